"""Export, import and backup against real SQLite files.

The history is made by the real pipeline (two areas, automatic and explicit snapshots,
a finalized round, a rollback, a refused command, non-ASCII text), so the export holds
every kind of event there is.
"""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from adapters import archive, sqlite_verify
from adapters.canonical import ZERO_HASH, canonical, chain_hash
from adapters.sqlite_schema import DatabaseLocked, WriterLock
from adapters.sqlite_store import SqliteStore
from domain.state import render
from tests.wire import (
    BIDDER,
    Msg,
    bid,
    create_area,
    example_lines,
    msg,
    open_round,
    register,
)
from tests.worker.harness import START, client_on, worker_on

Line = dict[str, Any]


class TickClock:
    """Moves one millisecond per reading, so every event has its own time."""

    def __init__(self) -> None:
        self.moment = START

    def now(self) -> dt.datetime:
        self.moment += dt.timedelta(milliseconds=1)
        return self.moment


def first_part() -> list[Msg]:
    return [
        create_area("North", id="c-n"),
        create_area("South", id="c-s"),
        register("AB", id="r-ab", name="Ann Bell"),
        register("CD", id="r-cd"),
        register("EF", area="South", id="r-ef", name="Éva Ñúñez ✓"),
        open_round(1, max_per_day=2, id="o-1"),
        bid("AB", ["2026-07-01", "2026-07-02"], id="b-ab"),
        bid("CD", ["2026-07-02"], id="b-cd"),
        withdraw("CD", id="w-cd"),
        msg("checkpoint", bid_year=2026, area="North", label="half ✓", id="k-1"),
        bid("AB", ["2026-07-03"], id="b-ab2"),
        msg("finalize_round", bid_year=2026, area="North", round=1, id="f-1"),
        register("AB", area="South", id="r-ab-dup"),  # refused: duplicate_initials
    ]


def withdraw(initials: str, **kw: Any) -> Msg:
    return msg("withdraw_bid", bid_year=2026, area="North", round=1, initials=initials,
               actor=BIDDER, **kw)  # fmt: skip


def second_part(to_event: int) -> list[Msg]:
    return [
        msg("rollback", bid_year=2026, area="North", to_event=to_event, id="rb-1"),
        register("GH", id="r-gh"),
        register("IJ", area="South", id="r-ij"),
        open_round(1, area="South", id="o-s1"),
        bid("EF", ["2026-12-24"], area="South", id="b-ef"),
    ]


@pytest.fixture
async def original(tmp_path: Path) -> tuple[Path, list[Msg]]:
    """A database with a varied history, and every message that made it."""
    db = tmp_path / "original.sqlite3"
    sent = first_part()
    async with client_on(db, clock=TickClock(), checkpoint_every=3) as client:
        replies = await client.ask(*sent)
        assert [r["ok"] for r in replies] == [True] * 12 + [False]
        more = second_part(to_event=replies[7]["event_id"])
        assert all(r["ok"] for r in await client.ask(*more))
    return db, sent + more


async def export_of(db: Path) -> bytes:
    store = await SqliteStore.open(db, writer=False)
    try:
        return b"".join([line async for line in archive.export_lines(store)])
    finally:
        await store.close()


