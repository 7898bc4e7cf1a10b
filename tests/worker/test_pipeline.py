"""The pipeline end to end in-process: every error code, ordering, idempotency, restarts."""

from __future__ import annotations

import datetime as dt
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import msgspec
import pytest

from adapters import codec
from adapters.transports import TooLarge, memory_stream_pair
from tests.wire import (
    BIDDER,
    Msg,
    bid,
    create_area,
    example_lines,
    get_state,
    line,
    msg,
    open_round,
    register,
)
from tests.worker.harness import START, Client, client_on, worker_on
from worker.applier import Outbox, Request, _decode
from worker.pipeline import BATCH_BYTES, Connection, Window, _Feed

pytestmark = pytest.mark.anyio


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "bidlog.sqlite3"


def code(reply: dict[str, Any]) -> str:
    assert reply["ok"] is False, reply
    error: dict[str, Any] = reply["error"]
    return str(error["code"])


async def setup_north(client: Client) -> None:
    replies = await client.ask(create_area(), register("AB"), register("CD"), open_round())
    assert all(r["ok"] for r in replies), replies


async def test_example_session_runs_clean(db: Path) -> None:
    with anyio.fail_after(10):
        async with client_on(db) as client:
            lines = example_lines()
            replies = await client.ask(*lines)
    assert [r["ok"] for r in replies] == [True] * len(lines)
    assert [r["id"] for r in replies] == [f"m{i}" for i in range(1, 11)] + [
        "q1",
        "m11",
        "q2",
        "q3",
        "q4",
    ]
    q1, q2 = replies[10]["result"], replies[12]["result"]
    assert q1["rounds"][0]["status"] == "finalized"
    assert q2["rounds"][0]["status"] == "open"
    assert [b["initials"] for b in q2["rounds"][0]["bids"]] == ["AB", "CD"]
    assert replies[-1]["result"] == {"events": 11, "snapshots": 3}


async def test_ack_carries_event_id_seq_and_time(db: Path) -> None:
    async with client_on(db) as client:
        first, second = await client.ask(create_area("North"), create_area("South"))
    assert (first["event_id"], first["seq"]) == (1, 1)
    assert (second["event_id"], second["seq"]) == (2, 1)
    assert first["recorded_at"] == "2026-11-25T20:00:00.000000Z"
    assert "duplicate" not in first


class CountingClock:
    """Moves one millisecond per reading, and counts the readings."""

    def __init__(self) -> None:
        self.moment = START
        self.readings = 0

    def now(self) -> dt.datetime:
        self.readings += 1
        self.moment += dt.timedelta(milliseconds=1)
        return self.moment


async def test_the_commands_of_one_transaction_share_its_time(db: Path) -> None:
    clock = CountingClock()
    async with client_on(db, clock=clock) as client:
        together = await client.ask(create_area("North"), create_area("South"), create_area("East"))
        later = await client.ask_one(create_area("West"))
    times = {r["recorded_at"] for r in together}
    assert len(times) == 1, together  # one batch, one reading of the clock
    assert later["recorded_at"] > times.pop()
    assert clock.readings < 6  # not one reading per command


async def test_replies_follow_message_order_when_pipelined(db: Path) -> None:
    messages = [create_area()] + [register(f"A{chr(65 + i)}") for i in range(20)]
    messages += [get_state(id=f"q{i}") for i in range(3)]
    async with client_on(db) as client:
        replies = await client.ask(*messages)
    assert [r["id"] for r in replies] == [m["id"] for m in messages]
    assert len(replies[-1]["result"]["users"]) == 20


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"{not json\n", "malformed_json"),
        (b'{"id": "x", "type": "create_area", "name": "\xff"}\n', "malformed_json"),
        (b"[1, 2]\n", "invalid_message"),
        (b'{"type": "verify"}\n', "invalid_message"),
    ],
)
async def test_unusable_lines_get_an_error_with_null_id(
    db: Path, raw: bytes, expected: str
) -> None:
    async with client_on(db) as client:
        reply = await client.ask_one(raw)
    assert reply["id"] is None
    assert code(reply) == expected


async def test_line_over_one_mebibyte_is_refused_and_the_stream_goes_on(db: Path) -> None:
    huge = b'{"id": "big", "pad": "' + b"x" * (1 << 20) + b'"}\n'
    async with client_on(db) as client:
        big, after = await client.ask(huge, create_area())
    assert code(big) == "message_too_large"
    assert after["ok"] is True


