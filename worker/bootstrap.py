"""The one place that builds the real adapters and wires them to the pipeline."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from adapters.clock import SystemClock
from adapters.gc_policy import tune_gc
from adapters.sqlite_store import SqliteStore
from adapters.sqlite_writer import ProcessStore
from domain.ledger import Ledger
from domain.records import OutcomeUnknown
from worker.applier import Applier
from worker.pipeline import Worker, running
from worker.ports import Clock

log = logging.getLogger("bidlog")
TAIL_CHECK = 1000


@dataclass(frozen=True)
class Settings:
    """What the command line (or an embedding program) chooses."""

    db: Path
    synchronous: str = "full"
    checkpoint_every: int = 1000
    max_batch: int = 512
    # "process": appends in a writer process, overlapping the next batch's decisions
    # (adapters.sqlite_writer); "thread": all in this process, on aiosqlite's thread.
    writer: str = "process"


class FatalError(Exception):
    """The worker cannot start (exit status 1)."""


async def open_store(settings: Settings, *, writer: bool) -> SqliteStore:
    """Open the database, turning every failure into one clear ``FatalError``."""
    if not writer and not settings.db.exists():
        raise FatalError(f"no database at {settings.db}")
    try:
        return await SqliteStore.open(
            str(settings.db), synchronous=settings.synchronous, writer=writer
        )
    except Exception as exc:
        raise FatalError(f"cannot open {settings.db}: {exc}") from exc


async def open_writer(settings: Settings) -> SqliteStore | ProcessStore:
    """Open the database for a worker, with a writer process if ``settings`` say so."""
    if settings.writer == "thread":
        return await open_store(settings, writer=True)
    try:
        return await ProcessStore.open(str(settings.db), synchronous=settings.synchronous)
    except Exception as exc:
        raise FatalError(f"cannot open {settings.db}: {exc}") from exc


def _lost(group: BaseExceptionGroup[BaseException]) -> OutcomeUnknown | None:
    """The ``OutcomeUnknown`` that stopped the applier, if that is what happened."""
    for exc in group.exceptions:
        if isinstance(exc, OutcomeUnknown):
            return exc
        if isinstance(exc, BaseExceptionGroup) and (found := _lost(exc)) is not None:
            return found
    return None


@asynccontextmanager
async def serving(settings: Settings, clock: Clock | None = None) -> AsyncIterator[Worker]:
    """Open the store, recover every scope, and run a worker until the block exits."""
    store = await open_writer(settings)
    started = False
    try:
        try:
            recovered = await store.recover()
            # Start-up integrity check: the tail of the chain (bidlog verify does it all).
            await store.check_tail(TAIL_CHECK)
        except Exception as exc:
            raise FatalError(f"cannot recover {settings.db}: {exc}") from exc
        ledger = Ledger(recovered, checkpoint_every=settings.checkpoint_every)
        tune_gc()
        start = await store.head()
        log.info(
            "worker started",
            extra={
                "db": str(settings.db),
                "scopes": len(recovered.scopes),
                "head_event": start.event_id,
                "head_hash": start.hash,
                "synchronous": settings.synchronous,
            },
        )
        started = True
        applier = Applier(store, ledger, clock or SystemClock())
        try:
            async with running(Worker(applier, max_batch=settings.max_batch)) as worker:
                yield worker
        except BaseExceptionGroup as group:
            lost = _lost(group)
            if lost is None:
                raise
            log.critical("stopping: %s", lost)
            raise FatalError(
                f"stopped: {lost}. Start the worker again: it recovers from the "
                "database; senders re-send what was not answered (a command already "
                "stored is answered as a duplicate)"
            ) from None
    finally:
        # The head at stop and at the next start must match: kept logs are an anchor
        # outside the file (the chain alone cannot show its newest events cut off).
        # A start that failed logs no head: it never had one it could vouch for.
        end = await store.head()
        await store.close()
        if started:
            extra = {"db": str(settings.db), "head_event": end.event_id, "head_hash": end.hash}
            log.info("worker stopped", extra=extra)
