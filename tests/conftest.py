"""Shared test settings: aiosqlite needs asyncio; hypothesis is derandomized in CI; a
store a failed test left open is stopped, so that the run ends."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from adapters.sqlite_store import SqliteStore

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _stop_stores_left_open(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Stop the database thread of every store a test opened and did not close.

    aiosqlite's thread is not a daemon: a test that fails before ``store.close()`` would
    otherwise keep the interpreter alive after the session, so a failing run would hang
    (in CI, until its time limit) instead of reporting the failure.
    """
    opened: list[SqliteStore] = []
    init = SqliteStore.__init__

    def recording_init(self: SqliteStore, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        opened.append(self)

    monkeypatch.setattr(SqliteStore, "__init__", recording_init)
    yield
    for store in opened:
        db = store._db
        if db._running:
            db.stop()
            if store._lock is not None:
                store._lock.release()
