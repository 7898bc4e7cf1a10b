"""The ports the worker drives. Adapters implement them structurally (no import needed)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any, Protocol

from domain.records import Ack, Batch, Recovered
from domain.state import ScopeKey, ScopeState


class Clock(Protocol):
    """Where ``recorded_at`` comes from; the core clamps it so it never decreases."""

    def now(self) -> dt.datetime: ...


class Store(Protocol):
    """The append-only audit log: the source of truth."""

    async def recover(self) -> Recovered:
        """Every scope's current state (newest snapshot + deltas), the head event id and time."""
        ...

    async def append(self, batch: Batch) -> None:
        """Commit every event, snapshot and ack of ``batch`` in one transaction, or none.

        Raises ``StoredAlready`` (nothing written) if any of ``batch.fresh`` has an
        idempotency record, and ``PersistenceFailed`` if the commit fails."""
        ...

    async def acks(self, message_ids: Sequence[str]) -> dict[str, Ack]:
        """The stored idempotency records among ``message_ids``."""
        ...

    async def state_at(
        self, key: ScopeKey, *, at_event: int | None = None, at_time: dt.datetime | None = None
    ) -> ScopeState | None:
        """The scope's state now, after global event ``at_event``, or at ``at_time``."""
        ...

    async def event_state(self, key: ScopeKey, event_id: int) -> ScopeState | None:
        """The scope's state right after ``event_id`` if that event belongs to the scope."""
        ...

    async def timeline(
        self, key: ScopeKey, *, after_event: int = 0, limit: int = 1000
    ) -> tuple[list[dict[str, Any]], int | None] | None:
        """A page of the scope's events (section-6 dicts) and ``next_after``; None if no scope."""
        ...

    async def list_areas(self, bid_year: int | None = None) -> list[dict[str, Any]]:
        """``{bid_year, area, seq, head_event}`` per scope, sorted by year then area."""
        ...

    async def verify(self) -> dict[str, int]:
        """``{events, snapshots}``; raises ``IntegrityError`` naming the first bad event."""
        ...

    async def close(self) -> None:
        """Close the database."""
        ...
