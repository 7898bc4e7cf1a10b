"""``verify``: the hash chain end to end, every snapshot recomputed, snapshot rows
consistent with their events. Streams the log in chunks; holds one state per scope."""

from __future__ import annotations

import sqlite3
import time
from collections import deque
from collections.abc import Callable
from typing import NoReturn

from adapters.canonical import chain_hash
from adapters.sqlite_reads import belongs, events_after, head, point
from adapters.sqlite_rows import Head, Row, decode_state, event_dict, row_event, time_fault
from domain.deltas import before_fault, is_restorable_part
from domain.errors import IntegrityError
from domain.events import SCHEMA_VERSION, Event, authorship_fault
from domain.evolve import evolve
from domain.state import ScopeKey, ScopeState

CHUNK = 2000
Tick = Callable[[str, int, int | None], None]
"""Told how long work is going: ``(phase, done, total or None)``, e.g. ``("checking",
checked, upto)`` after each step of a verify. The caller draws progress with it."""
STEP_SECONDS = 0.05  # a step gives the database thread back after this (rollback reads)

_STRAY_SNAPSHOT = """
SELECT s.event_id FROM snapshots s LEFT JOIN events e ON e.event_id = s.event_id
WHERE e.event_id IS NULL OR e.snapshot = 0 OR e.bid_year != s.bid_year OR e.area != s.area
ORDER BY s.event_id LIMIT 1
"""


class Verifier:
    """One pass over the log; ``start`` once, then ``step`` until it returns False."""

    def __init__(self, known_head: Head | None = None, *, rollbacks: bool = True) -> None:
        """``rollbacks``: check what each rollback restores (import's loader did, so its
        final pass need not do it again)."""
        self.known_head = known_head
        self.rollbacks = rollbacks
        self.sound: set[int] = set()  # snapshots checked: a rollback's read starts at one
        self._rows: deque[Row] = deque()  # fetched, not yet checked (the log up to
        # ``upto`` never changes, so they stay good between steps)
        self.checked = 0
        self.snapshots = 0
        self.upto = 0
        self.prev = Head()
        self.states: dict[ScopeKey, ScopeState] = {}
        self.late: tuple[int, str] | None = None

    def start(self, conn: sqlite3.Connection) -> None:
        """Fix the end of the pass and find stray snapshot rows up front; first of all,
        the file itself must be sound (SQLite's quick_check: pages, b-trees and indexes,
        which the chain does not cover: a damaged idempotency index verified, and every
        commit on it then failed)."""
        damage = [" ".join(row[0].split()) for row in conn.execute("PRAGMA quick_check(3)")]
        if damage != ["ok"]:
            _fail(0, f"the database file is damaged (SQLite quick_check: {'; '.join(damage)})")
        self.upto = head(conn).event_id
        row = conn.execute(_STRAY_SNAPSHOT).fetchone()
        self.late = None if row is None else (row[0], "a snapshot does not match its event")

    def step(self, conn: sqlite3.Connection) -> bool:
        """Check the next chunk (or what a step before left of it); False once the whole
        log is checked."""
        started = time.monotonic()
        if not self._rows:
            self._rows = deque(events_after(conn, self.checked, CHUNK))
            if not self._rows or self._rows[0][0] > self.upto:
                self._rows.clear()
                self._finish()
                return False
        rows = self._rows
        while rows:
            row = rows.popleft()
            if row[0] > self.upto:
                rows.clear()
                break
            event = self._check(row)
            if event.action == "rollback" and self.rollbacks:
                fault = rollback_fault(conn, event, self.sound)
                if fault is not None:
                    _fail(row[0], f"event {row[0]}: {fault}")
                if time.monotonic() - started > STEP_SECONDS:
                    break  # the rest of the chunk next step: a live worker appends
        if self.checked < self.upto:
            return True
        self._finish()
        return False

    def result(self) -> dict[str, int]:
        return {"events": self.checked, "snapshots": self.snapshots}

    def _check(self, row: Row) -> Event:
        event_id = row[0]
        expected = self.checked + 1
        if event_id != expected:
            _fail(expected, f"event {expected} is missing")
        self._check_chain(row)
        event = self._check_event(row)
        state = self._evolve(event)
        if event.snapshot:
            self._check_snapshot(event, state, row[17])
        elif row[17] is not None:
            _fail(event_id, f"event {event_id} has a snapshot but is not a snapshot event")
        self.states[event.scope] = state
        self.checked = event_id
        if self.late is not None and event_id >= self.late[0]:
            _fail(*self.late)
        return event

    def _check_chain(self, row: Row) -> None:
        obj = event_dict(row)
        stored = obj.pop("hash")
        if obj["prev_hash"] != self.prev.hash or chain_hash(self.prev.hash, obj) != stored:
            _fail(row[0], f"hash chain broken at event {row[0]}")
        at = obj["recorded_at"]
        fault = time_fault(row[0], at)
        if fault is not None:
            _fail(row[0], fault)
        if at < self.prev.recorded_at:
            _fail(row[0], f"recorded_at goes back at event {row[0]}")
        self.prev = Head(row[0], stored, obj["recorded_at"])

    def _check_event(self, row: Row) -> Event:
        try:
            event = row_event(row)
        except Exception as exc:
            _fail(row[0], f"event {row[0]} cannot be decoded: {exc}")
        if row[14] != SCHEMA_VERSION:  # not hashed (not a section-6 field): checked here
            _fail(row[0], f"event {row[0]} has schema_version {row[14]!r}, not {SCHEMA_VERSION}")
        fault = authorship_fault(event)
        if fault is not None:
            _fail(event.event_id, f"event {event.event_id}: {fault}")
        before = self.states.get(event.scope)
        if event.seq != (before.seq if before is not None else 0) + 1:
            _fail(event.event_id, f"event {event.event_id} has seq {event.seq} out of order")
        fault = before_fault(before, event)
        if fault is not None:
            _fail(event.event_id, f"event {event.event_id}: {fault}")
        return event

    def _evolve(self, event: Event) -> ScopeState:
        try:
            return evolve(self.states.get(event.scope), event)
        except Exception as exc:
            _fail(event.event_id, f"event {event.event_id} does not replay: {exc!r}")

    def _check_snapshot(self, event: Event, state: ScopeState, text: str | None) -> None:
        if text is None:
            _fail(event.event_id, f"snapshot of event {event.event_id} is missing")
        try:
            stored = decode_state(text)
        except Exception:
            stored = None
        if stored != state:
            _fail(event.event_id, f"snapshot of event {event.event_id} differs from replay")
        self.snapshots += 1
        self.sound.add(event.event_id)

    def _finish(self) -> None:
        if self.late is not None:
            _fail(*self.late)
        known = self.known_head
        if known is not None and known.event_id > self.checked:
            _fail(self.checked + 1, f"event {self.checked + 1} is missing")
        if known is not None and known.event_id == self.checked and known != self.prev:
            _fail(self.checked, f"the head event {self.checked} is not the one committed")


