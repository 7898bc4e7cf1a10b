"""The operator commands as an operator runs them: replay, export, import, verify, backup."""

from __future__ import annotations

import itertools
import os
import pty
import signal
import sqlite3
import string
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from tests.e2e.proc import BIN, SocketClient, bidlog, replies, start_socket_worker
from tests.wire import EXAMPLE, bid, create_area, get_state, line, msg, open_round, register

INITIALS = ["".join(p) for p in itertools.product(string.ascii_uppercase, repeat=2)]


@pytest.fixture
def sockdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="bl"))  # AF_UNIX paths are short
    yield path
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


@pytest.fixture
def example_db(tmp_path: Path) -> Path:
    db = tmp_path / "example.sqlite3"
    assert bidlog("replay", EXAMPLE, "--db", db).returncode == 0
    return db


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A database of 40,000 events, and its export: long enough work to be seen."""
    where = tmp_path_factory.mktemp("big")
    db, export = where / "big.sqlite3", where / "big.ndjson"
    assert bidlog("serve", "--db", db, stdin=many_commands(40_000)).returncode == 0
    assert bidlog("export", "--db", db, "--out", export).returncode == 0
    return db, export


def summary(done: subprocess.CompletedProcess[bytes]) -> dict[str, Any]:
    assert b"Traceback" not in done.stderr, done.stderr.decode()
    result: dict[str, Any] = msgspec.json.decode(done.stdout)
    return result


def sql(db: Path, query: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(query).fetchall()
    finally:
        conn.close()


def fails_cleanly(done: subprocess.CompletedProcess[bytes], says: str) -> None:
    assert done.returncode == 1, done.stderr
    err = done.stderr.decode()
    assert "Traceback" not in err
    assert says in err, err


def many_commands(count: int) -> bytes:
    """``count`` command lines: an area, users, a round, then bids (all succeed)."""
    users = INITIALS[:50]
    head = [create_area(id="c"), *(register(i, id=f"r-{i}") for i in users)]
    head.append(open_round(1, max_per_day=1000, id="o"))
    bids = (
        bid(users[n % 50], [f"2026-07-{1 + n % 28:02d}"], id=f"b-{n}")
        for n in range(count - len(head))
    )
    return b"".join(line(m) for m in [*head, *bids])


# -- replay ----------------------------------------------------------------------------


def test_replay_into_a_database_then_again_gives_only_duplicates(tmp_path: Path) -> None:
    db = tmp_path / "b.sqlite3"
    first = bidlog("replay", EXAMPLE, "--db", db)
    assert first.returncode == 0
    assert summary(first) == {
        "lines": 15,
        "ok": 15,
        "duplicate": 0,
        "failed": 0,
        "failures": [],
        "unanswered": 0,
    }
    assert b"15 lines answered: 15 ok, 0 duplicate, 0 failed" in first.stderr
    again = summary(bidlog("replay", EXAMPLE, "--db", db))
    assert (again["ok"], again["duplicate"], again["failed"]) == (4, 11, 0)  # 4 queries
    assert sql(db, "SELECT count(*) FROM events") == [(11,)]


def test_replay_names_failures_by_file_and_line_and_exits_1(tmp_path: Path) -> None:
    db = tmp_path / "b.sqlite3"
    feed = tmp_path / "feed.ndjson"
    feed.write_bytes(
        line(create_area(id="a1"))
        + b"\n   \n"
        + b"{not json\n"
        + line(create_area(id="a2"))
        + line(register("AB", id="u1"))
        + line(register("AB", id="u2"))
        + line(register("CD", area="Nowhere", id="u3"))
        + b"\x0c\n"  # form feed: blank to Python, not to JSON
    )
    done = bidlog("replay", feed, "--db", db)
    assert done.returncode == 1
    result = summary(done)
    assert (result["lines"], result["ok"], result["failed"]) == (7, 2, 5)
    where = [(f["file"], f["line"], f["id"], f["code"]) for f in result["failures"]]
    assert where == [
        (str(feed), 4, None, "malformed_json"),
        (str(feed), 5, "a2", "area_exists"),
        (str(feed), 7, "u2", "duplicate_initials"),
        (str(feed), 8, "u3", "unknown_area"),
        (str(feed), 9, None, "malformed_json"),
    ]
    assert f"{feed}:7: id u2: duplicate_initials:".encode() in done.stderr


def test_replay_reads_several_files_and_stdin_in_order(tmp_path: Path) -> None:
    db = tmp_path / "b.sqlite3"
    first, last = tmp_path / "1.ndjson", tmp_path / "3.ndjson"
    first.write_bytes(line(create_area(id="c")))
    last.write_bytes(line(register("EF", id="r3")))
    middle = line(register("AB", id="r2")) + line(register("AB", id="r2b"))
    done = bidlog("replay", first, "-", last, "--db", db, stdin=middle)
    result = summary(done)
    assert (result["ok"], result["failed"]) == (3, 1)
    assert result["failures"][0]["file"] == "<stdin>"
    assert result["failures"][0]["line"] == 2


def test_replay_ignores_a_byte_order_mark_opening_each_file(tmp_path: Path) -> None:
    """Editors on Windows open a file with a UTF-8 BOM; RFC 8259 lets a parser ignore it."""
    files = [tmp_path / "one.ndjson", tmp_path / "two.ndjson"]
    files[0].write_bytes(b"\xef\xbb\xbf" + line(create_area(id="a1")))
    files[1].write_bytes(b"\xef\xbb\xbf" + line(register("AB", id="u1")).rstrip(b"\n"))
    done = bidlog("replay", *files, "--db", tmp_path / "b.sqlite3")
    assert done.returncode == 0, done.stderr
    assert (summary(done)["ok"], summary(done)["failed"]) == (2, 0)


def test_replay_into_a_running_worker_and_a_second_writer_is_refused(
    tmp_path: Path, sockdir: Path
) -> None:
    db, sock = tmp_path / "b.sqlite3", sockdir / "s"
    proc = start_socket_worker(db, sock)
    try:
        done = bidlog("replay", EXAMPLE, "--socket", sock)
        assert done.returncode == 0, done.stderr
        assert summary(done)["ok"] == 15
        assert summary(bidlog("replay", EXAMPLE, "--socket", sock))["duplicate"] == 11
        fails_cleanly(bidlog("replay", EXAMPLE, "--db", db), "in use by another bidlog process")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0


@pytest.mark.parametrize(
    ("args", "status", "says"),
    [
        (["replay", "missing.ndjson"], 1, "cannot read missing.ndjson: No such file"),
        (["replay", "."], 1, "cannot read .: it is a directory"),
        (["replay", "-", "--socket", "nosock"], 1, "cannot connect to nosock"),
        (["replay", "-", "--socket", "s", "--db", "x.sqlite3"], 2, "not both"),
        (["replay"], 2, "required: FILE"),
        (["export", "--db", "missing.sqlite3"], 1, "no database at missing.sqlite3"),
        (["verify", "--db", "missing.sqlite3"], 1, "no database at missing.sqlite3"),
        (["backup", "--db", "missing.sqlite3", "--out", "c"], 1, "no database at missing"),
        (["backup", "--db", "x"], 2, "--out"),
        (["export", "--db", "x.sqlite3", "--out", "./x.sqlite3"], 1, "is the database itself"),
        (["export", "--db", "x.sqlite3", "--out", "no/x"], 1, "no directory no"),
        (["import", "missing.ndjson", "--db", "n.sqlite3"], 1, "missing.ndjson: No such file"),
        (["import", "--db", "n.sqlite3"], 2, "FILE"),
    ],
)
def test_bad_input_gets_one_clear_line_and_no_traceback(
    tmp_path: Path, args: list[str], status: int, says: str
) -> None:
    done = subprocess.run(
        [str(BIN), *args], cwd=tmp_path, capture_output=True, timeout=60, check=False
    )
    assert done.returncode == status, done.stderr
    assert "Traceback" not in done.stderr.decode()
    assert says in done.stderr.decode()
    assert not (tmp_path / "n.sqlite3").exists()


def test_replay_interrupted_then_rerun_applies_everything_exactly_once(tmp_path: Path) -> None:
    db, feed = tmp_path / "b.sqlite3", tmp_path / "feed.ndjson"
    total = 6000
    feed.write_bytes(many_commands(total))
    proc = subprocess.Popen(
        [str(BIN), "replay", str(feed), "--db", str(db)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    while proc.poll() is None and _events(db) < 200:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    done = bidlog("replay", feed, "--db", db)
    result = summary(done)
    assert done.returncode == 0
    assert result["ok"] + result["duplicate"] == total
    assert result["duplicate"] >= 200
    assert sql(
        db, "SELECT count(*), count(DISTINCT message_id) FROM events WHERE message_id IS NOT NULL"
    ) == [(total, total)]
    assert bidlog("verify", "--db", db).returncode == 0


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_replay_stopped_by_a_signal_sums_up_and_a_rerun_finishes(
    tmp_path: Path, signum: signal.Signals
) -> None:
    db, feed = tmp_path / "b.sqlite3", tmp_path / "feed.ndjson"
    total = 20000
    feed.write_bytes(many_commands(total))
    with subprocess.Popen(
        [str(BIN), "replay", str(feed), "--db", str(db)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as proc:
        while proc.poll() is None and _events(db) < 200:
            time.sleep(0.005)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert b"Traceback" not in err
    assert f"stopped by {signum.name}".encode() in err
    first = msgspec.json.decode(out)
    assert 0 < first["ok"] < total and first["failed"] == 0
    # Every command applied was answered and counted (automatic checkpoints aside).
    assert sql(db, "SELECT count(message_id) FROM events") == [(first["ok"],)]
    again = summary(bidlog("replay", feed, "--db", db))
    assert (again["duplicate"], again["ok"]) == (first["ok"], total - first["ok"])


def test_replay_stopped_twice_gives_up_on_a_worker_that_does_not_answer(
    tmp_path: Path, sockdir: Path
) -> None:
    db, sock, feed = tmp_path / "b.sqlite3", sockdir / "s", tmp_path / "feed.ndjson"
    total = 20000
    feed.write_bytes(many_commands(total))
    worker = start_socket_worker(db, sock)
    proc: subprocess.Popen[bytes] | None = None
    try:
        proc = subprocess.Popen(
            [str(BIN), "replay", str(feed), "--socket", str(sock)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        while proc.poll() is None and _events(db) < 200:
            time.sleep(0.005)
        worker.send_signal(signal.SIGSTOP)  # a hung worker: it answers nothing
        proc.send_signal(signal.SIGINT)
        time.sleep(1)
        assert proc.poll() is None  # the first stop waits for the replies owed
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
        assert proc.returncode == 1, err
        assert b"Traceback" not in err
        assert b"stopped by SIGINT again" in err, err
        first = msgspec.json.decode(out)
        assert first["unanswered"] > 0
        assert first["ok"] + first["unanswered"] < total
        worker.send_signal(signal.SIGCONT)
        again = summary(bidlog("replay", feed, "--socket", sock))
        assert again["ok"] + again["duplicate"] == total
        assert again["duplicate"] >= first["ok"]
    finally:
        if proc is not None:  # if it still waits (it must not), fail rather than hang
            proc.kill()
            proc.communicate()
        worker.send_signal(signal.SIGCONT)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(20) == 0
    assert sql(db, "SELECT count(message_id), count(DISTINCT message_id) FROM events") == [
        (total, total)
    ]


def test_replay_whose_terminal_hangs_up_still_writes_its_summary(tmp_path: Path) -> None:
    """SIGHUP comes with a closed terminal: progress and the text summary cannot be
    written to it, and the JSON summary on stdout must still come."""
    db, feed, out = tmp_path / "b.sqlite3", tmp_path / "feed.ndjson", tmp_path / "out.json"
    total = 20000
    feed.write_bytes(many_commands(total))
    master, slave = pty.openpty()
    with out.open("wb") as stdout:
        proc = subprocess.Popen(
            [str(BIN), "replay", str(feed), "--db", str(db)], stdout=stdout, stderr=slave
        )
    os.close(slave)
    try:
        while proc.poll() is None and _events(db) < 200:
            time.sleep(0.005)
        os.close(master)  # the terminal goes away, then the hangup
        proc.send_signal(signal.SIGHUP)
        assert proc.wait(60) == 1
    finally:
        proc.kill()
        proc.wait()
    first = msgspec.json.decode(out.read_bytes())
    assert 0 < first["ok"] < total and first["failed"] == 0
    assert sql(db, "SELECT count(message_id) FROM events") == [(first["ok"],)]


def _events(db: Path) -> int:
    """Events committed so far, read without ever creating the file."""
    if not db.exists():
        return 0
    try:
        conn = sqlite3.connect(db.as_uri() + "?mode=ro", uri=True)
        try:
            return int(conn.execute("SELECT count(*) FROM events").fetchone()[0])
        finally:
            conn.close()
    except sqlite3.Error:  # schema not there yet
        return 0


# -- export / import -------------------------------------------------------------------


def test_export_to_dash_is_stdout(example_db: Path, tmp_path: Path) -> None:
    dash = bidlog("export", "--db", example_db, "--out", "-", cwd=tmp_path)
    plain = bidlog("export", "--db", example_db)
    assert dash.returncode == 0 and dash.stdout == plain.stdout != b""
    assert not (tmp_path / "-").exists()


def test_export_import_round_trip(example_db: Path, tmp_path: Path) -> None:
    exported = bidlog("export", "--db", example_db)
    assert exported.returncode == 0
    lines = replies(exported.stdout)
    assert [e["event_id"] for e in lines] == list(range(1, 12))
    assert [e["event_id"] for e in lines if "state" in e] == [9, 10, 11]
    out = tmp_path / "log.ndjson"
    assert bidlog("export", "--db", example_db, "--out", out).returncode == 0
    assert out.read_bytes() == exported.stdout

    rebuilt = tmp_path / "rebuilt.sqlite3"
    done = bidlog("import", out, "--db", rebuilt)
    assert done.returncode == 0, done.stderr
    assert summary(done) == {"events": 11, "snapshots": 3}
    assert summary(bidlog("verify", "--db", rebuilt)) == {"events": 11, "snapshots": 3}
    assert bidlog("export", "--db", rebuilt).stdout == exported.stdout
    again = summary(bidlog("replay", EXAMPLE, "--db", rebuilt))
    assert (again["ok"], again["duplicate"]) == (4, 11)

    fails_cleanly(bidlog("import", out, "--db", rebuilt), "already exists and is not empty")
    from_stdin = tmp_path / "stdin.sqlite3"
    assert bidlog("import", "-", "--db", from_stdin, stdin=exported.stdout).returncode == 0


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_import_stopped_by_a_signal_leaves_nothing_and_says_so(
    big: tuple[Path, Path], tmp_path: Path, signum: signal.Signals
) -> None:
    """Ctrl-C used to wait for the import's end, then exit 130 with a complete database
    in place and not a word (fourth audit)."""
    _, export = big
    target = tmp_path / "new" / "rebuilt.sqlite3"
    target.parent.mkdir()
    with subprocess.Popen(
        [str(BIN), "import", str(export), "--db", str(target)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as proc:
        time.sleep(0.5)  # started, far from done (40,000 events take seconds)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, err
    assert out == b""
    assert f"import: stopped by {signum.name}; nothing was imported".encode() in err
    assert sorted(p.name for p in target.parent.iterdir()) == ["rebuilt.sqlite3.lock"]


@pytest.mark.parametrize(
    ("spoil", "says"),
    [
        (lambda ls: [*ls[:3], ls[3].replace(b"Carl", b"Karl"), *ls[4:]], "line 4: event 4: hash"),
        (lambda ls: ls[:4] + ls[5:], "line 5: event id 6 where 5 was expected"),
        (lambda ls: [*ls[:6], b"{not json", *ls[6:]], "line 7: not JSON"),
    ],
)
def test_import_refuses_a_spoiled_export_and_leaves_nothing(
    example_db: Path, tmp_path: Path, spoil: Any, says: str
) -> None:
    lines = bidlog("export", "--db", example_db).stdout.splitlines()
    bad = tmp_path / "bad.ndjson"
    bad.write_bytes(b"\n".join(spoil(lines)) + b"\n")
    target = tmp_path / "new" / "rebuilt.sqlite3"
    target.parent.mkdir()
    fails_cleanly(bidlog("import", bad, "--db", target), f"{bad}: {says}")
    assert [p.name for p in target.parent.iterdir()] == ["rebuilt.sqlite3.lock"]


# -- verify ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tamper", "bad_event"),
    [
        ('UPDATE events SET cause = \'{"description":"x","id":"y"}\' WHERE event_id = 5', 5),
        ("UPDATE events SET recorded_at = '2030-01-01T00:00:00.000000Z' WHERE event_id = 11", 11),
        ("UPDATE snapshots SET state = replace(state, '\"AB\"', '\"ZZ\"') WHERE event_id = 10", 10),
        ("DELETE FROM snapshots WHERE event_id = 9", 9),
        ("DELETE FROM events WHERE event_id = 7", 7),
    ],
)
def test_verify_catches_tampering_behind_the_stores_back(
    example_db: Path, tamper: str, bad_event: int
) -> None:
    assert summary(bidlog("verify", "--db", example_db)) == {"events": 11, "snapshots": 3}
    conn = sqlite3.connect(example_db)
    for (name,) in conn.execute("SELECT name FROM sqlite_schema WHERE type = 'trigger'"):
        conn.execute(f"DROP TRIGGER {name}")
    assert conn.execute(tamper).rowcount == 1
    conn.commit()
    conn.close()
    done = bidlog("verify", "--db", example_db)
    fails_cleanly(done, f"(first bad event: {bad_event})")
    assert done.stderr.startswith(b"bidlog: integrity_error: ")
    error = summary(done)
    assert error["code"] == "integrity_error"
    assert error["details"]["event_id"] == bad_event


def _forge_snapshot(db: Path, event_id: int) -> None:
    conn = sqlite3.connect(db)
    conn.execute("DROP TRIGGER snapshots_no_update")
    forged = conn.execute(
        "UPDATE snapshots SET state = replace(state, 'Ann Bell', 'Eve Bell') WHERE event_id = ?",
        (event_id,),
    )
    assert forged.rowcount == 1
    conn.commit()
    conn.close()


def test_a_worker_will_not_start_on_a_forged_newest_snapshot(example_db: Path) -> None:
    _forge_snapshot(example_db, 11)
    fails_cleanly(
        bidlog("serve", "--db", example_db, stdin=line(create_area("South"))),
        "snapshot of event 11 differs from the replay",
    )
    state = bidlog("state", "--bid-year", "2026", "--area", "North", "--db", example_db)
    fails_cleanly(state, "integrity_error: snapshot of event 11 differs")
    serve = bidlog("serve", "--db", example_db, stdin=b"")
    assert b"worker stopped" not in serve.stderr  # no head vouched for by a failed start
    assert sql(example_db, "SELECT max(event_id) FROM events") == [(11,)]


def test_state_refuses_an_event_changed_after_the_newest_snapshot(example_db: Path) -> None:
    """South has no snapshot: `state` replays its events, and checks each one's hash."""
    conn = sqlite3.connect(example_db)
    conn.execute("DROP TRIGGER events_no_update")
    changed = conn.execute(
        "UPDATE events SET after = replace(after, 'Eve Fox', 'Eve Fix') WHERE event_id = 5"
    )
    assert changed.rowcount == 1
    conn.commit()
    conn.close()
    south: list[str | Path] = ["state", "--bid-year", "2026", "--area", "South", "--db", example_db]
    fails_cleanly(bidlog(*south), "integrity_error: event 5 does not match its hash")
    assert summary(bidlog(*south, "--at-event", "4"))["users"] == []


