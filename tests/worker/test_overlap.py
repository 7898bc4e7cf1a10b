"""The applier over a writer process: one batch commits while the next is decided.

The next batch is decided on the ledger as if the one in flight had committed; when that
commit fails, the ledger goes back and the next batch is decided again. These tests put
the applier in exactly that position (two ``process`` calls, the first left in flight)
with faults injected in the writer process, and check the replies, the ledger and the
file agree.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import msgspec
import pytest

from adapters import codec
from adapters import sqlite_writer as writer_module
from adapters.clock import FixedClock
from adapters.sqlite_store import FailAt, SqliteStore
from adapters.sqlite_writer import ProcessStore
from domain.commands import BaseCommand
from domain.ledger import Ledger
from domain.records import Batch, OutcomeUnknown
from domain.state import render
from tests.wire import Msg, create_area, line, register
from tests.worker.harness import START, worker_on
from worker import applier as applier_module
from worker.applier import Applier, Outbox, Request
from worker.pipeline import Worker

pytestmark = pytest.mark.anyio


class Replies:
    """One connection's outbox, collecting replies as dicts."""

    def __init__(self) -> None:
        self.got: list[dict[str, Any]] = []
        self.outbox = Outbox(self._send)

    def _send(self, item: tuple[bytes, int]) -> None:
        data, _ = item
        self.got += [msgspec.json.decode(x) for x in data.splitlines()]

    def request(self, *messages: Msg) -> list[Request]:
        return [Request([line(m).rstrip(b"\n") for m in messages], self.outbox)]


@asynccontextmanager
async def applier_on(
    db: Path, fault: FailAt | None = None, *, writer: str = "process", **options: Any
) -> AsyncIterator[Applier]:
    """An applier over a writer process (or, ``writer="thread"``, the store's thread)."""
    store: ProcessStore | SqliteStore
    if writer == "process":
        store = await ProcessStore.open(str(db), fault=fault)
    else:
        store = await SqliteStore.open(str(db), fault=fault)
    try:
        yield Applier(store, Ledger(await store.recover()), FixedClock(START), **options)
    finally:
        await store.close()


async def stored_states(db: Path) -> dict[Any, Any]:
    store = await SqliteStore.open(str(db), writer=False)
    try:
        recovered = await store.recover()
        assert await store.verify()
    finally:
        await store.close()
    return {key: render(state) for key, state in recovered.scopes.items()}


async def test_a_batch_is_answered_only_once_its_commit_returns(tmp_path: Path) -> None:
    conn = Replies()
    async with applier_on(tmp_path / "b.sqlite3") as applier:
        await applier.process(conn.request(create_area(id="a1")))
        assert applier.busy and conn.got == []  # in flight: not acknowledged yet
        await applier.settle()
        assert not applier.busy
    assert [(r["id"], r["ok"], r["event_id"]) for r in conn.got] == [("a1", True, 1)]


async def test_a_failed_batch_in_flight_takes_back_the_next_batchs_decisions(
    tmp_path: Path,
) -> None:
    """The second batch was decided as if the first had committed (CD registered, so a
    second CD was refused); the first fails, so the second is decided again: CD is new."""
    db = tmp_path / "b.sqlite3"
    first, second = Replies(), Replies()
    async with applier_on(db, FailAt(1, skip=1)) as applier:
        await applier.process(first.request(create_area(id="a1")))
        await applier.settle()
        await applier.process(first.request(register("CD", id="r1")))  # will fail
        await applier.process(second.request(register("CD", id="r2")))
        await applier.settle()
        ledger = {key: render(state) for key, state in applier.ledger.scopes.items()}
        head = applier.ledger.head_event
    assert first.got[1]["id"] == "r1" and first.got[1]["error"]["code"] == "persistence_failed"
    assert (second.got[0]["id"], second.got[0]["ok"], second.got[0]["event_id"]) == ("r2", True, 2)
    assert head == 2
    assert ledger == await stored_states(db)
    assert [u["initials"] for u in ledger[(2026, "North")]["users"]] == ["CD"]


