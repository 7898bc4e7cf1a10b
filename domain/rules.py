"""Pure checks of PROTOCOL section 5, each raising one DomainError subclass."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping

import msgspec

from domain import errors, index
from domain.commands import (
    BIDDER_COMMANDS,
    BaseCommand,
    Rollback,
    SubmitBid,
    UpdateUser,
)
from domain.state import Bid, RoundView, ScopeState, ScopeView, User


def check_shape(command: BaseCommand) -> None:
    """Cross-field rules the schema cannot express."""
    if isinstance(command, SubmitBid):
        check_days(command.days, command.bid_year)
    elif isinstance(command, UpdateUser) and not _has_update(command):
        raise errors.InvalidMessage(
            "update_user needs at least one of name, user_type, crew, seniority", path="$"
        )


def check_days(days: tuple[dt.date, ...], bid_year: int) -> None:
    seen: set[dt.date] = set()
    for i, day in enumerate(days):
        if day.year != bid_year:
            raise errors.InvalidMessage(
                f"day {day.isoformat()} is outside bid year {bid_year}", path=f"$.days[{i}]"
            )
        if day in seen:
            raise errors.InvalidMessage(
                f"day {day.isoformat()} is listed twice", path=f"$.days[{i}]"
            )
        seen.add(day)


def _has_update(command: UpdateUser) -> bool:
    fields = (command.name, command.user_type, command.crew, command.seniority)
    return any(f is not msgspec.UNSET for f in fields)


def check_role(command: BaseCommand, action: str) -> None:
    role = command.actor.role
    if role == "system" or (role == "bidder" and action not in BIDDER_COMMANDS):
        raise errors.Unauthorized(f"role {role} may not send {action}", role=role, type=action)


def check_expected_seq(command: BaseCommand, state: ScopeView | None) -> None:
    current = state.seq if state is not None else 0
    expected = command.expected_seq  # None or UNSET: no expectation
    if isinstance(expected, int) and expected != current:
        raise errors.VersionConflict(
            f"expected seq {expected}, scope is at {current}",
            seq=current,
            expected_seq=expected,
        )


def require_scope(state: ScopeView | None, command: BaseCommand) -> ScopeView:
    if state is None:
        raise errors.UnknownArea(
            f"area {command.bid_year}/{command.area} does not exist",
            bid_year=command.bid_year,
            area=command.area,
        )
    return state


def require_no_scope(state: ScopeView | None, command: BaseCommand) -> None:
    if state is not None:
        raise errors.AreaExists(
            f"area {command.bid_year}/{command.area} exists already",
            bid_year=command.bid_year,
            area=command.area,
        )


def require_user(state: ScopeView, initials: str) -> User:
    user = index.users_by_initials(state).get(initials)
    if user is None:
        raise errors.UnknownUser(
            f"no user {initials} in {state.bid_year}/{state.area}", initials=initials
        )
    return user


def check_initials_free(state: ScopeView, initials: str, other_initials: Mapping[str, str]) -> None:
    known = index.users_by_initials(state)
    area = state.area if initials in known else other_initials.get(initials)
    if area is not None:
        raise errors.DuplicateInitials(
            f"initials {initials} are already registered in {state.bid_year}/{area}",
            initials=initials,
            area=area,
        )


def check_can_open(state: ScopeView, number: int) -> None:
    current = state.open_round()
    if current is not None:
        raise errors.RoundAlreadyOpen(
            f"round {current.round} is still open", open_round=current.round
        )
    expected = state.rounds[-1].round + 1 if state.rounds else 1
    if number != expected:
        raise errors.RoundOutOfOrder(
            f"the next round is {expected}, not {number}", round=number, expected_round=expected
        )


def require_open_round(state: ScopeView, number: int) -> RoundView:
    current = state.open_round()
    if current is None or current.round != number:
        open_no = current.round if current is not None else None
        raise errors.RoundNotOpen(
            f"round {number} is not the open round", round=number, open_round=open_no
        )
    return current


def check_days_available(
    state: ScopeView, current: RoundView, initials: str, own: Bid | None, days: tuple[dt.date, ...]
) -> None:
    """``days`` (ascending) are neither held from a finalized round nor full in ``current``,
    where ``initials`` holds ``own`` (or nothing)."""
    finalized: list[RoundView] = []
    if len(state.rounds) > 1:  # ``current`` is one of them: with no other, none is finalized
        finalized = [r for r in state.rounds if r.status == "finalized"]
    if finalized:
        held = _held_days(finalized, initials)
        for day in days:
            if day in held:
                raise errors.DayAlreadyHeld(
                    f"{initials} already holds {day.isoformat()} from round {held[day]}",
                    day=day.isoformat(),
                    round=held[day],
                )
    counts = index.day_counts(current)
    own_days = own.days if own is not None else ()
    limit = current.max_per_day
    for day in days:
        # Holders of the day: other users' bids in this round, plus finalized rounds.
        taken = counts.get(day, 0) - (day in own_days)
        if finalized:
            taken += sum(index.day_counts(rnd).get(day, 0) for rnd in finalized)
        if taken >= limit:
            raise errors.DayFull(
                f"{day.isoformat()} is full ({limit} per day)",
                day=day.isoformat(),
                max_per_day=limit,
            )


def _held_days(finalized: list[RoundView], initials: str) -> dict[dt.date, int]:
    held: dict[dt.date, int] = {}
    for rnd in finalized:
        bid = index.bids_by_initials(rnd).get(initials)
        if bid is not None:
            held.update((day, rnd.round) for day in bid.days)
    return held


def require_bid(current: RoundView, initials: str) -> Bid:
    bid = index.bids_by_initials(current).get(initials)
    if bid is None:
        raise errors.NoBid(
            f"{initials} has no bid in round {current.round}",
            initials=initials,
            round=current.round,
        )
    return bid


def check_rollback(
    state: ScopeView,
    command: Rollback,
    target: ScopeState | None,
    other_initials: Mapping[str, str],
) -> ScopeState:
    x = command.to_event
    if target is None or target.key != state.key or target.head_event != x or x >= state.head_event:
        raise errors.InvalidRollbackTarget(
            f"event {x} is not an earlier event of {state.bid_year}/{state.area}",
            to_event=x,
            head_event=state.head_event,
        )
    for user in target.users:
        area = other_initials.get(user.initials)
        if area is not None:
            raise errors.RollbackConflict(
                f"restoring {user.initials} clashes with {state.bid_year}/{area}",
                initials=user.initials,
                area=area,
            )
    return target
