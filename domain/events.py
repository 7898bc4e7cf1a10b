"""The audit event: what happened to one scope, with the delta needed to replay it.

``before``/``after`` hold JSON-ready builtins (dicts, lists, strings, ints, null) so that
the event hashes and exports byte-for-byte the same before and after a round trip.
"""

from __future__ import annotations

from typing import Any

import msgspec

from domain.commands import Actor, Cause

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
