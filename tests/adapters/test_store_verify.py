"""``verify``: a clean log checks out; every kind of tampering (done the only way it can
be: dropping the triggers first) is caught and names the first bad event."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from adapters import sqlite_verify
from adapters.canonical import chain_hash
from adapters.sqlite_rows import EVENT_COLUMNS, event_dict
from adapters.sqlite_store import SqliteStore
from domain.errors import IntegrityError
from tests.adapters.store_support import Driver, scenario, tamper, with_auto_checkpoints

CLEAN = {"events": 14, "snapshots": 3}


async def build(db: Path) -> None:
    store = await SqliteStore.open(db)
    try:
        await Driver(store).run(*scenario())
    finally:
        await store.close()


def rehash_from(db: Path, first: int) -> None:
    """What a careful forger does: recompute every hash from ``first`` to the head."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            f"SELECT {EVENT_COLUMNS} FROM events WHERE event_id >= ? ORDER BY event_id", (first,)
        ).fetchall()
        (prev,) = conn.execute(
            "SELECT hash FROM events WHERE event_id = ?", (first - 1,)
        ).fetchone()
        for row in rows:
            obj = event_dict(row)
            del obj["hash"]
            obj["prev_hash"] = prev
            prev = chain_hash(prev, obj)
            conn.execute(
                "UPDATE events SET prev_hash = ?, hash = ? WHERE event_id = ?",
                (obj["prev_hash"], prev, row[0]),
            )


async def forged(
    tmp_path: Path, first: int, *statements: str
) -> pytest.ExceptionInfo[IntegrityError]:
    """Build the scenario's log, change it with ``statements`` and re-hash the chain from
    event ``first`` on, as a careful forger would; what ``verify`` raises on it."""
    db = tmp_path / "db.sqlite3"
    await build(db)
    tamper(db, *statements)
    rehash_from(db, first)
    with pytest.raises(IntegrityError) as caught:
        await verify(db)
    return caught


async def verify(db: Path, *, writer: bool = True) -> dict[str, int]:
    store = await SqliteStore.open(db, writer=writer)
    try:
        return await store.verify()
    finally:
        await store.close()


@pytest.mark.parametrize("writer", [True, False])
async def test_a_clean_log_checks_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writer: bool
) -> None:
    db = tmp_path / "db.sqlite3"
    await build(db)
    assert await verify(db, writer=writer) == CLEAN
    monkeypatch.setattr(sqlite_verify, "CHUNK", 3)
    assert await verify(db, writer=writer) == CLEAN


async def test_an_empty_log_checks_out(tmp_path: Path) -> None:
    assert await verify(tmp_path / "db.sqlite3") == {"events": 0, "snapshots": 0}


@pytest.mark.parametrize(
    ("statements", "bad", "message"),
    [
        (["UPDATE events SET detail = '{\"x\":1}' WHERE event_id = 5"], 5, "hash chain"),
        (["UPDATE events SET recorded_at = '2027-01-01T00:00:00.000000Z' WHERE event_id = 5"], 5,
         "hash chain"),
        (["UPDATE events SET hash = prev_hash WHERE event_id = 14"], 14, "hash chain"),
        (["DELETE FROM events WHERE event_id = 6"], 6, "event 6 is missing"),
        (["UPDATE snapshots SET state = replace(state, '\"finalized\"', '\"open\"') "
          "WHERE event_id = 9"], 9, "differs from replay"),
        (["UPDATE snapshots SET state = 'not json' WHERE event_id = 10"], 10, "differs"),
        (["DELETE FROM snapshots WHERE event_id = 13"], 13, "snapshot of event 13 is missing"),
        (["INSERT INTO snapshots SELECT 5, bid_year, area, state FROM snapshots "
          "WHERE event_id = 9"], 5, "has a snapshot but is not"),
        (["UPDATE snapshots SET area = 'South' WHERE event_id = 9"], 9, "snapshot does not"),
        # the idempotency record is the event row itself, so the chain covers it
        (["UPDATE events SET message_digest = 'forged' WHERE event_id = 4"], 4, "hash chain"),
        (["UPDATE events SET message_id = 'ghost' WHERE event_id = 4"], 4, "hash chain"),
        (["UPDATE events SET schema_version = 99 WHERE event_id = 6"], 6, "schema_version 99"),
    ],
)  # fmt: skip
async def test_tampering_is_caught_at_the_first_bad_event(
    tmp_path: Path, statements: list[str], bad: int, message: str
) -> None:
    db = tmp_path / "db.sqlite3"
    await build(db)
    tamper(db, *statements)
    with pytest.raises(IntegrityError, match=message) as caught:
        await verify(db)
    assert caught.value.details == {"event_id": bad}
    assert caught.value.code == "integrity_error"


