"""The cyclic garbage collector's settings for a long-running bidlog process (the worker
and its writer process alike)."""

from __future__ import annotations

import gc

GC_YOUNG = 50_000


def tune_gc() -> None:
    """Set the cyclic garbage collector for a process, once its start-up state exists.

    What exists now (modules, the recovered ledger) lives as long as the process:
    ``gc.freeze()`` leaves it out of full collections, which walked all of it and paused
    the worker for 21-31 ms at a time. A batch's objects (decoded messages, events,
    replies, rows) live until its commit returns and then go; with the default young
    threshold (700) they were walked and promoted several times over: 13% of the
    worker's CPU on the bench mix (gc callbacks: 0.25 s of 1.9 s for 20,000 commands).
    With room for a whole batch's objects they are gone before any collection (0.02 s).
    Cycles are still collected, after ``GC_YOUNG`` net allocations.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG, 10, 10)
