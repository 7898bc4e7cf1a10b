"""Byte transports for the worker: NDJSON framing, stdin/stdout, a Unix socket, in-process pairs.

Every transport is an ``anyio.abc.ByteStream`` (or a listener of them); ``frame_lines`` turns
any byte stream into lines. Nothing here knows about messages.
"""

from __future__ import annotations

import errno
import os
import select
import selectors
import socket
import stat
from collections.abc import AsyncGenerator
from dataclasses import dataclass

import anyio
import anyio.abc
import anyio.lowlevel
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

__all__ = [
    "MAX_LINE",
    "MAX_UNIX_PATH",
    "LineFramer",
    "MemoryByteStream",
    "SocketInUse",
    "SocketPathError",
    "StdioStream",
    "TooLarge",
    "TransportError",
    "UnixListener",
    "bind_unix",
    "frame_lines",
    "memory_stream_pair",
]

MAX_LINE = 1 << 20
"""The longest line (bytes, without its newline) the protocol accepts: 1 MiB."""

MAX_UNIX_PATH = 107
"""The longest AF_UNIX socket path in bytes (``sun_path`` is 108 bytes with its NUL)."""

_PIPE_BUF = 4096  # a write this small never blocks once poll() reports the pipe writable
_READ_SIZE = 1 << 16


class TransportError(Exception):
    """A transport cannot be set up."""


class SocketInUse(TransportError):
    """Another process answers on the socket path."""


class SocketPathError(TransportError):
    """The socket path is unusable: too long, or taken by something that is not a socket."""


# ---------------------------------------------------------------------------------------------
# Framing


@dataclass(frozen=True, slots=True)
class TooLarge:
    """Stands for a line longer than ``limit`` bytes, which was discarded."""

    limit: int


BOM = b"\xef\xbb\xbf"
JSON_SPACE = b" \t\r\n"
"""JSON's whitespace (RFC 8259): a line of only these is blank. Not vertical tab or form
feed, which Python's ``isspace`` counts: a line of those is not JSON, and is answered."""


class LineFramer:
    """Splits chunks of bytes into lines; holds at most ``limit + 1`` bytes of a partial line.

    Lines come without ``\\n`` and without a trailing ``\\r``; blank lines (``JSON_SPACE``
    only) are skipped; a line longer than ``limit`` becomes one ``TooLarge`` as soon as that
    is known, and the rest of it, up to the next newline, is dropped unread.
    """

    def __init__(self, limit: int = MAX_LINE) -> None:
        self._limit = limit
        self._pending = bytearray()
        self._discarding = False
        self._head: bytes | None = b""  # the stream's first bytes, until a BOM is ruled out

    @property
    def buffered(self) -> int:
        """Bytes of a partial line held until its newline comes."""
        return len(self._pending)

    def feed(self, chunk: bytes) -> list[bytes | TooLarge]:
        """The lines that ``chunk`` completes, in order."""
        if self._head is not None:
            chunk = self._skip_bom(chunk)
        out: list[bytes | TooLarge] = []
        start = 0
        if self._discarding:
            start = chunk.find(b"\n") + 1
            if start == 0:
                return out
            self._discarding = False
        first = chunk.find(b"\n", start)
        if first < 0:
            self._hold(chunk, start, out)
            return out
        if self._pending:
            self._complete_pending(chunk, start, first, out)
            start = first + 1
        last = chunk.rfind(b"\n")
        if start <= last:
            lines = chunk[start:last].split(b"\n")
            if last - start <= self._limit and b"\r" not in chunk:
                # No line here can be too long or end in \r: only blank ones to skip.
                out.extend(line for line in lines if line.strip(JSON_SPACE))
            else:
                for line in lines:
                    self._emit(line, out)
        self._hold(chunk, last + 1, out)
        return out

    def _skip_bom(self, chunk: bytes) -> bytes:
        """A UTF-8 byte order mark opening the stream is dropped (RFC 8259 lets a parser
        ignore it; editors on Windows write one)."""
        head = self._head = (self._head or b"") + chunk
        if len(head) < len(BOM) and BOM.startswith(head):
            return b""  # too short to tell yet
        self._head = None
        return head[len(BOM) :] if head.startswith(BOM) else head

    def finish(self) -> list[bytes | TooLarge]:
        """At end of input: the last line if it had no newline."""
        if self._head:  # a stream shorter than a BOM
            self._pending += self._head
        self._head = None
        out: list[bytes | TooLarge] = []
        if self._pending:
            self._emit(bytes(self._pending), out)
            self._pending.clear()
        self._discarding = False
        return out

    def _complete_pending(
        self, chunk: bytes, start: int, end: int, out: list[bytes | TooLarge]
    ) -> None:
        if len(self._pending) + (end - start) > self._limit + 1:
            out.append(TooLarge(self._limit))
        else:
            self._pending += memoryview(chunk)[start:end]
            self._emit(bytes(self._pending), out)
        self._pending.clear()

    def _hold(self, chunk: bytes, start: int, out: list[bytes | TooLarge]) -> None:
        size = len(chunk) - start
        if size <= 0:
            return
        # limit + 1: the last byte may be a '\r' that the newline will strip.
        if len(self._pending) + size > self._limit + 1:
            out.append(TooLarge(self._limit))
            self._pending.clear()
            self._discarding = True
        else:
            self._pending += memoryview(chunk)[start:]

    def _emit(self, line: bytes, out: list[bytes | TooLarge]) -> None:
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) > self._limit:
            out.append(TooLarge(self._limit))
        elif line.strip(JSON_SPACE):
            out.append(line)


