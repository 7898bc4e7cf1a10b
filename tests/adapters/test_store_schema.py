"""Opening the store: schema and version, append-only triggers, the one-writer lock."""

from __future__ import annotations

import fcntl
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from adapters import archive
from adapters.sqlite_schema import DB_VERSION, lock_path_for, prepare_writer
from adapters.sqlite_store import DatabaseLocked, SchemaVersionError, SqliteStore, StoreError
from domain.records import Batch
from tests.adapters.store_support import NORTH, Driver, checkpoint, scenario

ROOT = Path(__file__).resolve().parents[2]


def pragma(db: Path, name: str) -> object:
    with sqlite3.connect(db) as conn:
        return conn.execute(f"PRAGMA {name}").fetchone()[0]


def set_user_version(db: Path, version: int) -> None:
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version = {version}")
    conn.close()


async def filled(db: Path) -> Driver:
    store = await SqliteStore.open(db)
    driver = Driver(store)
    for command in scenario():
        await driver.run(command)
    return driver


async def test_new_database_is_wal_with_the_schema_version(tmp_path: Path) -> None:
    db = tmp_path / "new.sqlite3"
    store = await SqliteStore.open(db)
    await store.close()
    assert pragma(db, "user_version") == DB_VERSION
    assert pragma(db, "journal_mode") == "wal"
    tables = {
        row[0] for row in sqlite3.connect(db).execute("SELECT name FROM sqlite_schema").fetchall()
    }
    assert {"events", "snapshots", "events_by_message"} <= tables


async def test_reopening_keeps_the_schema(tmp_path: Path) -> None:
    db = tmp_path / "db.sqlite3"
    for _ in range(2):
        store = await SqliteStore.open(db)
        assert (await store.head()).event_id == 0
        await store.close()


@pytest.mark.parametrize("writer", [True, False])
async def test_unknown_schema_version_is_refused_naming_both(tmp_path: Path, writer: bool) -> None:
    db = tmp_path / "db.sqlite3"
    await (await SqliteStore.open(db)).close()
    set_user_version(db, 99)
    with pytest.raises(SchemaVersionError, match=rf"version 99.*version {DB_VERSION}"):
        await SqliteStore.open(db, writer=writer)
    assert not _locked(db), "a failed open must release the writer lock"


async def test_a_foreign_sqlite_database_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "other.sqlite3"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE t (x)")
    with pytest.raises(StoreError, match="not a bidlog database"):
        await SqliteStore.open(db)


async def test_a_file_that_is_not_sqlite_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "junk.sqlite3"
    db.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(StoreError, match="not a usable SQLite database"):
        await SqliteStore.open(db)


async def test_a_database_the_writer_cannot_write_is_refused(tmp_path: Path) -> None:
    """SQLite opens a file it may not write read-only without a word (a worker then
    answered every command persistence_failed); the writer's set-up now tries a write.
    A read-only connection stands in for a file the process may not write."""
    db = tmp_path / "db.sqlite3"
    await (await SqliteStore.open(db)).close()
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, isolation_level=None)
    try:
        with pytest.raises(StoreError, match=r"cannot write .*readonly"):
            prepare_writer(conn, db, "full")
    finally:
        conn.close()


async def test_a_reader_needs_an_existing_database(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no database"):
        await SqliteStore.open(tmp_path / "missing.sqlite3", writer=False)
    assert not (tmp_path / "missing.sqlite3").exists()


async def test_bad_synchronous_option_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="synchronous"):
        await SqliteStore.open(tmp_path / "db.sqlite3", synchronous="off")


@pytest.mark.parametrize(("option", "level"), [("full", 2), ("normal", 1)])
async def test_synchronous_option_reaches_sqlite(tmp_path: Path, option: str, level: int) -> None:
    store = await SqliteStore.open(tmp_path / "db.sqlite3", synchronous=option)
    try:
        found = await store._run(lambda conn: conn.execute("PRAGMA synchronous").fetchone()[0])
        assert found == level
    finally:
        await store.close()


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE events SET action = 'checkpoint' WHERE event_id = 2",
        "DELETE FROM events WHERE event_id = 14",
        "UPDATE snapshots SET state = '{}'",
        "DELETE FROM snapshots",
        "UPDATE events SET message_digest = 'x'",
    ],
)
async def test_triggers_refuse_update_and_delete(tmp_path: Path, statement: str) -> None:
    db = tmp_path / "db.sqlite3"
    await (await filled(db)).store.close()
    conn = sqlite3.connect(db)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute(statement)
    conn.rollback()
    conn.close()
    store = await SqliteStore.open(db)
    assert await store.verify() == {"events": 14, "snapshots": 3}
    await store.close()


