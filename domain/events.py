"""The audit event: what happened to one scope, with the delta needed to replay it.

``before``/``after`` hold JSON-ready builtins (dicts, lists, strings, ints, null) so that
the event hashes and exports byte-for-byte the same before and after a round trip.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from domain.commands import (
    AREA_PATTERN,
    BIDDER_COMMANDS,
    COMMAND_TYPES,
    MAX_LABEL,
    Actor,
    Cause,
)

SCHEMA_VERSION = 1
SNAPSHOT_ACTIONS = frozenset({"rollback", "finalize_round", "checkpoint"})
SYSTEM_ACTOR = Actor(id="bidlog", role="system")


class Event(msgspec.Struct, frozen=True, kw_only=True):
    """One audit event (protocol section 6, without the hash chain, which the store adds).

    Stored events do not forbid unknown fields: old code must read newer events.
    """

    event_id: int
    seq: int
    bid_year: int
    area: str
    recorded_at: str
    action: str
    actor: Actor
    cause: Cause
    message_id: str | None
    message_digest: str | None
    detail: dict[str, Any]
    before: Any
    after: Any
    snapshot: bool

    @property
    def scope(self) -> tuple[int, str]:
        return (self.bid_year, self.area)


def authorship_fault(event: Event) -> str | None:
    """Why ``event`` could not have been recorded by bidlog as it stands, judging by who
    sent it (PROTOCOL section 5's role rules, section 6's automatic checkpoints); None if
    it could. A chain re-hashed by a forger passes every hash: this is what still tells.
    (That a rollback's ``to_event`` is an event of its own scope needs the log: the
    readers of whole logs check it.)"""
    if event.action not in _ACTIONS:
        return f"unknown action {event.action!r}"
    if not 2000 <= event.bid_year <= 2100:
        return f"bid_year {event.bid_year} is outside 2000-2100"
    if _AREA.match(event.area) is None:
        return f"area {event.area!r} is not a valid area name"
    if event.message_digest is not None and _DIGEST.match(event.message_digest) is None:
        return "message_digest is not 64 lowercase hex digits"
    if event.snapshot != (event.action in SNAPSHOT_ACTIONS):
        return f"wrong snapshot flag for {event.action}"
    fault = _detail_fault(event)
    if fault is not None:
        return fault
    automatic = event.message_id is None or event.message_digest is None
    if automatic:
        if event.message_id is not None or event.message_digest is not None:
            return "message_id and message_digest must be both present or both null"
        if event.action != "checkpoint" or event.actor != SYSTEM_ACTOR:
            return "only bidlog's automatic checkpoints have no message"
        return None
    role = event.actor.role
    if role == "system":
        return "role system sends no messages; only automatic checkpoints are bidlog's"
    if role == "bidder" and event.action not in BIDDER_COMMANDS:
        return f"role bidder may not send {event.action}"
    return None


def _detail_fault(event: Event) -> str | None:
    """``detail`` holds what ``decide`` puts there, and nothing else: a rollback's
    ``to_event``, a checkpoint's ``label`` when it was given, else nothing. (Automatic
    checkpoints stored before 2026-11-26 08:25 UTC hold ``{"automatic": true}``: the
    hash covers it, so it stays.)"""
    detail, allowed = event.detail, frozenset[str]()
    if event.message_id is None and detail.keys() == {"automatic"} and detail["automatic"] is True:
        return None  # only automatic checkpoints have no message: checked by the caller
    if event.action == "rollback":
        to_event = detail.get("to_event")
        if type(to_event) is not int or not 0 < to_event < event.event_id:
            return "a rollback's to_event must be an earlier event"
        allowed = _TO_EVENT
    elif event.action == "checkpoint":
        label = detail.get("label", "")
        if type(label) is not str or len(label) > MAX_LABEL:
            return f"a checkpoint's label must be text of at most {MAX_LABEL} characters"
        allowed = _LABEL
    extra = sorted(detail.keys() - allowed)
    if extra:
        return f"detail of a {event.action} holds {', '.join(map(repr, extra))}"
    return None


_TO_EVENT = frozenset({"to_event"})
_LABEL = frozenset({"label"})
_ACTIONS = frozenset(str(t.__struct_config__.tag) for t in COMMAND_TYPES)
_AREA = re.compile(AREA_PATTERN)
_DIGEST = re.compile(r"[0-9a-f]{64}\Z")
