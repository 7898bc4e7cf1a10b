"""Moving the audit log: export to NDJSON, import into a new database, online backup.

An export line is the canonical JSON (``adapters.canonical``) of one section-6 event with
its ``hash``, plus ``state`` (the rendered snapshot) on snapshot events, in ``event_id``
order: the file alone rebuilds the database, and anyone can check its chain.

Import trusts nothing in the file. Each line must continue the chain (``prev_hash`` is the
previous line's ``hash``, ``hash`` is recomputed), ids and ``seq`` must follow, every
event must replay, and every snapshot must equal the state that replay gives. The rows go
into a temporary file beside the target, which is verified like a live database and only
then renamed into place: a refused import leaves no database behind.

Everything here but ``export_lines`` is synchronous (plain ``sqlite3``); run it in a
worker thread.
"""

from __future__ import annotations

import contextlib
import glob
import os
import sqlite3
import threading
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import Any

import msgspec

from adapters.canonical import ZERO_HASH, canonical, chain_hash
from adapters.sqlite_rows import (
    INSERT_EVENT,
    INSERT_SNAPSHOT,
    Head,
    event_object,
    event_row,
    state_text,
    time_fault,
)
from adapters.sqlite_schema import (
    DB_VERSION,
    WriterLock,
    prepare_reader,
    refuse_hard_links,
    schema_sql,
)
from adapters.sqlite_store import SqliteStore
from adapters.sqlite_verify import Tick, Verifier, rollback_fault
from domain.deltas import before_fault
from domain.errors import IntegrityError
from domain.events import Event, authorship_fault
from domain.evolve import evolve
from domain.state import ScopeKey, ScopeState

__all__ = [
    "ArchiveError",
    "BadLine",
    "Interrupted",
    "backup",
    "export_lines",
    "import_export",
    "publish",
    "refuse_overwrite",
    "temporary_beside",
    "verify_connection",
]

EVENT_FIELDS = frozenset(
    {
        "event_id",
        "seq",
        "bid_year",
        "area",
        "recorded_at",
        "action",
        "actor",
        "cause",
        "message_id",
        "message_digest",
        "detail",
        "before",
        "after",
        "snapshot",
        "prev_hash",
    }
)
"""The hashed fields of an exported event (section 6, without ``hash``)."""

_decode_line = msgspec.json.Decoder()


class ArchiveError(Exception):
    """An export, import or backup cannot be done; the message says why."""


class Interrupted(ArchiveError):
    """``stop`` was set (a signal): the work ended early and nothing was written."""


