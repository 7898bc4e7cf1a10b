"""Reads, run on the database thread: each function takes the ``sqlite3`` connection.

A scope's state at a point is its newest snapshot at or before the point plus the
events of the scope after that snapshot, folded with ``domain.evolve``: never a replay
from the beginning when a snapshot exists. That snapshot is trusted only once the scope's
events since the snapshot before it replay to it, so a snapshot altered behind the
store's back is an ``IntegrityError``, not a state served or restored by a rollback.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable
from typing import Any, TypeVar

import msgspec

from adapters.canonical import chain_hash
from adapters.sqlite_rows import (
    EVENT_COLUMNS,
    Head,
    Row,
    decode_rendered,
    decode_state,
    event_dict,
    row_event,
    row_hash,
)
from domain.errors import IntegrityError
from domain.evolve import evolve
from domain.records import Ack
from domain.state import ScopeKey, ScopeState

T = TypeVar("T")
END = 2**63 - 1
"""An event id past any stored one: "now"."""


class Point(msgspec.Struct, frozen=True):
    """A scope's state at some point, and how many of its events follow its snapshot."""

    state: ScopeState
    since_snapshot: int


def in_read_transaction(conn: sqlite3.Connection, read: Callable[[], T]) -> T:
    """Run ``read`` inside one read transaction, so its statements see one snapshot."""
    conn.execute("BEGIN")
    try:
        return read()
    finally:
        conn.execute("COMMIT")


def head(conn: sqlite3.Connection) -> Head:
    row = conn.execute(
        "SELECT event_id, hash, recorded_at FROM events ORDER BY event_id DESC LIMIT 1"
    ).fetchone()
    return Head() if row is None else Head(row[0], row[1], row[2])


def point(
    conn: sqlite3.Connection,
    key: ScopeKey,
    upto: int = END,
    checked: set[int] | None = None,
    *,
    check_hashes: bool = True,
) -> Point | None:
    """The scope's state after its last event with ``event_id <= upto``.

    Replays from the second newest snapshot at or before ``upto`` (or the scope's start),
    checking on the way that the newest one equals the replay; raises ``IntegrityError``
    naming the newest snapshot's event if not. At most two snapshot intervals are read.
    ``checked`` holds the event ids of snapshots found sound already (a store's own set,
    added to here): from one of those, the replay starts at it, one interval at most.
    With ``check_hashes``, the events after the newest snapshot, which no snapshot vouches
    for, must each match their own hash (an event changed without re-hashing the chain is
    ``IntegrityError``); that costs about 3 ms in a typical read.
    """
    snaps = conn.execute(
        "SELECT event_id, state FROM snapshots WHERE bid_year = ? AND area = ? "
        "AND event_id <= ? ORDER BY event_id DESC LIMIT 2",
        (*key, upto),
    ).fetchall()
    newest: tuple[int, str] | None = snaps[0] if snaps else None
    if newest is not None and checked is not None and newest[0] in checked:
        snaps, newest = [newest, newest], None  # start at it; nothing left to check
    base, after = (_snapshot_state(*snaps[1]), snaps[1][0]) if len(snaps) == 2 else (None, 0)
    rows = conn.execute(
        f"SELECT {EVENT_COLUMNS} FROM events WHERE bid_year = ? AND area = ? "
        "AND event_id > ? AND event_id <= ? ORDER BY event_id",
        (*key, after, upto),
    ).fetchall()
    state, since = base, 0
    for row in rows:
        if newest is None and check_hashes:
            _check_hash(row)
        state = _evolve(state, row)
        since += 1
        if newest is not None and row[0] == newest[0]:
            _check_snapshot(newest, state)
            if checked is not None:
                checked.add(newest[0])
            since, newest = 0, None
    if newest is not None:
        _check_snapshot(newest, None)  # no event of this scope has the snapshot's id
    return None if state is None else Point(state, since)


def _check_hash(row: Row) -> None:
    with contextlib.suppress(Exception):  # a column of a wrong type: the full check says
        if row_hash(row) == row[16]:  # the quick way, from the stored texts
            return
    try:  # as verify does it: decoded, and encoded canonically again
        obj = event_dict(row)
        stored = obj.pop("hash")
        sound = chain_hash(obj["prev_hash"], obj) == stored
    except Exception:
        sound = False
    if not sound:
        raise IntegrityError(
            f"event {row[0]} does not match its hash; run `bidlog verify`", event_id=row[0]
        )


def _evolve(state: ScopeState | None, row: Row) -> ScopeState:
    try:
        return evolve(state, row_event(row))
    except Exception as exc:
        raise IntegrityError(
            f"event {row[0]} does not replay ({exc!r}); run `bidlog verify`", event_id=row[0]
        ) from exc


def _snapshot_state(event_id: int, text: str) -> ScopeState:
    try:
        return decode_state(text)
    except Exception as exc:
        raise IntegrityError(
            f"snapshot of event {event_id} cannot be decoded ({exc}); run `bidlog verify`",
            event_id=event_id,
        ) from exc