async def frame_lines(
    stream: anyio.abc.ByteReceiveStream, *, limit: int = MAX_LINE
) -> AsyncGenerator[bytes | TooLarge, None]:
    """Every line of ``stream`` until it ends (see ``LineFramer``).

    Errors of the stream other than its end (``BrokenResourceError`` on a reset connection,
    ``ClosedResourceError``) propagate. Iterate inside ``contextlib.aclosing`` when you may
    stop early.
    """
    framer = LineFramer(limit)
    while True:
        try:
            chunk = await stream.receive()
        except anyio.EndOfStream:
            break
        for item in framer.feed(chunk):
            yield item
    for item in framer.finish():
        yield item


# ---------------------------------------------------------------------------------------------
# stdin / stdout


def _pollable(fd: int) -> bool:
    """Whether the event loop's selector can watch ``fd`` (not a regular file or /dev/null)."""
    with selectors.DefaultSelector() as selector:
        try:
            selector.register(fd, selectors.EVENT_READ)
        except (OSError, ValueError):
            return False
    return True


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


class StdioStream(anyio.abc.ByteStream):
    """Receives from the process's stdin and sends to its stdout, without blocking the loop.

    Pipes, ttys and sockets are awaited with the event loop's selector, so cancelling a
    ``receive`` is immediate and leaves no thread behind (stdin may stay open and idle).
    Regular files and /dev/null cannot be selected; they are read in a worker thread (such a
    read always returns promptly) and written directly. Sent bytes go straight to the file
    descriptor (no buffer to flush). Closing the stream does not close the descriptors; end of
    output is the process's exit. Flags of the descriptors (shared with the parent) are never
    changed.
    """

    def __init__(self, stdin: int = 0, stdout: int = 1) -> None:
        self._in = stdin
        self._out = stdout
        self._in_open = _is_open(stdin)
        self._in_pollable = self._in_open and _pollable(stdin)
        self._out_pollable = _pollable(stdout)
        self._out_poll = _poll_out(stdout) if self._out_pollable else None
        self._closed = False
        self._eof_sent = False

    async def receive(self, max_bytes: int = _READ_SIZE) -> bytes:
        """The next bytes of stdin; ``EndOfStream`` at its end."""
        if self._closed:
            raise anyio.ClosedResourceError
        if not self._in_open:
            await anyio.lowlevel.checkpoint()
            raise anyio.EndOfStream
        data = await (
            self._read_selected(max_bytes) if self._in_pollable else self._read_file(max_bytes)
        )
        if not data:
            raise anyio.EndOfStream
        return data

    async def _read_selected(self, max_bytes: int) -> bytes:
        while True:
            await anyio.wait_readable(self._in)
            try:
                return os.read(self._in, max_bytes)
            except BlockingIOError:  # another reader of a shared stdin was quicker
                continue
            except OSError as exc:
                raise _broken(exc) from exc

    async def _read_file(self, max_bytes: int) -> bytes:
        try:
            return await anyio.to_thread.run_sync(os.read, self._in, max_bytes)
        except OSError as exc:
            raise _broken(exc) from exc

    async def send(self, item: bytes) -> None:
        """Write all of ``item`` to stdout."""
        if self._closed or self._eof_sent:
            raise anyio.ClosedResourceError
        await anyio.lowlevel.checkpoint_if_cancelled()
        view = memoryview(item)
        while view:
            try:
                view = view[await self._write_some(view) :]
            except BlockingIOError:  # someone made the shared stdout non-blocking
                await anyio.wait_writable(self._out)
            except OSError as exc:
                raise _broken(exc) from exc

    async def _write_some(self, view: memoryview) -> int:
        if self._out_poll is None:
            return os.write(self._out, view)
        if not self._out_poll.poll(0):
            await anyio.wait_writable(self._out)
        return os.write(self._out, view[:_PIPE_BUF])

    async def send_eof(self) -> None:
        """Refuse further sends (stdout itself stays open until the process exits)."""
        self._eof_sent = True
        await anyio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        """Stop using stdin and stdout; a waiting ``receive`` gets ``ClosedResourceError``."""
        if not self._closed:
            self._closed = True
            if self._in_pollable:
                anyio.notify_closing(self._in)
            if self._out_pollable:
                anyio.notify_closing(self._out)
        await anyio.lowlevel.checkpoint()


def _poll_out(fd: int) -> select.poll:
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return poller


def _broken(exc: OSError) -> anyio.BrokenResourceError:
    return anyio.BrokenResourceError(f"{os.strerror(exc.errno or 0)} (errno {exc.errno})")


