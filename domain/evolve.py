"""``evolve(state, event) -> state``: apply one event's delta; ``replay`` folds many."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable
from operator import attrgetter
from typing import Any, TypeVar

import msgspec

from domain import index
from domain.commands import Cause
from domain.events import SYSTEM_ACTOR, Event
from domain.state import Bid, Round, ScopeState, User

AUTO_CHECKPOINT_CAUSE = Cause(id="auto-checkpoint", description="automatic checkpoint")


def evolve(state: ScopeState | None, event: Event) -> ScopeState:
    """The scope's state after ``event``; ``state`` is None only before ``create_area``."""
    if state is None or event.action == "create_area":
        return ScopeState(event.bid_year, event.area, event.seq, event.event_id)
    return _EVOLVERS[event.action](state, event)


def replay(state: ScopeState | None, events: Iterable[Event]) -> ScopeState | None:
    """Fold ``events`` (in order) onto ``state``."""
    for event in events:
        state = evolve(state, event)
    return state


def auto_checkpoint(state: ScopeState, *, event_id: int, recorded_at: str) -> Event:
    """The automatic checkpoint bidlog itself records (no message, system actor)."""
    return Event(
        event_id=event_id,
        seq=state.seq + 1,
        bid_year=state.bid_year,
        area=state.area,
        recorded_at=recorded_at,
        action="checkpoint",
        actor=SYSTEM_ACTOR,
        cause=AUTO_CHECKPOINT_CAUSE,
        message_id=None,
        message_digest=None,
        detail={},  # no command, so no command fields (section 6: `{}` when none)
        before=None,
        after=None,
        snapshot=True,
    )


# Each evolver returns the state after the event (built with positional arguments, and
# parts that the event leaves alone shared: ``evolve`` runs for every command).


def _next(
    state: ScopeState, event: Event, users: tuple[User, ...], rounds: tuple[Round, ...]
) -> ScopeState:
    new = ScopeState(state.bid_year, state.area, event.seq, event.event_id, users, rounds)
    index.carry_users(state, new)
    return new


def _put_user(state: ScopeState, event: Event) -> ScopeState:
    user = msgspec.convert(event.after["user"], User)
    return _next(state, event, put_sorted(state.users, user.initials, user), state.rounds)


def _add_round(state: ScopeState, event: Event) -> ScopeState:
    rnd = msgspec.convert(event.after["round"], Round)
    rounds = tuple(sorted((*state.rounds, rnd), key=lambda r: r.round))
    return _next(state, event, state.users, rounds)


def _put_bid(state: ScopeState, event: Event) -> ScopeState:
    after = event.after
    number: int = after["round"]
    data = after["bid"]
    new = None if data is None else bid_of(data)
    initials: str = new.initials if new is not None else event.before["bid"]["initials"]
    rounds = state.rounds
    at = len(rounds) - 1  # the open round is the last one
    while at >= 0 and rounds[at].round != number:
        at -= 1
    if at < 0:
        return _next(state, event, state.users, rounds)
    rnd = rounds[at]
    old = index.bids_by_initials(rnd).get(initials)
    bids = put_sorted(rnd.bids, initials, new)
    changed = Round(rnd.round, rnd.status, rnd.max_per_day, bids)
    index.carry_bid(rnd, changed, old, new)
    return _next(state, event, state.users, (*rounds[:at], changed, *rounds[at + 1 :]))


def bid_of(data: Any) -> Bid:
    """A bid from its event form (validated: a malformed stored bid is refused)."""
    return msgspec.convert(data, Bid)


def _set_status(state: ScopeState, event: Event) -> ScopeState:
    number, status = event.after["round"], event.after["status"]
    rounds = tuple(
        msgspec.structs.replace(r, status=status) if r.round == number else r for r in state.rounds
    )
    return _next(state, event, state.users, rounds)


def _unchanged(state: ScopeState, event: Event) -> ScopeState:
    return _next(state, event, state.users, state.rounds)


def _restore(state: ScopeState, event: Event) -> ScopeState:
    after = event.after
    users = msgspec.convert(after["users"], tuple[User, ...])
    return _next(state, event, users, msgspec.convert(after["rounds"], tuple[Round, ...]))


_initials = attrgetter("initials")
T = TypeVar("T", User, Bid)


def put_sorted(items: tuple[T, ...], initials: str, item: T | None) -> tuple[T, ...]:
    """``items`` (sorted by initials) with the one for ``initials`` replaced, added, or
    removed (``item`` None)."""
    at = bisect.bisect_left(items, initials, key=_initials)
    found = at < len(items) and items[at].initials == initials
    head: tuple[T, ...] = items[:at]
    rest: tuple[T, ...] = items[at + 1 :] if found else items[at:]
    return head + (item,) + rest if item is not None else head + rest  # noqa: RUF005


_EVOLVERS: dict[str, Callable[[ScopeState, Event], ScopeState]] = {
    "register_user": _put_user,
    "update_user": _put_user,
    "open_round": _add_round,
    "submit_bid": _put_bid,
    "withdraw_bid": _put_bid,
    "finalize_round": _set_status,
    "checkpoint": _unchanged,
    "rollback": _restore,
}
