"""The store's appends in a process of their own, so they overlap the next decisions.

Under the GIL, a thread that encodes, hashes and inserts a batch takes the CPU from the
one deciding the next batch: overlap measured no faster in one process. A second process
shares no GIL. ``ProcessStore`` is the worker's store with its appends done by a child
process (``python -m adapters.sqlite_writer``) that runs the same ``SqliteStore.append``
(aiosqlite, one transaction per batch) on its own connection; reads stay in the worker,
on its connection (WAL readers see every commit the child has returned).

The two talk over a socket pair, one frame (4-byte length, msgpack) each way per batch:
``submit(batch)`` sends a batch, ``outcome()`` waits for its commit. Between the two the
worker decides the next batch; only one batch is ever in flight.

The worker holds the writer lock; the child shares it (the same open file description,
inherited), so a restarted worker cannot open the database while a child of the old one
still writes. The child ends when the worker closes the socket, and is killed by the
kernel if the worker dies (``PR_SET_PDEATHSIG``). If the child dies, the outcome of the
batch in flight is unknown (it may have committed): ``outcome()`` raises
``OutcomeUnknown`` and the worker must stop; a restart recovers from the file.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as dt
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import msgspec
from anyio.streams.buffered import BufferedByteReceiveStream

from adapters import logs
from adapters.gc_policy import tune_gc
from adapters.sqlite_rows import Head
from adapters.sqlite_schema import InvalidBatch, StoreError
from adapters.sqlite_store import FailAt, SqliteStore
from adapters.sqlite_verify import Tick
from domain.errors import PersistenceFailed
from domain.records import Ack, Batch, Entry, OutcomeUnknown, Recovered, StoredAlready
from domain.state import ScopeKey, ScopeState

log = logging.getLogger("bidlog.writer")

# -- the frames ---------------------------------------------------------------------------


class Ready(msgspec.Struct, tag="ready"):
    """The child opened the database; its head (must match the worker's)."""

    head: Head


class Committed(msgspec.Struct, tag="committed"):
    head: Head


class Stored(msgspec.Struct, tag="stored"):
    """Some of the batch's fresh ids are stored already: nothing was written."""

    acks: list[Ack]


class Failed(msgspec.Struct, tag="failed"):
    """Nothing was written: ``kind`` is ``persistence``, ``invalid`` or ``internal``."""

    kind: str
    message: str


Reply = Ready | Committed | Stored | Failed
_encode = msgspec.msgpack.Encoder().encode
_decode_reply = msgspec.msgpack.Decoder(Reply).decode
_decode_batch = msgspec.msgpack.Decoder(Batch).decode
_HEADER = 4
SEND_BUFFER = 4 << 20  # bytes (Linux caps it at net.core.wmem_max)
START_TIMEOUT = 60.0  # seconds for the child to open the database (SQLite waits 5 s)


def _frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(_HEADER, "big") + payload


def _complete(buffer: bytearray) -> bool:
    """Whether ``buffer`` begins with a whole frame."""
    return len(buffer) >= _HEADER and len(buffer) >= _HEADER + int.from_bytes(
        buffer[:_HEADER], "big"
    )


async def _receive(reader: BufferedByteReceiveStream) -> bytes:
    size = int.from_bytes(await reader.receive_exactly(_HEADER), "big")
    return await reader.receive_exactly(size)


def _wire(batch: Batch) -> Batch:
    """The batch as sent: a state goes along only where it is stored (snapshots)."""
    entries = tuple(
        entry if entry.event.snapshot or entry.state is None else Entry(entry.event, None)
        for entry in batch.entries
    )
    return Batch(entries, batch.acks, batch.fresh)


# -- the worker's side ------------------------------------------------------------------


class WriterProcess:
    """The child that appends; start with ``WriterProcess.start``.

    The worker's end of the socket pair is a plain non-blocking socket, waited on with
    ``anyio.wait_readable`` and ``anyio.wait_writable``."""

    def __init__(self, process: anyio.abc.Process, sock: socket.socket) -> None:
        self._process = process
        self._sock = sock
        sock.setblocking(False)
        self._buffer = bytearray()
        self._sent = False
        self._ended: BaseException | None = None  # why nothing more can come
        self._waiting = False  # a task waits for the socket to be readable
        self._waited: anyio.Event | None = None  # set when it stops waiting

    @classmethod
    async def start(
        cls,
        path: Path,
        *,
        synchronous: str,
        lock_fd: int,
        fault: FailAt | None = None,
    ) -> tuple[WriterProcess, Head]:
        """Spawn the child on ``path`` sharing the lock ``lock_fd``; return it and its head."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # A batch of 512 commands is about 320 KiB: room for it in one send, so the
        # worker hands it over in one system call and goes on deciding.
        with contextlib.suppress(OSError):
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        command = [
            sys.executable,
            "-P",  # not the working directory first on sys.path: only the installed code
            "-m",
            "adapters.sqlite_writer",
            "--db",
            str(path),
            "--synchronous",
            synchronous,
            "--channel",
            str(theirs.fileno()),
            "--lock",
            str(lock_fd),
            "--parent",
            str(os.getpid()),
        ]
        if fault is not None:
            command += ["--fault", f"{fault.at},{fault.times},{fault.skip}"]
        try:
            process = await anyio.open_process(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=None,  # the worker's: the child writes there only when it fails
                pass_fds=(theirs.fileno(), lock_fd),
                start_new_session=True,  # a terminal's signals (^C, hangup) are the worker's
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        writer = cls(process, ours)
        try:
            with anyio.fail_after(START_TIMEOUT):
                reply = await writer._reply()
        except (OutcomeUnknown, TimeoutError) as exc:
            await writer.close()
            why = str(exc) or f"no answer within {START_TIMEOUT:g} s"
            raise StoreError(f"the writer process did not start: {why}") from exc
        except BaseException:
            await writer.close()
            raise
        if isinstance(reply, Failed):
            await writer.close()
            raise StoreError(f"the writer process cannot open {path}: {reply.message}")
        if not isinstance(reply, Ready):
            await writer.close()
            raise StoreError(f"the writer process began with {type(reply).__name__}")
        return writer, reply.head

    @property
    def pid(self) -> int:
        return self._process.pid

    async def submit(self, batch: Batch) -> None:
        """Send ``batch`` for commit; ``outcome()`` says how it went. One at a time."""
        if self._sent:
            raise RuntimeError("a batch is in flight: wait for its outcome first")
        data = memoryview(_frame(_encode(_wire(batch))))
        self._sent = True  # even if the send fails part way: the child may have it
        try:
            while data:
                try:
                    data = data[self._sock.send(data) :]
                except BlockingIOError:
                    await anyio.wait_writable(self._sock)
        except OSError as exc:
            raise await self._lost("the batch could not be sent", exc) from exc

    async def outcome(self) -> Head:
        """The head after the submitted batch committed; or ``StoredAlready``,
        ``PersistenceFailed``, ``InvalidBatch`` (nothing written), or ``OutcomeUnknown``
        (the child is gone: the batch may or may not be stored)."""
        if not self._sent:
            raise RuntimeError("no batch is in flight")
        reply = await self._reply()
        self._sent = False
        if isinstance(reply, Committed):
            return reply.head
        if isinstance(reply, Stored):
            raise StoredAlready({ack.message_id: ack for ack in reply.acks})
        if isinstance(reply, Failed):
            if reply.kind == "persistence":
                raise PersistenceFailed(reply.message)
            if reply.kind == "invalid":
                raise InvalidBatch(reply.message)
            raise StoreError(f"the writer process failed: {reply.message}")
        raise await self._lost(f"it answered {type(reply).__name__}", None)

    def has_answer(self) -> bool:
        """Whether the batch in flight has its answer in (or the child is gone), as far
        as read already: ``outcome()`` will not wait. Never waits, reads nothing."""
        return self._sent and (self._ended is not None or _complete(self._buffer))

    async def answered(self) -> None:
        """Wait until the batch in flight is answered, or the child is gone (for a task
        that wakes the worker then)."""
        while self._sent and self._ended is None and not _complete(self._buffer):
            await self._readable()
            self._read_available()

    async def _readable(self) -> None:
        """Wait until the socket is readable, or until the task already waiting for
        that stops: anyio refuses two waits on one socket (BusyResourceError)."""
        if self._waiting:
            waited = self._waited = self._waited or anyio.Event()
            await waited.wait()
            return
        self._waiting = True
        try:
            await anyio.wait_readable(self._sock)
        finally:
            self._waiting = False
            if self._waited is not None:
                self._waited.set()
                self._waited = None

    def _read_available(self) -> None:
        """Take in what the child has sent, without waiting."""
        while self._ended is None:
            try:
                data = self._sock.recv(1 << 16)
            except BlockingIOError:
                return
            except OSError as exc:
                self._ended = exc
                return
            if not data:
                self._ended = EOFError("the socket was closed")
                return
            self._buffer += data

    async def _reply(self) -> Reply:
        while not _complete(self._buffer):
            self._read_available()
            if _complete(self._buffer):
                break
            if self._ended is not None:
                raise await self._lost("it ended", self._ended)
            await self._readable()
        size = int.from_bytes(self._buffer[:_HEADER], "big")
        payload = bytes(self._buffer[_HEADER : _HEADER + size])
        del self._buffer[: _HEADER + size]
        try:
            reply: Reply = _decode_reply(payload)
        except msgspec.DecodeError as exc:
            raise await self._lost("it answered garbage", exc) from exc
        return reply

    async def ended(self) -> OutcomeUnknown:
        """Wait until the child ends (it should not, before ``close``): why it did."""
        await self._process.wait()
        return await self._lost("it ended on its own", None)

    async def _lost(self, what: str, exc: BaseException | None) -> OutcomeUnknown:
        """Why the child cannot answer; the batch in flight, if any, has no outcome."""
        with anyio.move_on_after(2):  # its exit status, if it is exiting
            await self._process.wait()
        code = self._process.returncode
        if code is None:
            status = "is lost"
        elif code < 0:
            status = f"was killed by signal {-code}"
        else:
            status = f"ended with exit status {code}"
        cause = "" if exc is None else f" ({exc!r})"
        unknown = "; the last batch may or may not be stored" if self._sent else ""
        return OutcomeUnknown(
            f"the writer process (pid {self.pid}) {status}: {what}{cause}{unknown}"
        )

    async def close(self) -> None:
        """End the child (it finishes a commit in progress) and wait for it."""
        with anyio.CancelScope(shield=True):
            self._sock.close()
            with anyio.move_on_after(30):
                await self._process.wait()
                return
            self._process.kill()
            await self._process.wait()


class ProcessStore:
    """``worker.ports.Store`` with appends in a ``WriterProcess``; reads on ``reads``.

    Also ``submit``, ``outcome``, ``has_answer`` and ``answered``, with which the
    applier decides the next batch while the child commits this one."""

    def __init__(self, reads: SqliteStore, writer: WriterProcess) -> None:
        self._reads = reads
        self._writer = writer
        self.path = reads.path

    @classmethod
    async def open(
        cls,
        path: str | os.PathLike[str],
        *,
        synchronous: str = "full",
        fault: FailAt | None = None,
    ) -> ProcessStore:
        """Open ``path`` for writing (taking its lock) and start the writer process."""
        reads = await SqliteStore.open(path, synchronous=synchronous)
        try:
            writer, head = await WriterProcess.start(
                reads.path, synchronous=synchronous, lock_fd=reads.lock_fd, fault=fault
            )
        except BaseException:
            await reads.close()
            raise
        store = cls(reads, writer)
        if head != await reads.head():
            await store.close()
            raise StoreError(f"the writer process sees another head of {reads.path}: {head}")
        return store

    @property
    def writer_pid(self) -> int:
        return self._writer.pid

    async def submit(self, batch: Batch) -> None:
        await self._writer.submit(batch)

    def has_answer(self) -> bool:
        return self._writer.has_answer()

    async def ended(self) -> OutcomeUnknown:
        return await self._writer.ended()

    async def answered(self) -> None:
        await self._writer.answered()

    async def outcome(self) -> None:
        self._reads.follow(await self._writer.outcome())

    async def append(self, batch: Batch) -> None:
        await self.submit(batch)
        await self.outcome()

    async def close(self) -> None:
        try:
            await self._writer.close()
        finally:
            await self._reads.close()

    # -- reads, on the worker's connection --------------------------------------------

    async def head(self) -> Head:
        """From the file: the child may have committed a batch it could not answer."""
        return await self._reads.stored_head()

    async def recover(self) -> Recovered:
        return await self._reads.recover()

    async def check_tail(self, count: int = 1000) -> None:
        await self._reads.check_tail(count)

    async def acks(self, message_ids: Sequence[str]) -> dict[str, Ack]:
        return await self._reads.acks(message_ids)

    async def state_at(
        self, key: ScopeKey, *, at_event: int | None = None, at_time: dt.datetime | None = None
    ) -> ScopeState | None:
        return await self._reads.state_at(key, at_event=at_event, at_time=at_time)

    async def event_state(self, key: ScopeKey, event_id: int) -> ScopeState | None:
        return await self._reads.event_state(key, event_id)

    async def timeline(
        self, key: ScopeKey, *, after_event: int = 0, limit: int = 1000
    ) -> tuple[list[dict[str, Any]], int | None] | None:
        return await self._reads.timeline(key, after_event=after_event, limit=limit)

    async def list_areas(self, bid_year: int | None = None) -> list[dict[str, Any]]:
        return await self._reads.list_areas(bid_year)

    def iter_events(
        self, after_event: int = 0, upto: int | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        return self._reads.iter_events(after_event, upto)

    async def verify(self, tick: Tick | None = None) -> dict[str, int]:
        return await self._reads.verify(tick)


# -- the child's side -------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1


def _die_with(parent: int) -> None:
    """Ask the kernel to kill this process when the worker dies (Linux); if the worker
    is gone already, go now. Elsewhere the closed socket ends the child."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


async def _serve(args: argparse.Namespace) -> int:
    sock = socket.socket(fileno=args.channel)
    stream = await anyio.abc.UNIXSocketStream.from_socket(sock)
    reader = BufferedByteReceiveStream(stream)
    fault = None
    if args.fault:
        at, times, skip = (int(part) for part in args.fault.split(","))
        fault = FailAt(at, times=times, skip=skip)
    async with stream:
        try:
            store = await SqliteStore.open(
                args.db, synchronous=args.synchronous, lock_fd=args.lock, fault=fault
            )
        except Exception as exc:
            await stream.send(_frame(_encode(Failed("internal", str(exc)))))
            return 1
        try:
            await stream.send(_frame(_encode(Ready(await store.head()))))
            while True:
                try:
                    payload = await _receive(reader)
                except (anyio.EndOfStream, anyio.IncompleteRead):
                    return 0  # the worker closed: done
                reply = await _append(store, _decode_batch(payload))
                try:
                    await stream.send(_frame(_encode(reply)))
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    # The worker is gone (or closed with the batch in flight): it
                    # recovers from the file; nothing here to tell it, nor anyone else.
                    log.warning("the worker went away before taking an answer; stopping")
                    return 1
        finally:
            await store.close()


async def _append(store: SqliteStore, batch: Batch) -> Reply:
    try:
        await store.append(batch)
    except StoredAlready as stored:
        return Stored(list(stored.acks.values()))
    except PersistenceFailed as exc:
        return Failed("persistence", exc.message)
    except InvalidBatch as exc:
        return Failed("invalid", str(exc))
    except Exception as exc:
        log.exception("the writer process failed on a batch")
        return Failed("internal", repr(exc))
    return Committed(await store.head())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bidlog-writer", description=__doc__)
    parser.add_argument("--db", required=True)
    parser.add_argument("--synchronous", required=True)
    parser.add_argument("--channel", type=int, required=True)
    parser.add_argument("--lock", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--fault", default="")
    args = parser.parse_args(argv)
    _die_with(args.parent)
    # The worker decides when to stop (it has its own session, but systemd signals the
    # whole control group): it closes the socket once everything read is committed.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    # Its lines go to the worker's stderr, among the worker's: the same JSON lines.
    logs.setup("warning", process="writer", pid=os.getpid())
    tune_gc()  # as the worker: a batch's objects go before any collection walks them
    try:
        return anyio.run(_serve, args)
    except Exception:
        log.exception("the writer process failed; it stops (the worker stops with it)")
        return 1


if __name__ == "__main__":
    sys.exit(main())
