"""Appending: one transaction per batch, durable, hash-chained, snapshots where due, and
atomic under a fault at any statement of the transaction, the COMMIT included."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest

from adapters.canonical import ZERO_HASH, chain_hash
from adapters.sqlite_rows import Head, event_object, event_row, hashed_row, row_hash
from adapters.sqlite_store import FailAt, InvalidBatch, SqliteStore
from domain.errors import PersistenceFailed
from domain.events import SNAPSHOT_ACTIONS, SYSTEM_ACTOR
from domain.records import Ack, Batch, StoredAlready
from domain.state import render
from tests.adapters.store_support import (
    NORTH,
    SOUTH,
    Driver,
    bid,
    checkpoint,
    create,
    finalize,
    open_round,
    register,
    scenario,
    with_auto_checkpoints,
)

SECTION_6 = {
    "event_id", "seq", "bid_year", "area", "recorded_at", "action", "actor", "cause",
    "message_id", "message_digest", "detail", "before", "after", "snapshot", "prev_hash",
    "hash",
}  # fmt: skip


async def events_of(store: SqliteStore) -> list[dict[str, Any]]:
    return [event async for event in store.iter_events()]


def table_counts(db: Path) -> tuple[int, int, int]:
    """Events, snapshots, and idempotency records (events that carry a message id)."""
    with sqlite3.connect(db) as conn:
        return tuple(
            conn.execute(f"SELECT count(*) FROM {where}").fetchone()[0]
            for where in ("events", "snapshots", "events WHERE message_id IS NOT NULL")
        )


async def test_a_batch_survives_reopening(tmp_path: Path) -> None:
    db = tmp_path / "db.sqlite3"
    store = await SqliteStore.open(db)
    driver = Driver(store)
    await driver.run(*scenario())
    before = await events_of(store)
    head = await store.head()
    await store.close()

    again = await SqliteStore.open(db)
    assert await again.head() == head
    assert await events_of(again) == before
    assert [e["event_id"] for e in before] == list(range(1, 15))
    for key in (NORTH, SOUTH):
        assert await again.state_at(key) == driver.ledger.state(key)
    acks = await again.acks([e["message_id"] for e in before])
    assert len(acks) == 14
    assert acks[before[0]["message_id"]].event_id == 1
    await again.close()


@dataclass
class Created:
    """A store holding one committed create_area, with that event's message id."""

    db: Path
    store: SqliteStore
    driver: Driver
    head: Head
    message_id: str


async def created(tmp_path: Path) -> Created:
    db = tmp_path / "db.sqlite3"
    store = await SqliteStore.open(db)
    driver = Driver(store)
    await driver.run(create())
    message_id = driver.entries[0].event.message_id
    assert message_id is not None
    return Created(db, store, driver, await store.head(), message_id)


async def test_an_append_whose_fresh_ids_are_stored_writes_nothing(tmp_path: Path) -> None:
    one = await created(tmp_path)
    db, store, head = one.db, one.store, one.head
    stored = (await store.acks([one.message_id]))[one.message_id]
    batch = await one.driver.decide([register("AB"), register("CD")], step=None)
    fresh = (batch.acks[0].message_id, stored.message_id, batch.acks[1].message_id)
    with pytest.raises(StoredAlready) as raised:
        await store.append(Batch(batch.entries, batch.acks, fresh))
    assert raised.value.acks == {stored.message_id: stored}
    assert await store.head() == head
    assert table_counts(db) == (1, 0, 1)
    await store.append(Batch(batch.entries, batch.acks, fresh[::2]))
    assert (await store.head()).event_id == 3
    await store.close()


async def test_an_event_whose_message_id_is_stored_is_caught_by_the_unique_index(
    tmp_path: Path,
) -> None:
    # Ids the batch's events carry are not looked up before the insert: the unique index
    # refuses the stored one, and only then are the fresh ids looked up, after the
    # rollback, so an id inserted earlier in the same batch is not reported as stored.
    one = await created(tmp_path)
    db, store, head, stored_id = one.db, one.store, one.head, one.message_id
    stored = (await store.acks([stored_id]))[stored_id]
    again = msgspec.structs.replace(register("CD"), id=stored_id)
    batch = await one.driver.decide([register("AB"), again], step=None)
    fresh = tuple(ack.message_id for ack in batch.acks)
    assert fresh[1] == stored_id
    with pytest.raises(StoredAlready) as raised:
        await store.append(Batch(batch.entries, batch.acks, fresh))
    assert raised.value.acks == {stored_id: stored}
    assert await store.head() == head
    assert table_counts(db) == (1, 0, 1)
    await store.close()