async def test_a_batch_in_flight_with_a_stored_id_is_decided_again(tmp_path: Path) -> None:
    """A new ``process`` call decides ids as new; the writer finds r1 stored, writes
    nothing, and the batch is decided again (id_reused), then the one after it (EF is
    new after all)."""
    db = tmp_path / "b.sqlite3"
    conn, other = Replies(), Replies()
    async with applier_on(db) as applier:
        await applier.process(conn.request(create_area(id="a1"), register("CD", id="r1")))
        await applier.settle()
        await applier.process(conn.request(register("EF", id="r1")))  # r1 used for CD
        await applier.process(other.request(register("EF", id="r2")))
        await applier.settle()
        ledger = {key: render(state) for key, state in applier.ledger.scopes.items()}
    assert conn.got[2]["error"]["code"] == "id_reused"
    assert (other.got[0]["ok"], other.got[0]["event_id"]) == (True, 3)
    assert ledger == await stored_states(db)
    assert [u["initials"] for u in ledger[(2026, "North")]["users"]] == ["CD", "EF"]


async def test_an_idle_writer_gets_the_first_lines_of_a_batch_at_once(tmp_path: Path) -> None:
    """With nothing in flight, ``send_at`` lines decided go to the writer while the rest
    are decided; their replies go out when the rest are sent."""
    conn = Replies()
    users = [register(initials, id=f"r{initials}") for initials in ("AB", "CD", "EF", "GH")]
    async with applier_on(tmp_path / "b.sqlite3", send_at=2) as applier:
        await applier.process(conn.request(create_area(id="a1"), *users))
        early = [r["id"] for r in conn.got]
        await applier.settle()
    assert early == ["a1", "rAB"]  # the first two, committed while the rest were decided
    assert [(r["id"], r["event_id"]) for r in conn.got[2:]] == [
        ("rCD", 3),
        ("rEF", 4),
        ("rGH", 5),
    ]


async def test_a_failed_early_send_takes_back_the_rest_of_the_batch(tmp_path: Path) -> None:
    db = tmp_path / "b.sqlite3"
    conn = Replies()
    async with applier_on(db, FailAt(1), send_at=2) as applier:
        await applier.process(
            conn.request(create_area(id="a1"), register("AB", id="r1"), register("CD", id="r2"))
        )
        await applier.settle()
        ledger = {key: render(state) for key, state in applier.ledger.scopes.items()}
    codes = [r["ok"] or r["error"]["code"] for r in conn.got]
    # r2 was decided on an area that the failed commit took back: refused, not stored.
    assert codes == ["persistence_failed", "persistence_failed", "unknown_area"]
    assert ledger == await stored_states(db) == {}


async def test_a_query_waits_for_the_batch_in_flight(tmp_path: Path) -> None:
    conn = Replies()
    async with applier_on(tmp_path / "b.sqlite3") as applier:
        await applier.process(conn.request(create_area(id="a1")))
        await applier.process(
            conn.request(
                register("CD", id="r1"),
                {"id": "q1", "type": "get_state", "bid_year": 2026, "area": "North"},
            )
        )
        await applier.settle()
    assert [r["id"] for r in conn.got] == ["a1", "r1", "q1"]
    assert [u["initials"] for u in conn.got[2]["result"]["users"]] == ["CD"]


async def test_a_lost_writer_process_leaves_the_outcome_unknown(tmp_path: Path) -> None:
    conn = Replies()
    store = await ProcessStore.open(str(tmp_path / "b.sqlite3"))
    try:
        applier = Applier(store, Ledger(await store.recover()), FixedClock(START))
        os.kill(store.writer_pid, signal.SIGKILL)
        # The send fails if the child is gone already (its socket closed), else the
        # answer never comes: unknown either way (a busy machine gives both).
        with pytest.raises(OutcomeUnknown, match=r"killed by signal 9.*may or may not be stored"):
            with anyio.fail_after(10):
                await applier.process(conn.request(create_area(id="a1")))
                await applier.settle()
    finally:
        await store.close()
    assert conn.got == []  # nothing acknowledged, nothing refused: unknown


