"""A scope while a batch of bids is decided: mutable, frozen into a ``ScopeState`` after.

States are immutable, so applying a bid to one builds a new sorted tuple of the round's
bids, a new ``Round`` and a new ``ScopeState``: most of what a bid cost. Bids are nearly
all of the traffic, and a batch decides hundreds of them before it commits. So a draft
keeps a scope that is receiving bids as a ``Working``: the open round's bids and day
counts are dictionaries (``domain.index``'s own) updated in place, and the immutable
state is built once, when the draft is committed or something other than a bid comes.

``Working.put_bid`` must do exactly what ``evolve`` does with a bid's event; the
property tests hold ``freeze()`` to the fold of the same events by ``evolve``.
"""

from __future__ import annotations

from operator import attrgetter

from domain import index
from domain.events import Event
from domain.evolve import bid_of, put_sorted
from domain.state import Bid, Round, RoundStatus, RoundView, ScopeKey, ScopeState, User

_initials = attrgetter("initials")
_FEW_CHANGES = 8


class WorkingRound:
    """The open round of a ``Working`` scope; its bids live in ``domain.index``'s lookups."""

    def __init__(self, rnd: Round) -> None:
        self.round = rnd.round
        self.status: RoundStatus = rnd.status
        self.max_per_day = rnd.max_per_day
        self.by_initials, self.counts = index.take(rnd)
        index.give(self, self.by_initials, self.counts)
        self._before = rnd.bids
        self.changed: set[str] = set()  # initials whose bid may differ from ``_before``

    @property
    def bids(self) -> tuple[Bid, ...]:
        """The bids, sorted: from the round's old tuple when few changed (a batch of one
        bid at low load), else sorted afresh."""
        if len(self.changed) > _FEW_CHANGES:
            return tuple(sorted(self.by_initials.values(), key=_initials))
        bids = self._before
        for initials in self.changed:
            bids = put_sorted(bids, initials, self.by_initials.get(initials))
        return bids

    def peek(self) -> Round:
        """The round as a ``Round`` (which builds its own lookups if asked)."""
        return Round(self.round, self.status, self.max_per_day, self.bids)

    def freeze(self) -> Round:
        """The round as a ``Round``, which takes over the lookups (use this one no more)."""
        frozen = self.peek()
        index.give(frozen, self.by_initials, self.counts)
        return frozen


class Working:
    """A scope with an open round, changed in place by the events of bids."""

    def __init__(self, state: ScopeState, at: int) -> None:
        """``state.rounds[at]`` is the open round."""
        self.bid_year = state.bid_year
        self.area = state.area
        self.seq = state.seq
        self.head_event = state.head_event
        self.users: tuple[User, ...] = state.users
        self._base = state.rounds
        self._at = at
        self.current = WorkingRound(state.rounds[at])
        self.rounds: tuple[RoundView, ...] = (
            *state.rounds[:at],
            self.current,
            *state.rounds[at + 1 :],
        )
        index.share_users(state, self)

    @property
    def key(self) -> ScopeKey:
        return (self.bid_year, self.area)

    def open_round(self) -> WorkingRound:
        return self.current

    def put_bid(self, event: Event) -> None:
        """Apply a ``submit_bid`` or ``withdraw_bid`` event of this scope's open round."""
        after, current = event.after, self.current
        number, data = after["round"], after["bid"]
        if number != current.round or event.bid_year != self.bid_year or event.area != self.area:
            raise ValueError(f"event {event.event_id} is not a bid in this scope's open round")
        new = None if data is None else bid_of(data)
        initials = new.initials if new is not None else event.before["bid"]["initials"]
        current.changed.add(initials)
        bids = current.by_initials
        index.put_bid(bids, current.counts, bids.get(initials), new)
        self.seq = event.seq
        self.head_event = event.event_id

    def peek(self) -> ScopeState:
        """The scope as a ``ScopeState``; this one goes on."""
        return self._state(self.current.peek())

    def freeze(self) -> ScopeState:
        """The scope as a ``ScopeState``, which takes over the lookups (use this one no
        more)."""
        return self._state(self.current.freeze())

    def _state(self, current: Round) -> ScopeState:
        base, at = self._base, self._at
        rounds = (*base[:at], current, *base[at + 1 :])
        state = ScopeState(self.bid_year, self.area, self.seq, self.head_event, self.users, rounds)
        index.share_users(self, state)
        return state


def thaw(state: ScopeState) -> Working | ScopeState:
    """``state`` made ready for bids: a ``Working`` if it has an open round, else itself
    (a bid is then refused, and changes nothing)."""
    for at, rnd in enumerate(state.rounds):
        if rnd.status == "open":
            return Working(state, at)
    return state
