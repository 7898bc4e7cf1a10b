"""Reads: state now, at an event, at a time (snapshot + deltas), rollback end to end,
timeline pages, areas, recovery and export, identical after close and reopen."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from adapters import sqlite_store
from adapters.sqlite_store import SqliteStore
from domain.errors import IntegrityError
from domain.records import Recovered
from domain.state import ScopeKey, render
from tests.adapters.store_support import (
    NORTH,
    SOUTH,
    START,
    Driver,
    checkpoint,
    create,
    register,
    scenario,
    tamper,
    with_auto_checkpoints,
)

OTHER_YEAR: ScopeKey = (2025, "Zulu")
NEVER: ScopeKey = (2026, "Nowhere")


@asynccontextmanager
async def scenario_store(
    db: Path, *, checkpoint_every: int = 1000
) -> AsyncIterator[tuple[SqliteStore, Driver]]:
    """The scenario in two batches; with automatic checkpoints, its variant."""
    store = await SqliteStore.open(db)
    try:
        driver = Driver(store, checkpoint_every=checkpoint_every)
        commands = scenario() if checkpoint_every == 1000 else with_auto_checkpoints()
        await driver.run(*commands[:6])
        await driver.run(*commands[6:])
        yield store, driver
    finally:
        await store.close()


async def all_points(store: SqliteStore, driver: Driver) -> dict[tuple[ScopeKey, int], object]:
    """The store's state of every scope at every event, checked against memory."""
    head = (await store.head()).event_id
    seen: dict[tuple[ScopeKey, int], object] = {}
    for key in (NORTH, SOUTH, NEVER):
        for n in range(head + 2):
            found = await store.state_at(key, at_event=n)
            assert found == driver.expected(key, n), (key, n)
            seen[key, n] = found
        assert await store.state_at(key) == driver.ledger.state(key)
    return seen


async def test_state_at_every_event_matches_memory_and_survives_reopen(tmp_path: Path) -> None:
    db = tmp_path / "db.sqlite3"
    async with scenario_store(db) as (store, driver):
        before = await all_points(store, driver)
    again = await SqliteStore.open(db)
    try:
        assert await all_points(again, driver) == before
    finally:
        await again.close()


async def test_state_at_a_time_is_the_scopes_last_event_by_then(tmp_path: Path) -> None:
    async with scenario_store(tmp_path / "db.sqlite3") as (store, driver):
        for entry in driver.entries:
            moment = dt.datetime.fromisoformat(entry.event.recorded_at.replace("Z", "+00:00"))
            for key in (NORTH, SOUTH):
                expected = driver.expected(key, entry.event.event_id)
                assert await store.state_at(key, at_time=moment) == expected
                later = moment + dt.timedelta(microseconds=500)
                assert await store.state_at(key, at_time=later) == expected
        assert await store.state_at(NORTH, at_time=START) is None
        local = START.astimezone(dt.timezone(dt.timedelta(hours=-5))) + dt.timedelta(hours=1)
        assert await store.state_at(NORTH, at_time=local) == driver.ledger.state(NORTH)
        # Times whose UTC form leaves the calendar: after, or before, every event.
        far = dt.datetime(9999, 12, 31, 23, 59, tzinfo=dt.timezone(-dt.timedelta(hours=1)))
        assert await store.state_at(NORTH, at_time=far) == driver.ledger.state(NORTH)
        first = dt.datetime(1, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=1)))
        assert await store.state_at(NORTH, at_time=first) is None
        with pytest.raises(ValueError, match="time zone"):
            await store.state_at(NORTH, at_time=dt.datetime(2026, 11, 26))
        with pytest.raises(ValueError, match="not both"):
            await store.state_at(NORTH, at_event=3, at_time=START)


async def test_rollback_end_to_end(tmp_path: Path) -> None:
    async with scenario_store(tmp_path / "db.sqlite3") as (store, _):
        target = await store.event_state(NORTH, 7)
        now = await store.state_at(NORTH, at_event=13)  # the rollback to event 7
        assert target is not None and now is not None
        assert (now.users, now.rounds) == (target.users, target.rounds)
        assert [r.round for r in now.rounds] == [1]
        before = await store.state_at(NORTH, at_event=12)
        assert before is not None and [r.round for r in before.rounds] == [1, 2]
        assert (now.seq, now.head_event) == (10, 13)


async def test_event_state_only_for_an_event_of_the_scope(tmp_path: Path) -> None:
    async with scenario_store(tmp_path / "db.sqlite3") as (store, driver):
        assert await store.event_state(NORTH, 6) == driver.expected(NORTH, 6)
        assert await store.event_state(NORTH, 3) is None  # South's event
        assert await store.event_state(SOUTH, 3) == driver.expected(SOUTH, 3)
        assert await store.event_state(NORTH, 99) is None
        assert await store.event_state(NEVER, 1) is None


