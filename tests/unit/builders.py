"""Factories for commands, states and contexts, and a ledger harness with a fixed clock.

Every default is a valid value, so a test names only what it is about.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import msgspec

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
    UpdateUser,
    WithdrawBid,
)
from domain.decide import Context
from domain.events import Event
from domain.evolve import evolve
from domain.ledger import Ledger
from domain.records import Entry
from domain.state import Bid, Round, RoundStatus, ScopeKey, ScopeState, User

YEAR = 2026
AREA = "North"
KEY: ScopeKey = (YEAR, AREA)
ADMIN = Actor(id="admin-1", role="admin")
BIDDER = Actor(id="bidder-1", role="bidder")
SYSTEM = Actor(id="bidlog", role="system")
CAUSE = Cause(id="TCK-1", description="test")
NOW = dt.datetime(2026, 11, 25, 20, 33, 0, 123456, tzinfo=dt.UTC)
NOW_TEXT = "2026-11-25T20:33:00.123456Z"
SENIORITY = Seniority(
    cumulative_natca_bu_date=dt.date(2015, 1, 4),
    natca_bu_date=dt.date(2015, 1, 4),
    eod_faa_date=dt.date(2014, 6, 30),
    service_computation_date=dt.date(2014, 6, 30),
    lottery_value=17,
)


def day(month_day: str, year: int = YEAR) -> dt.date:
    """``day("07-01")`` is 1 July of the bid year."""
    return dt.date.fromisoformat(f"{year}-{month_day}")


def days(*month_days: str) -> tuple[dt.date, ...]:
    return tuple(day(md) for md in month_days)


def _envelope(kw: dict[str, Any]) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": "m-1",
        "actor": ADMIN,
        "cause": CAUSE,
        "bid_year": YEAR,
        "area": AREA,
    }
    base.update(kw)
    return base


def create_area(**kw: Any) -> CreateArea:
    return CreateArea(**_envelope(kw))


def register_user(initials: str = "AB", **kw: Any) -> RegisterUser:
    fields: dict[str, Any] = {
        "initials": initials,
        "name": f"User {initials}",
        "user_type": "CPC",
        "seniority": SENIORITY,
    }
    fields.update(kw)
    return RegisterUser(**_envelope(fields))


def update_user(initials: str = "AB", **kw: Any) -> UpdateUser:
    return UpdateUser(**_envelope({"initials": initials, **kw}))


def open_round(number: int = 1, max_per_day: int = 2, **kw: Any) -> OpenRound:
    return OpenRound(**_envelope({"round": number, "max_per_day": max_per_day, **kw}))


def submit_bid(
    initials: str = "AB", number: int = 1, bid_days: Sequence[dt.date] = (), **kw: Any
) -> SubmitBid:
    chosen = tuple(bid_days) or days("07-01")
    return SubmitBid(**_envelope({"initials": initials, "round": number, "days": chosen, **kw}))


def withdraw_bid(initials: str = "AB", number: int = 1, **kw: Any) -> WithdrawBid:
    return WithdrawBid(**_envelope({"initials": initials, "round": number, **kw}))


def finalize_round(number: int = 1, **kw: Any) -> FinalizeRound:
    return FinalizeRound(**_envelope({"round": number, **kw}))


def checkpoint(**kw: Any) -> Checkpoint:
    return Checkpoint(**_envelope(kw))


def rollback(to_event: int, **kw: Any) -> Rollback:
    return Rollback(**_envelope({"to_event": to_event, **kw}))


def user(initials: str = "AB", **kw: Any) -> User:
    fields: dict[str, Any] = {
        "initials": initials,
        "name": f"User {initials}",
        "user_type": "CPC",
        "crew": None,
        "seniority": SENIORITY,
    }
    fields.update(kw)
    return User(**fields)


def bid(initials: str, *month_days: str) -> Bid:
    return Bid(initials, days(*month_days))


def round_(number: int, status: RoundStatus = "open", max_per_day: int = 2, *bids: Bid) -> Round:
    return Round(number, status, max_per_day, tuple(sorted(bids, key=lambda b: b.initials)))


def scope(
    *,
    users: Sequence[User] = (),
    rounds: Sequence[Round] = (),
    seq: int = 3,
    head_event: int = 10,
    area: str = AREA,
) -> ScopeState:
    return ScopeState(
        bid_year=YEAR,
        area=area,
        seq=seq,
        head_event=head_event,
        users=tuple(sorted(users, key=lambda u: u.initials)),
        rounds=tuple(rounds),
    )


def context(
    event_id: int = 11,
    *,
    other_initials: Mapping[str, str] | None = None,
    rollback_target: ScopeState | None = None,
    digest: str | None = "d" * 64,
) -> Context:
    return Context(
        event_id=event_id,
        recorded_at=NOW_TEXT,
        message_digest=digest,
        other_initials=other_initials or {},
        rollback_target=rollback_target,
    )


def without_position(state: ScopeState | None) -> ScopeState | None:
    """The state with ``seq``/``head_event`` zeroed, to compare content only."""
    if state is None:
        return None
    return msgspec.structs.replace(state, seq=0, head_event=0)


class Stated(msgspec.Struct, frozen=True):
    """An event and the state after it, always (``Entry.state`` may be None)."""

    event: Event
    state: ScopeState


def with_states(
    entries: Sequence[Entry], before: Callable[[ScopeKey], ScopeState | None]
) -> list[Stated]:
    """``entries`` with every state filled in by ``evolve`` from ``before(scope)``, the
    scope's state before them. A draft leaves out the states of bids decided on a scope
    it keeps mutable (``domain.working``); those it gives must equal ``evolve``'s."""
    last: dict[ScopeKey, ScopeState | None] = {}
    out: list[Stated] = []
    for entry in entries:
        key = entry.event.scope
        state = evolve(last[key] if key in last else before(key), entry.event)
        assert entry.state is None or entry.state == state
        last[key] = state
        out.append(Stated(entry.event, state))
    return out


class Harness:
    """A ledger driven one committed command at a time, remembering every state by
    event id so that rollbacks get their target the way storage would supply it."""

    def __init__(self, *, checkpoint_every: int = 1000) -> None:
        self.ledger = Ledger(checkpoint_every=checkpoint_every)
        self.states: dict[int, ScopeState] = {}
        self.entries: list[Stated] = []

    def target(self, command: Command) -> ScopeState | None:
        if not isinstance(command, Rollback):
            return None
        found = self.states.get(command.to_event)
        same_scope = found is not None and found.key == (command.bid_year, command.area)
        return found if same_scope else None

    def apply(self, command: Command, *, now: dt.datetime = NOW) -> list[Stated]:
        draft = self.ledger.draft()
        given = draft.apply(command, now=now, rollback_target=self.target(command))
        added = with_states(given, self.ledger.state)
        self.ledger.commit(draft)
        for entry in added:
            self.states[entry.event.event_id] = entry.state
        self.entries.extend(added)
        return added

    def run(self, *commands: Command) -> ScopeState:
        """Apply every command; return the state of the last one's scope."""
        for command in commands:
            self.apply(command)
        return self.state(self.entries[-1].event.scope)

    def state(self, key: ScopeKey = KEY) -> ScopeState:
        found = self.ledger.state(key)
        assert found is not None
        return found