def test_state_and_timeline_of_a_damaged_file_fail_in_one_line(example_db: Path) -> None:
    with example_db.open("r+b") as file:  # pages 3-5 overwritten: it opens, reads fail
        file.seek(2 * 4096)
        file.write(b"\xff" * 4096 * 3)
    scope: list[str | Path] = ["--bid-year", "2026", "--area", "North", "--db", example_db]
    for command in ("state", "timeline"):
        fails_cleanly(bidlog(command, *scope), f"cannot read {example_db}: ")


def test_export_of_a_snapshot_that_is_not_json_fails_cleanly(
    example_db: Path, tmp_path: Path
) -> None:
    conn = sqlite3.connect(example_db)
    conn.execute("DROP TRIGGER snapshots_no_update")
    conn.execute("UPDATE snapshots SET state = '{' WHERE event_id = 10")
    conn.commit()
    conn.close()
    out = tmp_path / "x.ndjson"
    fails_cleanly(
        bidlog("export", "--db", example_db, "--out", out),
        "export: integrity_error: event 10 cannot be read back",
    )
    assert not out.exists()


def test_a_forged_older_snapshot_is_neither_served_nor_restored(example_db: Path) -> None:
    _forge_snapshot(example_db, 9)
    rollback = msg("rollback", bid_year=2026, area="North", to_event=9)
    past = msg("get_state", bid_year=2026, area="North", at_event=9)
    feed = line(rollback) + line(past) + line(get_state())
    done = bidlog("serve", "--db", example_db, stdin=feed)
    assert done.returncode == 0  # the snapshots that "now" rests on (10, 11) are sound
    refused, also_refused, now = replies(done.stdout)
    for reply in (refused, also_refused):
        assert reply["error"]["code"] == "integrity_error"
        assert reply["error"]["details"] == {"event_id": 9}
    assert now["result"]["users"][0]["name"] == "Ann Bell"
    assert sql(example_db, "SELECT max(event_id) FROM events") == [(11,)]


