"""Commit failures through the whole pipeline (fault injection in the real store), and
proof that persistence changes nothing about what the core decides."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from adapters import codec
from adapters.sqlite_store import FailAt, SqliteStore
from domain.commands import BaseCommand, Rollback
from domain.errors import DomainError
from domain.ledger import Ledger
from domain.state import ScopeState, render
from tests.unit.builders import with_states
from tests.wire import bid, create_area, example_lines, get_state, msg, open_round, register
from tests.worker.harness import START, client_on

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["thread", "process"])
def writer(request: pytest.FixtureRequest) -> str:
    """Appends on aiosqlite's thread, or in a writer process (the fault injected there,
    where ``fault.fired`` cannot be seen: the replies show it)."""
    value: str = request.param
    return value


@pytest.mark.parametrize("statement", [1, 2])  # the event row (its ack), the COMMIT
async def test_failed_commit_answers_persistence_failed_and_moves_nothing(
    tmp_path: Path, statement: int, writer: str
) -> None:
    fault = FailAt(statement, skip=1)
    with anyio.fail_after(10):
        async with client_on(tmp_path / "b.sqlite3", fault=fault, writer=writer) as client:
            created = await client.ask_one(create_area())
            failed = await client.ask_one(register("AB", id="r1"))
            after_failure = await client.ask_one(get_state())
            retried = await client.ask_one(register("AB", id="r1"))
            later = await client.ask_one(get_state())
    assert created["ok"] and fault.fired == (writer == "thread")
    assert failed["error"]["code"] == "persistence_failed"
    assert failed["error"]["details"] == {"retryable": True}
    assert after_failure["result"]["users"] == [] and after_failure["result"]["seq"] == 1
    assert (retried["ok"], retried["event_id"], retried.get("duplicate")) == (True, 2, None)
    assert [u["initials"] for u in later["result"]["users"]] == ["AB"]


async def test_a_failed_id_check_of_a_batch_without_events_answers_persistence_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch whose commands the rules all refused still checks its ids (a refusal of a
    repeat would be wrong); if that lookup fails, they are answered persistence_failed."""

    async def failing(self: SqliteStore, ids: Any) -> Any:
        raise sqlite3.OperationalError("injected lookup failure")

    async with client_on(tmp_path / "b.sqlite3") as client:
        await client.ask_one(create_area())
        monkeypatch.setattr(SqliteStore, "acks", failing)
        refused = await client.ask(create_area(id="again"), b"{not json\n")
        monkeypatch.undo()
        retried = await client.ask_one(create_area(id="again"))
    assert refused[0]["error"]["code"] == "persistence_failed"
    assert refused[1]["error"]["code"] == "malformed_json"
    assert retried["error"]["code"] == "area_exists"


async def test_a_failed_batch_fails_every_command_in_it_and_nothing_else(
    tmp_path: Path, writer: str
) -> None:
    db = tmp_path / "b.sqlite3"
    fault = FailAt(1, skip=1, times=2)
    messages = [register(f"A{chr(65 + i)}") for i in range(26)]
    async with client_on(db, fault=fault, writer=writer) as client:
        await client.ask_one(create_area())
        replies = await client.ask(*messages)
        state = (await client.ask_one(get_state()))["result"]
        timeline = (await client.ask_one(msg("timeline", bid_year=2026, area="North")))["result"]
    stored = {r["id"] for r in replies if r["ok"]}
    refused = [r for r in replies if not r["ok"]]
    assert refused and all(r["error"]["code"] == "persistence_failed" for r in refused), [
        (r["id"], r["error"]["code"]) for r in refused if r["error"]["code"] != "persistence_failed"
    ]
    by_id = {m["id"]: m["initials"] for m in messages}
    assert sorted(u["initials"] for u in state["users"]) == sorted(by_id[i] for i in stored)
    ids = [e["event_id"] for e in timeline["events"]]
    assert ids == list(range(1, len(stored) + 2))  # gap-free despite failures


async def test_worker_keeps_serving_after_many_failures(tmp_path: Path, writer: str) -> None:
    fault = FailAt(1, times=5)
    async with client_on(tmp_path / "b.sqlite3", fault=fault, writer=writer) as client:
        first = [await client.ask_one(create_area(id="c1")) for _ in range(5)]
        finally_ok = await client.ask_one(create_area(id="c1"))
    assert all(r["error"]["code"] == "persistence_failed" for r in first)
    assert finally_ok["ok"] and finally_ok["event_id"] == 1