async def test_a_rehashed_forgery_is_caught_by_the_next_snapshot(tmp_path: Path) -> None:
    caught = await forged(
        tmp_path,
        7,
        "UPDATE events SET after = replace(after, '2026-07-03', '2026-07-04') WHERE event_id = 7",
    )
    assert caught.match("snapshot of event 9 differs")
    assert caught.value.details == {"event_id": 9}


async def test_a_delta_that_does_not_replay_is_caught(tmp_path: Path) -> None:
    caught = await forged(
        tmp_path, 2, "UPDATE events SET after = '{\"nonsense\":1}' WHERE event_id = 2"
    )
    assert caught.match("event 2 does not replay")
    assert caught.value.details == {"event_id": 2}


@pytest.mark.parametrize(
    ("statement", "message"),
    [
        ("""UPDATE events SET actor = '{"id":"bidlog","role":"system"}' WHERE event_id = 2""",
         "role system sends no messages"),
        ("""UPDATE events SET actor = '{"id":"u-1","role":"bidder"}' WHERE event_id = 2""",
         "role bidder may not send register_user"),
        ("UPDATE events SET message_id = NULL, message_digest = NULL WHERE event_id = 2",
         "only bidlog's automatic checkpoints have no message"),
        ("UPDATE events SET message_digest = NULL WHERE event_id = 2",
         "both present or both null"),
        ("UPDATE events SET message_digest = 'zz' WHERE event_id = 2",
         "message_digest is not 64 lowercase hex digits"),
        ("UPDATE events SET action = 'frobnicate' WHERE event_id = 2",
         "unknown action 'frobnicate'"),
        ("UPDATE events SET bid_year = 1999 WHERE event_id = 2",
         "bid_year 1999 is outside 2000-2100"),
        # Only rollbacks, finalized rounds and checkpoints are snapshots (the fifth audit
        # added a snapshot row too: verify passed it, import refused its export).
        ("UPDATE events SET snapshot = 1 WHERE event_id = 2",
         "wrong snapshot flag for register_user"),
        # Later than event 1 as text, but not a time the store writes (fifth audit:
        # verify passed it, import refused it; reads of the past compare these texts).
        ("UPDATE events SET recorded_at = '2027-01-01T00:00:00.000000+00:00' "
         "WHERE event_id = 2", "event 2: recorded_at '2027-01-01T00:00:00.000000.00:00' is not"),
        # ``detail`` holds only what decide puts there.
        ("""UPDATE events SET detail = '{"zzz":1}' WHERE event_id = 2""",
         "detail of a register_user holds 'zzz'"),
    ],
)  # fmt: skip
async def test_a_rehashed_event_nobody_could_have_sent_is_caught(
    tmp_path: Path, statement: str, message: str
) -> None:
    """A forger who re-hashes the chain passes every hash; the role rules still tell."""
    caught = await forged(tmp_path, 2, statement)
    assert caught.match(message)
    assert caught.value.details == {"event_id": 2}


