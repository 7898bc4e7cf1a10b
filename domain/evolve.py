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
    if event.action == "create_area" or state is None:
        return ScopeState(event.bid_year, event.area, event.seq, event.event_id)
    changes = _EVOLVERS[event.action](state, event.before, event.after)
    new = msgspec.structs.replace(state, seq=event.seq, head_event=event.event_id, **changes)
    index.carry_users(state, new)
    return new


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
        detail={"automatic": True},
        before=None,
        after=None,
        snapshot=True,
    )


# Each evolver returns the fields of the state that the event changes.
Changes = dict[str, Any]


def _put_user(state: ScopeState, before: Any, after: Any) -> Changes:
    user = msgspec.convert(after["user"], User)
    return {"users": _put_sorted(state.users, user.initials, user)}


def _add_round(state: ScopeState, before: Any, after: Any) -> Changes:
    rnd = msgspec.convert(after["round"], Round)
    return {"rounds": tuple(sorted((*state.rounds, rnd), key=lambda r: r.round))}


def _put_bid(state: ScopeState, before: Any, after: Any) -> Changes:
    number: int = after["round"]
    new = None if after["bid"] is None else msgspec.convert(after["bid"], Bid)
    initials: str = new.initials if new is not None else before["bid"]["initials"]
    rounds = list(state.rounds)
    for i, rnd in enumerate(rounds):
        if rnd.round == number:
            rounds[i] = msgspec.structs.replace(rnd, bids=_put_sorted(rnd.bids, initials, new))
            index.carry_bid(rnd, rounds[i], index.bids_by_initials(rnd).get(initials), new)
    return {"rounds": tuple(rounds)}


def _set_status(state: ScopeState, before: Any, after: Any) -> Changes:
    number, status = after["round"], after["status"]
    rounds = (
        msgspec.structs.replace(r, status=status) if r.round == number else r for r in state.rounds
    )
    return {"rounds": tuple(rounds)}


def _unchanged(state: ScopeState, before: Any, after: Any) -> Changes:
    return {}


def _restore(state: ScopeState, before: Any, after: Any) -> Changes:
    return {
        "users": msgspec.convert(after["users"], tuple[User, ...]),
        "rounds": msgspec.convert(after["rounds"], tuple[Round, ...]),
    }


_initials = attrgetter("initials")
T = TypeVar("T", User, Bid)


def _put_sorted(items: tuple[T, ...], initials: str, item: T | None) -> tuple[T, ...]:
    """``items`` (sorted by initials) with the one for ``initials`` replaced, added, or
    removed (``item`` None)."""
    at = bisect.bisect_left(items, initials, key=_initials)
    found = at < len(items) and items[at].initials == initials
    head: tuple[T, ...] = items[:at]
    rest: tuple[T, ...] = items[at + 1 :] if found else items[at:]
    return head + (item,) + rest if item is not None else head + rest  # noqa: RUF005


_EVOLVERS: dict[str, Callable[[ScopeState, Any, Any], Changes]] = {
    "register_user": _put_user,
    "update_user": _put_user,
    "open_round": _add_round,
    "submit_bid": _put_bid,
    "withdraw_bid": _put_bid,
    "finalize_round": _set_status,
    "checkpoint": _unchanged,
    "rollback": _restore,
}