async def test_a_repeat_of_a_line_sent_early_is_a_duplicate(tmp_path: Path) -> None:
    conn = Replies()
    async with applier_on(tmp_path / "b.sqlite3", send_at=2) as applier:
        same = register("AB", id="r1")
        await applier.process(conn.request(create_area(id="a1"), same, same))
        await applier.settle()
    assert [(r["id"], r["event_id"], r.get("duplicate")) for r in conn.got] == [
        ("a1", 1, None),
        ("r1", 2, None),
        ("r1", 2, True),
    ]


async def test_a_repeat_of_a_line_sent_early_that_failed_is_decided_again(
    tmp_path: Path,
) -> None:
    conn = Replies()
    async with applier_on(tmp_path / "b.sqlite3", FailAt(1, skip=1), send_at=1) as applier:
        await applier.process(conn.request(create_area(id="a1")))
        await applier.settle()
        same = register("AB", id="r1")
        await applier.process(conn.request(same, same))
        await applier.settle()
    codes = [r.get("duplicate") or r["ok"] or r["error"]["code"] for r in conn.got]
    # The first r1 failed; the second was a duplicate of it until then: now it is new.
    assert codes == [True, "persistence_failed", True]
    assert (conn.got[2]["event_id"], conn.got[2].get("duplicate")) == (2, None)


async def test_a_batch_that_cannot_be_encoded_is_refused_and_the_worker_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conn = Replies()
    async with applier_on(tmp_path / "b.sqlite3") as applier:
        with monkeypatch.context() as patched:
            patched.setattr(writer_module, "_encode", _fail_to_encode)
            await applier.process(conn.request(create_area(id="a1")))
        await applier.process(conn.request(create_area(id="a2")))
        await applier.settle()
    assert conn.got[0]["error"]["code"] == "persistence_failed"
    assert (conn.got[1]["ok"], conn.got[1]["event_id"]) == (True, 1)


def _fail_to_encode(obj: object) -> bytes:
    raise OverflowError("injected: cannot encode")


async def test_the_head_comes_from_the_file_not_from_the_last_answer(tmp_path: Path) -> None:
    """A writer killed after its COMMIT and before its answer: the worker's stop log must
    name the head the file has (a restart compares them)."""
    db = tmp_path / "b.sqlite3"
    store = await ProcessStore.open(str(db))
    try:
        applier = Applier(store, Ledger(await store.recover()), FixedClock(START))
        await applier.process(Replies().request(create_area(id="a1")))
        reader = await SqliteStore.open(str(db), writer=False)
        try:
            with anyio.fail_after(10):
                while (await reader.stored_head()).event_id == 0:  # noqa: ASYNC110 (the file)
                    await anyio.sleep(0.001)
        finally:
            await reader.close()
        os.kill(store.writer_pid, signal.SIGKILL)
        assert (await store.head()).event_id == 1
    finally:
        await store.close()