@pytest.mark.parametrize(
    ("detail", "where", "fault"),
    [
        ('{"automatic":true}', "message_id IS NULL", None),  # as stored before 08:25 UTC
        ('{"automatic":1}', "message_id IS NULL", "detail of a checkpoint holds 'automatic'"),
        ('{"automatic":true}', "message_id IS NOT NULL AND action = 'checkpoint'",
         "detail of a checkpoint holds 'automatic'"),
    ],
)  # fmt: skip
async def test_automatic_checkpoints_of_older_databases_still_verify(
    tmp_path: Path, detail: str, where: str, fault: str | None
) -> None:
    """Until 2026-11-26 08:25 UTC bidlog wrote automatic checkpoints with detail
    {"automatic": true}; the hash covers it, so such databases must go on verifying
    (the review of the detail check found them refused). Only there, and only that."""
    db = tmp_path / "db.sqlite3"
    store = await SqliteStore.open(db)
    try:
        await Driver(store, checkpoint_every=3).run(*with_auto_checkpoints())
    finally:
        await store.close()
    tamper(db, f"UPDATE events SET detail = '{detail}' WHERE {where}")
    with sqlite3.connect(db) as conn:
        (first,) = conn.execute(f"SELECT min(event_id) FROM events WHERE {where}").fetchone()
    conn.close()
    rehash_from(db, first)
    if fault is None:
        assert (await verify(db))["events"] > 0
    else:
        with pytest.raises(IntegrityError, match=fault):
            await verify(db)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("snapshot = 0", "wrong snapshot flag for checkpoint"),
        ("""detail = '{"label":"x","to_event":1}'""", "detail of a checkpoint holds 'to_event'"),
        ("""detail = '{"label":7}'""", "label must be text of at most 100 characters"),
        (f"""detail = '{{"label":"{"x" * 101}"}}'""", "label must be text of at most 100"),
    ],
)
async def test_a_rehashed_checkpoint_nobody_could_have_sent_is_caught(
    tmp_path: Path, change: str, message: str
) -> None:
    caught = await forged(tmp_path, 10, f"UPDATE events SET {change} WHERE event_id = 10")
    assert caught.match(message)
    assert caught.value.details == {"event_id": 10}


@pytest.mark.parametrize(
    ("detail", "message"),
    [
        ('{"to_event":3}', "rollback to event 3, which is not an event of its scope"),
        ('{"to_event":13}', "a rollback's to_event must be an earlier event"),
        ('{"to_event":"7"}', "a rollback's to_event must be an earlier event"),
    ],
)
async def test_a_rehashed_rollback_to_an_event_it_could_not_target_is_caught(
    tmp_path: Path, detail: str, message: str
) -> None:
    # Event 13 is North's rollback to event 7.
    caught = await forged(
        tmp_path, 13, f"UPDATE events SET detail = '{detail}' WHERE event_id = 13"
    )
    assert caught.match(message)
    assert caught.value.details == {"event_id": 13}


async def test_a_rehashed_rollback_restoring_a_state_the_scope_never_had_is_caught(
    tmp_path: Path,
) -> None:
    """The forger changes the restored state and its snapshot alike: every hash and the
    snapshot check pass; the state at the rollback's target still tells."""
    caught = await forged(
        tmp_path,
        13,
        "UPDATE events SET after = json_set(after, '$.users[0].name', 'Forged') "
        "WHERE event_id = 13",
        "UPDATE snapshots SET state = json_set(state, '$.users[0].name', 'Forged') "
        "WHERE event_id = 13",
    )
    assert caught.match("not the scope's at event 7")
    assert caught.value.details == {"event_id": 13}