# ---------------------------------------------------------------------------------------------
# Unix socket


class UnixListener(anyio.abc.SocketListener):
    """A Unix stream socket listener that removes its socket file when it closes."""

    def __init__(self, inner: anyio.abc.SocketListener, path: str, inode: tuple[int, int]) -> None:
        self._inner = inner
        self._path = path
        self._inode = inode
        self._closed = False

    @property
    def path(self) -> str:
        """Where clients connect."""
        return self._path

    @property
    def _raw_socket(self) -> socket.socket:
        return self._inner.extra(anyio.abc.SocketAttribute.raw_socket)

    async def accept(self) -> anyio.abc.SocketStream:
        return await self._inner.accept()

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            _unlink_if_ours(self._path, self._inode)
        await self._inner.aclose()


async def bind_unix(path: str, *, backlog: int = 4096) -> UnixListener:
    """Listen on a Unix stream socket at ``path``, created mode 0600.

    A socket file nobody answers on (left by a crash) is replaced. Raises ``SocketInUse`` if a
    process answers on it, ``SocketPathError`` if the path is too long or is not a socket.
    """
    sock, inode = await anyio.to_thread.run_sync(_bind_unix_sync, path, backlog)
    try:
        inner = await anyio.abc.SocketListener.from_socket(sock)
    except BaseException:
        sock.close()
        _unlink_if_ours(path, inode)
        raise
    return UnixListener(inner, path, inode)


def _bind_unix_sync(path: str, backlog: int) -> tuple[socket.socket, tuple[int, int]]:
    _check_unix_path(path)
    _clear_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        _bind_private(sock, path)
        st = os.stat(path)
        inode = (st.st_dev, st.st_ino)
        try:
            sock.listen(backlog)
        except BaseException:
            _unlink_if_ours(path, inode)
            raise
    except BaseException:
        sock.close()
        raise
    return sock, inode


def _check_unix_path(path: str) -> None:
    raw = os.fsencode(path)
    if not raw or b"\0" in raw:
        raise SocketPathError(f"invalid socket path {path!r}")
    if len(raw) > MAX_UNIX_PATH:
        raise SocketPathError(
            f"socket path is {len(raw)} bytes long, AF_UNIX allows at most {MAX_UNIX_PATH}: "
            f"use a shorter path: {path}"
        )


def _clear_stale_socket(path: str) -> None:
    """Remove a socket file nobody listens on; refuse a live socket or any other file."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketPathError(f"{path} exists and is not a socket; refusing to replace it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            _unlink_missing_ok(path)
            return
        except FileNotFoundError:
            return
        except BlockingIOError:
            pass  # a live listener with a full backlog
        except PermissionError as exc:
            raise SocketInUse(
                f"cannot probe {path} ({exc.strerror}); is it another user's?"
            ) from exc
    raise SocketInUse(f"another process is serving on {path}")


def _bind_private(sock: socket.socket, path: str) -> None:
    # The umask makes bind create the file 0600 (never wider, not even briefly); the chmod
    # makes sure of it whatever the platform does with a socket's mode.
    old = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise SocketInUse(f"{path} was taken while binding") from exc
        raise
    finally:
        os.umask(old)
    os.chmod(path, 0o600)


def _unlink_if_ours(path: str, inode: tuple[int, int]) -> None:
    """Remove the socket file unless another listener has replaced it since."""
    try:
        st = os.lstat(path)
    except OSError:
        return
    if (st.st_dev, st.st_ino) == inode:
        _unlink_missing_ok(path)


def _unlink_missing_ok(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# ---------------------------------------------------------------------------------------------
# In-process


class MemoryByteStream(anyio.abc.ByteStream):
    """One end of an in-process byte stream pair (see ``memory_stream_pair``)."""

    def __init__(
        self, send: MemoryObjectSendStream[bytes], receive: MemoryObjectReceiveStream[bytes]
    ) -> None:
        self._send = send
        self._receive = receive
        self._leftover = b""

    async def receive(self, max_bytes: int = _READ_SIZE) -> bytes:
        data = self._leftover or await self._receive.receive()
        if len(data) > max_bytes:
            data, self._leftover = data[:max_bytes], data[max_bytes:]
        else:
            self._leftover = b""
        return data

    async def send(self, item: bytes) -> None:
        if item:
            await self._send.send(bytes(item))
        else:
            await anyio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        self._send.close()
        await anyio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        self._send.close()
        self._receive.close()
        self._leftover = b""
        await anyio.lowlevel.checkpoint()


def memory_stream_pair(max_buffer: int = 64) -> tuple[MemoryByteStream, MemoryByteStream]:
    """Two connected byte streams ``(client, server)``; each end's close is the other's EOF.

    ``max_buffer`` chunks may wait in each direction before ``send`` waits (backpressure).
    """
    to_server, from_client = anyio.create_memory_object_stream[bytes](max_buffer)
    to_client, from_server = anyio.create_memory_object_stream[bytes](max_buffer)
    return MemoryByteStream(to_server, from_server), MemoryByteStream(to_client, from_client)
