"""What an event's ``before`` must say, given the state of its scope just before it (pure).

Replay reads only ``after``; ``before`` is there for the reader of the audit trail (what
was there before the change). ``decide`` writes it from the state, so a log bidlog wrote
has the ``before`` this computes; a forger who re-hashes the chain does not, unless he
also knew to keep it true. Readers of whole logs (``verify``, ``import``) check it.
"""

from __future__ import annotations

from typing import Any

import msgspec

from domain import index
from domain.decide import bid_data, user_data
from domain.events import Event
from domain.state import ScopeState

_ENCODE = msgspec.json.Encoder(order="sorted").encode


def before_fault(state: ScopeState | None, event: Event) -> str | None:
    """Why ``event.before`` is not what ``state`` (its scope just before it) held; None
    if it is, or if the event is not one ``decide`` writes a ``before`` for."""
    try:
        expected = _expected(state, event)
    except Exception:  # a delta of the wrong shape (a list where a dict goes, say)
        return "its delta is not of the shape its action writes"
    if expected is _FREE:
        return None
    if expected is _ROLLBACK:
        assert state is not None
        same = is_restorable_part(event.before, state)
    else:
        same = event.before == expected
    return None if same else "its `before` is not what its scope held before it"


def is_restorable_part(data: Any, state: ScopeState) -> bool:
    """Whether ``data`` (builtins, as read back from an event) is ``scope_data(state)``,
    the users and rounds a rollback replaces and restores: compared as canonical JSON."""
    return _ENCODE(data) == _ENCODE({"users": state.users, "rounds": state.rounds})


_FREE = object()  # nothing to compare (the replay checks the rest)
_ROLLBACK = object()  # the whole restorable state: compared as canonical JSON


def _expected(state: ScopeState | None, event: Event) -> Any:
    action, after = event.action, event.after
    if action in ("create_area", "register_user", "open_round", "checkpoint"):
        return None
    if state is None:  # no scope yet: the replay refuses the event
        return _FREE
    if action == "rollback":
        return _ROLLBACK
    if action == "update_user":
        initials = after["user"]["initials"]
        found = index.users_by_initials(state).get(initials)
        return None if found is None else {"user": user_data(found)}
    if action == "finalize_round":
        return {"round": after["round"], "status": "open"}
    if action in ("submit_bid", "withdraw_bid"):
        number = after["round"]
        bid = after["bid"] if action == "submit_bid" else (event.before or {}).get("bid")
        initials = bid["initials"] if isinstance(bid, dict) else None
        for rnd in state.rounds:
            if rnd.round == number:
                held = index.bids_by_initials(rnd).get(initials) if initials else None
                return {"round": number, "bid": bid_data(held)}
        return {"round": number, "bid": None}
    return _FREE
