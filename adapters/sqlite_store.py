"""The audit log on SQLite via aiosqlite: implements ``worker.ports.Store`` structurally.

One hop per operation: every append (BEGIN, the inserts, COMMIT) and every read runs as
one plain function on aiosqlite's database thread, through ``Connection._execute(fn)``.
That is aiosqlite's own private dispatcher (its public methods are thin wrappers over
it; see omnilib/aiosqlite#19 on running a whole transaction on the thread). The public
API would cost one thread hop and one event-loop wake-up per statement, and would let
other tasks' statements interleave with the transaction. ``_run`` is the one place that
touches it, so a change in aiosqlite breaks loudly here, and in the tests.

The writer's head (last id, hash, time) lives in memory and advances only after COMMIT
returns, on the database thread; a failed append leaves it, and the file, as they were.
"""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import aiosqlite

from adapters import sqlite_reads as reads
from adapters.sqlite_rows import INSERT_EVENT, INSERT_SNAPSHOT, Head, Row, encode_batch
from adapters.sqlite_schema import (
    DatabaseLocked,
    InvalidBatch,
    SchemaVersionError,
    StoreError,
    Synchronous,
    WriterLock,
    prepare_reader,
    prepare_writer,
    refuse_hard_links,
)
from adapters.sqlite_verify import Tick, Verifier, check_tail
from domain.errors import PersistenceFailed
from domain.records import Ack, Batch, Recovered, StoredAlready
from domain.state import ScopeKey, ScopeState

__all__ = [
    "DatabaseLocked",
    "FailAt",
    "FaultHook",
    "Head",
    "InvalidBatch",
    "SchemaVersionError",
    "SqliteStore",
    "StoreError",
]

T = TypeVar("T")
EXPORT_CHUNK = 1000


class FaultHook(Protocol):
    """Called before each statement of an append: every row insert, then the COMMIT.

    ``index`` counts from 1 within one append; raising fails that append there.
    """

    def __call__(self, index: int, statement: str) -> None: ...


class FailAt:
    """Fault injection: statement ``at`` of an append raises ``sqlite3.OperationalError``.

    Statements are numbered from 1 within each append: one per event row, then one per
    snapshot row, and last the COMMIT (an ack is stored as its event row). The first
    ``skip`` appends pass, then ``times`` appends fail. ``FailAt(0)`` never fails and only
    counts: ``seen`` is the number of statements the last append reached, ``appends`` how
    many began.
    """

    def __init__(self, at: int, *, times: int = 1, skip: int = 0) -> None:
        self.at = at
        self.times = times
        self.skip = skip
        self.fired = 0
        self.seen = 0
        self.appends = 0

    def __call__(self, index: int, statement: str) -> None:
        if index == 1:
            self.appends += 1
        self.seen = index
        due = self.appends > self.skip and self.fired < self.times
        if due and index == self.at:
            self.fired += 1
            raise sqlite3.OperationalError(f"injected fault at statement {index} ({statement})")


