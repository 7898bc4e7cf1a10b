"""evolve, replay and auto_checkpoint on their own."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from domain import days as days_module
from domain.commands import Command
from domain.decide import decide
from domain.events import SYSTEM_ACTOR, Event
from domain.evolve import auto_checkpoint, evolve, replay
from domain.state import ScopeState
from tests.unit.builders import (
    NOW_TEXT,
    YEAR,
    bid,
    context,
    create_area,
    days,
    open_round,
    register_user,
    round_,
    scope,
    submit_bid,
    user,
    without_position,
)


def test_replay_of_nothing_is_the_state_given() -> None:
    assert replay(None, []) is None
    state = scope(users=[user()])
    assert replay(state, []) == state


def test_replay_folds_events_in_order() -> None:
    state: ScopeState | None = None
    events: list[Event] = []
    commands: list[Command] = [create_area(), register_user("AB"), open_round(1), submit_bid()]
    for i, command in enumerate(commands, start=1):
        event = decide(state, command, context(i))
        events.append(event)
        state = evolve(state, event)
    assert replay(None, events) == state
    assert state is not None
    assert (state.seq, state.head_event) == (4, 4)
    assert state.rounds == (round_(1, "open", 2, bid("AB", "07-01")),)


def test_auto_checkpoint_is_a_system_snapshot_that_changes_nothing() -> None:
    state = scope(users=[user()], rounds=[round_(1)], seq=3, head_event=10)
    event = auto_checkpoint(state, event_id=11, recorded_at=NOW_TEXT)
    assert (event.event_id, event.seq, event.recorded_at) == (11, 4, NOW_TEXT)
    assert (event.bid_year, event.area) == (YEAR, state.area)
    assert (event.action, event.actor, event.snapshot) == ("checkpoint", SYSTEM_ACTOR, True)
    assert (event.message_id, event.message_digest, event.detail) == (None, None, {})
    after = evolve(state, event)
    assert without_position(after) == without_position(state)
    assert (after.seq, after.head_event) == (4, 11)


def test_a_bid_evolves_the_same_whether_its_days_are_in_the_table_or_not() -> None:
    # The table only writes days; a restart (table empty) must not change evolve.
    state = scope(users=[user("AB")], rounds=[round_(1, "open", 2, bid("AB", "03-01"))])
    event = decide(state, submit_bid("AB", bid_days=days("07-04", "07-01")), context())
    from_table = evolve(state, event)
    days_module.forget()  # as after a restart: the days come from the event's text
    assert evolve(state, event) == from_table
    assert from_table.rounds[0].bids == (bid("AB", "07-01", "07-04"),)


@pytest.mark.parametrize(
    "stored",
    [
        {"initials": "AB", "days": ["2026-13-01"]},
        {"initials": "AB", "days": "2026-07-01"},
        {"initials": 7, "days": ["2026-07-01"]},
        {"days": ["2026-07-01"]},
    ],
)
def test_a_malformed_stored_bid_is_refused_not_evolved(stored: dict[str, Any]) -> None:
    state = scope(users=[user("AB")], rounds=[round_(1)])
    days_module.iso(days("07-01"))  # the day has been written: the shape is still checked
    event = decide(state, submit_bid("AB"), context())
    forged = msgspec.structs.replace(event, after={"round": 1, "bid": stored})
    with pytest.raises(msgspec.ValidationError):
        evolve(state, forged)