@pytest.mark.parametrize(
    ("event_id", "statement"),
    [
        (6, "UPDATE events SET before = "
            """'{"bid":{"days":["2026-07-09"],"initials":"AB"},"round":1}' WHERE event_id = 6"""),
         # AB had no bid in round 1 before
        (9, """UPDATE events SET before = '{"round":1,"status":"finalized"}' WHERE event_id = 9"""),
        (13, "UPDATE events SET before = json_set(before, '$.users[0].name', 'Forged') "
             "WHERE event_id = 13"),  # the state the rollback replaced
    ],
)  # fmt: skip
async def test_a_rehashed_event_whose_before_is_untrue_is_caught(
    tmp_path: Path, event_id: int, statement: str
) -> None:
    """Replay reads only ``after``: a changed ``before`` passes every hash and snapshot
    once re-hashed, but it is no longer what the scope held."""
    caught = await forged(tmp_path, event_id, statement)
    assert caught.match("its `before` is not what its scope held")
    assert caught.value.details == {"event_id": event_id}


@pytest.mark.parametrize("before", ["[1]", '"text"', '{"round":1,"bid":[1]}'])
async def test_a_rehashed_delta_of_the_wrong_shape_is_an_integrity_error(
    tmp_path: Path, before: str
) -> None:
    # Event 14 is a withdraw_bid.
    caught = await forged(
        tmp_path, 14, f"UPDATE events SET before = '{before}' WHERE event_id = 14"
    )
    assert caught.match("event 14")
    assert caught.value.details == {"event_id": 14}


async def test_a_damaged_index_is_caught_though_every_event_checks_out(tmp_path: Path) -> None:
    db = tmp_path / "db.sqlite3"
    await build(db)
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        (root,) = conn.execute(
            "SELECT rootpage FROM sqlite_schema WHERE name = 'events_by_message'"
        ).fetchone()
        (size,) = conn.execute("PRAGMA page_size").fetchone()
    conn.close()
    with db.open("r+b") as file:  # the idempotency index's page, zeroed
        file.seek((root - 1) * size)
        file.write(bytes(size))
    with pytest.raises(IntegrityError, match="the database file is damaged") as caught:
        await verify(db, writer=False)
    assert caught.value.details == {"event_id": 0}


async def test_the_writer_notices_a_truncated_head(tmp_path: Path) -> None:
    """Only the writer knows what it committed; a reader cannot tell a cut-off tail."""
    db = tmp_path / "db.sqlite3"
    await build(db)
    store = await SqliteStore.open(db)
    try:
        tamper(db, "DELETE FROM events WHERE event_id = 14")
        with pytest.raises(IntegrityError, match="event 14 is missing") as caught:
            await store.verify()
        assert caught.value.details == {"event_id": 14}
        reader = await SqliteStore.open(db, writer=False)
        assert await reader.verify() == {"events": 13, "snapshots": 3}
        await reader.close()
    finally:
        await store.close()


async def test_check_tail_catches_a_changed_recent_event_and_passes_a_clean_log(
    tmp_path: Path,
) -> None:
    db = tmp_path / "db.sqlite3"
    await build(db)
    store = await SqliteStore.open(db, writer=False)
    try:
        await store.check_tail(5)
        tamper(db, 'UPDATE events SET cause = \'{"id":"x"}\' WHERE event_id = 12')
        with pytest.raises(IntegrityError, match="failed at event 12") as caught:
            await store.check_tail(5)
        assert caught.value.details == {"event_id": 12}
        await store.check_tail(1)  # event 12 lies outside the newest one
    finally:
        await store.close()


async def test_a_step_that_has_read_rollbacks_for_its_time_gives_the_thread_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each rollback costs a read of its target's state; a live worker's appends share
    the database thread with verify, so a step ends once its time is used."""
    db = tmp_path / "db.sqlite3"
    await build(db)
    monkeypatch.setattr(sqlite_verify, "STEP_SECONDS", -1.0)
    conn = sqlite3.connect(db)
    try:
        verifier = sqlite_verify.Verifier()
        verifier.start(conn)
        assert verifier.step(conn)
        assert verifier.checked == 13  # stopped right after the rollback, event 13
        while verifier.step(conn):
            pass
    finally:
        conn.close()
    assert verifier.result() == await verify(db)