async def test_a_second_writer_is_refused_and_a_reader_is_served(tmp_path: Path) -> None:
    db = tmp_path / "db.sqlite3"
    driver = await filled(db)
    with pytest.raises(
        DatabaseLocked, match=rf"in use by another bidlog process \(pid {os.getpid()}"
    ):
        await SqliteStore.open(db)
    reader = await SqliteStore.open(db, writer=False)
    assert await reader.state_at(NORTH) == driver.ledger.state(NORTH)
    await driver.run(checkpoint(label="late"))
    assert (await reader.head()).event_id == 15, "a reader sees commits made after it opened"
    with pytest.raises(StoreError, match="read-only"):
        await reader.append(Batch(()))
    await reader.close()
    await driver.store.close()
    again = await SqliteStore.open(db)
    assert (await again.head()).event_id == 15
    await again.close()


async def test_the_lock_names_another_process(tmp_path: Path) -> None:
    db = tmp_path / "db.sqlite3"
    with process_holding(db) as pid:
        with pytest.raises(DatabaseLocked, match=rf"pid {pid}\b"):
            await SqliteStore.open(db)
        reader = await SqliteStore.open(db, writer=False)
        await reader.close()
    store = await SqliteStore.open(db)  # the lock went with the process
    await store.close()


async def test_an_inherited_lock_must_be_this_databases_lock_held(tmp_path: Path) -> None:
    """The writer process gets the worker's lock as a descriptor: it is taken only if it
    is open on this database's lock file and holds the lock (a copy of the holder's)."""
    db, other = tmp_path / "db.sqlite3", tmp_path / "other.sqlite3"
    holder = await SqliteStore.open(db)
    await (await SqliteStore.open(other)).close()  # leaves its lock file
    wrong_file = os.open(tmp_path / "unrelated", os.O_RDWR | os.O_CREAT)
    other_lock = os.open(lock_path_for(other), os.O_RDWR)
    fresh = os.open(lock_path_for(db), os.O_RDWR)  # the right file, but it holds nothing
    try:
        for fd in (wrong_file, other_lock):
            with pytest.raises(StoreError, match=rf"descriptor {fd} is not the lock file"):
                await SqliteStore.open(db, lock_fd=fd)
        with pytest.raises(StoreError, match=rf"descriptor {fresh} does not hold"):
            await SqliteStore.open(db, lock_fd=fresh)
        inherited = await SqliteStore.open(db, lock_fd=os.dup(holder.lock_fd))
        await inherited.close()
    finally:
        for fd in (wrong_file, other_lock, fresh):
            os.close(fd)
        await holder.close()


async def test_a_symbolic_link_to_a_held_database_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "db.sqlite3"
    (tmp_path / "other").mkdir()
    link = tmp_path / "other" / "alias.sqlite3"
    link.symlink_to(db)
    with process_holding(db) as pid:
        with pytest.raises(DatabaseLocked, match=rf"pid {pid}\b"):
            await SqliteStore.open(link)
    store = await SqliteStore.open(link)  # free again: through the link, the same lock
    with pytest.raises(DatabaseLocked):
        await SqliteStore.open(db)
    await store.close()


async def test_a_database_with_a_second_hard_link_is_not_opened(
    tmp_path: Path,
) -> None:
    db = tmp_path / "db.sqlite3"
    driver = await filled(db)
    await driver.store.close()
    alias = tmp_path / "alias.sqlite3"
    os.link(db, alias)
    for name in (db, alias):
        with pytest.raises(StoreError, match="2 hard links"):
            await SqliteStore.open(name)
        with pytest.raises(StoreError, match="reads miss commits"):
            await SqliteStore.open(name, writer=False)
        with pytest.raises(StoreError, match="2 hard links"):
            archive.backup(name, tmp_path / "copy.sqlite3")
    alias.unlink()
    store = await SqliteStore.open(db)
    await store.close()


@contextmanager
def process_holding(db: Path) -> Iterator[int]:
    """A separate bidlog process holding ``db`` for writing until the block exits."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-c", _HOLD_LOCK, str(db)]
    with subprocess.Popen(
        command, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    ) as holder:
        assert holder.stdin is not None and holder.stdout is not None
        try:
            assert holder.stdout.readline() == b"ready\n"
            yield holder.pid
        finally:
            holder.stdin.close()  # the holder's cue to close the store and exit
            assert holder.wait(timeout=30) == 0


async def test_close_is_idempotent_and_releases_the_lock(tmp_path: Path) -> None:
    db = tmp_path / "db.sqlite3"
    store = await SqliteStore.open(db)
    assert _locked(db)
    await store.close()
    await store.close()
    assert not _locked(db)


_HOLD_LOCK = """
import sys, anyio
from adapters.sqlite_store import SqliteStore
async def main():
    store = await SqliteStore.open(sys.argv[1])
    print("ready", flush=True)
    await anyio.to_thread.run_sync(sys.stdin.read)
    await store.close()
anyio.run(main, backend="asyncio")
"""


def _locked(db: Path) -> bool:
    fd = os.open(lock_path_for(db), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


async def test_a_lock_file_that_cannot_be_made_is_a_clear_error(tmp_path: Path) -> None:
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    with pytest.raises(StoreError, match="cannot open the lock file"):
        await SqliteStore.open(not_a_folder / "db.sqlite3")
