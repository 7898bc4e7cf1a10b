"""``decide(state, command, context) -> event``: the core's single entry for commands.

Each handler checks the command's rules and returns one event whose ``before``/``after``
delta is enough for ``evolve`` to replay it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import msgspec

from domain import days, index, rules
from domain.commands import (
    COMMAND_TYPES,
    BaseCommand,
    Checkpoint,
    Command,
    CreateArea,
    FinalizeRound,
    OpenRound,
    RegisterUser,
    Rollback,
    SubmitBid,
    UpdateUser,
    WithdrawBid,
)
from domain.events import SNAPSHOT_ACTIONS, Event
from domain.state import Bid, Round, ScopeState, ScopeView, User


class Context(msgspec.Struct, frozen=True):
    """What the core needs from outside: ids and time to stamp, and facts held elsewhere."""

    event_id: int
    recorded_at: str
    message_digest: str | None = None
    other_initials: Mapping[str, str] = msgspec.field(default_factory=dict)
    rollback_target: ScopeState | None = None


class Delta(msgspec.Struct, frozen=True):
    before: Any = None
    after: Any = None
    detail: dict[str, Any] = msgspec.field(default_factory=dict)


def decide(state: ScopeView | None, command: Command, context: Context) -> Event:
    """Refuse ``command`` with a DomainError, or return exactly one event."""
    action = _action(command)
    rules.check_shape(command)
    rules.check_role(command, action)
    rules.check_expected_seq(command, state)
    if isinstance(command, CreateArea):
        rules.require_no_scope(state, command)
        delta = Delta(after={"bid_year": command.bid_year, "area": command.area})
        return _event(command, action, 1, delta, context)
    scope = rules.require_scope(state, command)
    delta = _HANDLERS[type(command)](scope, command, context)
    return _event(command, action, scope.seq + 1, delta, context)


def _action(command: BaseCommand) -> str:
    return _ACTIONS[type(command)]


def _event(command: BaseCommand, action: str, seq: int, delta: Delta, ctx: Context) -> Event:
    return Event(
        event_id=ctx.event_id,
        seq=seq,
        bid_year=command.bid_year,
        area=command.area,
        recorded_at=ctx.recorded_at,
        action=action,
        actor=command.actor,
        cause=command.cause,
        message_id=command.id,
        message_digest=ctx.message_digest,
        detail=delta.detail,
        before=delta.before,
        after=delta.after,
        snapshot=action in SNAPSHOT_ACTIONS,
    )


def user_data(user: User) -> dict[str, Any]:
    data: dict[str, Any] = msgspec.to_builtins(user)
    return data


def bid_data(bid: Bid | None) -> dict[str, Any] | None:
    if bid is None:
        return None
    return {"initials": bid.initials, "days": days.iso(bid.days)}


def scope_data(state: ScopeView) -> dict[str, Any]:
    """The restorable part of a state (users and rounds) as builtins."""
    data: dict[str, Any] = msgspec.json.decode(
        msgspec.json.encode({"users": state.users, "rounds": state.rounds})
    )
    return data


def _register(state: ScopeView, cmd: RegisterUser, ctx: Context) -> Delta:
    rules.check_initials_free(state, cmd.initials, ctx.other_initials)
    crew = cmd.crew if isinstance(cmd.crew, int) else None
    user = User(cmd.initials, cmd.name, cmd.user_type, crew, cmd.seniority)
    return Delta(after={"user": user_data(user)})


def _update(state: ScopeView, cmd: UpdateUser, ctx: Context) -> Delta:
    old = rules.require_user(state, cmd.initials)
    changes = {
        name: value
        for name in ("name", "user_type", "crew", "seniority")
        if (value := getattr(cmd, name)) is not msgspec.UNSET
    }
    new = msgspec.structs.replace(old, **changes)
    return Delta(before={"user": user_data(old)}, after={"user": user_data(new)})


def _open_round(state: ScopeView, cmd: OpenRound, ctx: Context) -> Delta:
    rules.check_can_open(state, cmd.round)
    rnd = Round(cmd.round, "open", cmd.max_per_day)
    return Delta(after={"round": msgspec.to_builtins(rnd)})


def _submit(state: ScopeView, cmd: SubmitBid, ctx: Context) -> Delta:
    rules.require_user(state, cmd.initials)
    current = rules.require_open_round(state, cmd.round)
    wanted = tuple(sorted(cmd.days))
    old = index.bids_by_initials(current).get(cmd.initials)
    rules.check_days_available(state, current, cmd.initials, old, wanted)
    return Delta(
        before={"round": cmd.round, "bid": bid_data(old)},
        after={"round": cmd.round, "bid": {"initials": cmd.initials, "days": days.iso(wanted)}},
    )


def _withdraw(state: ScopeView, cmd: WithdrawBid, ctx: Context) -> Delta:
    current = rules.require_open_round(state, cmd.round)
    old = rules.require_bid(current, cmd.initials)
    return Delta(
        before={"round": cmd.round, "bid": bid_data(old)},
        after={"round": cmd.round, "bid": None},
    )


def _finalize(state: ScopeView, cmd: FinalizeRound, ctx: Context) -> Delta:
    rules.require_open_round(state, cmd.round)
    return Delta(
        before={"round": cmd.round, "status": "open"},
        after={"round": cmd.round, "status": "finalized"},
    )


def _checkpoint(state: ScopeView, cmd: Checkpoint, ctx: Context) -> Delta:
    return Delta(detail={"label": cmd.label} if isinstance(cmd.label, str) else {})


def _rollback(state: ScopeView, cmd: Rollback, ctx: Context) -> Delta:
    target = rules.check_rollback(state, cmd, ctx.rollback_target, ctx.other_initials)
    return Delta(
        before=scope_data(state),
        after=scope_data(target),
        detail={"to_event": cmd.to_event},
    )


_ACTIONS: dict[type[BaseCommand], str] = {t: str(t.__struct_config__.tag) for t in COMMAND_TYPES}
_HANDLERS: dict[type[BaseCommand], Callable[[ScopeView, Any, Context], Delta]] = {
    RegisterUser: _register,
    UpdateUser: _update,
    OpenRound: _open_round,
    SubmitBid: _submit,
    WithdrawBid: _withdraw,
    FinalizeRound: _finalize,
    Checkpoint: _checkpoint,
    Rollback: _rollback,
}
