"""In-process harness: the real pipeline and a real SQLite file, driven over memory streams."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import msgspec

from adapters.clock import FixedClock
from adapters.sqlite_store import SqliteStore
from adapters.sqlite_writer import ProcessStore
from domain.ledger import Ledger
from tests.wire import Msg, line
from worker.applier import Applier
from worker.pipeline import Worker, running

START = dt.datetime(2026, 11, 25, 20, 0, tzinfo=dt.UTC)


class Client:
    """One connection: send messages (pipelined), read replies as dicts."""

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def send(self, *messages: Msg | bytes) -> None:
        data = [m if isinstance(m, bytes) else line(m) for m in messages]
        await self.stream.send(b"".join(data))

    async def receive(self, count: int) -> list[dict[str, Any]]:
        while self.buffer.count(b"\n") < count:
            self.buffer += await self.stream.receive()
        lines = self.buffer.split(b"\n")
        self.buffer = b"\n".join(lines[count:])
        return [msgspec.json.decode(x) for x in lines[:count]]

    async def ask(self, *messages: Msg | bytes) -> list[dict[str, Any]]:
        await self.send(*messages)
        return await self.receive(len(messages))

    async def ask_one(self, message: Msg | bytes) -> dict[str, Any]:
        return (await self.ask(message))[0]


@asynccontextmanager
async def worker_on(
    db: Path,
    *,
    fault: Any = None,
    clock: Any = None,
    checkpoint_every: int = 1000,
    writer: str = "thread",
    **worker_options: Any,
) -> AsyncIterator[Worker]:
    """A worker over a real database file, stopped (drained) when the block exits.
    ``writer="process"``: appends in a writer process (``fault`` goes there)."""
    store: SqliteStore | ProcessStore
    if writer == "process":
        store = await ProcessStore.open(str(db), fault=fault)
    else:
        store = await SqliteStore.open(str(db), fault=fault)
    try:
        ledger = Ledger(await store.recover(), checkpoint_every=checkpoint_every)
        applier = Applier(store, ledger, clock or FixedClock(START))
        async with running(Worker(applier, **worker_options)) as worker:
            yield worker
    finally:
        await store.close()


@asynccontextmanager
async def client_on(db: Path, **kw: Any) -> AsyncIterator[Client]:
    async with worker_on(db, **kw) as worker:
        stream = await worker.connect()
        async with stream:
            yield Client(stream)
