"""The anyio pipeline: connections frame lines into queues of their own; one applier
task takes what is waiting as a batch, commits it, and replies in order per stream.

The applier takes the connections' chunks in turn (one chunk of each connection with
lines waiting, round and round, up to ``max_batch`` lines), and a batch stops after a
read (query or rollback) once it has run for ``turn`` seconds, the rest going back to
the front of its connection's queue: so a client pipelining heavy queries delays the
others by about a turn, not by all it sent.

Memory stays bounded: at most ``inbox_size`` chunks of lines wait in all, and each
connection has a window of at most ``in_flight`` lines read but not yet answered, so a
flood or a slow disk pushes back on the readers instead of growing queues. Lines travel
in chunks (all the lines one read produced) so the per-line cost stays small.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
import anyio.abc
import anyio.lowlevel
from anyio.streams.memory import MemoryObjectReceiveStream

from adapters.transports import LineFramer, TooLarge, memory_stream_pair
from worker.applier import Applier, Outbox, Request

log = logging.getLogger("bidlog.pipeline")

_GONE = (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)
BATCH_BYTES = 4 << 20  # of lines in one batch (and in one waiting chunk), about
SEND_SLICE = 64 << 10  # replies are written at most this many bytes at a time


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

    async def changed(self) -> None:
        """Until some lines are released."""
        await self._wait()

    async def _wait(self) -> None:
        if self._freed.is_set():
            self._freed = anyio.Event()
        await self._freed.wait()


class Connection:
    """One connection's replies on their way out, and what to do if they pile up.

    ``unwritten`` counts reply bytes handed over but not yet written; ``taken``, those
    written. A large reply waits (``full``, ``room``) while more than ``limit`` are
    unwritten, and
    at the end of its input (or when the worker stops) the connection waits until its
    replies are written (``drained``). Either way, a peer that takes none of them for
    ``patience`` seconds is dropped: reading stops, its remaining replies are discarded
    (what it sent is still committed), and the stream is closed. Stdin and stdout are no
    such peer (``one_peer`` false: a pager that pauses is backpressure): there only a
    stopping worker drops them. Once the worker stops, a connection still taking its
    replies ``stop_grace`` seconds later is dropped too, however steadily it reads: a
    stop ends in bounded time (before a service manager's SIGKILL).
    """

    def __init__(
        self,
        window: Window,
        send: Callable[[tuple[bytes, int]], None],
        *,
        limit: int,
        patience: float,
        one_peer: bool = True,
        stopped_since: Callable[[], float | None] = lambda: None,
        stop_grace: float = math.inf,
    ) -> None:
        self.window = window
        self.one_peer = one_peer
        self.stopped_since = stopped_since  # when the worker began to stop, if it has
        self.stop_grace = stop_grace
        self._send = send
        self.limit = limit
        self.patience = patience
        self.unwritten = 0
        self.taken = 0  # reply bytes written so far: progress
        self.dropped = False
        self.on_drop: Callable[[], None] = lambda: None
        self.reading: anyio.CancelScope | None = None
        self.sending: anyio.CancelScope | None = None
        self._written = anyio.Event()

    def deliver(self, item: tuple[bytes, int]) -> None:
        """The applier's ``Outbox.send``: never blocks."""
        data, count = item
        if self.dropped:
            self.window.release(count)
            return
        self.unwritten += len(data)
        self._send(item)

    def full(self) -> bool:
        """The applier's ``Outbox.full``: too many replies unwritten for a large one."""
        return self.unwritten > self.limit and not self.dropped

    async def room(self) -> None:
        """Until the connection is not ``full``: a slow reader is waited for as long as
        it takes something every ``patience`` seconds, else dropped."""
        while self.unwritten > self.limit and not self.dropped:
            with anyio.move_on_after(self.patience) as waited:
                await self._wait_written()
            self._judge(stalled=waited.cancelled_caught)

    async def admit(self, count: int) -> None:
        """Room in the window for ``count`` more lines. While the window is full of lines
        whose replies wait to be written, a peer that takes none of them for
        ``patience`` seconds is dropped: one that sends everything before it reads
        would otherwise wait for the worker to read on, and the worker for it, for good
        (not stdin, until a stop: its sender is not stdout's reader; see ``_judge``)."""
        window = self.window
        while window.used and window.used + count > window.size:  # as Window.acquire
            await self._lines_answered()
        window.used += count

    async def drained(self) -> None:
        """Until every line read is answered and written; drops the connection if it
        has replies waiting and takes none of them for ``patience`` seconds (at the end
        of its input, or when the worker stops, a peer that does not read would
        otherwise hold the worker for good; stdin only when the worker stops)."""
        while self.window.used:
            await self._lines_answered()

    async def _lines_answered(self) -> None:
        """Until some lines of the window are answered and written, or ``patience``
        seconds have passed; then a peer with replies waiting that took none is dropped."""
        taken = self.taken
        with anyio.move_on_after(self.patience) as waited:
            await self.window.changed()
        if self.unwritten:
            self._judge(stalled=waited.cancelled_caught and self.taken == taken)

    def _judge(self, *, stalled: bool) -> None:
        """Drop the connection if it ``stalled`` (took nothing for ``patience``) and is
        one to drop for that, or if the worker has been stopping for ``stop_grace``."""
        since = self.stopped_since()
        if stalled and (self.one_peer or since is not None):
            self.drop(f"it took none of its replies for {self.patience:g} s")
        elif since is not None and anyio.current_time() - since > self.stop_grace:
            self.drop(f"it was still taking its replies {self.stop_grace:g} s into the stop")

    def written(self, size: int) -> None:
        self.unwritten -= size
        self.taken += size
        self._written.set()

    async def _wait_written(self) -> None:
        if self._written.is_set():
            self._written = anyio.Event()
        await self._written.wait()

    def drop(self, why: str) -> None:
        if self.dropped:
            return
        self.dropped = True
        self.on_drop()
        log.warning(
            "closing a connection: %s (%d bytes of replies unwritten)",
            why,
            self.unwritten,
            extra={"unwritten": self.unwritten},
        )
        for scope in (self.reading, self.sending):
            if scope is not None:
                scope.cancel()
        self._written.set()


class _Feed:
    """One connection's chunks waiting for the applier, oldest first."""

    __slots__ = ("chunks", "conn", "parked", "queued", "size", "taken")

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.chunks: deque[Request] = deque()
        self.size = 0  # bytes read for the chunks waiting
        self.taken = anyio.Event()  # set when the applier takes some
        self.queued = False  # in the worker's ring of connections with chunks waiting
        self.parked = False  # waiting, out of the ring, for its reader to take replies


class Worker:
    """One applier and any number of connections feeding it."""

    def __init__(
        self,
        applier: Applier,
        *,
        max_batch: int = 512,
        inbox_size: int = 256,
        in_flight: int = 2048,
        max_unwritten: int = 16 << 20,
        patience: float = 10.0,
        stop_grace: float = 30.0,
        turn: float = 0.02,
        max_waiting: int = 16 << 20,
    ) -> None:
        self.applier = applier
        self.stop_grace = stop_grace
        self.max_batch = max_batch
        self.in_flight = in_flight
        self.max_unwritten = max_unwritten
        self.patience = patience
        self.turn = turn
        self.max_waiting = max_waiting  # bytes of read lines waiting, per connection
        self.dropped = 0  # connections closed with replies unwritten
        self._ring: deque[_Feed] = deque()  # connections with chunks waiting, in turn
        self._chunks = Window(inbox_size)  # chunks waiting, all connections together
        self._work = anyio.Event()  # set when a chunk arrives or the inbox closes
        self._closed = False
        self._parked = 0
        self._readers: set[anyio.CancelScope] = set()
        self._reading = 0
        self._no_readers = anyio.Event()
        self._stopping = False
        self._stopped_at: float | None = None
        self.stopped = anyio.Event()
        self._tg: anyio.abc.TaskGroup | None = None

    async def apply_forever(self) -> None:
        """Take what is waiting (about ``max_batch`` lines, the connections in turn) and
        process it; end when the inbox is closed and empty."""
        try:
            async with anyio.create_task_group() as tg:
                if self.applier.pipelined:
                    tg.start_soon(self._watch_answers)
                    tg.start_soon(self.applier.writer_lost)  # raises: the worker stops
                await self._apply_forever()
                tg.cancel_scope.cancel()
        finally:
            # Cancelled (another task of the worker failed) with a batch being committed:
            # its replies are still owed, and its outcome is still to be had.
            if self.applier.busy:
                with anyio.CancelScope(shield=True):
                    await self.applier.settle()

    async def _apply_forever(self) -> None:
        while True:
            while not self._ring:
                if self.applier.busy:
                    # A batch commits: answer it once it has, unless lines come first
                    # (then they are decided meanwhile, as the commit goes on).
                    if self.applier.has_answer():
                        with anyio.CancelScope(shield=True):
                            await self.applier.advance()
                        continue
                    if self._work.is_set():
                        self._work = anyio.Event()
                    await self._work.wait()  # lines, or the answer (_watch_answers)
                    continue
                if self._closed and not self._parked:
                    return
                if self._work.is_set():
                    self._work = anyio.Event()
                await self._work.wait()
            with anyio.CancelScope(shield=True):
                if self.applier.has_answer():  # answered already: reply before deciding
                    await self.applier.advance()  # more (and the next batch is larger)
                requests, feeds = self._gather()
                rest, ended_by = await self.applier.process(requests, turn=self.turn)
            for request in reversed(rest):  # back to the front of their queues, in order
                feed = feeds[id(request.outbox)]
                feed.chunks.appendleft(request)
                feed.size += request.size  # as _gather took it off
                self._chunks.used += 1
            if ended_by is not None:
                # Back in turn: the connections whose lines were not reached keep their
                # place, at the front in the batch's order; the one whose read ended the
                # batch goes to the back, or a client of heavy queries would keep it.
                last = feeds[id(ended_by)]
                waiting = dict.fromkeys(feeds[id(request.outbox)] for request in rest)
                for feed in reversed([f for f in waiting if f is not last]):
                    self._requeue(feed, front=True)
                self._requeue(last, front=False)
            # Let the readers hand over what they have read (a batch of queries answered
            # from memory may never have waited for anything).
            await anyio.lowlevel.checkpoint()

    async def _watch_answers(self) -> None:
        """Wake the applier loop when the writer answers a batch, as a chunk of lines
        does. (Racing the two with a task group per wait, one task cancelled, made
        cyclic garbage: 67-88 ms collections at 1,000 commands/s.)"""
        while True:
            await self.applier.answered()
            self._work.set()

    def _gather(self) -> tuple[list[Request], dict[int, _Feed]]:
        requests: list[Request] = []
        feeds: dict[int, _Feed] = {}
        ring, lines, size = self._ring, 0, 0
        # At most max_batch lines, and about BATCH_BYTES: a batch holds its lines until
        # it is committed, and lines can be 1 MiB each.
        while ring and lines < self.max_batch and size < BATCH_BYTES:
            feed = ring.popleft()
            request = feed.chunks.popleft()
            requests.append(request)
            feeds[id(request.outbox)] = feed
            lines += len(request.frames)
            size += request.size
            feed.size -= request.size
            feed.taken.set()
            if feed.chunks:
                ring.append(feed)
            else:
                feed.queued = False
        self._chunks.release(len(requests))
        return requests, feeds

    def _enqueue(self, feed: _Feed) -> None:
        if not feed.queued and not feed.parked:
            feed.queued = True
            self._ring.append(feed)
            self._work.set()

    def _requeue(self, feed: _Feed, *, front: bool) -> None:
        """Put ``feed`` back in turn (at the front or the back), or park it if its
        connection is full; leave it out if it has nothing waiting."""
        if feed.queued:
            self._ring.remove(feed)
            feed.queued = False
        if not feed.chunks or feed.parked:
            return
        if feed.conn.full():
            self._park(feed)
            return
        feed.queued = True
        if front:
            self._ring.appendleft(feed)
        else:
            self._ring.append(feed)
        self._work.set()

    def _park(self, feed: _Feed) -> None:
        """Take ``feed`` out of turn until its reader has taken enough replies (or is
        dropped for taking none): the applier never waits for one slow reader."""
        if feed.parked:
            return
        if feed.queued:
            self._ring.remove(feed)
            feed.queued = False
        feed.parked = True
        self._parked += 1
        self.task_group.start_soon(self._unpark_when_room, feed)

    async def _unpark_when_room(self, feed: _Feed) -> None:
        try:
            await feed.conn.room()
        finally:
            feed.parked = False
            self._parked -= 1
            if feed.chunks:
                self._enqueue(feed)
            self._work.set()  # also: a closing inbox may have waited for this one

    async def serve(self, stream: anyio.abc.ByteStream, *, one_peer: bool = True) -> None:
        """Read lines from ``stream`` until it ends (or the worker stops) and answer each.
        ``one_peer``: the same peer sends the lines and reads the replies (a socket, not
        stdin and stdout); see ``Connection.admit``."""
        outbox_send, outbox = anyio.create_memory_object_stream[tuple[bytes, int]](math.inf)
        window = Window(self.in_flight)
        conn = Connection(
            window,
            outbox_send.send_nowait,
            limit=self.max_unwritten,
            patience=self.patience,
            one_peer=one_peer,
            stopped_since=lambda: self._stopped_at,
            stop_grace=self.stop_grace,
        )
        conn.on_drop = self._count_drop
        try:
            with outbox:  # closed by _write_replies, and here if that never ran (cancelled)
                async with anyio.create_task_group() as tg:
                    tg.start_soon(_write_replies, stream, outbox, conn)
                    async with outbox_send:
                        replies = Outbox(conn.deliver, conn.full)
                        await self._read_requests(stream, replies, conn, _Feed(conn))
                        await conn.drained()  # every reply handed to the writer and written
        finally:
            with anyio.CancelScope(shield=True):
                await stream.aclose()

    def _count_drop(self) -> None:
        self.dropped += 1

    async def _read_requests(
        self, stream: anyio.abc.ByteStream, outbox: Outbox, conn: Connection, feed: _Feed
    ) -> None:
        if self._stopping:
            return
        window = conn.window
        scope = conn.reading = anyio.CancelScope()
        self._readers.add(scope)
        self._reading += 1
        try:
            with scope:
                await self._pump(stream, outbox, window, feed)
        except _GONE as exc:
            log.info("connection closed while reading: %s", exc)
        finally:
            self._readers.discard(scope)
            self._reading -= 1
            if self._reading == 0 and self._stopping:
                self._no_readers.set()

    async def _pump(
        self, stream: anyio.abc.ByteStream, outbox: Outbox, window: Window, feed: _Feed
    ) -> None:
        framer = LineFramer()
        while True:
            try:
                frames = framer.feed(await stream.receive())
            except anyio.EndOfStream:
                frames = framer.finish()
                await self._push(frames, outbox, window, feed, _size(frames))
                return
            await self._push(frames, outbox, window, feed, _size(frames))

    async def _push(
        self,
        frames: list[bytes | TooLarge],
        outbox: Outbox,
        window: Window,
        feed: _Feed,
        size: int,
    ) -> None:
        if not frames:
            return
        acquired = False
        try:
            await feed.conn.admit(len(frames))
            acquired = True
            await self._room_to_wait(feed, size)
        except anyio.get_cancelled_exc_class():
            # Stopping (or dropped) while waiting for room: lines already read are
            # still handed over, to be committed and answered (or their replies
            # discarded, if dropped), never lost in between.
            if not acquired:
                window.used += len(frames)
            await self._hand_over(frames, outbox, feed, size)
            raise
        await self._hand_over(frames, outbox, feed, size)

    async def _room_to_wait(self, feed: _Feed, size: int) -> None:
        """Until the connection's lines waiting for the applier hold at most
        ``max_waiting`` bytes: the window counts lines, and lines can be 1 MiB each."""
        while feed.size and feed.size + size > self.max_waiting:
            if feed.taken.is_set():
                feed.taken = anyio.Event()
            await feed.taken.wait()

    async def _hand_over(
        self, frames: list[bytes | TooLarge], outbox: Outbox, feed: _Feed, size: int
    ) -> None:
        waiting = feed.chunks
        feed.size += size
        last = waiting[-1] if waiting else None
        if (
            last is not None
            and len(last.frames) + len(frames) <= self.max_batch
            and last.size + size <= BATCH_BYTES
        ):
            # Joined to the chunk already waiting: a connection whose lines wait (parked,
            # say, its reader slow) takes few of the inbox's slots, whatever its writes.
            last.frames.extend(frames)
            last.size += size
        else:
            # Shielded: a chunk is either handed over whole or never taken, and the
            # applier keeps draining, so this cannot hang a shutdown.
            with anyio.CancelScope(shield=True):
                await self._chunks.acquire(1)
            waiting.append(Request(frames, outbox, size))
        self._enqueue(feed)

    def stop_reading(self) -> None:
        """Stop every reader; what was read is still committed and answered."""
        self._stopping = True
        if self._stopped_at is None:
            self._stopped_at = anyio.current_time()
        self.stopped.set()
        for scope in list(self._readers):
            scope.cancel()
        if self._reading == 0:
            self._no_readers.set()

    async def finish(self) -> None:
        """After ``stop_reading``: once no reader is left, close the inbox. (Each
        connection then waits for its replies to be taken; see ``Connection.drained``.)"""
        await self._no_readers.wait()
        self._closed = True
        self._work.set()

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


def _size(frames: list[bytes | TooLarge]) -> int:
    """The bytes of the lines (a line of 1 MiB spans many reads: not the bytes read)."""
    try:
        return sum(map(len, frames))  # type: ignore[arg-type]  # TooLarge is rare
    except TypeError:
        return sum(len(frame) for frame in frames if isinstance(frame, bytes))


async def _write_replies(
    stream: anyio.abc.ByteStream,
    outbox: MemoryObjectReceiveStream[tuple[bytes, int]],
    conn: Connection,
) -> None:
    """Write replies in order, coalescing what is waiting; free the window as they go."""
    async with outbox:
        async for first in outbox:
            chunk = [first]
            while True:
                try:
                    chunk.append(outbox.receive_nowait())
                except (anyio.WouldBlock, anyio.EndOfStream):
                    break
            data = b"".join(data for data, _ in chunk)
            sent = 0
            if not conn.dropped:
                with anyio.CancelScope() as conn.sending:
                    try:
                        # In slices, each counted as taken once written: a client that
                        # reads slowly but steadily is seen taking its replies, however
                        # many were coalesced (16 MiB at 250 KB/s took over a minute).
                        while sent < len(data):
                            piece = (
                                data if len(data) <= SEND_SLICE else data[sent : sent + SEND_SLICE]
                            )
                            await stream.send(piece)
                            sent += len(piece)
                            conn.written(len(piece))
                    except _GONE as exc:  # stdout closed, or a client gone: stop reading
                        conn.drop(f"its replies cannot be written ({exc!r})")
                conn.sending = None
            conn.written(len(data) - sent)  # dropped: the rest is discarded
            conn.window.release(sum(count for _, count in chunk))


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