# -- reading while a worker serves -----------------------------------------------------


def test_backup_export_and_verify_while_a_worker_serves_and_writes(
    tmp_path: Path, sockdir: Path
) -> None:
    db, sock = tmp_path / "b.sqlite3", sockdir / "s"
    proc = start_socket_worker(db, sock)
    stop = threading.Event()
    acked: list[int] = []

    def write_forever() -> None:
        client = SocketClient(sock)
        client.ask([line(create_area(id="c"))])
        client.ask([line(register(i, id=f"r-{i}")) for i in INITIALS[:20]])
        client.ask([line(open_round(1, max_per_day=1000, id="o"))])
        for n in itertools.count():
            if stop.is_set():
                break
            got = client.ask([line(bid("AB", [f"2026-07-{1 + n % 28:02d}"], id=f"b{n}"))])
            acked.append(got[0]["event_id"])
        client.close()

    writer = threading.Thread(target=write_forever)
    writer.start()
    try:
        while len(acked) < 50:
            time.sleep(0.01)
        before = len(acked)
        copy = tmp_path / "copy.sqlite3"
        backed = bidlog("backup", "--db", db, "--out", copy)
        exported = bidlog("export", "--db", db)
        verified = bidlog("verify", "--db", db)
        after = len(acked)
    finally:
        stop.set()
        writer.join(20)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    assert backed.returncode == 0, backed.stderr
    assert exported.returncode == 0 and verified.returncode == 0
    counts = summary(backed)
    assert after > before  # the worker kept writing while they read
    assert acked[before - 1] <= counts["events"] <= acked[after - 1]
    assert counts["out"] == str(copy)
    assert summary(bidlog("verify", "--db", copy))["events"] == counts["events"]
    final = bidlog("export", "--db", db).stdout.splitlines(keepends=True)
    assert bidlog("export", "--db", copy).stdout == b"".join(final[: counts["events"]])
    assert exported.stdout == b"".join(final[: len(exported.stdout.splitlines())])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# -- progress on a terminal ------------------------------------------------------------