async def test_reads_replay_from_the_snapshot_before_the_newest(tmp_path: Path) -> None:
    """Spoil North's event 2 (before its snapshots at 9 and two checkpoints after): reads
    of now still work, which they could not if they replayed from the beginning; a read
    that does replay event 2 says which event is bad."""
    db = tmp_path / "db.sqlite3"
    async with scenario_store(db) as (store, driver):
        await driver.run(checkpoint(label="one"))
        await driver.run(checkpoint(label="two"))
        expected = driver.ledger.state(NORTH)
    tamper(db, "UPDATE events SET after = '{\"nonsense\": 1}' WHERE event_id = 2")
    store = await SqliteStore.open(db)
    try:
        assert await store.state_at(NORTH) == expected
        with pytest.raises(IntegrityError, match="event 2 does not replay") as caught:
            await store.state_at(NORTH, at_event=9)
        assert caught.value.details == {"event_id": 2}
    finally:
        await store.close()


async def test_a_snapshot_altered_behind_the_stores_back_is_never_served(
    tmp_path: Path,
) -> None:
    db = tmp_path / "db.sqlite3"
    async with scenario_store(db) as (store, driver):
        await driver.run(checkpoint(label="one"))
        newest = driver.entries[-1].event.event_id
        good = driver.ledger.state(NORTH)
    assert good is not None and good.users
    name = good.users[0].name
    tamper(
        db,
        f"UPDATE snapshots SET state = replace(state, '{name}', 'Forged') "
        f"WHERE event_id = {newest}",
    )
    store = await SqliteStore.open(db)
    try:
        for read in (store.recover(), store.state_at(NORTH), store.event_state(NORTH, newest)):
            with pytest.raises(IntegrityError, match=f"snapshot of event {newest} differs"):
                await read
        tamper(db, f"UPDATE snapshots SET state = '{{' WHERE event_id = {newest}")
        with pytest.raises(IntegrityError, match=f"snapshot of event {newest} cannot be decoded"):
            await store.state_at(NORTH)
        assert await store.state_at(NORTH, at_event=newest - 1) == driver.expected(
            NORTH, newest - 1
        )
    finally:
        await store.close()


async def test_an_event_after_the_newest_snapshot_is_checked_against_its_hash(
    tmp_path: Path,
) -> None:
    """No snapshot vouches for the events after the newest one: a reader, recovery and a
    rollback's target check each one's hash, so a changed event is never built upon."""
    db = tmp_path / "db.sqlite3"
    async with scenario_store(db) as (_, driver):
        await driver.run(register("ZZ"))
        changed = driver.entries[-1].event.event_id
        before = driver.expected(NORTH, changed - 1)
    tamper(db, f"UPDATE events SET after = replace(after, 'ZZ', 'ZY') WHERE event_id = {changed}")
    reader = await SqliteStore.open(db, writer=False)
    writer = await SqliteStore.open(db)
    try:
        for read in (reader.state_at(NORTH), writer.recover(), writer.event_state(NORTH, changed)):
            with pytest.raises(IntegrityError, match=f"event {changed} does not match its hash"):
                await read
        assert await reader.state_at(NORTH, at_event=changed - 1) == before
        # A REAL in an INTEGER column, which the quick check's %d would truncate.
        restore = "UPDATE events SET after = replace(after, 'ZY', 'ZZ') WHERE event_id = "
        tamper(db, f"{restore}{changed}")
        assert await reader.state_at(NORTH) is not None  # as it was: reads again
        tamper(db, f"UPDATE events SET seq = seq + 0.5 WHERE event_id = {changed}")
        with pytest.raises(IntegrityError, match=f"event {changed} does not match its hash"):
            await reader.state_at(NORTH)
    finally:
        await reader.close()
        await writer.close()


async def test_an_event_only_re_spaced_behind_the_stores_back_still_reads(
    tmp_path: Path,
) -> None:
    """The quick hash check works on the stored texts; an event whose JSON was only
    re-spaced (the same values) hashes the same by the protocol's formula, as verify
    finds: reads do not refuse it either."""
    db = tmp_path / "db.sqlite3"
    async with scenario_store(db) as (_, driver):
        await driver.run(register("ZZ"))
        changed = driver.entries[-1].event.event_id
        expected = driver.ledger.state(NORTH)
    tamper(db, f"UPDATE events SET actor = replace(actor, ',', ', ') WHERE event_id = {changed}")
    reader = await SqliteStore.open(db, writer=False)
    try:
        assert await reader.state_at(NORTH) == expected
        assert (await reader.verify())["events"] == changed
    finally:
        await reader.close()