async def test_a_line_the_codec_fails_on_costs_that_line_only(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in decoding (as the first deep-line scan had) answers that line `internal`;
    the applier, and every other line, go on."""
    decode = codec.decode

    def failing(line: bytes) -> codec.Decoded:
        if b"boom" in line:
            raise RuntimeError("a codec bug")
        return decode(line)

    monkeypatch.setattr(codec, "decode", failing)
    async with client_on(db) as client:
        before, broken, after = await client.ask(
            create_area(id="a1"), b'{"id":"boom"}\n', get_state(id="q1")
        )
    assert before["ok"] and after["ok"]
    assert (broken["id"], code(broken)) == (None, "internal")


async def test_blank_lines_get_no_reply(db: Path) -> None:
    async with client_on(db) as client:
        await client.send(b"\n   \n", create_area(id="a1"))
        (reply,) = await client.receive(1)
    assert reply["id"] == "a1"


async def test_schema_errors_name_the_field(db: Path) -> None:
    async with client_on(db) as client:
        year, unknown, kind = await client.ask(
            create_area(year=1999, id="y"),
            create_area(id="u", colour="red"),
            msg("launch_rocket", id="t"),
        )
    assert (year["id"], code(year), year["error"]["details"]["path"]) == (
        "y",
        "invalid_message",
        "$.bid_year",
    )
    assert (code(unknown), unknown["error"]["details"]["path"]) == ("invalid_message", "$.colour")
    assert (kind["id"], code(kind)) == ("t", "unknown_type")


async def test_bidder_may_only_bid_and_system_is_reserved(db: Path) -> None:
    async with client_on(db) as client:
        await setup_north(client)
        admin_cmd, system, ok = await client.ask(
            create_area("South", actor=BIDDER),
            create_area("East", actor={"id": "x", "role": "system"}),
            bid("AB", ["2026-07-01"]),
        )
    assert code(admin_cmd) == "unauthorized"
    assert code(system) == "unauthorized"
    assert ok["ok"] is True
    async with client_on(db) as client:
        query = await client.ask_one(get_state(actor={"id": "x", "role": "system"}))
    assert query["error"]["details"] == {"role": "system", "type": "get_state"}


async def test_every_domain_rule_through_the_pipeline(db: Path) -> None:
    async with client_on(db) as client:
        await setup_north(client)
        replies = await client.ask(
            create_area(),  # area_exists
            register("ZZ", area="Nowhere"),  # unknown_area
            register("AB"),  # duplicate_initials
            create_area("South"),
            register("CD", area="South"),  # duplicate_initials across areas
            open_round(2),  # round_already_open
            bid("QQ", ["2026-07-01"]),  # unknown_user
            bid("AB", ["2026-07-01"], number=2),  # round_not_open
            bid("AB", ["2026-07-01"]),
            bid("CD", ["2026-07-01"]),  # day_full (max 1)
            msg("withdraw_bid", bid_year=2026, area="North", round=1, initials="CD"),  # no_bid
            msg("finalize_round", bid_year=2026, area="North", round=1),
            open_round(3),  # round_out_of_order
            open_round(2, max_per_day=5),
            bid("AB", ["2026-07-01"], number=2),  # day_already_held
            msg("rollback", bid_year=2026, area="North", to_event=999),  # invalid target
            msg("rollback", bid_year=2026, area="North", to_event=0),  # no event 0
            msg("rollback", bid_year=2026, area="North", to_event=-1),
            create_area(expected_seq=0),  # version_conflict (seq of North is not 0)
        )
    codes = [r["error"]["code"] if not r["ok"] else "ok" for r in replies]
    assert codes == [
        "area_exists",
        "unknown_area",
        "duplicate_initials",
        "ok",
        "duplicate_initials",
        "round_already_open",
        "unknown_user",
        "round_not_open",
        "ok",
        "day_full",
        "no_bid",
        "ok",
        "round_out_of_order",
        "ok",
        "day_already_held",
        "invalid_rollback_target",
        "invalid_rollback_target",
        "invalid_rollback_target",
        "version_conflict",
    ]
    assert replies[4]["error"]["details"] == {"initials": "CD", "area": "North"}
    assert replies[9]["error"]["details"]["day"] == "2026-07-01"
    assert replies[-1]["error"]["details"]["seq"] == 7


async def test_rollback_conflict_when_initials_moved_to_another_area(db: Path) -> None:
    async with client_on(db) as client:
        await client.ask(create_area(), create_area("South"))
        reg = await client.ask_one(register("AB"))
        await client.ask(msg("checkpoint", bid_year=2026, area="North"))
        # AB leaves North (roll back to before the registration), joins South...
        back = await client.ask_one(msg("rollback", bid_year=2026, area="North", to_event=1))
        south = await client.ask_one(register("AB", area="South"))
        # ...so restoring North as of AB's registration now clashes.
        clash = await client.ask_one(
            msg("rollback", bid_year=2026, area="North", to_event=reg["event_id"])
        )
    assert back["ok"] and south["ok"]
    assert code(clash) == "rollback_conflict"
    assert clash["error"]["details"] == {"initials": "AB", "area": "South"}


async def test_duplicate_command_returns_the_original_ack(db: Path) -> None:
    first = create_area(id="same")
    async with client_on(db) as client:
        original = await client.ask_one(first)
        again, same_batch = await client.ask(first, first)
        reused = await client.ask_one(create_area("South", id="same"))
    assert again == {**original, "duplicate": True}
    assert same_batch == again
    assert code(reused) == "id_reused"


async def test_duplicates_hold_across_restarts(db: Path) -> None:
    lines = example_lines()
    async with client_on(db) as client:
        first = await client.ask(*lines)
    async with client_on(db) as client:
        second = await client.ask(*lines)
        areas = await client.ask_one(msg("list_areas"))
    for a, b in zip(first, second, strict=True):
        if "event_id" in a:
            assert b == {**a, "duplicate": True}
    assert [x["head_event"] for x in areas["result"]["areas"]] == [11, 5]


async def test_one_batch_mixing_stored_and_new_commands(db: Path) -> None:
    """The ids are checked in the transaction: a batch holding repeats of stored commands
    writes nothing at first, is decided again knowing them, and then commits the rest."""
    async with client_on(db) as client:
        stored = await client.ask(create_area(id="a1"), register("AB", id="r1"))
    async with client_on(db) as client:
        replies = await client.ask(
            register("AB", id="r1"),  # repeat: would now be duplicate_initials
            register("CD", id="r2"),  # new
            create_area(id="a1"),  # repeat: would now be area_exists
            register("AB", id="r3"),  # new, refused
            register("CD", id="r2"),  # repeat within the batch
        )
        areas = await client.ask_one(msg("list_areas"))
    assert replies[0] == {**stored[1], "duplicate": True}
    assert replies[1]["ok"] and replies[1]["event_id"] == 3, "ids stay gap-free"
    assert replies[2] == {**stored[0], "duplicate": True}
    assert code(replies[3]) == "duplicate_initials"
    assert replies[4] == {**replies[1], "duplicate": True}
    assert areas["result"]["areas"][0]["head_event"] == 3


async def test_a_batch_of_repeats_only_writes_nothing(db: Path) -> None:
    async with client_on(db) as client:
        stored = await client.ask(create_area(id="a1"), register("AB", id="r1"))
    async with client_on(db) as client:
        replies = await client.ask(create_area(id="a1"), register("AB", id="r1"))
        areas = await client.ask_one(msg("list_areas"))
    assert replies == [{**r, "duplicate": True} for r in stored]
    assert areas["result"]["areas"][0]["head_event"] == 2


async def test_failed_commands_are_not_remembered(db: Path) -> None:
    async with client_on(db) as client:
        early = await client.ask_one(register("AB", id="r1"))
        await client.ask_one(create_area())
        retried = await client.ask_one(register("AB", id="r1"))
    assert code(early) == "unknown_area"
    assert retried["ok"] is True


async def test_queries_see_commands_sent_before_them(db: Path) -> None:
    async with client_on(db) as client:
        replies = await client.ask(
            create_area(),
            get_state(),
            register("AB"),
            get_state(),
            msg("timeline", bid_year=2026, area="North"),
            msg("list_areas"),
            msg("list_areas", bid_year=2027),
        )
    assert replies[1]["result"]["seq"] == 1
    assert [u["initials"] for u in replies[3]["result"]["users"]] == ["AB"]
    assert [e["action"] for e in replies[4]["result"]["events"]] == ["create_area", "register_user"]
    assert replies[4]["result"]["next_after"] is None
    assert replies[5]["result"]["areas"] == [
        {"bid_year": 2026, "area": "North", "seq": 2, "head_event": 2}
    ]
    assert replies[6]["result"]["areas"] == []


async def test_point_in_time_queries(db: Path) -> None:
    async with client_on(db) as client:
        await client.ask(create_area(), register("AB"), register("CD"))
        at2, missing, both = await client.ask(
            get_state(at_event=2),
            get_state("South", at_event=3),
            get_state(at_event=2, at_time="2026-11-25T20:00:00Z"),
        )
        at_time = await client.ask_one(get_state(at_time="2026-11-25T20:00:00Z"))
        before = await client.ask_one(get_state(at_time="2020-01-01T00:00:00Z"))
        # Every event is at 20:00:00.000000: a time half a microsecond before is not
        # rounded up to it; a date that does not exist is refused.
        just_before = await client.ask_one(get_state(at_time="2026-11-25T19:59:59.9999995Z"))
        no_day = await client.ask_one(get_state(at_time="2026-02-30T00:00:00Z"))
    assert code(just_before) == "not_found"
    assert code(no_day) == "invalid_message" and no_day["error"]["details"]["path"] == "$.at_time"
    assert [u["initials"] for u in at2["result"]["users"]] == ["AB"]
    assert code(missing) == "not_found"
    assert code(both) == "invalid_message"
    assert at_time["result"]["head_event"] == 3
    assert code(before) == "not_found"


async def test_a_state_of_an_unknown_scope_says_it_does_not_exist(db: Path) -> None:
    """Asked for now, the scope does not exist; asked for a point, it had no event by
    then (it may have later)."""
    async with client_on(db) as client:
        await client.ask(create_area())
        now, early = await client.ask(get_state("South"), get_state(at_event=0))
    assert now["error"]["message"] == "area 2026/South does not exist"
    assert early["error"]["message"] == "area 2026/North had no event by that point"
    assert code(now) == code(early) == "not_found"


async def test_timeline_of_unknown_scope_is_not_found(db: Path) -> None:
    async with client_on(db) as client:
        reply = await client.ask_one(msg("timeline", bid_year=2026, area="Nope"))
    assert code(reply) == "not_found"


async def clients_at_once(
    db: Path, feeds: list[list[Msg]], **worker_options: Any
) -> tuple[list[list[dict[str, Any]]], dict[str, Any]]:
    """North created, then one client per feed sending all of it pipelined, at once:
    each client's replies, and North's state after."""
    results: dict[int, list[dict[str, Any]]] = {}

    async def feed(n: int, client: Client) -> None:
        results[n] = await client.ask(*feeds[n])

    with anyio.fail_after(30):
        async with worker_on(db, **worker_options) as worker:
            clients = [Client(await worker.connect()) for _ in feeds]
            await clients[0].ask_one(create_area())
            async with anyio.create_task_group() as tg:
                for n, client in enumerate(clients):
                    tg.start_soon(feed, n, client)
            state = await clients[0].ask_one(get_state())
            for client in clients:
                await client.stream.aclose()
    return [results[n] for n in range(len(feeds))], state


async def test_several_clients_pipelining_at_once(db: Path) -> None:
    feeds = [
        [register(f"{chr(65 + n)}{chr(65 + i)}", id=f"c{n}-{i}") for i in range(20)]
        for n in range(4)
    ]
    results, state = await clients_at_once(db, feeds)
    for n, replies in enumerate(results):
        assert [r["id"] for r in replies] == [f"c{n}-{i}" for i in range(20)]
        assert all(r["ok"] for r in replies)
    assert len(state["result"]["users"]) == 80


@pytest.mark.parametrize("turn", [0.0, 0.005])
async def test_a_client_pipelining_queries_does_not_hold_up_the_others(
    db: Path, turn: float
) -> None:
    """Connections take turns, and a batch stops after a read once its turn is used up:
    a command sent while another client's 300 queries are being answered is committed
    after a few of them, not after all (each timeline tells whether it ran after)."""
    with anyio.fail_after(30):
        async with (
            worker_on(db, turn=turn) as worker,
            await worker.connect() as heavy_stream,
            await worker.connect() as other_stream,
        ):
            heavy, other = Client(heavy_stream), Client(other_stream)
            await setup_north(other)
            timelines = [
                msg("timeline", id=f"q{i}", bid_year=2026, area="North") for i in range(300)
            ]
            await heavy.send(*timelines)
            answers = await heavy.receive(1)  # its queries are being answered
            assert (await other.ask_one(register("EF")))["ok"]
            answers += await heavy.receive(299)
    before = [a for a in answers if len(a["result"]["events"]) == 4]  # set-up only
    assert [a["id"] for a in answers] == [f"q{i}" for i in range(300)]
    assert 1 <= len(before) < 100


async def test_the_connection_whose_read_ended_a_batch_goes_to_the_back(db: Path) -> None:
    """With a turn of 0 every read ends its batch. A has ten queries waiting and B one
    command, gathered into one batch [A, B, A] (max_batch 3): B must come right after
    A's first query (the first version put A back in front, so B came after q1)."""
    answered: list[str] = []

    def connection(name: str) -> tuple[_Feed, Outbox]:
        def send(item: tuple[bytes, int]) -> None:
            data, count = item
            answered.extend(f"{name}:{msgspec.json.decode(x)['id']}" for x in data.splitlines())
            conn.window.release(count)

        conn = Connection(Window(10_000), send, limit=1 << 30, patience=10)
        return _Feed(conn), Outbox(conn.deliver, conn.full)

    def frames(*messages: Msg) -> list[bytes | TooLarge]:
        return [line(m).rstrip(b"\n") for m in messages]

    async with worker_on(db, turn=0, max_batch=3) as worker:
        (a, to_a), (b, to_b) = connection("A"), connection("B")
        await worker._push(frames(create_area(), register("AB")), to_b, b.conn.window, b, 0)
        with anyio.fail_after(10):
            while len(answered) < 2:  # noqa: ASYNC110
                await anyio.sleep(0.01)
        answered.clear()
        await worker._push(frames(get_state(id="q0")), to_a, a.conn.window, a, 100)
        await worker._push(frames(register("EF", id="cmd")), to_b, b.conn.window, b, 100)
        for i in range(1, 10, 3):  # chunks of three: too many to join the waiting one
            queries = [get_state(id=f"q{j}") for j in range(i, i + 3)]
            await worker._push(frames(*queries), to_a, a.conn.window, a, 300)
        with anyio.fail_after(10):
            while len(answered) < 11:  # noqa: ASYNC110
                await anyio.sleep(0.01)
    assert answered[:2] == ["A:q0", "B:cmd"]
    assert answered[2:] == [f"A:q{i}" for i in range(1, 10)]
    assert (a.size, b.size) == (0, 0)  # bytes waiting: all taken, none counted twice


async def test_a_batch_cut_short_after_a_read_hands_back_the_rest_in_order(db: Path) -> None:
    """With a turn of 0 every read ends its batch: the lines after it (commands and reads,
    of its own chunk and of other connections' chunks taken in the same batch) go back to
    the front of their queues, and each is still answered once, in order."""

    def mixed(client: int) -> list[Msg]:
        out: list[Msg] = []
        for i in range(40):
            initials = f"{chr(65 + client)}{chr(65 + i % 26)}" if i < 26 else None
            if initials is not None:
                out.append(register(initials, id=f"c{client}-r{i}"))
            out.append(msg("timeline", id=f"c{client}-t{i}", bid_year=2026, area="North"))
        return out

    results, state = await clients_at_once(db, [mixed(n) for n in range(3)], turn=0)
    for n, replies in enumerate(results):
        assert [r["id"] for r in replies] == [m["id"] for m in mixed(n)]
        assert all(r["ok"] for r in replies)
    assert len(state["result"]["users"]) == 3 * 26
    assert state["result"]["seq"] == 1 + 3 * 26  # each command applied exactly once


async def _drain(stream: anyio.abc.ByteStream) -> int:
    """Read until the worker closes the stream; the number of reply lines."""
    lines = 0
    while True:
        try:
            lines += (await stream.receive()).count(b"\n")
        except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
            return lines


async def test_a_client_that_takes_no_replies_to_its_queries_is_dropped(
    db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Query replies can be megabytes: the worker holds at most about ``max_unwritten``
    bytes of them for a connection, and drops one that takes none for ``patience``.
    Its queries wait out of turn meanwhile: another client is answered at once."""
    async with (
        worker_on(db, max_unwritten=4096, patience=0.3) as worker,
        await worker.connect() as stream,
        await worker.connect() as silent,
    ):
        other = Client(stream)
        await setup_north(other)
        await silent.send(b"".join(line(get_state()) for _ in range(2000)))
        with anyio.fail_after(20):
            assert (await other.ask_one(register("EF")))["ok"]
            assert worker.dropped == 0  # not waiting for the silent client to be dropped
            while not worker.dropped:  # noqa: ASYNC110 (the worker has no event for it)
                await anyio.sleep(0.05)
            answered = await _drain(silent)  # what was written, then the close
        assert answered < 2000
    assert "closing a connection: it took none of its replies for 0.3 s" in caplog.text


async def test_a_client_that_sends_everything_before_reading_is_dropped_not_hung(
    db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Small replies fill the window of lines before the bytes limit: the worker stopped
    reading, the client could not finish sending, and both waited for good (fifth
    audit: 5 minutes, until the client was killed). Now it is dropped after patience."""
    async with (
        worker_on(db, in_flight=16, patience=0.3) as worker,
        await worker.connect() as stream,
        await worker.connect() as sender,
    ):
        other = Client(stream)

        async def send_all() -> None:
            with pytest.raises((anyio.BrokenResourceError, anyio.ClosedResourceError)):
                for n in range(100_000):
                    await sender.send(line(msg("list_areas", id=f"q-{n}")))

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(send_all)
                while not worker.dropped:  # noqa: ASYNC110 (the worker has no event for it)
                    await anyio.sleep(0.05)
                assert (await other.ask_one(msg("list_areas")))["ok"]  # others served
    assert "closing a connection: it took none of its replies for 0.3 s" in caplog.text


class SlowReader(anyio.abc.ByteStream):
    """The worker's end of a connection whose client reads ``rate`` bytes a second,
    steadily: a send returns when the client has read all of it."""

    def __init__(self, inner: anyio.abc.ByteStream, rate: float) -> None:
        self.inner, self.rate = inner, rate

    async def send(self, item: bytes) -> None:
        await anyio.sleep(len(item) / self.rate)
        await self.inner.send(item)

    async def receive(self, max_bytes: int = 65536) -> bytes:
        return await self.inner.receive(max_bytes)

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_a_client_reading_slowly_but_steadily_is_not_dropped(db: Path) -> None:
    """Replies that pile up are written as one; progress was counted only once all of
    it was written, so a client reading 250 KB/s was dropped as one that "took none of
    its replies" while it was taking them (review). It is counted in slices now."""
    users = [f"{a}{b}" for a in "ABCD" for b in "ABCDE"]
    async with worker_on(db, max_unwritten=1 << 20, patience=0.5) as worker:
        client_end, server_end = memory_stream_pair()
        worker.task_group.start_soon(worker.serve, SlowReader(server_end, rate=2_000_000))
        client = Client(client_end)
        assert all(r["ok"] for r in await client.ask(create_area(), *map(register, users)))
        with anyio.fail_after(30):
            replies = await client.ask(*[get_state() for _ in range(800)])  # about 4 MB
        assert all(r["ok"] for r in replies)
        assert worker.dropped == 0
        await client_end.aclose()


async def test_a_slow_reader_of_large_replies_does_not_hold_up_the_others(db: Path) -> None:
    """A client that pauses before reading its query replies (for less than the
    patience) is not dropped, and meanwhile the applier serves everyone else: its
    queries wait out of turn, the applier does not wait for it."""
    taken = 0

    async def read_after_a_pause(stream: anyio.abc.ByteStream) -> None:
        nonlocal taken
        await anyio.sleep(1.0)
        while True:
            try:
                taken += (await stream.receive()).count(b"\n")
            except anyio.EndOfStream:
                return

    with anyio.fail_after(60):
        async with worker_on(db, max_unwritten=4096, patience=5) as worker:
            other = Client(await worker.connect())
            await setup_north(other)
            slow = await worker.connect()
            async with anyio.create_task_group() as tg:
                await slow.send(b"".join(line(get_state()) for _ in range(500)))
                tg.start_soon(read_after_a_pause, slow)
                for n in range(20):
                    reply = await other.ask_one(register(f"Z{chr(65 + n)}"))
                    assert reply["ok"] and taken == 0  # answered while the slow one waits
                await slow.send_eof()
            await slow.aclose()
            await other.stream.aclose()
        assert taken == 500 and worker.dropped == 0


async def test_a_silent_client_writing_a_line_at_a_time_does_not_fill_the_inbox(
    db: Path,
) -> None:
    """Each write of a client is a chunk; one that writes its queries a line at a time and
    reads nothing would have filled the inbox's 256 chunk slots while parked, and every
    other reader would have waited for it to be dropped. Its lines now join the chunk
    already waiting: another client is answered while it is still connected."""
    async with worker_on(db, max_unwritten=4096, patience=30) as worker:
        other = Client(await worker.connect())
        await setup_north(other)
        silent = await worker.connect()
        with anyio.fail_after(20):
            for i in range(600):
                await silent.send(line(get_state(id=f"q{i}")))
                await anyio.lowlevel.checkpoint()  # one read, one chunk
            assert (await other.ask_one(register("EF")))["ok"]
        assert worker.dropped == 0
        await silent.aclose()
        await other.stream.aclose()


async def test_lines_read_while_the_window_is_full_are_handed_over_when_stopping(
    db: Path,
) -> None:
    """A reader that has read a chunk and waits for its connection's window when the
    worker stops (or drops the connection) still hands the chunk over: lines read are
    committed and answered, never lost between the socket and the applier."""
    async with worker_on(db) as worker:
        window = Window(1)
        window.used = 1  # full: the next chunk waits
        feed = _Feed(Connection(window, lambda _: None, limit=1 << 20, patience=1))
        outbox = Outbox(lambda _: None)
        frames: list[bytes | TooLarge] = [line(create_area())]
        with anyio.CancelScope() as scope:
            worker.task_group.start_soon(_cancel_soon, scope)
            await worker._push(frames, outbox, window, feed, 0)
        assert scope.cancelled_caught
        assert window.used == 2  # counted, to be released when its reply is written
        with anyio.fail_after(10):
            while worker.applier.ledger.state((2026, "North")) is None:  # noqa: ASYNC110
                await anyio.sleep(0.01)  # the applier commits it


async def _cancel_soon(scope: anyio.CancelScope) -> None:
    await anyio.sleep(0.05)
    scope.cancel()


async def test_a_connection_waiting_holds_a_bounded_number_of_bytes_read(db: Path) -> None:
    """The window counts lines, and a line can be 1 MiB: a client that reads no replies
    (so its queries wait) and sends large lines used to be read on, 2,048 lines of them
    (the audit grew the worker to 829 MB with one). Now the worker stops reading from a
    connection whose waiting lines hold ``max_waiting`` bytes: its sends back up."""
    cause = {"id": "c", "description": "d" * 10_000}
    big = line(get_state(cause=cause))  # a query of 10 KB
    sent = 0
    async with worker_on(db, max_unwritten=4096, max_waiting=256 << 10, patience=30) as worker:
        other = Client(await worker.connect())
        await setup_north(other)
        stream = await worker.connect()
        await stream.send(b"".join(line(get_state()) for _ in range(100)))  # fills it up
        with anyio.move_on_after(5):
            for _ in range(1000):  # 10 MB, one line a write
                await stream.send(big)
                sent += 1
        await stream.aclose()
        await other.stream.aclose()
    # What was answered before its replies backed up, about 256 KiB waiting, and what
    # the stream buffers (64 writes): a few hundred (270 here), not all 1,000.
    assert 20 <= sent < 600


async def test_a_batch_holds_about_batch_bytes_of_lines_and_failures_hold_none(
    db: Path,
) -> None:
    """A batch keeps its lines until it commits: 512 lines of 1 MiB would be 512 MiB
    (the audit's worker reached 618 MB). Batches now stop at about BATCH_BYTES, and a
    refused line's failure drops its traceback, which held the line."""
    big = b'{"id":"x","type":"verify","pad":"' + b"p" * (1 << 20) + b'"}'
    failure = _decode(big)
    assert isinstance(failure, codec.DecodeFailure) and failure.__traceback__ is None
    async with worker_on(db) as worker:
        conn = Connection(Window(10_000), lambda _: None, limit=1 << 30, patience=10)
        feed, outbox = _Feed(conn), Outbox(conn.deliver)
        for _ in range(12):  # 12 MiB in chunks of 1 MiB, none joined past BATCH_BYTES
            feed.chunks.append(Request([big], outbox, len(big)))
        worker._ring.append(feed)
        feed.queued = True
        worker._chunks.used += 12  # as _push would have counted them
        requests, _ = worker._gather()
    assert BATCH_BYTES <= sum(r.size for r in requests) < BATCH_BYTES + len(big) + 1
    assert len(requests) < 12


async def test_stopping_gives_a_client_that_takes_no_replies_only_patience(db: Path) -> None:
    with anyio.fail_after(20):
        async with worker_on(db, patience=0.3) as worker:
            async with await worker.connect() as stream:
                await setup_north(Client(stream))
            silent = await worker.connect()
            await silent.send(b"".join(line(get_state(at_event=1)) for _ in range(3000)))
            await anyio.sleep(0.3)  # it reads, answers, and the replies pile up
        # Leaving the block stopped the worker while the client, still connected, read
        # nothing; it gets what was written, then the close.
        assert worker.dropped == 1
        assert 0 < await _drain(silent) < 3000
        await silent.aclose()


async def test_a_stop_ends_in_bounded_time_however_steadily_a_client_reads(
    db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Steady slow readers were waited for as long as they kept reading: four of them
    at 200 KB/s kept a stopping worker 102 s, past a service manager's SIGKILL
    (review). ``stop_grace`` after the stop, a connection still taking is dropped."""
    users = [f"{a}{b}" for a in "ABCD" for b in "ABCDE"]
    with anyio.fail_after(20):
        async with worker_on(db, patience=0.5, stop_grace=1.0) as worker:
            client_end, server_end = memory_stream_pair()
            worker.task_group.start_soon(worker.serve, SlowReader(server_end, rate=200_000))
            client = Client(client_end)
            assert all(r["ok"] for r in await client.ask(create_area(), *map(register, users)))
            await client.send(*[get_state() for _ in range(300)])  # about 1.5 MB: 7 s
            await client.receive(1)
            started = anyio.current_time()
        # Leaving the block stopped the worker: it took about stop_grace, not 7 s.
        assert anyio.current_time() - started < 4
        assert worker.dropped == 1
    assert "still taking its replies 1 s into the stop" in caplog.text
    await client_end.aclose()


async def test_stdout_is_waited_for_at_the_end_of_input_however_long_it_pauses(
    db: Path,
) -> None:
    """``serve < FILE | less``: the input ends while the pager pauses; stdin's writer is
    not stdout's reader, so the pause is waited for (it dropped the replies after the
    patience and exited 1: review). Only a stop ends the wait (see above)."""
    async with worker_on(db, patience=0.2) as worker:
        client_end, server_end = memory_stream_pair(max_buffer=0)  # a send waits for a read
        worker.task_group.start_soon(partial(worker.serve, server_end, one_peer=False))
        lines = [line(get_state(id=f"q{n}")) for n in range(2000)]
        await client_end.send(b"".join(lines))
        await client_end.send_eof()
        await anyio.sleep(1.0)  # five patiences without reading a byte
        with anyio.fail_after(20):
            answered = await _drain(client_end)
        assert (answered, worker.dropped) == (2000, 0)
        await client_end.aclose()


async def test_stopping_waits_for_a_client_that_is_still_taking_its_replies(db: Path) -> None:
    taken = 0

    async def read_slowly(stream: anyio.abc.ByteStream) -> None:
        nonlocal taken
        while True:
            try:
                taken += (await stream.receive()).count(b"\n")
            except anyio.EndOfStream:
                return
            await anyio.sleep(0.01)  # slow, but never 0.3 s without taking some

    async with anyio.create_task_group() as tg:
        async with worker_on(db, patience=0.3) as worker:
            async with await worker.connect() as stream:
                await setup_north(Client(stream))
            slow = await worker.connect()
            await slow.send(b"".join(line(get_state(at_event=1)) for _ in range(3000)))
            await anyio.sleep(0.3)  # replies pile up: the client has read nothing yet
            tg.start_soon(read_slowly, slow)
        # The stop let it take its replies to every line read (whole 64 KiB reads, as
        # many as fit the window of 2,048 lines).
        assert worker.dropped == 0
    assert taken > 1000
    await slow.aclose()