def on_terminal(tmp_path: Path, *args: str | Path) -> tuple[int, bytes, str]:
    """Run ``bidlog ARGS`` with stderr on a pseudo-terminal (stdout a file): the exit
    status, stdout, and everything written to the terminal."""
    master, slave = pty.openpty()
    stdout = tmp_path / "stdout"
    with stdout.open("wb") as out:
        proc = subprocess.Popen([str(BIN), *map(str, args)], stdout=out, stderr=slave)
    os.close(slave)
    seen = b""
    try:
        while chunk := os.read(master, 65536):
            seen += chunk
    except OSError:  # EIO: every writer of the terminal has closed it
        pass
    finally:
        os.close(master)
        status = proc.wait(60)
    return status, stdout.read_bytes(), seen.decode()


@pytest.mark.parametrize(
    ("command", "shows"),
    [
        (["verify"], "verify: checking 2,000 of {total:,} events"),
        (["export", "--out", "{tmp}/out.ndjson"], "export: writing 1,000 of {total:,} events"),
        (["import", "{export}", "--db", "{tmp}/new.sqlite3"], "import: reading 1,024 lines"),
        (["backup", "--out", "{tmp}/copy.sqlite3"], "backup: copying"),
    ],
)
def test_long_commands_show_progress_on_a_terminal_and_erase_it(
    big: tuple[Path, Path], tmp_path: Path, command: list[str], shows: str
) -> None:
    """A verify of 500,000 events took 12 s, an import 24 s, with not a word on the
    terminal. Progress goes to stderr, only when it is a terminal, and is erased before
    the result; stdout is the same either way."""
    db, export = big
    args = [part.format(tmp=tmp_path, export=export) for part in command]
    if command[0] != "import":
        args += ["--db", str(db)]
    status, out, terminal = on_terminal(tmp_path, *args)
    assert status == 0, terminal
    total = _events(db)
    drawn = terminal.split("\r\x1b[K")
    assert drawn[1].startswith(shows.format(total=total)), terminal
    result = f"bidlog: exported {total} events to {tmp_path}/out.ndjson\r\n"
    assert drawn[-1] in ("", result), terminal  # the line erased before the result
    for made in tmp_path.iterdir():
        made.unlink()  # the command's output, and the file its stdout went to
    piped = bidlog(*args)
    assert piped.returncode == 0 and piped.stdout == out
    assert "\r" not in piped.stderr.decode()


