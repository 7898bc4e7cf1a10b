"""evolve, replay and auto_checkpoint on their own."""

from __future__ import annotations

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
    assert (event.message_id, event.message_digest) == (None, None)
    after = evolve(state, event)
    assert without_position(after) == without_position(state)
    assert (after.seq, after.head_event) == (4, 11)
