"""The SQLite side of the store: its errors, the schema, the writer lock, and opening.

Tables (JSON columns hold canonical JSON text, see ``adapters.canonical``):

- ``events``: one row per audit event; ``event_id`` is the rowid, given explicitly.
- ``snapshots``: the full rendered state at every snapshot event.
The idempotency record of an acknowledged command is its event row: ``message_id``,
``message_digest`` and the acknowledgement (``event_id``, ``seq``, ``recorded_at``), found
through the unique index ``events_by_message``. A separate acks table would repeat those
columns and cost a second B-tree write per command (measured: ~5 us of ~25 us an event).

Indexes: ``events_by_scope`` (bid year, area, event id) serves every per-scope read; a
time lookup needs none of its own: ``recorded_at`` never decreases along ``event_id``
(append refuses it, verify checks it), so the last event at or before a time is found by
binary search over the primary key, which is cheaper than a second index on every insert.

Triggers refuse UPDATE and DELETE on both tables: the log is append-only through SQL too.
``PRAGMA user_version`` carries ``DB_VERSION``; any other non-zero version is refused.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
from pathlib import Path
from typing import Literal

DB_VERSION = 1
Synchronous = Literal["full", "normal"]

_TABLES = """
CREATE TABLE events (
    event_id       INTEGER PRIMARY KEY,
    seq            INTEGER NOT NULL,
    bid_year       INTEGER NOT NULL,
    area           TEXT    NOT NULL,
    recorded_at    TEXT    NOT NULL,
    action         TEXT    NOT NULL,
    actor          TEXT    NOT NULL,
    cause          TEXT    NOT NULL,
    message_id     TEXT,
    message_digest TEXT,
    detail         TEXT    NOT NULL,
    before         TEXT,
    after          TEXT,
    snapshot       INTEGER NOT NULL CHECK (snapshot IN (0, 1)),
    schema_version INTEGER NOT NULL,
    prev_hash      TEXT    NOT NULL,
    hash           TEXT    NOT NULL
);
CREATE INDEX events_by_scope ON events (bid_year, area, event_id);
CREATE TABLE snapshots (
    event_id INTEGER PRIMARY KEY,
    bid_year INTEGER NOT NULL,
    area     TEXT    NOT NULL,
    state    TEXT    NOT NULL
);
CREATE INDEX snapshots_by_scope ON snapshots (bid_year, area, event_id);
CREATE UNIQUE INDEX events_by_message ON events (message_id) WHERE message_id IS NOT NULL;
"""

_TRIGGER = """
CREATE TRIGGER {table}_no_{verb} BEFORE {VERB} ON {table}
BEGIN SELECT RAISE(ABORT, '{table} are append-only: {verb} refused'); END;
"""

PROTECTED_TABLES = ("events", "snapshots")


def schema_sql() -> str:
    """Every statement that creates a version-``DB_VERSION`` database (no transaction)."""
    triggers = "".join(
        _TRIGGER.format(table=table, verb=verb, VERB=verb.upper())
        for table in PROTECTED_TABLES
        for verb in ("update", "delete")
    )
    return _TABLES + triggers + f"PRAGMA user_version = {DB_VERSION};\n"


class StoreError(Exception):
    """The database cannot be used: missing, foreign, of another version, or misused."""


class DatabaseLocked(StoreError):
    """Another process holds the database for writing."""


class SchemaVersionError(StoreError):
    """The database was written by a bidlog with a schema this one does not know."""


class InvalidBatch(StoreError):
    """A batch breaks the log's invariants (gap in ids, time going back): a caller bug."""