def _commands() -> list[dict[str, Any]]:
    lines = [msgspec.json.decode(x) for x in example_lines()]
    extra = [
        register("GH", area="South"),
        open_round(1, 2, area="South"),
        bid("EF", ["2026-03-01", "2026-03-02"], area="South"),
        bid("GH", ["2026-03-01"], area="South"),
        bid("EF", ["2026-03-05"], area="South"),
        msg("withdraw_bid", bid_year=2026, area="South", round=1, initials="GH"),
        msg("update_user", bid_year=2026, area="South", initials="EF", crew=None),
        msg("rollback", bid_year=2026, area="South", to_event=14),
        register("AB", area="South"),  # refused: duplicate across areas
    ]
    return [m for m in lines if m["type"] not in {"get_state", "timeline", "verify"}] + extra


async def test_worker_emits_what_the_pure_core_emits(tmp_path: Path, writer: str) -> None:
    commands = _commands()
    core_events, core_states = _run_core(commands)
    db = tmp_path / "b.sqlite3"
    async with client_on(db, writer=writer) as client:
        replies = await client.ask(*commands)
    store = await SqliteStore.open(str(db), writer=False)
    try:
        stored = [e async for e in store.iter_events()]
        states = {k: await store.state_at(k) for k in core_states}
    finally:
        await store.close()
    assert [r["ok"] for r in replies] == [True] * (len(commands) - 1) + [False]
    ignore = {"event_id", "recorded_at", "prev_hash", "hash", "state"}
    assert [{k: v for k, v in e.items() if k not in ignore} for e in stored] == core_events
    assert {k: render(s) for k, s in states.items() if s} == {
        k: render(s) for k, s in core_states.items()
    }


def _run_core(commands: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[Any, Any]]:
    """The same commands through the pure core alone, rollback targets found in memory."""
    ledger = Ledger()
    history: dict[int, ScopeState] = {}
    events: list[dict[str, Any]] = []

    for raw in commands:
        decoded = codec.decode(msgspec.json.encode(raw))
        command = decoded.message
        assert isinstance(command, BaseCommand)
        target = history.get(command.to_event) if isinstance(command, Rollback) else None
        if target is not None and target.key != (command.bid_year, command.area):
            target = None
        draft = ledger.draft()
        try:
            given = draft.apply(
                command,
                now=START,
                digest=decoded.digest,
                rollback_target=target,
            )
        except DomainError:
            continue
        entries = with_states(given, ledger.state)
        ledger.commit(draft)
        for entry in entries:
            history[entry.event.event_id] = entry.state
            data = msgspec.to_builtins(entry.event)
            events.append(msgspec.json.decode(codec.encode_json_line(data)))
    drop = {"event_id", "recorded_at"}
    return [{k: v for k, v in e.items() if k not in drop} for e in events], dict(ledger.scopes)


async def test_a_failed_batch_of_bids_leaves_the_round_deciding_as_before(
    tmp_path: Path, writer: str
) -> None:
    """Bids are decided on a mutable copy of the open round (domain.working) that takes
    the committed round's lookups: after a failed commit those must still say what is
    committed, or a full day would be handed out twice."""
    fault = FailAt(1, skip=5)  # the sixth append: the batch of two bids below
    setup = [create_area(), register("AB"), register("CD"), open_round(1, 1)]
    async with client_on(tmp_path / "b.sqlite3", fault=fault, writer=writer) as client:
        for message in [*setup, bid("AB", ["2026-07-01"])]:
            assert (await client.ask_one(message))["ok"]
        failed = await client.ask(bid("AB", ["2026-07-02"]), bid("CD", ["2026-07-01"]))
        again = await client.ask_one(bid("CD", ["2026-07-01"]))
        state = (await client.ask_one(get_state()))["result"]
    assert fault.fired == (writer == "thread")
    assert [r["error"]["code"] for r in failed] == ["persistence_failed"] * 2
    assert again["error"]["code"] == "day_full"
    assert state["rounds"][0]["bids"] == [{"initials": "AB", "days": ["2026-07-01"]}]