class SqliteStore:
    """The append-only audit log in one SQLite file (WAL). Open with ``SqliteStore.open``."""

    def __init__(
        self,
        db: aiosqlite.Connection,
        path: Path,
        *,
        lock: WriterLock | None,
        head: Head,
        fault: FaultHook | None,
    ) -> None:
        self._db = db
        self._raw: sqlite3.Connection = db._conn
        self.path = path
        self._lock = lock
        self._head = head
        self.fault = fault
        self._sound: set[int] = set()  # snapshots (event ids) replay has confirmed

    @classmethod
    async def open(
        cls,
        path: str | os.PathLike[str],
        *,
        synchronous: str = "full",
        writer: bool = True,
        fault: FaultHook | None = None,
        lock_fd: int | None = None,
    ) -> SqliteStore:
        """Open (a writer creates it) the database at ``path``.

        A writer takes an exclusive ``flock`` on ``<path>.lock`` and raises
        ``DatabaseLocked`` while another process holds it. ``writer=False`` opens
        read-only (``mode=ro``), which works while a writer serves (WAL readers).
        ``lock_fd``: a writer lock held already, passed on by the process that took it
        (``adapters.sqlite_writer``'s child).
        Raises ``SchemaVersionError`` for a database of another schema version and
        ``StoreError`` for a missing (reader) or foreign file.
        """
        where = Path(path)
        mode = _synchronous(synchronous)
        _require_file(where, writer)
        if not writer:
            lock = None
        elif lock_fd is not None:
            lock = WriterLock.inherit(lock_fd, where)
        else:
            lock = WriterLock.acquire(where)
        try:
            return await cls._connect(where, mode, lock, fault)
        except BaseException:
            if lock is not None:
                lock.release()
            raise

    @classmethod
    async def _connect(
        cls, where: Path, synchronous: Synchronous, lock: WriterLock | None, fault: FaultHook | None
    ) -> SqliteStore:
        if lock is not None:
            db = await aiosqlite.connect(where, isolation_level=None)
        else:
            db = await aiosqlite.connect(_read_only_uri(where), uri=True, isolation_level=None)
        try:
            run = _dispatcher(db)
            if lock is not None:
                await run(prepare_writer, db._conn, where, synchronous)
            else:
                await run(prepare_reader, db._conn, where)
            head = await run(reads.head, db._conn)
        except BaseException:
            await db.close()
            raise
        return cls(db, where, lock=lock, head=head, fault=fault)

    @property
    def writer(self) -> bool:
        return self._lock is not None

    @property
    def lock_fd(self) -> int:
        """The writer lock's descriptor, to pass on to a writer process."""
        if self._lock is None:
            raise StoreError(f"{self.path} is open read-only")
        return self._lock.fd

    def follow(self, head: Head) -> None:
        """Another connection (a writer process holding this store's lock) committed up
        to ``head``: verify stops there, and ``head()`` answers it."""
        self._head = head

    async def close(self) -> None:
        """Close the connection, then drop the writer lock. Safe to call twice."""
        try:
            await self._db.close()
        finally:
            if self._lock is not None:
                self._lock.release()

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """One hop: ``fn(conn, *args)`` on the database thread."""
        run = _dispatcher(self._db)
        result: T = await run(fn, self._raw, *args)
        return result

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        """One hop: ``fn(conn, *args)`` inside one read transaction."""
        return await self._run(
            lambda conn: reads.in_read_transaction(conn, lambda: fn(conn, *args))
        )

    # -- writing ------------------------------------------------------------------------

    async def append(self, batch: Batch) -> None:
        """Commit every event, snapshot and ack of ``batch`` in one transaction, or none.

        If any of the message ids ``batch.fresh`` names is stored already, write nothing
        and raise ``StoredAlready`` with their records. (Ids the batch's events carry are
        checked by the unique index as they are inserted; only the others are looked up
        first, so a batch of new commands pays for no lookup.)
        Raises ``InvalidBatch`` (nothing written) if the ids do not continue the head or
        ``recorded_at`` goes back, and ``PersistenceFailed`` if SQLite fails; either way
        the database and the head are as before. If the awaiting task is cancelled, the
        transaction still runs to its end on the database thread and the head follows
        it: the caller cannot know the outcome, so shield this await from cancellation.
        """
        if self._lock is None:
            raise StoreError(f"{self.path} is open read-only")
        if batch.entries or batch.acks or batch.fresh:
            await self._run(self._append_on_thread, batch)

    def _append_on_thread(self, conn: sqlite3.Connection, batch: Batch) -> None:
        encoded = encode_batch(batch, self._head)
        statements = _Statements(self.fault)
        try:
            conn.execute("BEGIN IMMEDIATE")
            _check_fresh(conn, batch.fresh, encoded.events)
            try:
                conn.executemany(INSERT_EVENT, statements.each(encoded.events, "insert event"))
            except sqlite3.IntegrityError:
                # Perhaps the unique index on message_id: is some event's id stored? Look
                # once the batch's own rows are gone (the lock keeps other writers out).
                _roll_back(conn)
                _check_fresh(conn, batch.fresh)
                raise
            conn.executemany(INSERT_SNAPSHOT, statements.each(encoded.snapshots, "snapshot"))
            statements.before("commit")
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            _roll_back(conn)
            raise PersistenceFailed(
                f"could not commit {len(encoded.events)} events: {exc}",
                events=len(encoded.events),
            ) from exc
        except BaseException:
            _roll_back(conn)
            raise
        self._head = encoded.head

    # -- reading ------------------------------------------------------------------------

    async def head(self) -> Head:
        """The last event id (= number of events), its hash and ``recorded_at``.

        A writer answers from memory; a reader asks the file (a writer may be appending).
        """
        if self._lock is not None:
            return self._head
        return await self._read(reads.head)

    async def stored_head(self) -> Head:
        """The head as the file has it now, whoever wrote it."""
        return await self._read(reads.head)

    async def recover(self) -> Recovered:
        """Every scope's current state (newest snapshot + deltas), the head event id and time."""
        return await self._read(_recover, self._sound)

    async def acks(self, message_ids: Sequence[str]) -> dict[str, Ack]:
        """The stored idempotency records among ``message_ids``."""
        if not message_ids:
            return {}
        return await self._read(reads.acks, list(message_ids))

    async def state_at(
        self, key: ScopeKey, *, at_event: int | None = None, at_time: dt.datetime | None = None
    ) -> ScopeState | None:
        """The scope's state now, after global event ``at_event``, or at ``at_time``."""
        if at_event is not None and at_time is not None:
            raise ValueError("give at_event or at_time, not both")
        moment = None if at_time is None else _timestamp(at_time)
        # A reader (the CLI's `state`) checks the hashes of the events after the newest
        # snapshot; the worker's queries skip that, to keep a read of a past point fast
        # (about 6 ms, against 10 with it). Its start-up and rollbacks check them.
        check = self._lock is None
        return await self._read(_state_at, key, at_event, moment, self._sound, check)

    async def event_state(self, key: ScopeKey, event_id: int) -> ScopeState | None:
        """The scope's state right after ``event_id`` if that event belongs to the scope."""
        return await self._read(_event_state, key, event_id, self._sound)

    async def timeline(
        self, key: ScopeKey, *, after_event: int = 0, limit: int = 1000
    ) -> tuple[list[dict[str, Any]], int | None] | None:
        """A page of the scope's events (section-6 dicts) and ``next_after``; None if no scope."""
        if limit < 1:
            raise ValueError("limit must be at least 1")
        return await self._read(reads.timeline, key, after_event, limit)

    async def list_areas(self, bid_year: int | None = None) -> list[dict[str, Any]]:
        """``{bid_year, area, seq, head_event}`` per scope, sorted by year then area."""
        return await self._read(_list_areas, bid_year)

    async def iter_events(
        self, after_event: int = 0, upto: int | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """Every event after ``after_event`` (up to ``upto``, if given) as its section-6
        dict, in ``event_id`` order, with ``state`` (the rendered snapshot) added on
        snapshot events. Reads in chunks, so a writer can append meanwhile."""
        while upto is None or after_event < upto:
            limit = EXPORT_CHUNK if upto is None else min(EXPORT_CHUNK, upto - after_event)
            rows = await self._read(reads.events_after, after_event, limit)
            for obj in reads.export_dicts(rows):
                yield obj
            if len(rows) < limit:
                return
            after_event = rows[-1][0]

    async def check_tail(self, count: int = 1000) -> None:
        """Raise ``IntegrityError`` unless the newest ``count`` events chain to the head."""
        await self._read(check_tail, count)

    async def verify(self, tick: Tick | None = None) -> dict[str, int]:
        """``{events, snapshots}``; raises ``IntegrityError`` naming the first bad event.

        Checks the chain end to end, recomputes every snapshot by replay from the
        previous one, and the snapshot rows against their events; one hop per
        chunk of events, so appends can interleave (the pass stops at the head it saw
        first). ``tick`` hears ``("checking", checked, last)`` after each chunk.
        """
        verifier = Verifier(self._head if self._lock is not None else None)
        await self._read(verifier.start)
        while await self._read(verifier.step):
            if tick is not None:
                tick("checking", verifier.checked, verifier.upto)
        return verifier.result()


class _Statements:
    """Numbers the statements of one append and lets the fault hook fail any of them."""

    def __init__(self, fault: FaultHook | None) -> None:
        self.fault = fault
        self.index = 0

    def before(self, statement: str) -> None:
        self.index += 1
        if self.fault is not None:
            self.fault(self.index, statement)

    def each(self, rows: list[Row], statement: str) -> Iterable[Row]:
        if self.fault is None:
            return rows
        return self._hooked(rows, statement)

    def _hooked(self, rows: list[Row], statement: str) -> Iterator[Row]:
        for row in rows:
            self.before(statement)
            yield row


def _dispatcher(db: aiosqlite.Connection) -> Callable[..., Awaitable[Any]]:
    run: Callable[..., Awaitable[Any]] = db._execute
    return run


def _synchronous(value: str) -> Synchronous:
    if value == "full":
        return "full"
    if value == "normal":
        return "normal"
    raise ValueError(f"synchronous must be 'full' or 'normal', not {value!r}")


def _require_file(where: Path, writer: bool) -> None:
    if not writer and not where.exists():
        raise StoreError(f"no database at {where}")
    if not writer:
        refuse_hard_links(where)  # a writer checks under its lock


def _read_only_uri(where: Path) -> str:
    return where.resolve().as_uri() + "?mode=ro"


def _check_fresh(
    conn: sqlite3.Connection, fresh: tuple[str, ...], rows: list[Row] | None = None
) -> None:
    """Raise ``StoredAlready`` if any of ``fresh`` is stored; with ``rows``, skip the ids
    those rows are about to insert (their unique index checks them)."""
    if not fresh:
        return
    ids = list(fresh) if rows is None else list(set(fresh).difference(r[8] for r in rows))
    known = reads.acks(conn, ids) if ids else None
    if known:
        raise StoredAlready(known)


def _roll_back(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        conn.execute("ROLLBACK")


_AFTER_ALL = "9999-12-31T23:59:59.999999Z"  # at or after every recorded_at
_BEFORE_ALL = "0000"  # sorts before every recorded_at


def _timestamp(moment: dt.datetime) -> str:
    """The stored ``recorded_at`` format, so that text order is time order."""
    if moment.tzinfo is None:
        raise ValueError("at_time must carry a time zone")
    try:
        return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    except OverflowError:  # past year 9999 or before year 1 once in UTC
        return _AFTER_ALL if moment.year > 1 else _BEFORE_ALL


def _state_at(
    conn: sqlite3.Connection,
    key: ScopeKey,
    at_event: int | None,
    at_time: str | None,
    checked: set[int],
    check_hashes: bool,
) -> ScopeState | None:
    upto = reads.END if at_event is None else at_event
    if at_time is not None:
        upto = reads.last_event_at(conn, at_time)
    found_point = reads.point(conn, key, upto, checked, check_hashes=check_hashes)
    return None if found_point is None else found_point.state


def _event_state(
    conn: sqlite3.Connection, key: ScopeKey, event_id: int, checked: set[int]
) -> ScopeState | None:
    if not reads.belongs(conn, key, event_id):
        return None
    found = reads.point(conn, key, event_id, checked)
    return None if found is None else found.state


def _list_areas(conn: sqlite3.Connection, bid_year: int | None) -> list[dict[str, Any]]:
    return [reads.scope_head(conn, key) for key in reads.scope_keys(conn, bid_year)]


def _recover(conn: sqlite3.Connection, checked: set[int]) -> Recovered:
    scopes: dict[ScopeKey, ScopeState] = {}
    since: dict[ScopeKey, int] = {}
    for key in reads.scope_keys(conn):
        found = reads.point(conn, key, checked=checked)
        if found is not None:
            scopes[key] = found.state
            since[key] = found.since_snapshot
    last = reads.head(conn)
    return Recovered(scopes, since, last.event_id, last.recorded_at)
