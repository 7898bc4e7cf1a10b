"""Commands, and a driver that runs them through the real Ledger into a real store,
remembering every scope's state after every event to compare the store's reads with."""

from __future__ import annotations

import datetime as dt
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec

from adapters.canonical import digest
from adapters.sqlite_schema import PROTECTED_TABLES
from adapters.sqlite_store import SqliteStore
from domain.commands import (
    Actor,
    Cause,
    Checkpoint,
    Command,
    CreateArea,
    FinalizeRound,
    OpenRound,
    RegisterUser,
    Rollback,
    Seniority,
    SubmitBid,
    WithdrawBid,
)
from domain.errors import DomainError
from domain.ledger import Draft, Ledger
from domain.records import Ack, Batch, Entry
from domain.state import ScopeKey, ScopeState
from tests.unit.builders import with_states

YEAR = 2026
NORTH: ScopeKey = (YEAR, "North")
SOUTH: ScopeKey = (YEAR, "South")
ADMIN = Actor(id="admin-1", role="admin")
CAUSE = Cause(id="TCK-1", description="store test ✓")
START = dt.datetime(2026, 11, 25, 20, 0, tzinfo=dt.UTC)
SENIORITY = Seniority(
    cumulative_natca_bu_date=dt.date(2015, 1, 4),
    natca_bu_date=dt.date(2015, 1, 4),
    eod_faa_date=dt.date(2014, 6, 30),
    service_computation_date=dt.date(2014, 6, 30),
    lottery_value=17,
)

_ids = iter(range(1, 10**9))


def _envelope(key: ScopeKey) -> dict[str, Any]:
    return {"id": f"m-{next(_ids)}", "actor": ADMIN, "cause": CAUSE, "bid_year": key[0],
            "area": key[1]}  # fmt: skip


def create(key: ScopeKey = NORTH) -> CreateArea:
    return CreateArea(**_envelope(key))


def register(initials: str, key: ScopeKey = NORTH) -> RegisterUser:
    return RegisterUser(
        **_envelope(key),
        initials=initials,
        name=f"Ünïcode {initials}",
        user_type="CPC",
        seniority=SENIORITY,
    )


def open_round(number: int, key: ScopeKey = NORTH, max_per_day: int = 5) -> OpenRound:
    return OpenRound(**_envelope(key), round=number, max_per_day=max_per_day)


def bid(initials: str, number: int, *days: int, key: ScopeKey = NORTH) -> SubmitBid:
    chosen = tuple(dt.date(key[0], 7, d) for d in days or (1,))
    return SubmitBid(**_envelope(key), round=number, initials=initials, days=chosen)


def withdraw(initials: str, number: int, key: ScopeKey = NORTH) -> WithdrawBid:
    return WithdrawBid(**_envelope(key), round=number, initials=initials)


def finalize(number: int, key: ScopeKey = NORTH) -> FinalizeRound:
    return FinalizeRound(**_envelope(key), round=number)


def checkpoint(key: ScopeKey = NORTH, label: str | None = "cp") -> Checkpoint:
    return Checkpoint(**_envelope(key), label=label)


def rollback(to_event: int, key: ScopeKey = NORTH) -> Rollback:
    return Rollback(**_envelope(key), to_event=to_event)


def scenario() -> list[Command]:
    """Two scopes, users, bids, a finalized round, a checkpoint and a rollback (event 7)."""
    return [
        create(),  # 1
        register("AB"),  # 2
        create(SOUTH),  # 3
        register("CD"),  # 4
        open_round(1),  # 5
        bid("AB", 1, 1, 2),  # 6
        bid("CD", 1, 3),  # 7
        register("EF", SOUTH),  # 8
        finalize(1),  # 9 snapshot
        checkpoint(SOUTH),  # 10 snapshot
        open_round(2),  # 11
        bid("AB", 2, 5),  # 12
        rollback(7),  # 13 snapshot: round 1 open with both bids, no round 2
        withdraw("CD", 1),  # 14
    ]


