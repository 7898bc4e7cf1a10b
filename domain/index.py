"""Lookups derived from immutable state, kept on the object they derive from (pure).

States are immutable, so anything computed from one object stays true for its life.
``Round`` and ``ScopeState`` are declared with ``dict=True``: msgspec gives them a
``__dict__`` for attributes that are not fields, which encoding, equality and
``replace`` all ignore. An index lives there and is built on first use; ``evolve``
hands it on to the next object, updated by the one change, instead of a rebuild. That
turns per-command scans of users and bids into dictionary lookups. A scope being bid
in (``domain.working``) takes its open round's indexes and updates them in place.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter

from domain.state import Bid, Round, RoundView, ScopeState, ScopeView, User

_USERS = "_users_by_initials"
_BIDS = "_bids_by_initials"
_DAYS = "_day_counts"


def users_by_initials(state: ScopeView) -> dict[str, User]:
    found: dict[str, User] | None = state.__dict__.get(_USERS)
    if found is None:
        found = state.__dict__[_USERS] = {u.initials: u for u in state.users}
    return found


def bids_by_initials(rnd: RoundView) -> dict[str, Bid]:
    found: dict[str, Bid] | None = rnd.__dict__.get(_BIDS)
    if found is None:
        found = rnd.__dict__[_BIDS] = {b.initials: b for b in rnd.bids}
    return found


def day_counts(rnd: RoundView) -> dict[dt.date, int]:
    """How many bids of ``rnd`` hold each day."""
    found: dict[dt.date, int] | None = rnd.__dict__.get(_DAYS)
    if found is None:
        found = rnd.__dict__[_DAYS] = dict(Counter(d for bid in rnd.bids for d in bid.days))
    return found


def carry_users(old: ScopeState | None, new: ScopeState) -> None:
    """If ``new`` has the very users of ``old``, share its index instead of rebuilding."""
    if old is not None and old.users is new.users:
        share_users(old, new)


def share_users(source: ScopeView, target: ScopeView) -> None:
    """``target`` has the very users of ``source``: share its index, if it has one."""
    found = source.__dict__.get(_USERS)
    if found is not None:
        target.__dict__[_USERS] = found


def carry_bid(old: Round, new: Round, before: Bid | None, after: Bid | None) -> None:
    """``new`` is ``old`` with one user's bid changed from ``before`` to ``after``.

    The indexes move from ``old`` to ``new`` and are updated in place: a copy would cost
    time in proportion to the round's bids on every bid. ``old`` then has none, and
    builds its own again from its fields if it is ever asked (after a failed commit,
    the ledger's round is the ``old`` one).
    """
    bids: dict[str, Bid] | None = old.__dict__.pop(_BIDS, None)
    counts: dict[dt.date, int] | None = old.__dict__.pop(_DAYS, None)
    if bids is not None:
        put_bid(bids, None, before, after)
        new.__dict__[_BIDS] = bids
    if counts is not None:
        put_bid(None, counts, before, after)
        new.__dict__[_DAYS] = counts


def take(rnd: Round) -> tuple[dict[str, Bid], dict[dt.date, int]]:
    """``rnd``'s indexes, taken off it (built if it had none) for a caller to update in
    place: ``rnd`` builds its own again if it is ever asked."""
    bids, counts = bids_by_initials(rnd), day_counts(rnd)
    del rnd.__dict__[_BIDS], rnd.__dict__[_DAYS]
    return bids, counts


def give(rnd: RoundView, bids: dict[str, Bid], counts: dict[dt.date, int]) -> None:
    """Hand ``bids`` and ``counts`` (the indexes of exactly ``rnd``'s bids) to ``rnd``."""
    rnd.__dict__[_BIDS] = bids
    rnd.__dict__[_DAYS] = counts


def put_bid(
    bids: dict[str, Bid] | None,
    counts: dict[dt.date, int] | None,
    before: Bid | None,
    after: Bid | None,
) -> None:
    """Update a round's indexes for one user's bid going from ``before`` to ``after``."""
    if bids is not None:
        if after is not None:
            bids[after.initials] = after
        elif before is not None:
            del bids[before.initials]
    if counts is not None:
        if before is not None:
            for day in before.days:
                counts[day] -= 1
        if after is not None:
            for day in after.days:
                counts[day] = counts.get(day, 0) + 1