def _check(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise Interrupted("stopped before the end; nothing was written")


class BadLine(ArchiveError):
    """A line of an export file is unreadable, or breaks the chain or the replay."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"line {line}: {message}")
        self.line = line


# -- export ----------------------------------------------------------------------------


async def export_lines(store: SqliteStore, upto: int | None = None) -> AsyncIterator[bytes]:
    """Every event (up to ``upto``) as one canonical NDJSON line, in ``event_id`` order,
    read in chunks."""
    async for obj in store.iter_events(upto=upto):
        yield canonical(obj) + b"\n"


# -- import ----------------------------------------------------------------------------


def import_export(
    lines: Iterable[bytes],
    target: Path,
    stop: threading.Event | None = None,
    tick: Tick | None = None,
) -> dict[str, int]:
    """Rebuild a new database at ``target`` from export ``lines``: ``{events, snapshots}``.

    Takes ``target``'s writer lock, refuses a target that exists and is not empty, and
    raises ``BadLine`` naming the first line that is not a faithful continuation of the
    log. Nothing is left at ``target`` unless the whole file checked out. ``tick``
    hears ``("reading", lines, None)`` every 1,024 lines, then the final verify's steps.
    """
    if not target.parent.is_dir():
        raise ArchiveError(f"cannot create {target}: no directory {target.parent}")
    lock = WriterLock.acquire(target)
    try:
        _require_new(target)
        with temporary_beside(target) as tmp:
            counts = _build(lines, tmp, stop, tick)
            _require_new(target)
            _check(stop)
            publish(tmp, target)
        return counts
    finally:
        lock.release()


def _require_new(target: Path) -> None:
    if target.is_dir() or (target.exists() and target.stat().st_size > 0):
        raise ArchiveError(f"{target} already exists and is not empty; import builds a new one")


def _build(
    lines: Iterable[bytes], tmp: Path, stop: threading.Event | None, tick: Tick | None
) -> dict[str, int]:
    conn = sqlite3.connect(tmp, isolation_level=None)
    try:
        # The file is thrown away unless everything succeeds: no journal, no syncs until
        # ``publish`` makes it durable in one go.
        conn.execute("PRAGMA journal_mode = OFF")
        conn.execute("PRAGMA synchronous = OFF")
        conn.executescript(schema_sql())
        conn.execute("BEGIN")
        loader = _Loader(conn)
        for number, raw in enumerate(lines, 1):
            if number % 1024 == 0:
                _check(stop)
                if tick is not None:
                    tick("reading", number, None)
            if raw.strip():
                loader.load(number, raw)
        conn.execute("COMMIT")
        # What rollbacks restore, the loader checked.
        counts = verify_connection(conn, rollbacks=False, stop=stop, tick=tick)
        conn.execute("PRAGMA journal_mode = WAL")  # what the store would have set
        return counts
    finally:
        conn.close()


class _Loader:
    """Checks each exported event against the chain and the replay, then inserts it."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.head = Head()
        self.states: dict[ScopeKey, ScopeState] = {}
        self.sound: set[int] = set()  # snapshots checked against the replay

    def load(self, number: int, raw: bytes) -> None:
        obj = _parse(number, raw)
        event = _to_event(number, obj)
        hashed = {name: obj[name] for name in EVENT_FIELDS}
        if event_object(event, obj["prev_hash"]) != hashed:
            raise BadLine(number, f"event {event.event_id} has fields not in the stored form")
        self._check_chain(number, event, hashed, obj["hash"])
        fault = authorship_fault(event)
        if fault is None and event.action == "rollback":
            fault = rollback_fault(self.conn, event, self.sound)  # its target is in already
        if fault is not None:
            raise BadLine(number, f"event {event.event_id}: {fault}")
        state = self._replay(number, event)
        self._check_snapshot(number, event, state, obj)
        self._insert(number, event, hashed, obj["hash"], state)
        self.head = Head(event.event_id, obj["hash"], event.recorded_at)
        self.states[event.scope] = state

    def _check_chain(self, number: int, event: Event, hashed: dict[str, Any], hash_: Any) -> None:
        head = self.head
        if event.event_id != head.event_id + 1:
            expected = head.event_id + 1
            raise BadLine(number, f"event id {event.event_id} where {expected} was expected")
        if hashed["prev_hash"] != head.hash:
            what = "64 zeros" if head.hash == ZERO_HASH else f"the hash of event {head.event_id}"
            raise BadLine(number, f"event {event.event_id}: prev_hash is not {what} (broken chain)")
        if hash_ != chain_hash(head.hash, hashed):
            raise BadLine(
                number, f"event {event.event_id}: hash does not match its content (altered)"
            )
        fault = time_fault(event.event_id, event.recorded_at)
        if fault is not None:
            raise BadLine(number, fault)
        if event.recorded_at < head.recorded_at:
            raise BadLine(number, f"event {event.event_id}: decreasing recorded_at")

    def _replay(self, number: int, event: Event) -> ScopeState:
        before = self.states.get(event.scope)
        expected = (0 if before is None else before.seq) + 1
        if event.seq != expected:
            raise BadLine(
                number, f"event {event.event_id}: seq {event.seq} where {expected} was expected"
            )
        if (before is None) != (event.action == "create_area"):
            raise BadLine(number, f"event {event.event_id}: create_area must open its area")
        fault = before_fault(before, event)
        if fault is not None:
            raise BadLine(number, f"event {event.event_id}: {fault}")
        try:
            return evolve(before, event)
        except Exception as exc:
            raise BadLine(number, f"event {event.event_id} does not replay: {exc!r}") from exc

    def _check_snapshot(
        self, number: int, event: Event, state: ScopeState, obj: dict[str, Any]
    ) -> None:
        if event.snapshot != ("state" in obj):
            raise BadLine(
                number, f"event {event.event_id}: 'state' must be present exactly on snapshots"
            )
        if event.snapshot and canonical(obj["state"]) != canonical(state):
            raise BadLine(
                number, f"event {event.event_id}: snapshot differs from the replayed state"
            )
        if event.snapshot:
            self.sound.add(event.event_id)

    def _insert(
        self, number: int, event: Event, hashed: dict[str, Any], hash_: str, state: ScopeState
    ) -> None:
        try:
            self.conn.execute(INSERT_EVENT, event_row(hashed, hash_))
        except sqlite3.IntegrityError:  # events_by_message: the idempotency key is unique
            raise BadLine(
                number, f"event {event.event_id}: message id {event.message_id!r} used twice"
            ) from None
        if event.snapshot:
            self.conn.execute(
                INSERT_SNAPSHOT, (event.event_id, event.bid_year, event.area, state_text(state))
            )


def _parse(number: int, raw: bytes) -> dict[str, Any]:
    try:
        obj = _decode_line.decode(raw)
    except msgspec.DecodeError as exc:
        raise BadLine(number, f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise BadLine(number, "not a JSON object")
    missing = sorted(EVENT_FIELDS - obj.keys() | ({"hash"} - obj.keys()))
    unknown = sorted(obj.keys() - EVENT_FIELDS - {"hash", "state"})
    if missing or unknown:
        hint = ""
        if {"id", "type"} <= obj.keys() and "event_id" not in obj:
            hint = " (a message, not an event: `bidlog replay` feeds message files)"
        raise BadLine(number, f"missing fields {missing}, unknown fields {unknown}{hint}")
    return obj


def _to_event(number: int, obj: dict[str, Any]) -> Event:
    try:
        return msgspec.convert({k: obj[k] for k in EVENT_FIELDS - {"prev_hash"}}, Event)
    except msgspec.ValidationError as exc:
        raise BadLine(number, f"not an event: {exc}") from None


# -- backup ----------------------------------------------------------------------------


def backup(
    db: Path, out: Path, stop: threading.Event | None = None, tick: Tick | None = None
) -> dict[str, int]:
    """Copy the live database ``db`` to ``out`` with SQLite's online backup (one read
    transaction: a consistent point, while a writer keeps appending); verify the copy,
    then rename it into place. Returns the copy's ``{events, snapshots}``. ``tick``
    hears ``("copying", 0, None)`` once, then the verify's steps."""
    if not db.is_file():
        raise ArchiveError(f"no database at {db}")
    refuse_hard_links(db)
    refuse_overwrite(db, out)
    with temporary_beside(out) as tmp:
        source = sqlite3.connect(_read_only_uri(db), uri=True, isolation_level=None)
        try:
            prepare_reader(source, db)
            counts = _copy(source, tmp, out, db, stop, tick)
        finally:
            source.close()
        _check(stop)
        publish(tmp, out)
    return counts


def _copy(
    source: sqlite3.Connection,
    tmp: Path,
    out: Path,
    db: Path,
    stop: threading.Event | None,
    tick: Tick | None,
) -> dict[str, int]:
    try:
        copy = sqlite3.connect(tmp, isolation_level=None)
    except sqlite3.Error as exc:
        raise ArchiveError(f"cannot write {out}: {exc}") from exc
    try:
        # Every page in one step, one read transaction: a consistent point. (In steps, a
        # commit in between restarts the copy.) A signal is noticed after it.
        if tick is not None:
            tick("copying", 0, None)
        source.backup(copy)
        _check(stop)
        what = f"the copy of {db} (run bidlog verify on it)"
        return verify_connection(copy, what, stop=stop, tick=tick)
    finally:
        copy.close()


SQLITE_HEADER = b"SQLite format 3\x00"


def refuse_overwrite(db: Path, out: Path, *, writing: str = "database") -> None:
    """Refuse an output path that is the database or one of SQLite's files beside it, or
    a database in use or not closed cleanly. Renaming a file over a database that has a
    ``-wal`` with frames beside it (a worker serving it, or a crash's leftover) would
    pair the new file with the old log: a corrupt database, and acknowledged events gone.
    An empty ``-wal`` and a ``-shm`` are what read-only opens (``verify``, ``state``)
    leave beside a database closed cleanly: they hold nothing, and do not refuse it.

    ``writing`` is what would replace it: a ``"database"`` (a backup) replaces only an
    older database, an ``"export"`` never replaces one: a slip of the finger between
    ``backup --out`` and ``export --out`` must not destroy either kind of archive."""
    if not out.parent.is_dir():
        raise ArchiveError(f"cannot write {out}: no directory {out.parent}")
    taken = {db.resolve().with_name(db.name + suffix) for suffix in ("", "-wal", "-shm")}
    if out.resolve() in taken:
        raise ArchiveError(f"{out} is the database itself (or its journal); choose another file")
    real = out.resolve()
    for suffix in ("-wal", "-journal"):  # a log with something in it: it would be replayed
        journal = real.with_name(real.name + suffix)
        if journal.exists() and journal.stat().st_size > 0:
            raise ArchiveError(
                f"{out} is a database in use or not closed cleanly ({journal.name} is "
                "beside it); replacing it would corrupt it. Choose another file"
            )
    if WriterLock.held(real):
        raise ArchiveError(f"{out} is a database a bidlog process holds; choose another file")
    header = _header(real)
    is_database = header.startswith(SQLITE_HEADER)
    if writing == "export" and is_database:
        raise ArchiveError(f"{out} is a SQLite database; an export never replaces one")
    # SQLite keeps user_version at bytes 60-63 of the header: a bidlog database's is
    # DB_VERSION (most other SQLite files have 0).
    ours = is_database and int.from_bytes(header[60:64], "big") == DB_VERSION
    if writing == "database" and header and not ours:
        raise ArchiveError(
            f"{out} is not a bidlog database; a backup replaces only an older backup"
        )


def _header(path: Path) -> bytes:
    """The first 100 bytes of ``path`` (SQLite's header); empty if it is no regular file
    (none, a pipe: never opened, which could wait for a writer) or an empty one."""
    if not path.is_file():
        return b""
    with path.open("rb") as file:
        return file.read(100)


def verify_connection(
    conn: sqlite3.Connection,
    what: str = "the new database",
    *,
    rollbacks: bool = True,
    stop: threading.Event | None = None,
    tick: Tick | None = None,
) -> dict[str, int]:
    """The store's ``verify`` on a plain connection; ``ArchiveError`` if it fails,
    ``Interrupted`` once ``stop`` is set. (``rollbacks=False``: what rollbacks restore
    was checked already.)"""
    verifier = Verifier(rollbacks=rollbacks)
    try:
        verifier.start(conn)
        while verifier.step(conn):
            _check(stop)
            if tick is not None:
                tick("checking", verifier.checked, verifier.upto)
    except IntegrityError as exc:
        raise ArchiveError(f"{what} does not verify: {exc.message}") from exc
    return verifier.result()


def _read_only_uri(db: Path) -> str:
    return db.resolve().as_uri() + "?mode=ro"


# -- files -----------------------------------------------------------------------------


@contextlib.contextmanager
def temporary_beside(path: Path) -> Iterator[Path]:
    """A fresh temporary path in ``path``'s directory (so a rename is atomic), removed on
    the way out with any journal SQLite left beside it."""
    _remove_stale(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    _remove(tmp)
    try:
        yield tmp
    finally:
        _remove(tmp)


def _remove_stale(path: Path) -> None:
    """Remove what a killed process left: temporaries beside ``path`` whose process
    (the number in their name) is gone."""
    prefix = f".{path.name}."
    for old in path.parent.glob(glob.escape(prefix) + "*.tmp"):
        pid = old.name[len(prefix) : -len(".tmp")]
        if pid.isdigit() and old.is_file() and not _alive(int(pid)):
            _remove(old)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's
    return True


def _remove(tmp: Path) -> None:
    for leftover in (tmp, *(tmp.with_name(tmp.name + s) for s in ("-journal", "-wal", "-shm"))):
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()


def publish(tmp: Path, path: Path) -> None:
    """Make ``tmp`` durable, then atomically put it at ``path`` (and make that durable)."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