def with_auto_checkpoints() -> list[Command]:
    """The scenario without its hard-coded rollback target, which automatic checkpoints
    would shift, and with a rollback to event 2 (North's AB registration either way)."""
    return [*scenario()[:12], rollback(2)]


class Driver:
    """A ledger in front of a store: ``run`` decides commands in one draft, appends them
    as one batch (events, snapshots, acks), and commits the draft only after that."""

    def __init__(self, store: SqliteStore, *, checkpoint_every: int = 1000) -> None:
        self.store = store
        self.ledger = Ledger(checkpoint_every=checkpoint_every)
        self.entries: list[Entry] = []
        self.states: dict[int, ScopeState] = {}  # by event id: the scope's state after it
        self.clock = START
        self._pending: Draft | None = None

    async def run(
        self,
        *commands: Command | Callable[[Draft], Command],
        step: dt.timedelta | None = None,
        skip_refused: bool = False,
    ) -> list[Entry]:
        batch = await self.decide(commands, step=step, skip_refused=skip_refused)
        await self.store.append(batch)
        self.accept(batch)
        return list(batch.entries)

    async def decide(
        self,
        commands: Sequence[Command | Callable[[Draft], Command]],
        *,
        step: dt.timedelta | None,
        skip_refused: bool = False,
    ) -> Batch:
        """One draft over ``commands`` (or functions of the draft that make one, to choose
        a command from the working state); a refused command raises, or is left out."""
        draft = self.ledger.draft()
        acks: list[Ack] = []
        for item in commands:
            command = item(draft) if callable(item) else item
            self.clock += step if step is not None else dt.timedelta(milliseconds=1)
            body = digest(msgspec.to_builtins(command))
            target = await self._target(command, draft.entries)
            try:
                added = draft.apply(command, now=self.clock, digest=body, rollback_target=target)
            except DomainError:
                if skip_refused:
                    continue
                raise
            event = added[0].event
            acks.append(Ack(command.id, body, event.event_id, event.seq, event.recorded_at))
        self._pending = draft
        return Batch(tuple(draft.entries), tuple(acks))

    def accept(self, batch: Batch) -> None:
        """Make the decided batch current (call only after it committed)."""
        assert self._pending is not None
        self.states.update(self._fold(batch.entries))
        self.ledger.commit(self._pending)
        self._pending = None
        self.entries.extend(batch.entries)

    def _fold(self, entries: Sequence[Entry]) -> dict[int, ScopeState]:
        """The state after each of ``entries`` (not yet committed), by ``evolve``: a draft
        leaves out the states of bids (``Entry.state`` None)."""
        return {s.event.event_id: s.state for s in with_states(entries, self.ledger.state)}

    async def _target(self, command: Command, pending: Sequence[Entry]) -> ScopeState | None:
        """The rollback target as the worker gets it: from the store, or from the draft
        when the target event is in the same (uncommitted) batch."""
        if not isinstance(command, Rollback):
            return None
        key = (command.bid_year, command.area)
        for event_id, state in self._fold(pending).items():
            if event_id == command.to_event:
                return state if state.key == key else None
        return await self.store.event_state(key, command.to_event)

    def keys(self) -> list[ScopeKey]:
        return sorted({e.event.scope for e in self.entries})

    def expected(self, key: ScopeKey, at_event: int | None = None) -> ScopeState | None:
        """The scope's state in memory right after its last event ``<= at_event``."""
        found = None
        for entry in self.entries:
            if at_event is not None and entry.event.event_id > at_event:
                break
            if entry.event.scope == key:
                found = self.states[entry.event.event_id]
        return found


async def open_store(path: Path, **kw: Any) -> SqliteStore:
    return await SqliteStore.open(path, **kw)


def tamper(db: Path, *statements: str) -> None:
    """Change the log behind the store's back: drop its guard triggers, then run SQL."""
    with sqlite3.connect(db) as conn:
        for table in PROTECTED_TABLES:
            for verb in ("update", "delete"):
                conn.execute(f"DROP TRIGGER IF EXISTS {table}_no_{verb}")
        for statement in statements:
            conn.execute(statement)