async def test_timeline_pages(tmp_path: Path) -> None:
    async with scenario_store(tmp_path / "db.sqlite3") as (store, driver):
        north = [e.event.event_id for e in driver.entries if e.event.scope == NORTH]
        pages: list[list[int]] = []
        after = 0
        while True:
            page = await store.timeline(NORTH, after_event=after, limit=4)
            assert page is not None
            events, next_after = page
            pages.append([e["event_id"] for e in events])
            if next_after is None:
                break
            assert next_after == events[-1]["event_id"]
            after = next_after
        assert pages == [north[0:4], north[4:8], north[8:11]]
        whole = await store.timeline(NORTH, limit=11)
        assert whole is not None and whole[1] is None and len(whole[0]) == 11
        assert await store.timeline(NORTH, after_event=14) == ([], None)
        assert await store.timeline(NEVER) is None
        rolled = [e for e in whole[0] if e["action"] == "rollback"]
        assert rolled[0]["detail"] == {"to_event": 7} and "state" not in rolled[0]
        with pytest.raises(ValueError, match="limit"):
            await store.timeline(NORTH, limit=0)


async def test_list_areas_sorted_by_year_then_area(tmp_path: Path) -> None:
    async with scenario_store(tmp_path / "db.sqlite3") as (store, driver):
        await driver.run(create(OTHER_YEAR), create((2026, "Alpha")), create((2026, "alpha")))
        areas = await store.list_areas()
        assert [(a["bid_year"], a["area"]) for a in areas] == [
            OTHER_YEAR,
            (2026, "Alpha"),
            NORTH,
            SOUTH,
            (2026, "alpha"),
        ]
        assert areas[2] == {"bid_year": 2026, "area": "North", "seq": 11, "head_event": 14}
        assert [a["area"] for a in await store.list_areas(2025)] == ["Zulu"]
        assert await store.list_areas(2030) == []


async def test_recover_rebuilds_every_scope_from_its_newest_snapshot(tmp_path: Path) -> None:
    db = tmp_path / "db.sqlite3"
    async with scenario_store(db, checkpoint_every=3) as (store, driver):
        await driver.run(register("ZZ", SOUTH), checkpoint(SOUTH), register("YY", SOUTH))
        ledger = driver.ledger
    store = await SqliteStore.open(db)
    try:
        found = await store.recover()
    finally:
        await store.close()
    assert found.scopes == ledger.scopes
    assert found.since_snapshot == ledger.since_snapshot
    assert found.since_snapshot[SOUTH] == 1
    assert (found.head_event, found.last_recorded_at) == (
        ledger.head_event,
        ledger.last_recorded_at,
    )


async def test_recover_of_an_empty_database(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "db.sqlite3")
    try:
        assert await store.recover() == Recovered()
        assert await store.list_areas() == []
        assert await store.state_at(NORTH) is None
    finally:
        await store.close()


async def test_iter_events_streams_everything_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_store, "EXPORT_CHUNK", 4)
    async with scenario_store(tmp_path / "db.sqlite3") as (store, driver):
        events = [event async for event in store.iter_events()]
        assert [e["event_id"] for e in events] == list(range(1, 15))
        for event, entry in zip(events, driver.entries, strict=True):
            assert ("state" in event) is entry.event.snapshot
            if entry.event.snapshot:
                assert entry.state is not None
                assert event["state"] == render(entry.state)
        tail = [event async for event in store.iter_events(after_event=10)]
        assert tail == events[10:]
        for upto in (0, 3, 4, 5, 8, 14, 99):  # an export stops at the head it began with
            assert [e async for e in store.iter_events(upto=upto)] == events[:upto]
        assert [e async for e in store.iter_events(after_event=2, upto=9)] == events[2:9]
        timeline = await store.timeline(SOUTH)
        assert timeline is not None
        south = [e for e in events if e["area"] == "South"]
        assert [{k: v for k, v in e.items() if k != "state"} for e in south] == timeline[0]


async def test_a_snapshot_found_sound_is_read_from_directly_afterwards(tmp_path: Path) -> None:
    """The check costs a second snapshot interval once per snapshot, not on every read."""
    db = tmp_path / "db.sqlite3"
    async with scenario_store(db) as (store, driver):
        await driver.run(checkpoint(label="one"))
        newest = driver.entries[-1].event.event_id
        expected = driver.ledger.state(NORTH)
    store = await SqliteStore.open(db)
    try:
        assert await store.state_at(NORTH) == expected  # checks the snapshot at `newest`
        # An event before that snapshot, spoiled now, is no longer read from there on.
        tamper(db, "UPDATE events SET after = '{\"nonsense\": 1}' WHERE event_id = 14")
        assert await store.state_at(NORTH) == expected
        assert await store.state_at(NORTH, at_event=newest) == expected
        fresh = await SqliteStore.open(db, writer=False)  # a store that checked nothing yet
        try:
            with pytest.raises(IntegrityError, match="event 14 does not replay"):
                await fresh.state_at(NORTH)
        finally:
            await fresh.close()
    finally:
        await store.close()