def _check_snapshot(snapshot: tuple[int, str], replayed: ScopeState | None) -> None:
    event_id, text = snapshot
    if _snapshot_state(event_id, text) != replayed:
        raise IntegrityError(
            f"snapshot of event {event_id} differs from the replay of its scope's events; "
            "run `bidlog verify`",
            event_id=event_id,
        )


def last_event_at(conn: sqlite3.Connection, at_time: str) -> int:
    """The last event recorded at or before ``at_time`` (same text format), 0 if none.

    Binary search over event ids: ``recorded_at`` never decreases along ``event_id``.
    """
    low, high = 0, head(conn).event_id  # invariant: low is at or before, high+1 after
    while low < high:
        middle = (low + high + 1) // 2
        (recorded_at,) = conn.execute(
            "SELECT recorded_at FROM events WHERE event_id >= ? ORDER BY event_id LIMIT 1",
            (middle,),
        ).fetchone()
        if recorded_at <= at_time:
            low = middle
        else:
            high = middle - 1
    return low


def belongs(conn: sqlite3.Connection, key: ScopeKey, event_id: int) -> bool:
    row = conn.execute(
        "SELECT 1 FROM events WHERE event_id = ? AND bid_year = ? AND area = ?",
        (event_id, *key),
    ).fetchone()
    return row is not None


def scope_keys(conn: sqlite3.Connection, bid_year: int | None = None) -> list[ScopeKey]:
    """Every scope, sorted; one index probe per scope (a skip scan), not a full scan."""
    keys: list[ScopeKey] = []
    bound: tuple[int, str] = (bid_year if bid_year is not None else -1, "")
    while True:
        row = conn.execute(
            "SELECT bid_year, area FROM events WHERE (bid_year, area) > (?, ?) "
            "ORDER BY bid_year, area LIMIT 1",
            bound,
        ).fetchone()
        if row is None or (bid_year is not None and row[0] != bid_year):
            return keys
        bound = (int(row[0]), str(row[1]))
        keys.append(bound)


def scope_head(conn: sqlite3.Connection, key: ScopeKey) -> dict[str, Any]:
    seq, event_id = conn.execute(
        "SELECT seq, event_id FROM events WHERE bid_year = ? AND area = ? "
        "ORDER BY event_id DESC LIMIT 1",
        key,
    ).fetchone()
    return {"bid_year": key[0], "area": key[1], "seq": seq, "head_event": event_id}


def timeline(
    conn: sqlite3.Connection, key: ScopeKey, after_event: int, limit: int
) -> tuple[list[dict[str, Any]], int | None] | None:
    if not scope_exists(conn, key):
        return None
    rows = conn.execute(
        f"SELECT {EVENT_COLUMNS} FROM events WHERE bid_year = ? AND area = ? "
        "AND event_id > ? ORDER BY event_id LIMIT ?",
        (*key, after_event, limit + 1),
    ).fetchall()
    page = rows[:limit]
    next_after = int(page[-1][0]) if len(rows) > limit else None
    return [event_dict(row) for row in page], next_after


def scope_exists(conn: sqlite3.Connection, key: ScopeKey) -> bool:
    row = conn.execute(
        "SELECT 1 FROM events WHERE bid_year = ? AND area = ? LIMIT 1", key
    ).fetchone()
    return row is not None


def acks(conn: sqlite3.Connection, message_ids: list[str]) -> dict[str, Ack]:
    found: dict[str, Ack] = {}
    for start in range(0, len(message_ids), 500):  # stay under SQLite's variable limit
        chunk = message_ids[start : start + 500]
        rows = conn.execute(
            "SELECT message_id, message_digest, event_id, seq, recorded_at FROM events "
            f"WHERE message_id IN ({', '.join('?' * len(chunk))})",
            chunk,
        ).fetchall()
        found.update((row[0], Ack(*row)) for row in rows)
    return found


def events_after(conn: sqlite3.Connection, after_event: int, limit: int) -> list[Row]:
    """Up to ``limit`` events after ``after_event``, each with its snapshot text or None."""
    return conn.execute(
        f"SELECT {_prefixed('e')}, s.state FROM events e "
        "LEFT JOIN snapshots s ON s.event_id = e.event_id "
        "WHERE e.event_id > ? ORDER BY e.event_id LIMIT ?",
        (after_event, limit),
    ).fetchall()


def export_dicts(rows: list[Row]) -> list[dict[str, Any]]:
    """Rows of ``events_after`` as section-6 dicts, with ``state`` on snapshot events."""
    out = []
    for row in rows:
        try:
            obj = event_dict(row)
            if row[17] is not None:
                obj["state"] = decode_rendered(row[17])
        except Exception as exc:  # a column that is not JSON: changed behind the store
            raise IntegrityError(
                f"event {row[0]} cannot be read back ({exc}); run `bidlog verify`",
                event_id=row[0],
            ) from exc
        out.append(obj)
    return out


def _prefixed(alias: str) -> str:
    return ", ".join(f"{alias}.{name.strip()}" for name in EVENT_COLUMNS.split(","))
