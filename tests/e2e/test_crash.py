"""kill -9 mid-stream: every acknowledged command survives exactly once, nothing half-done."""

from __future__ import annotations

import itertools
import shutil
import signal
import string
import tempfile
import threading
import time
from pathlib import Path

from tests.e2e.proc import SocketClient, bidlog, replies, start_socket_worker
from tests.wire import create_area, line, register

INITIALS = ["".join(p) for p in itertools.product(string.ascii_uppercase, repeat=2)][:600]


def test_sigkill_mid_stream_loses_no_ack_and_applies_nothing_twice(tmp_path: Path) -> None:
    db = tmp_path / "b.sqlite3"
    sock = Path(tempfile.mkdtemp(prefix="bl")) / "s"
    lines = [line(create_area(id="c0"))] + [line(register(i, id=f"r-{i}")) for i in INITIALS]
    proc = start_socket_worker(db, sock)
    client = SocketClient(sock)
    acked: list[dict[str, object]] = []

    def read_until_dead() -> None:
        try:
            while True:
                raw = client.file.readline()
                if not raw:
                    return
                acked.extend(replies(raw))
        except OSError:
            return

    reader = threading.Thread(target=read_until_dead)
    reader.start()
    for chunk in range(0, len(lines), 20):
        try:
            client.send(lines[chunk : chunk + 20])
        except OSError:
            break
        if chunk == 300:
            time.sleep(0.05)
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(10)
    reader.join(10)
    client.close()
    assert all(r["ok"] for r in acked)

    again = start_socket_worker(db, sock)
    try:
        second = SocketClient(sock)
        resent = second.ask(lines)
        second.close()
    finally:
        again.send_signal(signal.SIGTERM)
        assert again.wait(20) == 0
    shutil.rmtree(sock.parent)

    by_id = {r["id"]: r for r in resent}
    for first in acked:
        assert by_id[first["id"]] == {**first, "duplicate": True}
    assert all(r["ok"] for r in resent), [r for r in resent if not r["ok"]][:3]
    state = replies(bidlog("state", "--bid-year", "2026", "--area", "North", "--db", db).stdout)
    assert len(state[0]["users"]) == len(INITIALS)
    assert bidlog("verify", "--db", db).returncode == 0
