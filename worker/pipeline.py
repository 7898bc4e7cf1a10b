"""The anyio pipeline: connections frame lines into one bounded inbox; one applier
task takes what is waiting as a batch, commits it, and replies in order per stream.

Memory stays bounded: the inbox holds at most ``inbox_size`` requests, and each
connection has at most ``in_flight`` lines read but not yet answered, so a flood or a
slow disk pushes back on the readers instead of growing queues.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from adapters.transports import frame_lines, memory_stream_pair
from worker.applier import Applier, Request

log = logging.getLogger("bidlog.pipeline")


class Worker:
    """One applier and any number of connections feeding it."""

    def __init__(
        self,
        applier: Applier,
        *,
        max_batch: int = 512,
        inbox_size: int = 1024,
        in_flight: int = 1024,
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
        """Take what is waiting (up to ``max_batch``), process it; end when the inbox closes."""
        async with self._inbox:
            async for first in self._inbox:
                requests = [first, *self._drain()]
                with anyio.CancelScope(shield=True):
                    await self.applier.process(requests)

    def _drain(self) -> list[Request]:
        more: list[Request] = []
        while len(more) < self.max_batch - 1:
            try:
                more.append(self._inbox.receive_nowait())
            except (anyio.WouldBlock, anyio.EndOfStream):
                break
        return more

    async def serve(self, stream: anyio.abc.ByteStream) -> None:
        """Read lines from ``stream`` until it ends (or the worker stops) and answer each."""
        outbox_send, outbox = anyio.create_memory_object_stream[bytes](math.inf)
        slots = anyio.Semaphore(self.in_flight)
        async with anyio.create_task_group() as tg:
            tg.start_soon(_write_replies, stream, outbox, slots)
            async with outbox_send:
                await self._read_requests(stream, outbox_send, slots)
                for _ in range(self.in_flight):  # every reply handed to the writer
                    await slots.acquire()
        await stream.aclose()

    async def _read_requests(
        self,
        stream: anyio.abc.ByteStream,
        outbox: MemoryObjectSendStream[bytes],
        slots: anyio.Semaphore,
    ) -> None:
        if self._stopping:
            return
        scope = anyio.CancelScope()
        self._readers.add(scope)
        self._reading += 1
        try:
            with scope:
                async for frame in frame_lines(stream):
                    await slots.acquire()
                    # Shielded: a request is either fully handed over or never taken,
                    # and the applier keeps draining, so this cannot hang a shutdown.
                    with anyio.CancelScope(shield=True):
                        await self._inbox_send.send(Request(frame, outbox.send_nowait))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            log.info("connection closed while reading: %s", exc)
        finally:
            self._readers.discard(scope)
            self._reading -= 1
            if self._reading == 0 and self._stopping:
                self._no_readers.set()

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
    outbox: MemoryObjectReceiveStream[bytes],
    slots: anyio.Semaphore,
) -> None:
    """Write replies in order, coalescing what is waiting; free one slot per reply."""
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
                    await stream.send(b"".join(chunk))
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                    log.info("peer went away; dropping its replies: %s", exc)
                    broken = True
            for _ in chunk:
                slots.release()


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
