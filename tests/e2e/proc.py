"""Run the real ``bidlog`` executable (the venv's console script) in tests."""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgspec

BIN = Path(sys.executable).parent / "bidlog"


def bidlog(
    *args: str | Path,
    stdin: bytes = b"",
    timeout: float = 60,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``bidlog ARGS`` to completion."""
    return subprocess.run(
        [str(BIN), *map(str, args)],
        input=stdin,
        cwd=cwd,
        capture_output=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )


def replies(out: bytes) -> list[dict[str, Any]]:
    return [msgspec.json.decode(x) for x in out.splitlines()]


def start_socket_worker(
    db: Path, sock: Path, *extra: str, max_files: int | None = None
) -> subprocess.Popen[bytes]:
    """Start ``bidlog serve --socket`` and wait until it accepts connections (with at
    most ``max_files`` open file descriptors, if given)."""

    def limit() -> None:
        if max_files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max_files, max_files))

    log = sock.with_name(sock.name + ".log")
    with log.open("ab") as stderr:
        proc = subprocess.Popen(
            [str(BIN), "serve", "--socket", str(sock), "--db", str(db), *extra],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            preexec_fn=limit,
        )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited: {log.read_bytes().decode(errors='replace')}")
        try:
            with socket.socket(socket.AF_UNIX) as probe:
                probe.connect(str(sock))
            return proc
        except OSError:
            time.sleep(0.02)
    proc.kill()
    raise RuntimeError("worker did not start listening")


class SocketClient:
    """A blocking NDJSON client on a Unix socket."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(30)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rb")

    def send(self, lines: list[bytes]) -> None:
        self.sock.sendall(b"".join(lines))

    def receive(self, count: int) -> list[dict[str, Any]]:
        return [msgspec.json.decode(self.file.readline()) for _ in range(count)]

    def ask(self, lines: list[bytes]) -> list[dict[str, Any]]:
        self.send(lines)
        return self.receive(len(lines))

    def close(self) -> None:
        self.file.close()
        self.sock.close()
