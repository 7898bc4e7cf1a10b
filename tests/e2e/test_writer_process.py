"""``bidlog serve`` appends through a writer process: what happens when either dies."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import socket
import string
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

import pytest

from adapters.sqlite_schema import WriterLock
from adapters.sqlite_writer import _encode, _frame
from domain.records import Batch
from tests.e2e.proc import BIN, SocketClient, bidlog, replies, start_socket_worker
from tests.wire import EXAMPLE, create_area, line, register

UPPER = string.ascii_uppercase


def writer_of(pid: int) -> int:
    """The worker's one child: its writer process."""
    (child,) = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return int(child)


def gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except FileNotFoundError:
            return True
        if state == "Z":  # dead, not yet reaped by its parent
            return True
        time.sleep(0.01)
    return False


def started(tmp_path: Path) -> tuple[Path, Path, subprocess.Popen[bytes], SocketClient]:
    """A socket worker on a new database, and a client whose area a1 is committed."""
    db, sock = tmp_path / "w.sqlite3", tmp_path / "s"
    worker = start_socket_worker(db, sock)
    try:
        client = SocketClient(sock)
        assert client.ask([line(create_area(id="a1"))])[0]["ok"]
    except BaseException:
        worker.kill()
        worker.wait(10)
        raise
    return db, sock, worker, client


def test_a_worker_killed_takes_its_writer_process_with_it(tmp_path: Path) -> None:
    db, sock, worker, client = started(tmp_path)
    try:
        client.close()
        child = writer_of(worker.pid)
        worker.kill()
        worker.wait(10)
        assert gone(child, within=5), "the writer process outlived its worker"
    finally:
        worker.kill()
        worker.wait(10)
    again = start_socket_worker(db, sock)  # the lock went with both
    try:
        client = SocketClient(sock)
        answer = client.ask([line(create_area(id="a1"))])[0]
        client.close()
    finally:
        again.terminate()
        assert again.wait(30) == 0
    assert answer["duplicate"] is True and answer["event_id"] == 1
    assert bidlog("verify", "--db", db).returncode == 0


def test_a_writer_process_killed_stops_the_worker_at_once_with_a_clear_error(
    tmp_path: Path,
) -> None:
    """Killed with nothing in flight: the worker stops then, not at its next command
    (a supervisor restarts it), and says why in one line."""
    db, sock, worker, client = started(tmp_path)
    try:
        os.kill(writer_of(worker.pid), signal.SIGKILL)
        assert worker.wait(30) == 1  # with no further line sent
        assert client.file.readline() == b""  # the connection is closed
        client.close()
    finally:
        worker.kill()
        worker.wait(10)
    log = sock.with_name(sock.name + ".log").read_text()
    assert "Traceback" not in log
    assert "bidlog: stopped: the writer process" in log and "killed by signal 9" in log
    assert "ended on its own" in log and "Start the worker again" in log
    # Started again, the worker recovers and goes on from the file.
    out = bidlog("serve", "--db", db, stdin=line(register("AB", id="r1")))
    (answer,) = replies(out.stdout)
    assert answer["ok"] and answer["event_id"] == 2
    assert bidlog("verify", "--db", db).returncode == 0


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_both_writers_answer_the_example_session_alike(tmp_path: Path, writer: str) -> None:
    db = tmp_path / "e.sqlite3"
    out = bidlog("serve", "--writer", writer, "--db", db, stdin=EXAMPLE.read_bytes())
    assert out.returncode == 0, out.stderr
    answers = replies(out.stdout)
    assert len(answers) == 15 and all(a["ok"] for a in answers)