async def test_an_integrity_error_with_no_stored_id_fails_the_append(tmp_path: Path) -> None:
    def refuse(index: int, statement: str) -> None:
        if index == 2:
            raise sqlite3.IntegrityError("injected constraint failure")

    db = tmp_path / "db.sqlite3"
    store = await SqliteStore.open(db, fault=refuse)
    driver = Driver(store)
    batch = await driver.decide([create(), register("AB")], step=None)
    fresh = tuple(ack.message_id for ack in batch.acks)
    with pytest.raises(PersistenceFailed, match="injected constraint failure"):
        await store.append(Batch(batch.entries, batch.acks, fresh))
    assert (await store.head()).event_id == 0
    assert table_counts(db) == (0, 0, 0)
    await store.close()


async def test_acks_hold_the_original_acknowledgement(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "db.sqlite3")
    driver = Driver(store)
    batch = await driver.decide([create(), register("AB")], step=None)
    await store.append(batch)
    found = await store.acks([ack.message_id for ack in batch.acks] + ["never-seen"])
    assert found == {ack.message_id: ack for ack in batch.acks}
    many = await store.acks([f"x-{n}" for n in range(1200)] + [batch.acks[1].message_id])
    assert list(many) == [batch.acks[1].message_id], "look-ups are chunked under SQLite's limit"
    assert await store.acks([]) == {}
    await store.close()


async def test_hash_chain_follows_the_protocol_formula(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "db.sqlite3")
    await Driver(store, checkpoint_every=3).run(*with_auto_checkpoints())
    prev = ZERO_HASH
    for event in await events_of(store):
        event.pop("state", None)
        assert set(event) == SECTION_6
        body = {k: v for k, v in event.items() if k != "hash"}
        text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        assert event["prev_hash"] == prev
        assert event["hash"] == hashlib.sha256(prev.encode() + text.encode()).hexdigest()
        prev = event["hash"]
    assert (await store.head()).hash == prev
    await store.close()


async def test_snapshots_are_stored_exactly_where_due(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "db.sqlite3")
    driver = Driver(store, checkpoint_every=3)
    await driver.run(*with_auto_checkpoints())
    events = await events_of(store)
    automatic = [e for e in events if e["actor"] == msgspec.to_builtins(SYSTEM_ACTOR)]
    assert automatic, "checkpoint_every=3 must have produced automatic checkpoints"
    for event in events:
        due = event["action"] in SNAPSHOT_ACTIONS
        assert event["snapshot"] is due
        assert ("state" in event) is due
    states = driver.states
    for event in events:
        if event["snapshot"]:
            assert event["state"] == render(states[event["event_id"]])
    assert (await store.verify())["snapshots"] == sum(e["snapshot"] for e in events)
    await store.close()


async def test_one_hop_to_the_database_thread_per_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await SqliteStore.open(tmp_path / "db.sqlite3")
    driver = Driver(store, checkpoint_every=2)
    batch = await driver.decide(with_auto_checkpoints(), step=None)
    hops: list[object] = []
    original: Callable[..., Awaitable[Any]] = store._db._execute

    async def counting(fn: Any, *args: Any) -> Any:
        hops.append(fn)
        return await original(fn, *args)

    monkeypatch.setattr(store._db, "_execute", counting)
    await store.append(batch)
    assert len(hops) == 1
    monkeypatch.undo()
    await store.close()


async def test_an_empty_batch_is_a_no_op(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "db.sqlite3")
    await store.append(Batch(()))
    assert (await store.head()).event_id == 0
    await store.close()


def _shifted(batch: Batch, at: int = 0, **changes: Any) -> Batch:
    entries = list(batch.entries)
    event = msgspec.structs.replace(entries[at].event, **changes)
    entries[at] = msgspec.structs.replace(entries[at], event=event)
    return Batch(tuple(entries), batch.acks)


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        (lambda b: _shifted(b, event_id=3), "does not follow"),
        (lambda b: _shifted(b, recorded_at="2026-11-25T19:00:00.000000Z"), "is before"),
        (lambda b: _shifted(b, recorded_at="2026-11-25 20:00:01Z"), "bad recorded_at"),
        (lambda b: _shifted(b, 1, recorded_at="9999-99-99 later"), "bad recorded_at"),
        (lambda b: Batch(b.entries, (Ack("zz", "d", 99, 1, "t"),)), "not in batch"),
        (lambda b: Batch(b.entries[1:], b.acks), "does not follow"),
    ],
)
async def test_a_batch_that_breaks_the_log_is_refused(
    tmp_path: Path, spoil: Any, message: str
) -> None:
    db = tmp_path / "db.sqlite3"
    store = await SqliteStore.open(db)
    driver = Driver(store)
    await driver.run(create())
    head = await store.head()
    batch = await driver.decide([register("AB"), register("CD")], step=None)
    with pytest.raises(InvalidBatch, match=message):
        await store.append(spoil(batch))
    assert await store.head() == head
    assert table_counts(db) == (1, 0, 1)
    await store.append(batch)
    assert (await store.head()).event_id == 3
    await store.close()


