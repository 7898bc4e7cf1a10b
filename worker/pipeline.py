"""The anyio pipeline: connections frame lines into one bounded inbox; one applier
task takes what is waiting as a batch, commits it, and replies in order per stream.

Memory stays bounded: the inbox holds at most ``inbox_size`` chunks of lines, and each
connection has a window of at most ``in_flight`` lines read but not yet answered, so a
flood or a slow disk pushes back on the readers instead of growing queues. Lines travel
in chunks (all the lines one read produced) so the per-line cost stays small.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream

from adapters.transports import LineFramer, TooLarge, memory_stream_pair
from worker.applier import Applier, Outbox, Request

log = logging.getLogger("bidlog.pipeline")

_GONE = (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)


class Window:
    """Counts a connection's lines read but not yet answered; readers wait when full."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.used = 0
        self._freed = anyio.Event()

    async def acquire(self, count: int) -> None:
        # A chunk larger than the whole window may pass alone, when nothing is in flight.
        while self.used and self.used + count > self.size:
            await self._wait()
        self.used += count

    def release(self, count: int) -> None:
        self.used -= count
        self._freed.set()

    async def drained(self) -> None:
        while self.used:
            await self._wait()

    async def _wait(self) -> None:
        if self._freed.is_set():
            self._freed = anyio.Event()
        await self._freed.wait()


class Worker:
    """One applier and any number of connections feeding it."""

    def __init__(
        self,
        applier: Applier,
        *,
        max_batch: int = 512,
        inbox_size: int = 256,
        in_flight: int = 2048,
    ) -> None:
        self.applier = applier
        self.max_batch = max_batch
        self.in_flight = in_flight
        self._inbox_send, self._inbox = anyio.create_memory_object_stream[Request](inbox_size)
        self._readers: set[anyio.CancelScope] = set()
        self._reading = 0
        self._no_readers = anyio.Event()
        self._stopping = False
        self.stopped = anyio.Event()
        self._tg: anyio.abc.TaskGroup | None = None

    async def apply_forever(self) -> None:
        """Take what is waiting (about ``max_batch`` lines), process it; end when the
        inbox is closed and empty."""
        async with self._inbox:
            async for first in self._inbox:
                requests = self._gather(first)
                with anyio.CancelScope(shield=True):
                    await self.applier.process(requests)

    def _gather(self, first: Request) -> list[Request]:
        requests, lines = [first], len(first.frames)
        while lines < self.max_batch:
            try:
                more = self._inbox.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream):
                break
            requests.append(more)
            lines += len(more.frames)
        return requests

    async def serve(self, stream: anyio.abc.ByteStream) -> None:
        """Read lines from ``stream`` until it ends (or the worker stops) and answer each."""
        outbox_send, outbox = anyio.create_memory_object_stream[tuple[bytes, int]](math.inf)
        window = Window(self.in_flight)
        async with anyio.create_task_group() as tg:
            tg.start_soon(_write_replies, stream, outbox, window)
            async with outbox_send:
                await self._read_requests(stream, Outbox(outbox_send.send_nowait), window)
                await window.drained()  # every reply handed to the writer and written
        await stream.aclose()

    async def _read_requests(
        self, stream: anyio.abc.ByteStream, outbox: Outbox, window: Window
    ) -> None:
        if self._stopping:
            return
        scope = anyio.CancelScope()
        self._readers.add(scope)
        self._reading += 1
        try:
            with scope:
                await self._pump(stream, outbox, window)
        except _GONE as exc:
            log.info("connection closed while reading: %s", exc)
        finally:
            self._readers.discard(scope)
            self._reading -= 1
            if self._reading == 0 and self._stopping:
                self._no_readers.set()

    async def _pump(self, stream: anyio.abc.ByteStream, outbox: Outbox, window: Window) -> None:
        framer = LineFramer()
        while True:
            try:
                frames = framer.feed(await stream.receive())
            except anyio.EndOfStream:
                await self._push(framer.finish(), outbox, window)
                return
            await self._push(frames, outbox, window)

    async def _push(self, frames: list[bytes | TooLarge], outbox: Outbox, window: Window) -> None:
        if not frames:
            return
        await window.acquire(len(frames))
        # Shielded: a chunk is either handed over whole or never taken, and the applier
        # keeps draining, so this cannot hang a shutdown.
        with anyio.CancelScope(shield=True):
            await self._inbox_send.send(Request(frames, outbox))

    def stop_reading(self) -> None:
        """Stop every reader; what was read is still committed and answered."""
        self._stopping = True
        self.stopped.set()
        for scope in list(self._readers):
            scope.cancel()
        if self._reading == 0:
            self._no_readers.set()

    async def finish(self) -> None:
        """After ``stop_reading``: once no reader is left, close the inbox."""
        await self._no_readers.wait()
        await self._inbox_send.aclose()

    @property
    def task_group(self) -> anyio.abc.TaskGroup:
        """The task group connections are served in (set by ``running``)."""
        assert self._tg is not None, "use the worker inside running()"
        return self._tg

    async def connect(self) -> anyio.abc.ByteStream:
        """An in-process connection (client side) served by this worker's task group."""
        client, server = memory_stream_pair()
        self.task_group.start_soon(self.serve, server)
        return client


async def _write_replies(
    stream: anyio.abc.ByteStream,
    outbox: MemoryObjectReceiveStream[tuple[bytes, int]],
    window: Window,
) -> None:
    """Write replies in order, coalescing what is waiting; free the window as they go."""
    broken = False
    async with outbox:
        async for first in outbox:
            chunk = [first]
            while True:
                try:
                    chunk.append(outbox.receive_nowait())
                except (anyio.WouldBlock, anyio.EndOfStream):
                    break
            if not broken:
                try:
                    await stream.send(b"".join(data for data, _ in chunk))
                except _GONE as exc:
                    log.info("peer went away; dropping its replies: %s", exc)
                    broken = True
            window.release(sum(count for _, count in chunk))


@asynccontextmanager
async def running(worker: Worker) -> AsyncIterator[Worker]:
    """Run ``worker``'s applier; on exit stop reading, drain, commit and answer."""
    async with anyio.create_task_group() as tg:
        worker._tg = tg
        tg.start_soon(worker.apply_forever)
        try:
            yield worker
        finally:
            worker.stop_reading()
            with anyio.CancelScope(shield=True):
                await worker.finish()