class WriterLock:
    """An exclusive ``flock`` on ``<db>.lock`` (not on the database file itself, so it
    never mixes with SQLite's own POSIX locks), holding the owner's pid for messages.

    The lock is named after the database's real path, so a symbolic link to a database
    takes the same lock. A database file with a second hard link is refused (see
    ``refuse_hard_links``).
    """

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, db_path: Path) -> WriterLock:
        lock_path = lock_path_for(db_path)
        refuse_hard_links(db_path)
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StoreError(f"cannot open the lock file {lock_path}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_owner(fd)
            os.close(fd)
            raise DatabaseLocked(
                f"database {db_path} is in use by another bidlog process ({owner}; "
                f"lock file {lock_path})"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(fd)

    @classmethod
    def inherit(cls, fd: int, db_path: Path) -> WriterLock:
        """The lock of ``db_path`` that another process took and passed on: ``fd`` is
        its open file, and the lock is held until both processes close it.

        ``fd`` must be open on ``db_path``'s lock file (``StoreError`` otherwise), and
        no other open file may hold the lock. (``flock`` is a no-op for the holder's
        file: it alone cannot tell the holder's file from a fresh one that holds
        nothing, which is why the file is checked first.)"""
        lock_path = lock_path_for(db_path)
        try:
            held, named = os.fstat(fd), os.stat(lock_path)
        except OSError as exc:
            raise StoreError(f"descriptor {fd} is not the lock file {lock_path}: {exc}") from exc
        if (held.st_dev, held.st_ino) != (named.st_dev, named.st_ino):
            raise StoreError(f"descriptor {fd} is not the lock file {lock_path}")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a no-op on the holder's file
        except OSError as exc:
            raise StoreError(f"descriptor {fd} does not hold the writer lock: {exc}") from exc
        return cls(fd)

    @property
    def fd(self) -> int:
        assert self._fd is not None, "the lock was released"
        return self._fd

    @staticmethod
    def held(db_path: Path) -> bool:
        """Whether a process holds the writer lock of ``db_path`` now."""
        try:
            fd = os.open(lock_path_for(db_path), os.O_RDONLY)
        except OSError:
            return False  # no lock file: nobody holds it
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def lock_path_for(db_path: Path) -> Path:
    """``<db>.lock`` beside the database's real file (symbolic links resolved)."""
    real = db_path.resolve()
    return real.with_name(real.name + ".lock")


def refuse_hard_links(db_path: Path) -> None:
    """Raise ``StoreError`` if the database file has a second name (hard link).

    SQLite finds a database's ``-wal`` by file name: through two names, writers fork the
    log, and a reader through one name misses what was committed through the other.
    """
    if db_path.is_dir():
        raise StoreError(f"{db_path} is a directory, not a database file")
    links = _hard_links(db_path)
    if links > 1:
        raise StoreError(
            f"database {db_path} has {links} hard links; SQLite keeps its write-ahead log "
            "by file name, so through two names writes fork the database and reads miss "
            "commits. Remove the other names (or copy it with `bidlog backup`)"
        )


def _hard_links(db_path: Path) -> int:
    try:
        return os.stat(db_path).st_nlink
    except OSError:
        return 0  # a new database (or a path the lock file will report on)


def _read_owner(fd: int) -> str:
    with contextlib.suppress(OSError):
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        if text.isdigit():
            return f"pid {text}"
    return "pid unknown"


def prepare_writer(conn: sqlite3.Connection, path: Path, synchronous: Synchronous) -> None:
    """Settings of the writing connection; create the schema in a new database."""
    conn.execute("PRAGMA busy_timeout = 5000")
    version = _user_version(conn, path)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {'FULL' if synchronous == 'full' else 'NORMAL'}")
    if version == 0:
        _require_empty(conn, path)
        _create_schema(conn)
    else:
        check_version(version, path)
        _require_writable(conn, path, version)


def _require_writable(conn: sqlite3.Connection, path: Path, version: int) -> None:
    """SQLite opens a file it may not write read-only, without a word: a worker would
    start, then answer every command persistence_failed. Try a write, and undo it."""
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(f"PRAGMA user_version = {version}")
        finally:
            conn.execute("ROLLBACK")
    except sqlite3.Error as exc:
        raise StoreError(f"cannot write {path}: {exc}") from exc


def prepare_reader(conn: sqlite3.Connection, path: Path) -> None:
    """Settings of a read-only connection; the database must already be a bidlog one."""
    conn.execute("PRAGMA busy_timeout = 5000")
    version = _user_version(conn, path)
    if version == 0:
        raise StoreError(f"{path} is not an initialized bidlog database")
    check_version(version, path)


def check_version(version: int, path: Path) -> None:
    if version != DB_VERSION:
        raise SchemaVersionError(
            f"database {path} has schema version {version}; "
            f"this bidlog reads and writes schema version {DB_VERSION} only"
        )


def _user_version(conn: sqlite3.Connection, path: Path) -> int:
    try:
        row = conn.execute("PRAGMA user_version").fetchone()
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{path} is not a usable SQLite database: {exc}") from exc
    return int(row[0])


def _require_empty(conn: sqlite3.Connection, path: Path) -> None:
    (count,) = conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()
    if count:
        raise StoreError(f"{path} holds tables but is not a bidlog database (user_version 0)")


def _create_schema(conn: sqlite3.Connection) -> None:
    try:
        conn.executescript(f"BEGIN IMMEDIATE;\n{schema_sql()}COMMIT;")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
