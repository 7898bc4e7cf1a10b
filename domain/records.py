"""What the core hands to storage and gets back from it: plain data, no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from domain.events import Event
from domain.state import ScopeKey, ScopeState


class Ack(msgspec.Struct, frozen=True):
    """The idempotency record of an acknowledged command: its id, body digest and reply."""

    message_id: str
    digest: str
    event_id: int
    seq: int
    recorded_at: str


class Entry(msgspec.Struct, frozen=True):
    """One event and the scope's state right after it: stored in full when
    ``event.snapshot``, always there then. A draft leaves it out (None) for a bid decided
    on a scope kept mutable (``domain.working``); ``evolve`` of the event gives it."""

    event: Event
    state: ScopeState | None

    @property
    def snapshot(self) -> ScopeState | None:
        return self.state if self.event.snapshot else None


@dataclass(frozen=True)
class Batch:
    """Everything one transaction commits: events in ``event_id`` order, their snapshots,
    and the idempotency records of the commands that produced them.

    ``fresh`` names the message ids the batch was decided as new: the transaction first
    looks them up and, if any is stored already, writes nothing and raises
    ``StoredAlready``. The caller decides again knowing them (one trip to the store per
    batch instead of a lookup and then a write)."""

    entries: tuple[Entry, ...]
    acks: tuple[Ack, ...] = ()
    fresh: tuple[str, ...] = ()


class StoredAlready(Exception):
    """Some of a batch's ``fresh`` message ids have idempotency records: nothing was
    written. ``acks`` holds those records."""

    def __init__(self, acks: dict[str, Ack]) -> None:
        super().__init__(f"{len(acks)} message ids are stored already")
        self.acks = acks


class OutcomeUnknown(Exception):
    """The store cannot tell whether a batch was committed (its writer is gone). The
    worker must stop without answering that batch; a restart recovers from the log."""


@dataclass(frozen=True)
class Recovered:
    """Every scope's current state as storage holds it, for startup."""

    scopes: dict[ScopeKey, ScopeState] = field(default_factory=dict)
    since_snapshot: dict[ScopeKey, int] = field(default_factory=dict)
    head_event: int = 0
    last_recorded_at: str = ""
