"""The state of one scope (bid year, area): immutable, with tuples kept in protocol order."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any, Literal, Protocol

import msgspec

from domain.commands import Seniority

ScopeKey = tuple[int, str]
RoundStatus = Literal["open", "finalized"]


class User(msgspec.Struct, frozen=True):
    """A controller registered in the scope."""

    initials: str
    name: str
    user_type: str
    crew: int | None
    seniority: Seniority


class Bid(msgspec.Struct, frozen=True):
    """One user's days in one round, ascending."""

    initials: str
    days: tuple[dt.date, ...]


class Round(msgspec.Struct, frozen=True, dict=True):
    """A bidding round; ``bids`` sorted by initials. (``dict=True``: ``domain.index``
    keeps its lookups on the object.)"""

    round: int
    status: RoundStatus
    max_per_day: int
    bids: tuple[Bid, ...] = ()


class ScopeState(msgspec.Struct, frozen=True, dict=True):
    """Everything about one scope; ``seq``/``head_event`` are those of its last event.
    (``dict=True``: ``domain.index`` keeps its lookups on the object.)"""

    bid_year: int
    area: str
    seq: int = 0
    head_event: int = 0
    users: tuple[User, ...] = ()
    rounds: tuple[Round, ...] = ()

    @property
    def key(self) -> ScopeKey:
        return (self.bid_year, self.area)

    def open_round(self) -> Round | None:
        for r in self.rounds:
            if r.status == "open":
                return r
        return None


class RoundView(Protocol):
    """What deciding reads of a round: a ``Round``, or the open round of a scope being
    bid in (``domain.working``). Lookups go through ``domain.index``."""

    @property
    def round(self) -> int: ...
    @property
    def status(self) -> RoundStatus: ...
    @property
    def max_per_day(self) -> int: ...
    @property
    def bids(self) -> tuple[Bid, ...]: ...


class ScopeView(Protocol):
    """What deciding reads of a scope: a ``ScopeState``, or a ``domain.working.Working``."""

    @property
    def bid_year(self) -> int: ...
    @property
    def area(self) -> str: ...
    @property
    def seq(self) -> int: ...
    @property
    def head_event(self) -> int: ...
    @property
    def users(self) -> tuple[User, ...]: ...
    @property
    def rounds(self) -> Sequence[RoundView]: ...
    @property
    def key(self) -> ScopeKey: ...
    def open_round(self) -> RoundView | None: ...


def render(state: ScopeState) -> dict[str, Any]:
    """The protocol's section-7 shape, as JSON-ready builtins."""
    out: dict[str, Any] = msgspec.json.decode(msgspec.json.encode(state))
    return out


def parse(data: Any) -> ScopeState:
    """Inverse of ``render``: a stored or exported snapshot back into a state."""
    return msgspec.convert(data, ScopeState)