async def test_a_worker_stopped_with_a_batch_in_flight_settles_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The applier loop ends abnormally (here: the point where it lets the readers run
    raises) right after sending a batch: the batch is still settled on the way out."""
    db = tmp_path / "b.sqlite3"
    seen: list[Worker] = []
    original = anyio.lowlevel.checkpoint

    async def checkpoint() -> None:
        if seen and seen[0].applier.busy:
            raise RuntimeError("injected: the applier loop fails here")
        await original()

    monkeypatch.setattr(anyio.lowlevel, "checkpoint", checkpoint)  # as the pipeline calls it
    with pytest.raises(BaseExceptionGroup):
        async with worker_on(db, writer="process") as worker:
            seen.append(worker)
            async with await worker.connect() as stream:
                await stream.send(line(create_area(id="a1")))
                await anyio.sleep(5)
    assert not worker.applier.busy
    assert (await stored_states(db)).keys() == {(2026, "North")}


async def test_the_watcher_and_the_applier_can_wait_for_one_answer_together(
    tmp_path: Path,
) -> None:
    """The worker's watcher waits for the answer while the applier waits for the outcome;
    anyio allows one wait on a socket at a time, so the second waits for the first."""
    conn = Replies()
    async with applier_on(tmp_path / "b.sqlite3") as applier:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(applier.answered)  # waits for the batch to be sent
                await applier.process(conn.request(create_area(id="a1")))
                assert applier.busy
                await applier.settle()  # both wait on the child's answer
        assert applier.has_answer() is False and not applier.busy
    assert [r["id"] for r in conn.got] == ["a1"]


async def test_an_early_batch_that_finds_a_stored_id_teaches_the_rest_of_its_batch(
    tmp_path: Path,
) -> None:
    """x is stored (for AB). Sent early with x as new, the first part of the batch comes
    back StoredAlready; the rest, decided when x looked like the early part's, must not
    keep that ack: x is id_reused both times, with AB's event, never another's."""
    db = tmp_path / "b.sqlite3"
    conn = Replies()
    async with applier_on(db, send_at=2) as applier:
        await applier.process(conn.request(create_area(id="a1"), register("AB", id="x")))
        await applier.settle()
        reuse = register("EF", id="x")
        await applier.process(conn.request(reuse, register("CD", id="r2"), reuse))
        await applier.settle()
    answers = [(r["id"], r["ok"] or r["error"]["code"]) for r in conn.got[2:]]
    assert answers == [("x", "id_reused"), ("r2", True), ("x", "id_reused")]
    assert conn.got[2]["error"]["details"]["event_id"] == 2
    assert conn.got[4]["error"]["details"]["event_id"] == 2


async def test_a_batch_sent_whole_early_stays_in_flight(tmp_path: Path) -> None:
    """A batch of exactly ``send_at`` lines is sent early and nothing follows it: the
    applier returns with it in flight, free to decide other lines meanwhile."""
    conn = Replies()
    async with applier_on(tmp_path / "b.sqlite3", send_at=2) as applier:
        await applier.process(conn.request(create_area(id="a1"), register("AB", id="r1")))
        assert applier.busy and conn.got == []
        await applier.settle()
    assert [r["id"] for r in conn.got] == ["a1", "r1"]


class CountedBatches:
    """The sizes of the batches an applier sends to its writer process."""

    def __init__(self, applier: Applier) -> None:
        self.sizes: list[int] = []
        self._submit = applier.store.submit  # type: ignore[attr-defined]
        applier.store.submit = self._counted  # type: ignore[attr-defined]

    async def _counted(self, batch: Batch) -> None:
        self.sizes.append(len(batch.entries))
        await self._submit(batch)


async def test_lines_decided_during_a_commit_wait_open_and_go_as_one_batch(
    tmp_path: Path,
) -> None:
    """While a batch commits, ``process`` decides more lines and returns without waiting
    for it; a later call adds to them. Once the commit is answered, ``advance`` sends
    them all as the next batch."""
    conn = Replies()
    async with applier_on(tmp_path / "b.sqlite3") as applier:
        batches = CountedBatches(applier)
        users = (register("AB", id="r1"), register("CD", id="r2"))
        await applier.process(conn.request(create_area(id="a1"), *users))
        await applier.process(conn.request(register("EF", id="r3")))
        await applier.process(conn.request(register("GH", id="r4")))
        assert conn.got == [] and batches.sizes == [3]  # nothing waited for a1..r2
        await applier.advance()
        assert [r["id"] for r in conn.got] == ["a1", "r1", "r2"] and batches.sizes == [3, 2]
        await applier.settle()
        assert not applier.busy
    assert [(r["id"], r["event_id"]) for r in conn.got[3:]] == [("r3", 4), ("r4", 5)]


async def test_lines_decided_during_a_commit_stay_open_only_below_its_size(
    tmp_path: Path,
) -> None:
    """As many lines as the batch in flight holds: ``process`` waits for its commit and
    sends them, so batches keep their size."""
    conn = Replies()
    async with applier_on(tmp_path / "b.sqlite3") as applier:
        batches = CountedBatches(applier)
        await applier.process(conn.request(create_area(id="a1"), register("AB", id="r1")))
        await applier.process(conn.request(register("CD", id="r2"), register("EF", id="r3")))
        assert [r["id"] for r in conn.got] == ["a1", "r1"] and batches.sizes == [2, 2]
        await applier.settle()
    assert [(r["id"], r["event_id"]) for r in conn.got[2:]] == [("r2", 3), ("r3", 4)]


@pytest.mark.parametrize("bound", ["OPEN_LINES", "OPEN_BYTES"])
async def test_lines_decided_during_a_commit_stay_open_only_below_the_bounds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bound: str
) -> None:
    """Past OPEN_LINES lines, or OPEN_BYTES bytes read, ``process`` waits for the commit
    in flight and sends them (it holds them until their own commit)."""
    monkeypatch.setattr(applier_module, bound, 2)
    conn = Replies()
    users = [register(initials, id=f"r{initials}") for initials in ("AB", "CD", "EF")]
    async with applier_on(tmp_path / "b.sqlite3") as applier:
        await applier.process(conn.request(create_area(id="a1"), *users))  # 4 in flight
        requests = conn.request(register("GH", id="r5"), register("IJ", id="r6"))
        requests[0].size = 2
        await applier.process(requests)
        assert len(conn.got) == 4 and applier.busy  # the first four are answered
        await applier.settle()
    assert [(r["id"], r["event_id"]) for r in conn.got[4:]] == [("r5", 5), ("r6", 6)]


async def test_an_open_batch_grows_only_to_its_bounds_across_calls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A later call adds lines to the open batch only up to its bounds: there it waits
    for the commit in flight and sends it, and its other lines make a new batch. (They
    once all joined it: a batch could grow to OPEN_LINES plus a whole read.)"""
    monkeypatch.setattr(applier_module, "OPEN_LINES", 4)
    conn = Replies()
    first = [register(f"A{chr(65 + i)}", id=f"r{i}") for i in range(4)]
    later = [register(f"B{chr(65 + i)}", id=f"s{i}") for i in range(16)]
    async with applier_on(tmp_path / "b.sqlite3") as applier:
        batches = CountedBatches(applier)
        await applier.process(conn.request(create_area(id="a1"), *first))  # 5 in flight
        await applier.process(conn.request(*later[:3]))  # 3 stay open
        assert batches.sizes == [5]
        await applier.process(conn.request(*later[3:]))
        assert batches.sizes == [5, 4, 12]
        await applier.settle()
    assert [r["event_id"] for r in conn.got] == list(range(1, 22))


