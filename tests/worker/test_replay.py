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
    assert replay.error == "lost the connection to the worker: BrokenResourceError"
