"""The real ``bidlog`` process: stdin, Unix socket, signals, exit codes, restarts."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import stat
import string
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.proc import BIN, SocketClient, bidlog, replies, start_socket_worker
from tests.wire import EXAMPLE, create_area, example_lines, get_state, line, register


@pytest.fixture
def sockdir() -> Iterator[Path]:
    # AF_UNIX paths are limited to ~107 bytes: keep them short.
    path = Path(tempfile.mkdtemp(prefix="bl"))
    yield path
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


def test_stdin_session_runs_clean_and_logs_go_to_stderr(tmp_path: Path) -> None:
    db = tmp_path / "b.sqlite3"
    done = bidlog("serve", "--db", db, stdin=EXAMPLE.read_bytes())
    assert done.returncode == 0, done.stderr
    out = replies(done.stdout)
    assert len(out) == len(example_lines())
    assert all(r["ok"] for r in out)
    assert b"worker started" in done.stderr
    assert str(db).encode() in done.stderr
    # The head at stop is logged, and is where the next start begins: an anchor for
    # noticing the newest events cut off between runs (the chain cannot show that).
    logs = replies(done.stderr)
    stopped = next(x for x in logs if x["msg"] == "worker stopped")
    assert stopped["head_event"] == 11 and len(stopped["head_hash"]) == 64
    again = bidlog("serve", "--db", db, stdin=b"")
    started = next(x for x in replies(again.stderr) if x["msg"] == "worker started")
    assert (started["head_event"], started["head_hash"]) == (11, stopped["head_hash"])


def test_stdin_from_a_regular_file_and_python_dash_m(tmp_path: Path) -> None:
    db = tmp_path / "b.sqlite3"
    with EXAMPLE.open("rb") as source:
        done = subprocess.run(
            [sys.executable, "-m", "worker", "serve", "--db", str(db)],
            stdin=source,
            capture_output=True,
            timeout=60,
            check=False,
        )
    assert done.returncode == 0, done.stderr
    assert all(r["ok"] for r in replies(done.stdout))


def test_second_run_of_the_same_file_only_duplicates(tmp_path: Path) -> None:
    db = tmp_path / "b.sqlite3"
    first = replies(bidlog("serve", "--db", db, stdin=EXAMPLE.read_bytes()).stdout)
    second = replies(bidlog("serve", "--db", db, stdin=EXAMPLE.read_bytes()).stdout)
    acks = [(a, b) for a, b in zip(first, second, strict=True) if "event_id" in a]
    assert acks and all(b == {**a, "duplicate": True} for a, b in acks)


def test_default_db_comes_from_env_then_cwd(tmp_path: Path) -> None:
    env_db = tmp_path / "env.sqlite3"
    bidlog("serve", stdin=line(create_area()), env={"BIDLOG_DB": str(env_db)})
    assert env_db.exists()
    done = subprocess.run(
        [str(BIN), "serve"],
        input=line(create_area()),
        cwd=tmp_path,
        capture_output=True,
        timeout=60,
        check=False,
        env={k: v for k, v in os.environ.items() if k != "BIDLOG_DB"},
    )
    assert done.returncode == 0
    assert (tmp_path / "bidlog.sqlite3").exists()


def test_state_and_timeline_commands(tmp_path: Path) -> None:
    db = tmp_path / "b.sqlite3"
    bidlog("serve", "--db", db, stdin=EXAMPLE.read_bytes())
    state = bidlog("state", "--bid-year", "2026", "--area", "North", "--db", db)
    assert state.returncode == 0
    assert replies(state.stdout)[0]["head_event"] == 11
    past = bidlog("state", "--bid-year", "2026", "--area", "North", "--at-event", "3", "--db", db)
    assert [u["initials"] for u in replies(past.stdout)[0]["users"]] == ["AB"]
    timeline = bidlog("timeline", "--bid-year", "2026", "--area", "North", "--db", db)
    assert [e["seq"] for e in replies(timeline.stdout)] == list(range(1, 10))
    missing = bidlog("state", "--bid-year", "2026", "--area", "West", "--db", db)
    assert missing.returncode == 1 and missing.stdout == b""
    assert missing.stderr.endswith(b"area 2026/West does not exist\n")
    # Times whose UTC form leaves the calendar are after, or before, every event.
    scope = ("--bid-year", "2026", "--area", "North", "--db", db)
    late = bidlog("state", *scope, "--at-time", "9999-12-31T23:59:59-01:00")
    assert replies(late.stdout)[0]["head_event"] == 11
    early = bidlog("state", *scope, "--at-time", "0001-01-01T00:00:00+01:00")
    assert early.returncode == 1 and b"Traceback" not in early.stderr
    assert b"had no event by then" in early.stderr


@pytest.mark.parametrize("command", ["state", "timeline", "export", "verify"])
def test_a_reader_that_closes_the_pipe_early_gets_no_traceback(
    tmp_path: Path, command: str
) -> None:
    db = tmp_path / "b.sqlite3"
    bidlog("serve", "--db", db, stdin=EXAMPLE.read_bytes())
    scope = [] if command in ("export", "verify") else ["--bid-year", "2026", "--area", "North"]
    with subprocess.Popen(
        [str(BIN), command, *scope, "--db", str(db)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()  # as `| head -0` does, before anything is written
        err = proc.stderr.read()
        assert proc.wait(timeout=60) == 1
    assert b"the reader closed the output early" in err and b"Traceback" not in err


@pytest.mark.parametrize(
    "args",
    [
        ["state", "--area", "North"],
        ["state", "--bid-year", "2026", "--area", "N", "--at-event", "1", "--at-time", "x"],
        ["serve", "--synchronous", "sometimes"],
        ["frobnicate"],
        ["state", "--bid-year", "99999999999999999999", "--area", "N"],
        ["state", "--bid-year", "1999", "--area", "N"],
        ["state", "--bid-year", "2_026", "--area", "N"],  # int() would take these three
        ["state", "--bid-year", " 2026", "--area", "N"],
        ["timeline", "--bid-year", "2026", "--area", "N", "--after-event", "\uff11"],
        ["timeline", "--bid-year", "2101", "--area", "N"],
        ["state", "--bid-year", "2026", "--area", "N", "--at-event", "9223372036854775808"],
        ["timeline", "--bid-year", "2026", "--area", "N", "--after-event", "-1"],
        ["state", "--bid-year", "2026", "--area", "bad/area"],
        ["timeline", "--bid-year", "2026", "--area", ""],
        ["serve", "--socket", ""],  # would have served stdin
        ["replay", "--socket", "", "-"],
        ["verify", "--db", ""],
        ["export", "--out", ""],
        ["export", "--out", "."],  # was a traceback
        ["backup", "--out", "/"],
    ],
)
def test_bad_usage_exits_2(args: list[str]) -> None:
    done = bidlog(*args)
    assert done.returncode == 2
    assert b"Traceback" not in done.stderr


def test_every_command_has_help() -> None:
    for command in ["serve", "state", "timeline", "replay", "export", "import", "verify", "backup"]:
        done = bidlog(command, "--help")
        assert done.returncode == 0, command
        assert b"usage: bidlog " + command.encode() in done.stdout
    assert bidlog("--help").returncode == 0


def test_unopenable_database_exits_1(tmp_path: Path) -> None:
    (tmp_path / "dir.sqlite3").mkdir()
    (tmp_path / "dir.sqlite3" / "a").touch()
    done = bidlog("serve", "--db", tmp_path / "dir.sqlite3", stdin=b"")
    assert done.returncode == 1
    assert b"dir.sqlite3 is a directory, not a database file" in done.stderr
    assert (
        bidlog(
            "state", "--bid-year", "2026", "--area", "N", "--db", tmp_path / "none.sqlite3"
        ).returncode
        == 1
    )


def test_running_out_of_file_descriptors_only_delays_new_connections(
    tmp_path: Path, sockdir: Path
) -> None:
    """accept() failing with EMFILE used to end the worker, and every connection with
    it. Now it waits and accepts again; connected clients are served throughout."""
    db, sock = tmp_path / "b.sqlite3", sockdir / "s"
    proc = start_socket_worker(db, sock, max_files=40)
    try:
        first = SocketClient(sock)
        assert first.ask([line(create_area())])[0]["ok"]
        crowd = []
        for _ in range(60):  # queued by the kernel; the worker cannot accept them all
            extra = socket.socket(socket.AF_UNIX)
            extra.connect(str(sock))
            crowd.append(extra)
        time.sleep(0.5)
        assert first.ask([line(get_state())])[0]["ok"]
        for extra in crowd:
            extra.close()
        late = SocketClient(sock)
        assert late.ask([line(get_state())])[0]["result"]["seq"] == 1
        first.close()
        late.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    assert (
        b"cannot accept a connection now (Too many open files)" in (sockdir / "s.log").read_bytes()
    )


def test_serve_with_stdout_closed_exits_1(tmp_path: Path) -> None:
    """Replies that cannot be written are a failure (exit 1), not a quiet success."""
    db = tmp_path / "b.sqlite3"
    done = subprocess.run(
        ["bash", "-c", f'exec "{BIN}" serve --db "{db}" >&-'],
        input=line(create_area()),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert b"not every reply was written" in done.stderr and b"Traceback" not in done.stderr


def test_a_reader_of_stdout_that_pauses_is_waited_for(tmp_path: Path) -> None:
    """``bidlog serve < FILE | less``: the pager stops reading for a while. Stdin is
    not stdout's reader, so this is backpressure, not a stuck peer: the worker waits,
    past its 10 s patience for a socket client, and every line is answered."""
    feed = tmp_path / "feed.ndjson"
    queries = [line({"id": f"q-{n}", "type": "list_areas"}) for n in range(20_000)]
    feed.write_bytes(b"".join(queries))
    with feed.open("rb") as stdin:
        proc = subprocess.Popen(
            [str(BIN), "serve", "--db", str(tmp_path / "b.sqlite3")],
            stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
    try:
        time.sleep(11)  # longer than the patience
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, err.decode()
    assert len(replies(out)) == 20_000
    assert b"closing a connection" not in err


def test_socket_serves_concurrent_pipelining_clients(tmp_path: Path, sockdir: Path) -> None:
    db, sock = tmp_path / "b.sqlite3", sockdir / "s"
    proc = start_socket_worker(db, sock)
    try:
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        setup = SocketClient(sock)
        assert setup.ask([line(create_area())])[0]["ok"]
        results: dict[int, list[dict[str, object]]] = {}

        def feed(n: int) -> None:
            client = SocketClient(sock)
            lines = [
                line(register(f"{chr(65 + n)}{chr(65 + i)}", id=f"s{n}-{i}")) for i in range(26)
            ]
            results[n] = client.ask(lines)
            client.close()

        threads = [threading.Thread(target=feed, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        for n, got in results.items():
            assert [r["id"] for r in got] == [f"s{n}-{i}" for i in range(26)]
            assert all(r["ok"] for r in got)
        assert len(results) == 8
        setup.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    assert not sock.exists()


def test_second_worker_on_same_database_refuses(tmp_path: Path, sockdir: Path) -> None:
    db = tmp_path / "b.sqlite3"
    proc = start_socket_worker(db, sockdir / "s")
    try:
        second = bidlog("serve", "--db", db, stdin=line(create_area()))
        assert second.returncode == 1
        assert second.stdout == b""
        readonly = bidlog("state", "--bid-year", "2026", "--area", "North", "--db", db)
        assert readonly.returncode == 1  # no such area yet, but the read itself works
        assert b"does not exist" in readonly.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0


def test_stale_socket_file_is_replaced(tmp_path: Path, sockdir: Path) -> None:
    db, sock = tmp_path / "b.sqlite3", sockdir / "s"
    proc = start_socket_worker(db, sock)
    proc.kill()
    proc.wait()
    assert sock.exists()  # left behind by the crash
    again = start_socket_worker(db, sock)
    try:
        client = SocketClient(sock)
        assert client.ask([line(create_area())])[0]["ok"]
        client.close()
    finally:
        again.send_signal(signal.SIGTERM)
        assert again.wait(20) == 0


def test_sigterm_answers_what_was_read_then_exits_0(tmp_path: Path, sockdir: Path) -> None:
    db, sock = tmp_path / "b.sqlite3", sockdir / "s"
    proc = start_socket_worker(db, sock)
    client = SocketClient(sock)
    lines = [line(create_area())] + [line(register(f"Q{chr(65 + i)}")) for i in range(26)]
    got = client.ask(lines)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    client.close()
    assert all(r["ok"] for r in got)
    state = bidlog("state", "--bid-year", "2026", "--area", "North", "--db", db)
    assert len(replies(state.stdout)[0]["users"]) == 26


def test_socket_in_use_or_unusable_path_exits_1(tmp_path: Path, sockdir: Path) -> None:
    sock = sockdir / "s"
    proc = start_socket_worker(tmp_path / "a.sqlite3", sock)
    try:
        other = bidlog("serve", "--socket", sock, "--db", tmp_path / "b.sqlite3")
        assert other.returncode == 1
        assert b"cannot listen" in other.stderr and b"Traceback" not in other.stderr
        assert sock.exists()  # the live worker's socket is left alone
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    missing = bidlog("serve", "--socket", sockdir / "no" / "s", "--db", tmp_path / "c.sqlite3")
    assert missing.returncode == 1 and b"Traceback" not in missing.stderr


def test_tampered_tail_fails_the_startup_integrity_check(tmp_path: Path) -> None:
    db = tmp_path / "b.sqlite3"
    assert bidlog("serve", "--db", db, stdin=EXAMPLE.read_bytes()).returncode == 0
    with sqlite3.connect(db) as conn:
        triggers = conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")
        for (name,) in triggers.fetchall():
            conn.execute(f"DROP TRIGGER {name}")
        conn.execute("UPDATE events SET cause = ? WHERE event_id = 10", ('{"id":"x"}',))
    done = bidlog("serve", "--db", db, stdin=line(create_area("West")))
    assert done.returncode == 1
    assert b"integrity check failed at event 10" in done.stderr
    assert done.stdout == b""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_on_stdin_answers_what_was_read_then_exits_0(
    tmp_path: Path, signum: signal.Signals
) -> None:
    """SIGHUP (the terminal or the session went away) stops as SIGTERM does; it used to
    kill the worker at once: no last log line with the head, the socket file left."""
    db = tmp_path / "b.sqlite3"
    proc = subprocess.Popen(
        [str(BIN), "serve", "--db", str(db)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(line(create_area()) + line(register("AB")))
    proc.stdin.flush()
    first = [proc.stdout.readline(), proc.stdout.readline()]
    proc.send_signal(signum)  # stdin stays open and idle
    assert proc.wait(20) == 0
    proc.stdin.close()
    proc.stdout.close()
    assert all(r["ok"] for r in replies(b"".join(first)))


def test_a_reader_that_leaves_part_way_through_a_large_state_is_noticed(tmp_path: Path) -> None:
    """Past the pipe's 64 KiB a buffered write returns short instead of raising."""
    db = tmp_path / "b.sqlite3"
    letters = string.ascii_uppercase
    users = [register(a + b, name="N" * 100) for a in letters for b in letters]
    feed = b"".join(map(line, [create_area(), *users]))
    assert bidlog("serve", "--db", db, stdin=feed).returncode == 0
    size = len(bidlog("state", "--bid-year", "2026", "--area", "North", "--db", db).stdout)
    assert size > 3 * 65536
    with subprocess.Popen(
        [str(BIN), "state", "--bid-year", "2026", "--area", "North", "--db", str(db)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        assert len(proc.stdout.read(10)) == 10  # as `| head -c 10` does
        proc.stdout.close()
        err = proc.stderr.read()
        assert proc.wait(timeout=60) == 1
    assert b"the reader closed the output early" in err and b"Traceback" not in err


def test_sigterm_while_stdout_is_never_read_ends_with_exit_1(tmp_path: Path) -> None:
    """Unread stdout holds the worker back (it stops reading input: backpressure, as any
    filter). On SIGTERM it waits while replies are taken; after 10 s with none taken it
    stops anyway, says so, and exits 1, as not every reply was written."""
    db, feed = tmp_path / "b.sqlite3", tmp_path / "feed.ndjson"
    feed.write_bytes(b"".join(line(create_area(f"A{i}")) for i in range(3000)))
    with (
        feed.open("rb") as stdin,
        subprocess.Popen(
            [str(BIN), "serve", "--db", str(db)],
            stdin=stdin,
            stdout=subprocess.PIPE,  # never read until it has exited
            stderr=subprocess.PIPE,
        ) as proc,
    ):
        assert proc.stderr is not None
        assert b"worker started" in proc.stderr.readline()
        time.sleep(1)  # it fills stdout's pipe, then waits
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 1
        err = proc.stderr.read()
    assert b"not every reply was written" in err and b"Traceback" not in err
    conn = sqlite3.connect(db)
    try:
        committed = conn.execute("SELECT count(*) FROM events").fetchone()[0]
    finally:
        conn.close()
    assert 0 < committed < 3000  # what was read was committed; the rest never read