def rollback_fault(conn: sqlite3.Connection, event: Event, sound: set[int]) -> str | None:
    """Why a rollback ``event`` (its ``to_event`` an earlier event, as ``authorship_fault``
    checks) could not have been recorded: its target is not an event of its own scope,
    or the state it restores is not the scope's at that event. ``conn`` holds every
    earlier event, their hashes checked already, and ``sound`` the snapshots found equal
    to the replay: the state is read from the newest one at or before ``to_event``."""
    to_event = event.detail["to_event"]
    if not belongs(conn, event.scope, to_event):
        return f"rollback to event {to_event}, which is not an event of its scope"
    found = point(conn, event.scope, to_event, sound, check_hashes=False)
    if found is None or not is_restorable_part(event.after, found.state):
        return f"the state it restores is not the scope's at event {to_event}"
    return None


def _fail(event_id: int, message: str) -> NoReturn:
    raise IntegrityError(message, event_id=event_id)


def check_tail(conn: sqlite3.Connection, count: int) -> None:
    """The newest ``count`` events must chain-hash to the head (a quick check for start-up;
    ``Verifier`` checks the whole log and every snapshot)."""
    upto = head(conn).event_id
    rows = events_after(conn, max(0, upto - count), count)
    prev: str | None = None
    for row in rows:
        obj = event_dict(row)
        stored = obj.pop("hash")
        if (prev is not None and obj["prev_hash"] != prev) or chain_hash(
            obj["prev_hash"], obj
        ) != stored:
            message = f"integrity check failed at event {row[0]}; run `bidlog verify`"
            _fail(row[0], message)
        prev = stored
