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
        base = ScopeState(bid_year=event.bid_year, area=event.area)
    else:
        base = _EVOLVERS[event.action](state, event.before, event.after)
    new = msgspec.structs.replace(base, seq=event.seq, head_event=event.event_id)
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


def _put_user(state: ScopeState, before: Any, after: Any) -> ScopeState:
    user = msgspec.convert(after["user"], User)
    return msgspec.structs.replace(state, users=_put_sorted(state.users, user.initials, user))


def _add_round(state: ScopeState, before: Any, after: Any) -> ScopeState:
    rnd = msgspec.convert(after["round"], Round)
    rounds = tuple(sorted((*state.rounds, rnd), key=lambda r: r.round))
    return msgspec.structs.replace(state, rounds=rounds)


def _put_bid(state: ScopeState, before: Any, after: Any) -> ScopeState:
    number: int = after["round"]
    new = None if after["bid"] is None else msgspec.convert(after["bid"], Bid)
    initials: str = new.initials if new is not None else before["bid"]["initials"]

    def change(rnd: Round) -> Round:
        changed = msgspec.structs.replace(rnd, bids=_put_sorted(rnd.bids, initials, new))
        index.carry_bid(rnd, changed, index.bids_by_initials(rnd).get(initials), new)
        return changed

    return _map_round(state, number, change)


def _set_status(state: ScopeState, before: Any, after: Any) -> ScopeState:
    return _map_round(
        state, after["round"], lambda r: msgspec.structs.replace(r, status=after["status"])
    )


def _map_round(state: ScopeState, number: int, change: Callable[[Round], Round]) -> ScopeState:
    rounds = tuple(change(r) if r.round == number else r for r in state.rounds)
    return msgspec.structs.replace(state, rounds=rounds)


def _unchanged(state: ScopeState, before: Any, after: Any) -> ScopeState:
    return state


def _restore(state: ScopeState, before: Any, after: Any) -> ScopeState:
    users = msgspec.convert(after["users"], tuple[User, ...])
    rounds = msgspec.convert(after["rounds"], tuple[Round, ...])
    return msgspec.structs.replace(state, users=users, rounds=rounds)


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


_EVOLVERS: dict[str, Callable[[ScopeState, Any, Any], ScopeState]] = {
    "register_user": _put_user,
    "update_user": _put_user,
    "open_round": _add_round,
    "submit_bid": _put_bid,
    "withdraw_bid": _put_bid,
    "finalize_round": _set_status,
    "checkpoint": _unchanged,
    "rollback": _restore,
}
