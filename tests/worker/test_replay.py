"""The replay client on its own, against streams that misbehave."""

from __future__ import annotations

from pathlib import Path

import anyio
import anyio.abc

from worker.replay import Replay, Source


class _Gone(anyio.abc.ByteStream):
    """A connection whose peer vanished without a word."""

    async def receive(self, max_bytes: int = 65536) -> bytes:
        raise anyio.BrokenResourceError()  # no message, as anyio raises it

    async def send(self, item: bytes) -> None:
        return None

    async def send_eof(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


async def test_a_lost_connection_is_named_even_when_the_error_says_nothing(
    tmp_path: Path,
) -> None:
    feed = tmp_path / "feed.ndjson"
    feed.write_bytes(b'{"id":"q","type":"verify"}\n')
    source = Source.open(str(feed))
    try:
        replay = Replay([source])
        await replay.run(_Gone())
    finally:
        source.close()
    assert replay.error is not None
    assert replay.error.startswith(
        "lost the connection to the worker (BrokenResourceError; is it stopping?) with "
    )


class _Dies(anyio.abc.ByteStream):
    """A worker that answers the first two lines, then ends the connection."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.sent: bytes | None = b""
        self.all_sent = anyio.Event()

    async def receive(self, max_bytes: int = 65536) -> bytes:
        await self.all_sent.wait()
        if self.sent is not None:
            self.sent = None
            return b'{"id":"m0","ok":true}\n{"id":"m1","ok":true}\n'
        raise anyio.EndOfStream

    async def send(self, item: bytes) -> None:
        assert self.sent is not None
        self.sent += item
        if self.sent.count(b"\n") == self.expected:
            self.all_sent.set()

    async def send_eof(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


async def test_lines_left_unanswered_by_a_worker_that_died_are_counted(tmp_path: Path) -> None:
    feed = tmp_path / "feed.ndjson"
    feed.write_bytes(b"".join(b'{"id":"m%d","type":"verify"}\n' % i for i in range(5)))
    source = Source.open(str(feed))
    try:
        replay = Replay([source])
        tally = await replay.run(_Dies(5))
    finally:
        source.close()
    assert (tally.ok, tally.failed, tally.unanswered) == (2, 0, 3)
    assert tally.summary()["unanswered"] == 3
    assert (
        "2 lines answered: 2 ok, 0 duplicate, 0 failed; 3 more unanswered"
        in (tally.describe(1.0)[0])
    )
    assert replay.error == (
        "the worker ended the connection with 3 lines unanswered; run the same replay again"
        " to finish (nothing is applied twice)"
    )


class _StopsReading(anyio.abc.ByteStream):
    """A worker that answers the two lines of the first send, then takes no more lines
    (as when it is stopped with SIGTERM) and ends the connection."""

    def __init__(self) -> None:
        self.sends = 0
        self.first = anyio.Event()
        self.refused = anyio.Event()

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if not self.first.is_set() or self.sends == 1:
            await self.first.wait()
            self.sends = 2
            return b'{"id":"m0","ok":true}\n{"id":"m1","ok":true}\n'
        await self.refused.wait()
        raise anyio.EndOfStream

    async def send(self, item: bytes) -> None:
        if self.first.is_set():
            self.refused.set()
            raise anyio.BrokenResourceError()
        self.sends = 1
        self.first.set()

    async def send_eof(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


async def test_a_worker_that_stops_taking_lines_still_has_its_replies_counted(
    tmp_path: Path,
) -> None:
    feed = tmp_path / "feed.ndjson"
    lines = [b'{"id":"m%d","type":"verify"}\n' % i for i in range(5000)]
    feed.write_bytes(b"".join(lines))
    source = Source.open(str(feed))
    try:
        replay = Replay([source], window=2)
        tally = await replay.run(_StopsReading())
    finally:
        source.close()
    assert (tally.ok, tally.failed, tally.unanswered) == (2, 0, 2)
    assert replay.error is not None
    assert replay.error.startswith("the worker stopped taking lines (BrokenResourceError;")


class _BreaksAfterStop(anyio.abc.ByteStream):
    """A worker that answers nothing and breaks the connection once the replay was
    stopped (as when it is killed while the replay waits for its replies)."""

    def __init__(self) -> None:
        self.replay: Replay | None = None
        self.sent = anyio.Event()

    async def receive(self, max_bytes: int = 65536) -> bytes:
        await self.sent.wait()
        assert self.replay is not None
        self.replay.stop("SIGINT")
        raise anyio.BrokenResourceError()

    async def send(self, item: bytes) -> None:
        self.sent.set()

    async def send_eof(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


async def test_a_stop_then_a_lost_connection_says_both_and_a_late_signal_changes_nothing(
    tmp_path: Path,
) -> None:
    feed = tmp_path / "feed.ndjson"
    feed.write_bytes(b"".join(b'{"id":"m%d","type":"verify"}\n' % i for i in range(3)))
    source = Source.open(str(feed))
    try:
        replay = Replay([source])
        stream = _BreaksAfterStop()
        stream.replay = replay
        tally = await replay.run(stream)
    finally:
        source.close()
    assert tally.unanswered == 3
    assert replay.error is not None
    assert replay.error.startswith(
        "stopped by SIGINT, then lost the connection to the worker (BrokenResourceError"
    )
    said = replay.error
    replay.stop("SIGTERM")  # after the run: nothing to stop, nothing to say
    assert replay.error == said


class _SlowSend(anyio.abc.ByteStream):
    """A worker whose first send is slow to be taken; it answers every line it got."""

    def __init__(self) -> None:
        self.started = anyio.Event()
        self.release = anyio.Event()
        self.got = b""
        self.answered = 0
        self.ended = anyio.Event()

    async def receive(self, max_bytes: int = 65536) -> bytes:
        while True:
            lines = self.got.count(b"\n")
            if lines > self.answered:
                replies = b'{"id":"m","ok":true}\n' * (lines - self.answered)
                self.answered = lines
                return replies
            if self.ended.is_set():
                raise anyio.EndOfStream
            await anyio.sleep(0.001)

    async def send(self, item: bytes) -> None:
        if not self.started.is_set():
            self.started.set()
            await self.release.wait()
        self.got += item

    async def send_eof(self) -> None:
        self.ended.set()

    async def aclose(self) -> None:
        return None


async def test_a_stop_lets_a_send_under_way_finish_so_no_line_is_cut_or_lost(
    tmp_path: Path,
) -> None:
    feed = tmp_path / "feed.ndjson"
    feed.write_bytes(b"".join(b'{"id":"m%d","type":"verify"}\n' % i for i in range(20000)))
    source = Source.open(str(feed))
    stream = _SlowSend()
    replay = Replay([source])
    try:
        async with anyio.create_task_group() as tg:

            async def stop_during_the_first_send() -> None:
                await stream.started.wait()
                replay.stop("SIGINT")
                await anyio.sleep(0.05)
                stream.release.set()

            tg.start_soon(stop_during_the_first_send)
            tally = await replay.run(stream)
    finally:
        source.close()
    assert stream.got.endswith(b"\n")
    assert tally.unanswered == 0 and tally.ok == stream.got.count(b"\n") > 0
    assert replay.error is not None and replay.error.startswith("stopped by SIGINT: the lines")