def test_a_hangup_of_the_terminal_drains_and_stops_cleanly(tmp_path: Path) -> None:
    """A closed terminal signals its whole process group: the worker stops as on SIGTERM
    (everything read is committed and answered); its writer process, in a session of
    its own, is not hung up with it."""
    lines = [line(create_area(id="a1"))] + [
        line(register(f"{a}{b}", id=f"r{a}{b}")) for a, b in itertools.product(UPPER, UPPER)
    ]
    proc = subprocess.Popen(
        [str(BIN), "serve", "--db", str(tmp_path / "h.sqlite3")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # a group of its own, as under a terminal
    )
    assert proc.stdin and proc.stdout
    feeder = threading.Thread(target=_feed, args=(proc.stdin, b"".join(lines)), daemon=True)
    try:
        feeder.start()
        first = os.read(proc.stdout.fileno(), 1 << 16)  # lines read, more coming
        os.killpg(proc.pid, signal.SIGHUP)
        feeder.join(30)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait(10)
    assert proc.returncode == 0, err
    answers = replies(first + out)
    assert 0 < len(answers) <= len(lines) and all(a["ok"] for a in answers)
    assert b"stopping on SIGHUP" in err


def _feed(pipe: IO[bytes], data: bytes) -> None:
    with contextlib.suppress(BrokenPipeError):  # the worker stopped reading
        pipe.write(data)
        pipe.flush()


def test_a_package_named_like_ours_in_the_working_directory_is_not_run(
    tmp_path: Path,
) -> None:
    fake = tmp_path / "adapters"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "sqlite_writer.py").write_text("raise SystemExit(3)\n")
    out = bidlog("serve", "--db", "x.sqlite3", stdin=EXAMPLE.read_bytes(), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert all(a["ok"] for a in replies(out.stdout))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_while_the_worker_starts_stops_it_cleanly_once_started(
    tmp_path: Path, signum: signal.Signals
) -> None:
    """The socket listens before the database is opened and the writer process started:
    a stop that comes then is kept, and the worker stops as soon as it has started."""
    sock = tmp_path / "s"
    worker = start_socket_worker(tmp_path / "w.sqlite3", sock)  # listening, still starting
    worker.send_signal(signum)
    try:
        assert worker.wait(30) == 0
    finally:
        worker.kill()
        worker.wait(10)
    log = sock.with_name(sock.name + ".log").read_text()
    assert f"stopping on {signum.name}" in log and "worker stopped" in log


def run_writer_process(
    db: Path, send: bytes, *, close: bool
) -> tuple[int, int, list[dict[str, Any]]]:
    """Start the writer process on ``db`` as the worker does, wait for it to be ready,
    send it ``send`` (closing our end right after, if ``close``), and wait for it to
    end: its pid, exit status and stderr lines (parsed)."""
    lock = WriterLock.acquire(db)
    ours, theirs = socket.socketpair()
    args = ["--db", str(db), "--synchronous", "full", "--channel", str(theirs.fileno())]
    args += ["--lock", str(lock.fd), "--parent", str(os.getpid())]
    child = subprocess.Popen(
        [sys.executable, "-P", "-m", "adapters.sqlite_writer", *args],
        pass_fds=(theirs.fileno(), lock.fd),
        stderr=subprocess.PIPE,
    )
    theirs.close()
    try:
        ours.settimeout(30)
        size = int.from_bytes(ours.recv(4, socket.MSG_WAITALL), "big")
        assert b"ready" in ours.recv(size, socket.MSG_WAITALL)
        ours.sendall(send)
        if close:
            ours.close()
        _, err = child.communicate(timeout=30)
    finally:
        ours.close()
        child.kill()
        child.wait(10)
        lock.release()
    return child.pid, child.returncode, [json.loads(x) for x in err.splitlines()]


def test_the_writer_process_reports_a_failure_as_a_json_log_line(tmp_path: Path) -> None:
    """The child's lines go to the worker's stderr among the worker's JSON lines: its own
    are JSON too, marked as the writer's, with no bare traceback (here it is sent a
    frame that is not a batch)."""
    not_msgpack = (1).to_bytes(4, "big") + b"\xc1"  # 0xc1 is never valid msgpack
    pid, status, logged = run_writer_process(tmp_path / "w.sqlite3", not_msgpack, close=False)
    assert status == 1
    assert [(x["level"], x["logger"], x["process"], x["pid"]) for x in logged] == [
        ("error", "bidlog.writer", "writer", pid)
    ]
    assert "the writer process failed" in logged[0]["msg"]
    assert "DecodeError" in logged[0]["exc"]


def test_the_writer_process_stops_quietly_when_the_worker_goes_before_its_answer(
    tmp_path: Path,
) -> None:
    """The worker is gone (its end closed) when the child answers: one warning line, no
    traceback, and the child ends."""
    empty_batch = _frame(_encode(Batch(())))
    _, status, logged = run_writer_process(tmp_path / "w.sqlite3", empty_batch, close=True)
    assert status == 1
    assert [(x["level"], x["msg"]) for x in logged] == [
        ("warning", "the worker went away before taking an answer; stopping")
    ]