def rows(db: Path, table: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
    finally:
        conn.close()


async def states_everywhere(db: Path) -> list[Any]:
    """Every scope's rendered state after every event, as the store reads them."""
    store = await SqliteStore.open(db, writer=False)
    try:
        head = (await store.head()).event_id
        keys = [(a["bid_year"], a["area"]) for a in await store.list_areas()]
        found = []
        for n in range(head + 1):
            for key in keys:
                state = await store.state_at(key, at_event=n)
                found.append(None if state is None else render(state))
        return found
    finally:
        await store.close()


async def test_rebuilt_database_verifies_and_matches_the_original_everywhere(
    original: tuple[Path, list[Msg]], tmp_path: Path
) -> None:
    db, _ = original
    exported = await export_of(db)
    rebuilt = tmp_path / "rebuilt.sqlite3"
    counts = archive.import_export(exported.splitlines(keepends=True), rebuilt)

    store = await SqliteStore.open(rebuilt, writer=False)
    try:
        assert await store.verify() == counts
    finally:
        await store.close()
    assert counts["snapshots"] >= 5  # checkpoint, finalize, rollback and automatic ones
    assert await export_of(rebuilt) == exported
    assert await states_everywhere(rebuilt) == await states_everywhere(db)
    for table in ("events", "snapshots"):
        assert rows(rebuilt, table) == rows(db, table), table


async def test_original_commands_are_duplicates_on_the_rebuilt_database(
    original: tuple[Path, list[Msg]], tmp_path: Path
) -> None:
    db, sent = original
    rebuilt = tmp_path / "rebuilt.sqlite3"
    archive.import_export((await export_of(db)).splitlines(), rebuilt)
    async with client_on(rebuilt, clock=TickClock()) as client:
        again = await client.ask(*sent)
    acked = [r for r in again if r["ok"]]
    assert len(acked) == len(sent) - 1
    assert all(r["duplicate"] for r in acked)
    assert [r["error"]["code"] for r in again if not r["ok"]] == ["duplicate_initials"]
    assert await export_of(rebuilt) == await export_of(db)  # nothing was appended


def rehash(lines: list[Line], start: int = 0) -> list[Line]:
    """Recompute the chain from ``lines[start]`` on, as a forger would."""
    prev = lines[start - 1]["hash"] if start else ZERO_HASH
    for obj in lines[start:]:
        obj["prev_hash"] = prev
        hashed = {k: v for k, v in obj.items() if k not in {"hash", "state"}}
        obj["hash"] = prev = chain_hash(prev, hashed)
    return lines


def first_snapshot_after(lines: list[Line], index: int) -> int:
    area = lines[index]["area"]
    return next(
        i for i in range(index + 1, len(lines)) if lines[i]["snapshot"] and lines[i]["area"] == area
    )


def alter(lines: list[Line]) -> tuple[list[Line], int]:
    lines[2]["actor"]["id"] = "someone-else"
    return lines, 3


def drop(lines: list[Line]) -> tuple[list[Line], int]:
    del lines[1]
    return lines, 2


def swap(lines: list[Line]) -> tuple[list[Line], int]:
    lines[1], lines[2] = lines[2], lines[1]
    return lines, 2


def forge_and_rehash(lines: list[Line]) -> tuple[list[Line], int]:
    lines[2]["after"]["user"]["name"] = "Forged Name"
    return rehash(lines, 2), first_snapshot_after(lines, 2) + 1


def forge_snapshot_state(lines: list[Line]) -> tuple[list[Line], int]:
    index = next(i for i, obj in enumerate(lines) if obj["snapshot"])
    lines[index]["state"]["users"] = []
    return lines, index + 1


def break_prev_hash(lines: list[Line]) -> tuple[list[Line], int]:
    lines[4]["prev_hash"] = "f" * 64
    hashed = {k: v for k, v in lines[4].items() if k not in {"hash", "state"}}
    lines[4]["hash"] = chain_hash("f" * 64, hashed)
    return rehash(lines, 5), 5


def reuse_message_id(lines: list[Line]) -> tuple[list[Line], int]:
    lines[3]["message_id"] = lines[2]["message_id"]
    return rehash(lines, 3), 4


def time_goes_back(lines: list[Line]) -> tuple[list[Line], int]:
    lines[3]["recorded_at"] = "2000-01-01T00:00:00.000000Z"
    return rehash(lines, 3), 4


def skip_seq(lines: list[Line]) -> tuple[list[Line], int]:
    lines[3]["seq"] += 1
    return rehash(lines, 3), 4


def extra_field(lines: list[Line]) -> tuple[list[Line], int]:
    lines[5]["note"] = "hello"
    return lines, 6


def drop_state(lines: list[Line]) -> tuple[list[Line], int]:
    index = next(i for i, obj in enumerate(lines) if obj["snapshot"])
    del lines[index]["state"]
    return lines, index + 1


def wrong_type(lines: list[Line]) -> tuple[list[Line], int]:
    lines[1]["seq"] = "1"
    return rehash(lines, 1), 2


def system_sends(lines: list[Line]) -> tuple[list[Line], int]:
    lines[1]["actor"] = {"id": "bidlog", "role": "system"}
    return rehash(lines, 1), 2


def bidder_creates(lines: list[Line]) -> tuple[list[Line], int]:
    lines[1]["actor"] = {"id": "u-1", "role": "bidder"}
    return rehash(lines, 1), 2


def anonymous_command(lines: list[Line]) -> tuple[list[Line], int]:
    lines[1]["message_id"] = lines[1]["message_digest"] = None
    return rehash(lines, 1), 2


def _rollback(lines: list[Line]) -> int:
    return next(i for i, obj in enumerate(lines) if obj["action"] == "rollback")


def rollback_elsewhere(lines: list[Line]) -> tuple[list[Line], int]:
    index = _rollback(lines)
    lines[index]["detail"]["to_event"] = next(o["event_id"] for o in lines if o["area"] == "South")
    return rehash(lines, index), index + 1


def rollback_forward(lines: list[Line]) -> tuple[list[Line], int]:
    index = _rollback(lines)
    lines[index]["detail"]["to_event"] = lines[index]["event_id"]
    return rehash(lines, index), index + 1


def rollback_restores_another_state(lines: list[Line]) -> tuple[list[Line], int]:
    index = _rollback(lines)
    lines[index]["after"]["users"][0]["name"] = "Forged"
    lines[index]["state"]["users"][0]["name"] = "Forged"
    return rehash(lines, index), index + 1


def untrue_before(lines: list[Line]) -> tuple[list[Line], int]:
    index = next(i for i, obj in enumerate(lines) if obj["action"] == "submit_bid")
    lines[index]["before"]["bid"] = {"initials": "ZZ", "days": ["2026-07-09"]}
    return rehash(lines, index), index + 1


def digest_not_hex(lines: list[Line]) -> tuple[list[Line], int]:
    lines[2]["message_digest"] = "zz"
    return rehash(lines, 2), 3


def year_out_of_range(lines: list[Line]) -> tuple[list[Line], int]:
    lines[0]["bid_year"] = 1999
    return rehash(lines, 0), 1


def time_not_utc(lines: list[Line]) -> tuple[list[Line], int]:
    lines[1]["recorded_at"] = lines[1]["recorded_at"].replace("Z", "+00:00")
    return rehash(lines, 1), 2


def bid_as_snapshot(lines: list[Line]) -> tuple[list[Line], int]:
    index = next(i for i, obj in enumerate(lines) if obj["action"] == "submit_bid")
    lines[index]["snapshot"] = True  # with its state too: only the action tells
    lines[index]["state"] = lines[first_snapshot_after(lines, index)]["state"]
    return rehash(lines, index), index + 1


def detail_added(lines: list[Line]) -> tuple[list[Line], int]:
    lines[0]["detail"] = {"zzz": 1}
    return rehash(lines, 0), 1


def unknown_action(lines: list[Line]) -> tuple[list[Line], int]:
    lines[1]["action"] = "frobnicate"
    return rehash(lines, 1), 2


Mutation = Callable[[list[Line]], tuple[list[Line], int]]


@pytest.mark.parametrize(
    ("mutate", "says"),
    [
        (alter, "hash does not match"),
        (drop, "event id 3 where 2 was expected"),
        (swap, "event id 3 where 2 was expected"),
        (forge_and_rehash, "snapshot differs from the replayed state"),
        (forge_snapshot_state, "snapshot differs from the replayed state"),
        (break_prev_hash, "prev_hash is not the hash of event 4"),
        (reuse_message_id, "used twice"),
        (time_goes_back, "decreasing recorded_at"),
        (skip_seq, "seq 4 where 3 was expected"),
        (extra_field, "unknown fields ['note']"),
        (drop_state, "'state' must be present exactly on snapshots"),
        (wrong_type, "not an event"),
        (system_sends, "role system sends no messages"),
        (bidder_creates, "role bidder may not send create_area"),
        (anonymous_command, "only bidlog's automatic checkpoints have no message"),
        (rollback_elsewhere, "which is not an event of its scope"),
        (rollback_forward, "a rollback's to_event must be an earlier event"),
        (rollback_restores_another_state, "the state it restores is not the scope's at event"),
        (digest_not_hex, "message_digest is not 64 lowercase hex digits"),
        (year_out_of_range, "bid_year 1999 is outside 2000-2100"),
        (unknown_action, "unknown action 'frobnicate'"),
        (time_not_utc, "+00:00' is not a UTC time with microseconds"),
        (bid_as_snapshot, "wrong snapshot flag for submit_bid"),
        (detail_added, "detail of a create_area holds 'zzz'"),
        (untrue_before, "its `before` is not what its scope held before it"),
    ],
)
async def test_a_broken_or_forged_export_is_refused_naming_the_line(
    original: tuple[Path, list[Msg]], tmp_path: Path, mutate: Mutation, says: str
) -> None:
    lines = [msgspec.json.decode(x) for x in (await export_of(original[0])).splitlines()]
    bad, line = mutate(lines)
    target = tmp_path / "new" / "rebuilt.sqlite3"
    target.parent.mkdir()
    with pytest.raises(archive.BadLine) as caught:
        archive.import_export([canonical(obj) + b"\n" for obj in bad], target)
    assert caught.value.line == line
    assert str(caught.value).startswith(f"line {line}: ")
    assert says in str(caught.value)
    assert sorted(p.name for p in target.parent.iterdir()) == ["rebuilt.sqlite3.lock"]


@pytest.mark.parametrize(
    ("junk", "says"),
    [(b"{oops", "not JSON"), (b"[1, 2]", "not a JSON object"), (b"\xff\xfe", "not JSON")],
)
async def test_an_unreadable_line_is_refused_counting_blank_lines(
    original: tuple[Path, list[Msg]], tmp_path: Path, junk: bytes, says: str
) -> None:
    lines = (await export_of(original[0])).splitlines(keepends=True)
    lines[3:3] = [b"\n", b"  \n", junk + b"\n"]
    target = tmp_path / "rebuilt.sqlite3"
    with pytest.raises(archive.BadLine, match=f"^line 6: {says}"):
        archive.import_export(lines, target)
    assert not target.exists()


def test_a_message_file_given_to_import_is_named_as_such(tmp_path: Path) -> None:
    """A file of commands is not an export: the refusal says so, and what feeds one."""
    target = tmp_path / "rebuilt.sqlite3"
    with pytest.raises(
        archive.BadLine, match=r"^line 1: .*a message, not an event: `bidlog replay`"
    ):
        archive.import_export(example_lines(), target)
    assert not target.exists()


async def test_blank_lines_are_ignored(original: tuple[Path, list[Msg]], tmp_path: Path) -> None:
    exported = await export_of(original[0])
    spaced = [x + b"\n\n" for x in exported.splitlines()]
    archive.import_export(spaced, tmp_path / "rebuilt.sqlite3")
    assert await export_of(tmp_path / "rebuilt.sqlite3") == exported


async def test_import_refuses_a_target_that_is_not_new(
    original: tuple[Path, list[Msg]], tmp_path: Path
) -> None:
    db, _ = original
    exported = (await export_of(db)).splitlines()
    before = db.read_bytes()
    with pytest.raises(archive.ArchiveError, match="already exists and is not empty"):
        archive.import_export(exported, db)
    assert db.read_bytes() == before
    empty = tmp_path / "empty.sqlite3"
    empty.touch()
    assert archive.import_export(exported, empty)["events"] == len(exported)


def test_import_refuses_a_target_another_process_writes(tmp_path: Path) -> None:
    target = tmp_path / "new.sqlite3"
    lock = WriterLock.acquire(target)
    try:
        with pytest.raises(DatabaseLocked):
            archive.import_export([], target)
    finally:
        lock.release()
    assert not target.exists()


async def test_an_empty_export_builds_an_empty_database(tmp_path: Path) -> None:
    target = tmp_path / "new.sqlite3"
    assert archive.import_export([], target) == {"events": 0, "snapshots": 0}
    async with client_on(target, clock=TickClock()) as client:
        assert (await client.ask_one(create_area()))["event_id"] == 1


async def test_backup_of_a_database_being_written_is_consistent_and_verifies(
    original: tuple[Path, list[Msg]], tmp_path: Path
) -> None:
    db, _ = original
    copy = tmp_path / "copy.sqlite3"
    async with worker_on(db, clock=TickClock()) as worker, await worker.connect() as stream:
        feeding = [register(f"Z{chr(65 + i)}", id=f"live-{i}") for i in range(26)]
        await stream.send(b"".join(msgspec.json.encode(m) + b"\n" for m in feeding))
        counts = await anyio.to_thread.run_sync(archive.backup, db, copy)
        await stream.send_eof()
        while await _receive_or_none(stream):
            pass
    assert archive.verify_connection(sqlite3.connect(copy)) == counts
    full = (await export_of(db)).splitlines(keepends=True)
    assert await export_of(copy) == b"".join(full[: counts["events"]])
    assert hidden_files(tmp_path) == []


def hidden_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


async def _receive_or_none(stream: Any) -> bytes | None:
    try:
        data: bytes = await stream.receive()
    except anyio.EndOfStream:
        return None
    return data


def test_backup_and_import_refuse_bad_paths(tmp_path: Path) -> None:
    with pytest.raises(archive.ArchiveError, match="no database"):
        archive.backup(tmp_path / "missing.sqlite3", tmp_path / "copy.sqlite3")
    db = tmp_path / "db.sqlite3"
    db.write_bytes(b"")
    for out in (tmp_path / "." / "db.sqlite3", tmp_path / "db.sqlite3-wal"):
        with pytest.raises(archive.ArchiveError, match="is the database itself"):
            archive.backup(db, out)
    with pytest.raises(archive.ArchiveError, match="no directory"):
        archive.backup(db, tmp_path / "nowhere" / "copy.sqlite3")
    with pytest.raises(archive.ArchiveError, match="no directory"):
        archive.import_export([], tmp_path / "nowhere" / "new.sqlite3")


async def test_backup_and_export_never_replace_the_other_kind_of_archive(
    original: tuple[Path, list[Msg]], tmp_path: Path
) -> None:
    db, _ = original
    exported = tmp_path / "log.ndjson"
    exported.write_bytes(b'{"event_id":1}\n')
    copy = tmp_path / "copy.sqlite3"
    archive.backup(db, copy)
    with pytest.raises(archive.ArchiveError, match="is not a bidlog database"):
        archive.backup(db, exported)
    foreign = tmp_path / "foreign.sqlite3"
    with sqlite3.connect(foreign) as conn:  # someone else's SQLite database
        conn.execute("CREATE TABLE t (x)")  # user_version 0, as most have
    conn.close()
    with pytest.raises(archive.ArchiveError, match="is not a bidlog database"):
        archive.backup(db, foreign)
    with pytest.raises(archive.ArchiveError, match="an export never replaces one"):
        archive.refuse_overwrite(db, copy, writing="export")
    archive.refuse_overwrite(db, exported, writing="export")  # an older export: replaced
    assert exported.read_bytes() == b'{"event_id":1}\n'
    assert archive.backup(db, copy)["events"] > 0  # an older backup: replaced


def test_a_backup_or_import_told_to_stop_writes_nothing(tmp_path: Path) -> None:
    db = tmp_path / "db.sqlite3"
    archive.import_export([], db)
    stop = threading.Event()
    stop.set()  # as a signal does, while the copy runs
    with pytest.raises(archive.Interrupted):
        archive.backup(db, tmp_path / "copy.sqlite3", stop)
    with pytest.raises(archive.Interrupted):
        archive.import_export([], tmp_path / "new.sqlite3", stop)
    assert not (tmp_path / "copy.sqlite3").exists()
    assert not (tmp_path / "new.sqlite3").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


async def test_backup_and_import_tell_their_progress_and_stop_while_checking(
    original: tuple[Path, list[Msg]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The final verify of a copy or an import is most of their time (8 of 10 s for
    500,000 events): a signal used to wait for its end. It is checked between chunks."""
    monkeypatch.setattr(sqlite_verify, "CHUNK", 3)
    db, _ = original
    lines = (await export_of(db)).splitlines(keepends=True)
    total = len(lines)
    heard: list[tuple[str, int, int | None]] = []
    stop = threading.Event()

    def tick(phase: str, done: int, last: int | None) -> None:
        heard.append((phase, done, last))

    def stop_at_checking(phase: str, done: int, last: int | None) -> None:
        if phase == "checking":
            heard.append((phase, done, last))
            stop.set()  # as a signal does

    counts = archive.backup(db, tmp_path / "copy.sqlite3", tick=tick)
    assert counts == archive.verify_connection(sqlite3.connect(db))
    assert heard[0] == ("copying", 0, None)
    assert heard[1:] == [("checking", done, total) for done in range(3, total, 3)]

    heard.clear()
    with pytest.raises(archive.Interrupted):
        archive.backup(db, tmp_path / "copy2.sqlite3", stop, stop_at_checking)
    stop.clear()
    with pytest.raises(archive.Interrupted):
        archive.import_export(lines, tmp_path / "new.sqlite3", stop, stop_at_checking)
    assert heard == [("checking", 3, total)] * 2  # stopped at the next chunk
    assert not (tmp_path / "copy2.sqlite3").exists()
    assert not (tmp_path / "new.sqlite3").exists()
    assert hidden_files(tmp_path) == []


def test_temporaries_of_a_killed_process_are_removed(tmp_path: Path) -> None:
    db = tmp_path / "db.sqlite3"
    archive.import_export([], db)  # an empty database to copy
    dead_pid = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1  # no such process
    out = tmp_path / "copy.sqlite3"
    dead = tmp_path / f".copy.sqlite3.{dead_pid}.tmp"
    live = tmp_path / f".copy.sqlite3.{os.getppid()}.tmp"  # the test runner's parent
    for leftover in (dead, live, dead.with_name(dead.name + "-journal")):
        leftover.write_bytes(b"half a copy")
    odd = tmp_path / f".copy.sqlite3.{dead_pid + 1}.tmp"
    odd.mkdir()  # not ours to remove: a directory
    archive.backup(db, out)
    assert not dead.exists() and not dead.with_name(dead.name + "-journal").exists()
    assert live.exists() and odd.is_dir()


def test_export_over_a_named_pipe_does_not_wait_for_a_writer(tmp_path: Path) -> None:
    db = tmp_path / "db.sqlite3"
    archive.import_export([], db)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    archive.refuse_overwrite(db, fifo, writing="export")  # returns: nothing to read
    archive.refuse_overwrite(db, fifo, writing="database")


async def test_backup_and_export_never_replace_a_database_in_use(
    original: tuple[Path, list[Msg]], tmp_path: Path
) -> None:
    db, _ = original
    served = tmp_path / "served.sqlite3"
    archive.backup(db, served)
    async with worker_on(served, clock=TickClock()) as worker, await worker.connect() as stream:
        await stream.send(msgspec.json.encode(create_area("Late")) + b"\n")
        assert b'"ok":true' in await stream.receive()
        for replace in (
            lambda: archive.backup(db, served),
            lambda: archive.refuse_overwrite(db, served),
        ):
            with pytest.raises(archive.ArchiveError, match="in use or not closed cleanly"):
                replace()
        await stream.send_eof()
    # Closed cleanly (no -wal left): an old backup may be replaced by a newer one.
    assert archive.backup(db, served)["events"] > 0
    # Checked with a read-only open, which leaves an empty -wal and a -shm: still so.
    reader = await SqliteStore.open(served, writer=False)
    assert (await reader.verify())["events"] > 0
    await reader.close()
    assert (tmp_path / "served.sqlite3-wal").stat().st_size == 0
    assert (tmp_path / "served.sqlite3-shm").exists()
    assert archive.backup(db, served)["events"] > 0
    # A crash's leftover log beside it: refused, the file is left as it was.
    (tmp_path / "served.sqlite3-wal").write_bytes(b"x")
    before = served.read_bytes()
    with pytest.raises(archive.ArchiveError, match=r"served\.sqlite3-wal is beside it"):
        archive.backup(db, served)
    assert served.read_bytes() == before
    (tmp_path / "served.sqlite3-wal").unlink()
    (tmp_path / "served.sqlite3-journal").write_bytes(b"x")  # a rollback journal: the same
    with pytest.raises(archive.ArchiveError, match=r"served\.sqlite3-journal is beside it"):
        archive.backup(db, served)
    (tmp_path / "served.sqlite3-journal").unlink()
    lock = WriterLock.acquire(served)
    try:
        with pytest.raises(archive.ArchiveError, match="a bidlog process holds"):
            archive.backup(db, served)
    finally:
        lock.release()
