"""``bidlog replay``: feed message files into a worker over one connection, pipelined,
and tally the replies (ok, duplicate, failed, with where each failure came from).

At most ``window`` lines are in flight: a line is sent only when a slot is free, and
each reply frees one. Replies come back in input order (one connection), so a queue of
``(file, line)`` pairs tells which line each reply answers. Blank lines get no reply
from the worker, so they are never sent.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import anyio
import anyio.abc
import msgspec

from adapters.transports import BOM, JSON_SPACE, StdioStream, TooLarge, frame_lines

WINDOW = 1000
SHOWN = 10
"""How many failures the summary lists (the counts cover all of them)."""
_SEND_SIZE = 1 << 16
_REPLY_LIMIT = 1 << 30  # replies to queries (a timeline page) may exceed the 1 MiB input limit
_decode_reply = msgspec.json.Decoder()


class ReplayError(Exception):
    """A replay cannot start or cannot finish: an unreadable file, a lost connection."""


@dataclass(frozen=True)
class Source:
    """An opened message file (``-`` is stdin); ``size`` is known for regular files."""

    name: str
    fd: int
    size: int | None

    @classmethod
    def open(cls, name: str) -> Source:
        try:
            fd = 0 if name == "-" else os.open(name, os.O_RDONLY)
            mode = os.fstat(fd).st_mode
        except OSError as exc:
            raise ReplayError(f"cannot read {name}: {exc.strerror}") from None
        if stat.S_ISDIR(mode):
            os.close(fd)
            raise ReplayError(f"cannot read {name}: it is a directory")
        size = os.fstat(fd).st_size if stat.S_ISREG(mode) else None
        return cls("<stdin>" if name == "-" else name, fd, size)

    def close(self) -> None:
        if self.fd != 0:
            os.close(self.fd)


async def numbered_lines(source: Source) -> AsyncIterator[tuple[int, bytes]]:
    """``(line number, line)`` for every non-blank line, without its newline."""
    # StdioStream only reads here: pipes and ttys through the selector, files in a thread.
    stream = StdioStream(stdin=source.fd)
    pending = b""
    number = 0
    while True:
        try:
            chunk = await stream.receive()
        except anyio.EndOfStream:
            break
        except anyio.BrokenResourceError as exc:
            raise ReplayError(f"cannot read {source.name}: {exc}") from None
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            number += 1
            if number == 1:
                line = line.removeprefix(BOM)  # as the worker's framing does
            if line.strip(JSON_SPACE):
                yield number, line
    if number == 0:
        pending = pending.removeprefix(BOM)
    if pending.strip(JSON_SPACE):
        yield number + 1, pending


@dataclass
class Tally:
    """What the replies said, and where the first few failures came from."""

    ok: int = 0
    duplicate: int = 0
    failed: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)
    unanswered: int = 0  # read (and maybe sent), but the connection ended before replies

    @property
    def lines(self) -> int:
        return self.ok + self.duplicate + self.failed

    def count(self, name: str, number: int, reply: Any) -> None:
        if isinstance(reply, dict) and reply.get("ok") is True:
            if reply.get("duplicate"):
                self.duplicate += 1
            else:
                self.ok += 1
            return
        self.failed += 1
        if len(self.failures) < SHOWN:
            self.failures.append(_failure(name, number, reply))

    def summary(self) -> dict[str, Any]:
        return {
            "lines": self.lines,
            "ok": self.ok,
            "duplicate": self.duplicate,
            "failed": self.failed,
            "failures": self.failures,
            "unanswered": self.unanswered,
        }

    def describe(self, seconds: float) -> list[str]:
        rate = self.lines / seconds if seconds > 0 else 0.0
        head = (
            f"{self.lines} lines answered: {self.ok} ok, {self.duplicate} duplicate, "
            f"{self.failed} failed"
            + (f"; {self.unanswered} more unanswered" if self.unanswered else "")
            + f" ({seconds:.1f} s, {rate:,.0f} lines/s)"
        )
        shown = [
            f"  {f['file']}:{f['line']}: id {f['id'] or '-'}: {f['code']}: {f['message']}"
            for f in self.failures
        ]
        if self.failed > len(self.failures):
            shown.append(f"  ... and {self.failed - len(self.failures)} more failures")
        return [head, *shown]


def _failure(name: str, number: int, reply: Any) -> dict[str, Any]:
    error = reply.get("error") if isinstance(reply, dict) else None
    if not isinstance(error, dict):
        error = {"code": "bad_reply", "message": f"unexpected reply {reply!r:.200}"}
    return {
        "file": name,
        "line": number,
        "id": reply.get("id") if isinstance(reply, dict) else None,
        "code": error.get("code"),
        "message": error.get("message"),
    }


class Replay:
    """One run: send every line of ``sources``, read every reply, keep the tally."""

    def __init__(self, sources: Sequence[Source], *, window: int = WINDOW) -> None:
        self.sources = sources
        self.tally = Tally()
        self.error: str | None = None
        self._slots = anyio.Semaphore(window)
        self._waiting: deque[tuple[str, int, int]] = deque()
        self._sent_all = False
        self.started = time.monotonic()
        self.answered_bytes = 0
        self._out = bytearray()  # lines counted in _waiting, not yet sent
        self._sending: anyio.CancelScope | None = None
        self._waiting_scope = anyio.CancelScope()  # sending what is owed, reading replies
        self._owed: anyio.CancelScope | None = None  # sending what was counted, once stopped
        self._in_send: anyio.CancelScope | None = None  # a send under way
        self._refused: str | None = None  # why the worker took no more lines, if it did not
        self._lost: str | None = None  # why the replies stopped, if the connection broke
        self._stopped: str | None = None  # the signal that stopped the sending
        self._again: str | None = None  # the signal that stopped the waiting for replies
        self._finished = False

    def stop(self, why: str) -> None:
        """Send no more lines; those sent are still answered and counted (SIGINT, SIGTERM,
        SIGHUP). A second stop waits no longer: the lines not answered are counted as
        such (a worker that does not answer, say because it is stopped)."""
        if self._finished:
            return
        if self._stopped is not None:
            self._again = self._again or why
            self._waiting_scope.cancel()
            for scope in (self._owed, self._in_send):
                if scope is not None:
                    scope.cancel()
            return
        self._stopped = why
        if self._sending is not None:
            self._sending.cancel()

    @property
    def total_bytes(self) -> int | None:
        sizes = [s.size for s in self.sources]
        return None if None in sizes else sum(s for s in sizes if s is not None)

    async def run(self, stream: anyio.abc.ByteStream, progress: TextIO | None = None) -> Tally:
        """Feed ``stream`` and read its replies until both ends are done."""
        self.started = time.monotonic()
        with self._waiting_scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._send_guarded, stream, tg.cancel_scope)
                if progress is not None:
                    tg.start_soon(self._show_progress, progress)
                await self._receive(stream)
                tg.cancel_scope.cancel()  # the sender is done unless the connection ended
        self._finished = True
        if progress is not None:
            _write(progress, "\r\x1b[K")
        self.tally.unanswered = len(self._waiting)
        self.error = self.error or self._ending()
        return self.tally

    def _ending(self) -> str | None:
        """What stopped the run short, if anything did (None: every line answered)."""
        left = len(self._waiting)
        again = "; run the same replay again to finish (nothing is applied twice)"
        if self._again is not None:
            return (
                f"stopped by {self._again} again: {left} lines not answered (the worker may "
                f"have applied some of them){again}"
            )
        stopped = f"stopped by {self._stopped}, then " if self._stopped is not None else ""
        if self._lost is not None:
            return (
                f"{stopped}lost the connection to the worker ({self._lost}; is it "
                f"stopping?) with {left} lines unanswered{again}"
            )
        if self._refused is not None:
            return (
                f"{stopped}the worker stopped taking lines ({self._refused}; is it "
                f"stopping?) with {left} lines unanswered{again}"
            )
        if left or (self._stopped is None and not self._sent_all):
            return f"{stopped}the worker ended the connection with {left} lines unanswered{again}"
        if self._stopped is not None:
            return (
                f"stopped by {self._stopped}: the lines sent were answered and are counted{again}"
            )
        return None

    async def _send_guarded(self, stream: anyio.abc.ByteStream, scope: anyio.CancelScope) -> None:
        try:
            with anyio.CancelScope() as self._sending:
                if self._stopped:
                    self._sending.cancel()
                await self._send_all(stream)
            if self._stopped:  # what is counted as sent goes, then the end of input
                with anyio.CancelScope(shield=True) as owed:
                    if self._waiting_scope.cancel_called:
                        owed.cancel()
                    self._owed = owed
                    await self._flush(stream)
                    await stream.send_eof()
        except ReplayError as exc:
            self.error = str(exc)
            scope.cancel()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            # The worker takes no more lines (it is stopping, or gone). What it read is
            # still answered: the replies are read on until the connection ends. The end
            # of input tells a worker that is still there that no more lines come.
            self._refused = str(exc) or type(exc).__name__
            with contextlib.suppress(Exception):
                await stream.send_eof()

    async def _flush(self, stream: anyio.abc.ByteStream) -> None:
        """Send the lines buffered. A send the first stop cut short would leave its last
        line cut (a malformed line to the worker) and the rest unsent though counted: it
        runs to its end; only a second stop gives up on it."""
        if not self._out:
            return
        data = bytes(self._out)
        self._out.clear()
        try:
            with anyio.CancelScope(shield=True) as self._in_send:
                if self._again is not None:
                    self._in_send.cancel()
                await stream.send(data)
        finally:
            self._in_send = None

    async def _send_all(self, stream: anyio.abc.ByteStream) -> None:
        out = self._out
        for source in self.sources:
            async for number, line in numbered_lines(source):
                try:
                    self._slots.acquire_nowait()
                except anyio.WouldBlock:
                    await self._flush(stream)  # what is buffered must go, or no slot frees
                    await self._slots.acquire()
                self._waiting.append((source.name, number, len(line) + 1))
                out += line + b"\n"
                if len(out) >= _SEND_SIZE:
                    await self._flush(stream)
        await self._flush(stream)
        self._sent_all = True
        await stream.send_eof()

    async def _receive(self, stream: anyio.abc.ByteStream) -> None:
        try:
            async for frame in frame_lines(stream, limit=_REPLY_LIMIT):
                if not self._waiting:
                    self.error = "the worker sent a reply to a line that was not sent"
                    return
                name, number, size = self._waiting.popleft()
                self._slots.release()
                self.answered_bytes += size
                self.tally.count(name, number, _decode(frame))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            self._lost = str(exc) or type(exc).__name__

    async def _show_progress(self, out: TextIO) -> None:
        while True:
            await anyio.sleep(0.25)
            if not _write(out, "\r\x1b[K" + self.progress_line()):
                return  # the terminal is gone (a hangup): no more progress

    def progress_line(self) -> str:
        seconds = max(time.monotonic() - self.started, 1e-9)
        text = f"{self.tally.lines:,} lines, {self.tally.lines / seconds:,.0f}/s"
        total = self.total_bytes
        if total and self.answered_bytes:
            done = min(self.answered_bytes / total, 1.0)
            eta = seconds * (1 - done) / done
            text += f", {done:.0%}, ETA {eta:,.0f} s"
        return text


def _decode(frame: bytes | TooLarge) -> Any:
    if isinstance(frame, TooLarge):
        return None
    try:
        return _decode_reply.decode(frame)
    except msgspec.DecodeError:
        return None


def report(replay: Replay, *, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """Print the summary (JSON on stdout, text on stderr); the exit status."""
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    tally = replay.tally
    stdout.write(msgspec.json.encode(tally.summary()).decode() + "\n")
    stdout.flush()
    lines = [
        f"bidlog replay: {text}" if not text.startswith(" ") else text
        for text in tally.describe(time.monotonic() - replay.started)
    ]
    if replay.error is not None:
        lines.append(f"bidlog replay: {replay.error}")
    _write(stderr, "".join(line + "\n" for line in lines))  # a closed terminal: still exit
    return 1 if tally.failed or replay.error is not None else 0


def _write(out: TextIO, text: str) -> bool:
    """Write and flush ``text``; False if ``out`` cannot take it (a hung-up terminal)."""
    try:
        out.write(text)
        out.flush()
    except (OSError, ValueError):
        return False
    return True