async def test_lines_that_join_an_open_batch_are_not_timed_before_they_came(
    tmp_path: Path,
) -> None:
    """An open batch's lines are decided when they come: each event's time is the
    clock's when its line was decided, never the time the batch opened."""
    conn = Replies()
    async with applier_on(tmp_path / "b.sqlite3") as applier:
        clock = applier.clock
        assert isinstance(clock, FixedClock)
        first = conn.request(create_area(id="a1"), register("AB", id="r1"), register("CD"))
        await applier.process(first)
        clock.advance(1)
        await applier.process(conn.request(register("EF", id="r3")))  # opens a batch
        clock.advance(1)
        await applier.process(conn.request(register("GH", id="r4")))  # joins it
        assert len(conn.got) == 0
        await applier.settle()
    times = {r["id"]: r["recorded_at"] for r in conn.got}
    assert times["a1"] == "2026-11-25T20:00:00.000000Z"
    assert times["r3"] == "2026-11-25T20:00:01.000000Z"
    assert times["r4"] == "2026-11-25T20:00:02.000000Z"


class Logged(Replies):
    """A connection's outbox that also logs its replies, with its number, in one list
    shared with other connections: the order they were delivered in."""

    def __init__(self, number: int, log: list[tuple[int, dict[str, Any]]]) -> None:
        super().__init__()
        self.number, self.log = number, log

    def _send(self, item: tuple[bytes, int]) -> None:
        before = len(self.got)
        super()._send(item)
        self.log += [(self.number, reply) for reply in self.got[before:]]


