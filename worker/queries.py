"""Answers to the protocol's queries, from committed state only."""

from __future__ import annotations

from typing import Any

from domain import errors
from domain.commands import GetState, ListAreas, Query, Timeline, Verify, parse_time
from domain.ledger import Ledger
from domain.state import ScopeState, render
from worker.ports import Store


async def answer(query: Query, ledger: Ledger, store: Store) -> dict[str, Any]:
    """The ``result`` of ``query``; raises DomainError (not_found, invalid_message, ...)."""
    if isinstance(query, GetState):
        return await _get_state(query, ledger, store)
    if isinstance(query, Timeline):
        return await _timeline(query, store)
    if isinstance(query, ListAreas):
        return list_areas(ledger, query.bid_year)
    if isinstance(query, Verify):
        return await store.verify()
    raise AssertionError(f"unhandled query {query!r}")  # pragma: no cover


async def _get_state(query: GetState, ledger: Ledger, store: Store) -> dict[str, Any]:
    key = (query.bid_year, query.area)
    if query.at_event is not None and query.at_time is not None:
        raise errors.InvalidMessage("give at_event or at_time, not both", path="$.at_time")
    state: ScopeState | None
    missing = "had no event by that point"
    if query.at_event is not None:
        state = await store.state_at(key, at_event=query.at_event)
    elif query.at_time is not None:
        try:
            moment = parse_time(query.at_time)
        except ValueError:
            raise errors.InvalidMessage(
                f"at_time {query.at_time} names no instant", path="$.at_time"
            ) from None
        state = await store.state_at(key, at_time=moment)
    else:
        state, missing = ledger.state(key), "does not exist"
    if state is None:
        raise errors.NotFound(
            f"area {query.bid_year}/{query.area} {missing}",
            bid_year=query.bid_year,
            area=query.area,
        )
    return render(state)


async def _timeline(query: Timeline, store: Store) -> dict[str, Any]:
    key = (query.bid_year, query.area)
    page = await store.timeline(key, after_event=query.after_event, limit=query.limit)
    if page is None:
        raise errors.NotFound(
            f"area {query.bid_year}/{query.area} never existed",
            bid_year=query.bid_year,
            area=query.area,
        )
    events, next_after = page
    return {"events": events, "next_after": next_after}


def list_areas(ledger: Ledger, bid_year: int | None) -> dict[str, Any]:
    """Every scope of the ledger, sorted by year then area."""
    rows = [
        {"bid_year": s.bid_year, "area": s.area, "seq": s.seq, "head_event": s.head_event}
        for key, s in sorted(ledger.scopes.items())
        if bid_year is None or key[0] == bid_year
    ]
    return {"areas": rows}