def test_export_to_stdout_draws_no_progress(big: tuple[Path, Path], tmp_path: Path) -> None:
    """On a terminal it was drawn among the lines, and over a pager (review)."""
    db, export = big
    status, out, terminal = on_terminal(tmp_path, "export", "--db", db)
    assert (status, terminal) == (0, "")
    assert out == export.read_bytes()


@pytest.mark.parametrize("command", ["export", "backup"])
def test_a_terminal_gone_does_not_fail_work_that_succeeded(
    big: tuple[Path, Path], tmp_path: Path, command: str
) -> None:
    """stderr is a terminal that is closed: progress and the closing message cannot be
    written. The export was complete and published, yet exited 1 (review)."""
    db, export = big
    out = tmp_path / "out"
    master, slave = pty.openpty()
    os.close(master)  # the terminal is gone before anything is written to it
    try:
        done = subprocess.run(
            [str(BIN), command, "--db", str(db), "--out", str(out)],
            stdout=subprocess.PIPE, stderr=slave, timeout=120, check=False,
        )  # fmt: skip
    finally:
        os.close(slave)
    assert done.returncode == 0
    if command == "export":
        assert out.read_bytes() == export.read_bytes()
    else:
        assert msgspec.json.decode(done.stdout)["events"] == _events(db)