@pytest.mark.parametrize("seed", range(int(os.environ.get("SEEDS", "32"))))
@pytest.mark.parametrize("writer", ["process", "thread"])
async def test_random_interleavings_with_failed_commits_agree_with_the_file(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    seed: int,
    writer: str,
) -> None:
    """Random reads of two connections (new commands, repeats of an id with the same or
    another message, refusals), ``advance`` calls between them, small bounds for the
    open batch and early sends, and one to four commits failing at a random statement
    (SEEDS=N in the environment runs N seeds; 300 passed), over the writer process and
    over the store's own thread. Afterwards: only the injected faults failed a commit;
    one reply a line, in order; the ledger is the file; every event stored was
    acknowledged with its id and no other; every repeat names the first event of its
    id; and the stored commands, decided again in ``event_id`` order from nothing, are
    each accepted and rebuild the same states."""
    rng = random.Random(seed)
    monkeypatch.setattr(applier_module, "OPEN_LINES", rng.choice([2, 3, 1024]))
    db = tmp_path / "b.sqlite3"
    fault = FailAt(rng.randint(1, 3), skip=rng.randrange(4), times=rng.randint(1, 4))
    log: list[tuple[int, dict[str, Any]]] = []  # (connection, reply), as delivered
    conns = [Logged(0, log), Logged(1, log)]
    sent: list[list[Msg]] = [[], []]
    messages: dict[str, Msg] = {}  # the first message of each id
    initials = [a + b for a in "ABC" for b in "DEF"]
    send_at = rng.choice([1, 2, 3, 128])
    async with applier_on(db, fault, writer=writer, send_at=send_at) as applier:
        for _ in range(30):
            if rng.random() < 0.25:
                await applier.advance()
                continue
            at = rng.randrange(2)
            batch: list[Msg] = []
            for _ in range(rng.randint(1, 4)):
                if messages and rng.random() < 0.2:  # a repeat, perhaps of another message
                    old = rng.choice(list(messages)[-6:])  # recent: perhaps in flight
                    same = rng.random() < 0.7
                    message = messages[old] if same else register("ZZ", id=old)
                elif rng.random() < 0.15:
                    message = create_area(rng.choice(["North", "South"]))
                else:
                    area = rng.choice(["North", "North", "South"])
                    message = register(rng.choice(initials), area)
                messages.setdefault(message["id"], message)
                batch.append(message)
                sent[at].append(message)
            await applier.process(conns[at].request(*batch))
        await applier.settle()
        ledger = {key: render(state) for key, state in applier.ledger.scopes.items()}
    failures = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert all("injected fault" in failure for failure in failures), failures
    assert [[r["id"] for r in conn.got] for conn in conns] == [[m["id"] for m in s] for s in sent]
    assert ledger == await stored_states(db)
    acked: dict[str, int] = {}  # id -> event_id of its first acknowledgement
    stored_message: dict[str, Msg] = {}  # id -> the message acknowledged
    answered = [0, 0]
    for at, reply in log:
        message = sent[at][answered[at]]
        answered[at] += 1
        if not reply["ok"]:
            continue
        if reply["id"] in acked:
            assert reply["event_id"] == acked[reply["id"]] and reply.get("duplicate")
        else:
            assert not reply.get("duplicate")
            acked[reply["id"]], stored_message[reply["id"]] = reply["event_id"], message
    with contextlib.closing(sqlite3.connect(db)) as conn:
        stored = conn.execute("SELECT event_id, message_id FROM events ORDER BY event_id")
        rows = [(event_id, message_id) for event_id, message_id in stored]
    assert rows == sorted((event_id, message_id) for message_id, event_id in acked.items())
    rebuilt = Ledger()
    for event_id, message_id in rows:
        decoded = codec.decode(line(stored_message[message_id]).rstrip(b"\n"))
        draft = rebuilt.draft()
        command = decoded.message
        assert isinstance(command, BaseCommand)
        entries = draft.apply(command, now=START, digest=decoded.digest)
        assert entries[0].event.event_id == event_id
        rebuilt.commit(draft)
    assert {key: render(state) for key, state in rebuilt.scopes.items()} == ledger