async def test_the_first_event_of_a_log_needs_a_well_formed_time(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "db.sqlite3")
    batch = await Driver(store).decide([create()], step=None)
    with pytest.raises(InvalidBatch, match="bad recorded_at"):
        await store.append(_shifted(batch, recorded_at=""))
    assert (await store.head()).event_id == 0
    await store.close()


async def test_a_constraint_failure_is_persistence_failed_and_changes_nothing(
    tmp_path: Path,
) -> None:
    one = await created(tmp_path)
    db, store, head, first = one.db, one.store, one.head, one.message_id
    batch = await one.driver.decide([register("AB")], step=None)
    # The idempotency key is unique (events_by_message): reusing one fails the insert.
    event = msgspec.structs.replace(batch.entries[0].event, message_id=first)
    ack = msgspec.structs.replace(batch.acks[0], message_id=first)
    clash = Batch((msgspec.structs.replace(batch.entries[0], event=event),), (ack,))
    with pytest.raises(PersistenceFailed) as caught:
        await store.append(clash)
    assert caught.value.details["retryable"] is True
    assert await store.head() == head
    assert table_counts(db) == (1, 0, 1)
    await store.append(batch)
    assert await store.verify() == {"events": 2, "snapshots": 0}
    await store.close()


def fault_batch_commands() -> list[Any]:
    """A batch with several events, a finalize and a checkpoint (snapshots), an automatic
    checkpoint (snapshot, no ack) and acks: every kind of statement an append runs."""
    return [
        bid("AB", 1, 4),
        register("GH"),
        finalize(1),
        checkpoint(SOUTH),
        open_round(2),
    ]


async def test_a_fault_at_any_statement_leaves_everything_unchanged(tmp_path: Path) -> None:
    base = tmp_path / "base.sqlite3"
    store = await SqliteStore.open(base)
    driver = Driver(store, checkpoint_every=4)
    await driver.run(*scenario()[:8])
    probe = await driver.decide(fault_batch_commands(), step=None)
    await store.close()
    rows = len(probe.entries), sum(e.event.snapshot for e in probe.entries), len(probe.acks)
    assert rows[1] >= 3 and rows[0] > rows[2], "batch must hold snapshots and an auto checkpoint"
    statements = rows[0] + rows[1] + 1  # every event and snapshot insert, then the COMMIT
    counter = FailAt(0)
    shutil.copyfile(base, tmp_path / "count.sqlite3")
    store = await SqliteStore.open(tmp_path / "count.sqlite3", fault=counter)
    await store.append(probe)
    await store.close()
    assert counter.seen == statements

    for index in range(1, statements + 1):
        db = tmp_path / f"fault-{index}.sqlite3"
        shutil.copyfile(base, db)
        fault = FailAt(index)
        store = await SqliteStore.open(db, fault=fault)
        head, counts = await store.head(), table_counts(db)
        states = [await store.state_at(key) for key in (NORTH, SOUTH)]
        with pytest.raises(PersistenceFailed, match=f"injected fault at statement {index}"):
            await store.append(probe)
        assert fault.fired == 1
        assert await store.head() == head
        assert table_counts(db) == counts
        assert await store.acks([a.message_id for a in probe.acks]) == {}
        assert [await store.state_at(key) for key in (NORTH, SOUTH)] == states
        await store.append(probe)  # the same batch goes through on retry, ids gap-free
        assert (await store.head()).event_id == head.event_id + rows[0]
        assert await store.verify() == {
            "events": head.event_id + rows[0],
            "snapshots": counts[1] + rows[1],
        }
        await store.close()


async def test_fault_hook_counts_statements_and_can_skip_appends(tmp_path: Path) -> None:
    fault = FailAt(2, skip=1)
    store = await SqliteStore.open(tmp_path / "db.sqlite3", fault=fault)
    driver = Driver(store)
    await driver.run(create(), register("AB"))  # 2 events + commit; skipped
    assert (fault.appends, fault.seen, fault.fired) == (1, 3, 0)
    with pytest.raises(PersistenceFailed):
        await driver.run(register("CD"))
    assert (fault.appends, fault.fired) == (2, 1)
    await driver.run(register("CD"))
    assert (await store.head()).event_id == 3
    await store.close()


async def test_stored_rows_equal_the_rows_built_from_the_hashed_object(tmp_path: Path) -> None:
    """``hashed_row`` (the fast path) and ``event_row(event_object)`` (import) agree."""
    store = await SqliteStore.open(tmp_path / "db.sqlite3")
    driver = Driver(store, checkpoint_every=3)
    await driver.run(*with_auto_checkpoints())
    await store.close()
    prev = ZERO_HASH
    for entry in driver.entries:
        row = hashed_row(entry.event, prev)
        obj = event_object(entry.event, prev)
        assert row == event_row(obj, chain_hash(prev, obj))
        assert row_hash(row) == row[16]  # the reads' quick check, from the stored texts
        prev = row[16]
