"""Lookups derived from immutable state, remembered per object (pure; no I/O).

States are immutable, so anything computed from one object stays true for its life.
Memoizing by identity (with a weak reference, so nothing outlives its object) turns the
per-command scans of users and bids into dictionary lookups, and ``evolve`` carries an
index forward to the next object by a small update instead of a rebuild.
"""

from __future__ import annotations

import datetime as dt
import weakref
from collections import Counter
from collections.abc import Callable
from typing import Generic, TypeVar

from domain.state import Bid, Round, ScopeState, User

K = TypeVar("K")
V = TypeVar("V")


class Memo(Generic[K, V]):
    """``memo(obj)`` derives a value from ``obj`` once and remembers it while ``obj`` lives."""

    def __init__(self, derive: Callable[[K], V]) -> None:
        self._derive = derive
        self._items: dict[int, tuple[weakref.ref[K], V]] = {}

    def __call__(self, obj: K) -> V:
        found = self.peek(obj)
        if found is None:
            found = self._derive(obj)
            self.put(obj, found)
        return found

    def peek(self, obj: K) -> V | None:
        entry = self._items.get(id(obj))
        return entry[1] if entry is not None and entry[0]() is obj else None

    def put(self, obj: K, value: V) -> None:
        key = id(obj)
        items = self._items
        items[key] = (weakref.ref(obj, lambda _: items.pop(key, None)), value)


def _users(state: ScopeState) -> dict[str, User]:
    return {u.initials: u for u in state.users}


def _bids(rnd: Round) -> dict[str, Bid]:
    return {b.initials: b for b in rnd.bids}


def _days(rnd: Round) -> dict[dt.date, int]:
    return dict(Counter(day for bid in rnd.bids for day in bid.days))


users_by_initials: Memo[ScopeState, dict[str, User]] = Memo(_users)
bids_by_initials: Memo[Round, dict[str, Bid]] = Memo(_bids)
day_counts: Memo[Round, dict[dt.date, int]] = Memo(_days)


def carry_users(old: ScopeState | None, new: ScopeState) -> None:
    """``new`` has the same users as ``old``: share its index instead of rebuilding."""
    if old is not None and old.users is new.users:
        found = users_by_initials.peek(old)
        if found is not None:
            users_by_initials.put(new, found)


def carry_bid(old: Round, new: Round, before: Bid | None, after: Bid | None) -> None:
    """``new`` is ``old`` with one user's bid changed from ``before`` to ``after``."""
    bids, counts = bids_by_initials.peek(old), day_counts.peek(old)
    if bids is not None:
        bids = dict(bids)
        if after is None and before is not None:
            bids.pop(before.initials, None)
        elif after is not None:
            bids[after.initials] = after
        bids_by_initials.put(new, bids)
    if counts is not None:
        counts = counts.copy()
        for day in before.days if before is not None else ():
            counts[day] -= 1
        for day in after.days if after is not None else ():
            counts[day] = counts.get(day, 0) + 1
        day_counts.put(new, counts)
