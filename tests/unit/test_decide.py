"""decide(): one accept and one reject test for every rule and error code of the core.

Accepting tests also fold the event with ``evolve``, so they prove the event's delta
carries the change, not only that no error was raised.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from domain.commands import Actor, Command, Seniority
from domain.decide import Context, decide
from domain.errors import DomainError
from domain.events import Event
from domain.evolve import evolve
from domain.state import ScopeState
from tests.unit.builders import (
    ADMIN,
    AREA,
    BIDDER,
    CAUSE,
    NOW_TEXT,
    SYSTEM,
    YEAR,
    bid,
    checkpoint,
    context,
    create_area,
    day,
    days,
    finalize_round,
    open_round,
    register_user,
    rollback,
    round_,
    scope,
    submit_bid,
    update_user,
    user,
    withdraw_bid,
)


def accept(
    state: ScopeState | None, command: Command, ctx: Context | None = None
) -> tuple[Event, ScopeState]:
    ctx = ctx or context()
    event = decide(state, command, ctx)
    return event, evolve(state, event)


def refuse(
    state: ScopeState | None, command: Command, ctx: Context | None = None
) -> tuple[str, dict[str, Any]]:
    with pytest.raises(DomainError) as caught:
        decide(state, command, ctx or context())
    return caught.value.code, caught.value.details


def tag(command: Command) -> str:
    return str(command.__struct_config__.tag)


def position_only(before: ScopeState, after: ScopeState, event: Event) -> bool:
    """``after`` is ``before`` with only seq/head_event moved to the event's."""
    moved = msgspec.structs.replace(before, seq=event.seq, head_event=event.event_id)
    return after == moved


WITH_ROUND = scope(users=[user("AB"), user("CD")], rounds=[round_(1)])


# --- the event's envelope -------------------------------------------------------------


def test_event_is_stamped_from_the_command_and_the_context() -> None:
    command = register_user("EF", id="m-42")
    event, _ = accept(scope(seq=3, head_event=10), command, context(11, digest="ab" * 32))

    assert event.event_id == 11
    assert event.seq == 4
    assert (event.bid_year, event.area) == (YEAR, AREA)
    assert event.recorded_at == NOW_TEXT
    assert event.action == "register_user"
    assert event.actor == ADMIN
    assert event.cause == CAUSE
    assert event.message_id == "m-42"
    assert event.message_digest == "ab" * 32
    assert event.snapshot is False


def test_evolve_moves_seq_and_head_event_to_the_events() -> None:
    _, after = accept(scope(seq=3, head_event=10), register_user("EF"), context(17))
    assert (after.seq, after.head_event) == (4, 17)


SNAPSHOT_CASES: list[tuple[ScopeState, Command, bool]] = [
    (WITH_ROUND, finalize_round(1), True),
    (WITH_ROUND, checkpoint(), True),
    (WITH_ROUND, rollback(5), True),
    (WITH_ROUND, register_user("EF"), False),
    (WITH_ROUND, update_user("AB", name="New"), False),
    (WITH_ROUND, submit_bid("AB"), False),
    (
        scope(users=[user()], rounds=[round_(1, "open", 2, bid("AB", "07-01"))]),
        withdraw_bid(),
        False,
    ),
    (scope(), open_round(1), False),
]


@pytest.mark.parametrize(("state", "command", "snapshot"), SNAPSHOT_CASES)
def test_snapshot_exactly_for_rollback_finalize_and_checkpoint(
    state: ScopeState, command: Command, snapshot: bool
) -> None:
    target = scope(users=[user("AB")], seq=2, head_event=5)
    event, _ = accept(state, command, context(rollback_target=target))
    assert event.snapshot is snapshot
    assert event.action == tag(command)


def test_create_area_event_is_a_delta_not_a_snapshot() -> None:
    event, _ = accept(None, create_area(), context(1))
    assert event.snapshot is False


# --- create_area ----------------------------------------------------------------------


def test_create_area_starts_an_empty_scope_at_seq_1() -> None:
    event, after = accept(None, create_area(), context(7))
    assert (event.seq, event.event_id, event.action) == (1, 7, "create_area")
    assert after == ScopeState(bid_year=YEAR, area=AREA, seq=1, head_event=7)


def test_create_area_refuses_an_existing_scope() -> None:
    code, details = refuse(scope(), create_area())
    assert code == "area_exists"
    assert details == {"bid_year": YEAR, "area": AREA}


# --- version_conflict -----------------------------------------------------------------


def test_expected_seq_equal_to_the_scopes_is_accepted() -> None:
    event, _ = accept(scope(seq=3), register_user("EF", expected_seq=3))
    assert event.seq == 4


def test_expected_seq_0_creates_a_missing_scope() -> None:
    event, _ = accept(None, create_area(expected_seq=0), context(1))
    assert event.seq == 1


def test_expected_seq_that_differs_is_a_version_conflict() -> None:
    code, details = refuse(scope(seq=3), register_user("EF", expected_seq=2))
    assert code == "version_conflict"
    assert details == {"seq": 3, "expected_seq": 2}


def test_version_conflict_on_a_missing_scope_reports_seq_0() -> None:
    code, details = refuse(None, create_area(expected_seq=2))
    assert code == "version_conflict"
    assert details == {"seq": 0, "expected_seq": 2}


def test_expected_seq_0_on_a_missing_scope_passes_to_unknown_area() -> None:
    code, _ = refuse(None, register_user(expected_seq=0))
    assert code == "unknown_area"


def test_version_conflict_comes_before_unknown_area() -> None:
    code, details = refuse(None, register_user(expected_seq=1))
    assert code == "version_conflict"
    assert details == {"seq": 0, "expected_seq": 1}


def test_version_conflict_on_an_existing_scope_comes_before_area_exists() -> None:
    code, details = refuse(scope(seq=3), create_area(expected_seq=0))
    assert code == "version_conflict"
    assert details == {"seq": 3, "expected_seq": 0}


def test_version_conflict_comes_before_the_commands_rules() -> None:
    code, _ = refuse(scope(seq=3), update_user("ZZ", name="X", expected_seq=1))
    assert code == "version_conflict"


# --- unknown_area ---------------------------------------------------------------------

SCOPED_COMMANDS: list[Command] = [
    register_user(),
    update_user(name="X"),
    open_round(1),
    submit_bid(),
    submit_bid(actor=BIDDER),
    withdraw_bid(),
    withdraw_bid(actor=BIDDER),
    finalize_round(1),
    checkpoint(label="x"),
    rollback(1),
]


@pytest.mark.parametrize("command", SCOPED_COMMANDS, ids=tag)
def test_every_command_but_create_area_needs_the_scope(command: Command) -> None:
    code, details = refuse(None, command)
    assert code == "unknown_area"
    assert details == {"bid_year": YEAR, "area": AREA}


# --- unauthorized ---------------------------------------------------------------------

ADMIN_COMMANDS: list[Command] = [
    create_area(),
    register_user("EF"),
    update_user(name="X"),
    open_round(2),
    finalize_round(1),
    checkpoint(),
    rollback(5),
]


@pytest.mark.parametrize("command", ADMIN_COMMANDS, ids=tag)
def test_a_bidder_may_not_send_admin_commands(command: Command) -> None:
    as_bidder = msgspec.structs.replace(command, actor=BIDDER)
    code, details = refuse(WITH_ROUND, as_bidder)
    assert code == "unauthorized"
    assert details == {"role": "bidder", "type": tag(command)}


@pytest.mark.parametrize("command", [*ADMIN_COMMANDS, submit_bid(), withdraw_bid()], ids=tag)
def test_no_message_may_claim_the_system_role(command: Command) -> None:
    as_system = msgspec.structs.replace(command, actor=SYSTEM)
    code, details = refuse(WITH_ROUND, as_system)
    assert code == "unauthorized"
    assert details == {"role": "system", "type": tag(command)}


def test_a_bidder_may_submit_and_withdraw() -> None:
    event, after = accept(WITH_ROUND, submit_bid("AB", actor=BIDDER))
    assert event.actor == BIDDER
    _, after = accept(after, withdraw_bid("AB", actor=BIDDER), context(12))
    assert after.rounds[0].bids == ()


def test_unauthorized_comes_before_version_conflict_and_rules() -> None:
    code, _ = refuse(scope(seq=3), create_area(actor=BIDDER, expected_seq=9))
    assert code == "unauthorized"


def test_unauthorized_comes_before_unknown_area() -> None:
    code, _ = refuse(None, register_user(actor=BIDDER))
    assert code == "unauthorized"


def test_cross_field_invalid_message_comes_before_unauthorized() -> None:
    code, _ = refuse(scope(), update_user("AB", actor=BIDDER))
    assert code == "invalid_message"


# --- register_user --------------------------------------------------------------------


def test_register_user_adds_the_user() -> None:
    command = register_user("EF", name="Eve Fox", user_type="Dev-R", crew=4)
    _, after = accept(scope(users=[user("AB")]), command)
    assert after.users == (user("AB"), user("EF", name="Eve Fox", user_type="Dev-R", crew=4))


def test_register_user_crew_defaults_to_none_and_users_stay_sorted() -> None:
    _, after = accept(scope(users=[user("CD")]), register_user("AA"))
    assert [u.initials for u in after.users] == ["AA", "CD"]
    assert after.users[0].crew is None


def test_register_user_refuses_initials_taken_in_the_area() -> None:
    code, details = refuse(scope(users=[user("AB")]), register_user("AB"))
    assert code == "duplicate_initials"
    assert details == {"initials": "AB", "area": AREA}


def test_register_user_refuses_initials_taken_in_another_area_of_the_year() -> None:
    ctx = context(other_initials={"AB": "South"})
    code, details = refuse(scope(), register_user("AB"), ctx)
    assert code == "duplicate_initials"
    assert details == {"initials": "AB", "area": "South"}


def test_register_user_accepts_initials_free_in_every_area() -> None:
    _, after = accept(scope(), register_user("AB"), context(other_initials={"CD": "South"}))
    assert [u.initials for u in after.users] == ["AB"]


# --- update_user ----------------------------------------------------------------------

CREWED = scope(users=[user("AB", crew=3), user("CD")])


def test_update_user_changes_only_the_given_fields() -> None:
    _, after = accept(CREWED, update_user("AB", name="Ann Bell"))
    assert after.users == (user("AB", name="Ann Bell", crew=3), user("CD"))


def test_update_user_user_type() -> None:
    _, after = accept(CREWED, update_user("AB", user_type="CPC-IT"))
    assert after.users[0] == user("AB", user_type="CPC-IT", crew=3)


def test_update_user_crew_null_clears_the_crew() -> None:
    _, after = accept(CREWED, update_user("AB", crew=None))
    assert after.users[0] == user("AB", crew=None)


def test_update_user_replaces_seniority_whole() -> None:
    new = Seniority(day("01-02"), day("01-03"), day("01-04"), day("01-05"), None)
    _, after = accept(CREWED, update_user("AB", seniority=new))
    assert after.users[0] == user("AB", crew=3, seniority=new)


def test_update_user_refuses_an_unknown_user() -> None:
    code, details = refuse(CREWED, update_user("ZZ", name="X"))
    assert code == "unknown_user"
    assert details == {"initials": "ZZ"}


def test_update_user_refuses_a_user_of_another_area() -> None:
    ctx = context(other_initials={"ZZ": "South"})
    code, _ = refuse(CREWED, update_user("ZZ", name="X"), ctx)
    assert code == "unknown_user"


def test_update_user_with_nothing_to_change_is_invalid() -> None:
    code, details = refuse(CREWED, update_user("AB"))
    assert code == "invalid_message"
    assert details == {"path": "$"}


# --- open_round -----------------------------------------------------------------------


def test_open_round_1_first() -> None:
    _, after = accept(scope(), open_round(1, max_per_day=5))
    assert after.rounds == (round_(1, "open", 5),)


def test_open_round_next_after_the_last_is_finalized() -> None:
    done = round_(1, "finalized", 2, bid("AB", "07-01"))
    _, after = accept(scope(rounds=[done]), open_round(2, max_per_day=1))
    assert after.rounds == (done, round_(2, "open", 1))
    assert after.open_round() == round_(2, "open", 1)


def test_open_round_refuses_while_a_round_is_open() -> None:
    code, details = refuse(WITH_ROUND, open_round(2))
    assert code == "round_already_open"
    assert details == {"open_round": 1}


@pytest.mark.parametrize(
    ("finalized", "number", "expected"), [(0, 2, 1), (1, 3, 2), (1, 1, 2), (2, 2, 3)]
)
def test_open_round_refuses_out_of_order(finalized: int, number: int, expected: int) -> None:
    rounds = [round_(n, "finalized") for n in range(1, finalized + 1)]
    code, details = refuse(scope(rounds=rounds), open_round(number))
    assert code == "round_out_of_order"
    assert details == {"round": number, "expected_round": expected}


# --- submit_bid -----------------------------------------------------------------------


def test_submit_bid_stores_days_ascending() -> None:
    _, after = accept(WITH_ROUND, submit_bid("AB", bid_days=days("07-03", "07-01", "07-02")))
    assert after.rounds[0].bids == (bid("AB", "07-01", "07-02", "07-03"),)


def test_submit_bid_keeps_bids_sorted_by_initials() -> None:
    _, after = accept(WITH_ROUND, submit_bid("CD"))
    _, after = accept(after, submit_bid("AB"), context(12))
    assert [b.initials for b in after.rounds[0].bids] == ["AB", "CD"]


def test_submit_bid_replaces_the_users_earlier_bid_in_the_round() -> None:
    state = scope(
        users=[user("AB"), user("CD")],
        rounds=[round_(1, "open", 2, bid("AB", "07-01", "07-02"), bid("CD", "07-01"))],
    )
    _, after = accept(state, submit_bid("AB", bid_days=days("07-05")))
    assert after.rounds[0].bids == (bid("AB", "07-05"), bid("CD", "07-01"))


def test_submit_bid_refuses_an_unknown_user() -> None:
    code, details = refuse(WITH_ROUND, submit_bid("ZZ"))
    assert code == "unknown_user"
    assert details == {"initials": "ZZ"}


def test_submit_bid_refuses_when_no_round_is_open() -> None:
    state = scope(users=[user("AB")], rounds=[round_(1, "finalized")])
    code, details = refuse(state, submit_bid("AB", 1))
    assert code == "round_not_open"
    assert details == {"round": 1, "open_round": None}


def test_submit_bid_refuses_a_round_that_is_not_the_open_one() -> None:
    state = scope(users=[user("AB")], rounds=[round_(1, "finalized"), round_(2)])
    code, details = refuse(state, submit_bid("AB", 1))
    assert code == "round_not_open"
    assert details == {"round": 1, "open_round": 2}


HELD = scope(
    users=[user("AB"), user("CD")],
    rounds=[round_(1, "finalized", 5, bid("AB", "07-01")), round_(2, "open", 5)],
)


def test_submit_bid_refuses_a_day_the_user_holds_from_a_finalized_round() -> None:
    code, details = refuse(HELD, submit_bid("AB", 2, days("07-02", "07-01")))
    assert code == "day_already_held"
    assert details == {"day": "2026-07-01", "round": 1}


def test_submit_bid_allows_a_day_another_user_holds() -> None:
    _, after = accept(HELD, submit_bid("CD", 2, days("07-01")))
    assert after.rounds[1].bids == (bid("CD", "07-01"),)


def full_day_state(max_per_day: int, finalized: list[str], open_bids: list[str]) -> ScopeState:
    """Users holding 07-01 from round 1 and bidding it in open round 2; AB bids next."""
    holders = [bid(i, "07-01") for i in finalized]
    bidders = [bid(i, "07-01") for i in open_bids]
    return scope(
        users=[user(i) for i in ["AB", *finalized, *open_bids]],
        rounds=[
            round_(1, "finalized", 9, *holders),
            round_(2, "open", max_per_day, *bidders),
        ],
    )


@pytest.mark.parametrize(
    ("max_per_day", "finalized", "open_bids"),
    [
        (1, ["CD"], []),
        (1, [], ["CD"]),
        (2, ["CD"], ["EF"]),
        (2, ["CD", "EF"], []),
        (3, ["CD"], ["EF", "GH"]),
    ],
)
def test_submit_bid_refuses_a_full_day(
    max_per_day: int, finalized: list[str], open_bids: list[str]
) -> None:
    state = full_day_state(max_per_day, finalized, open_bids)
    code, details = refuse(state, submit_bid("AB", 2, days("07-02", "07-01")))
    assert code == "day_full"
    assert details == {"day": "2026-07-01", "max_per_day": max_per_day}


@pytest.mark.parametrize(
    ("max_per_day", "finalized", "open_bids"),
    [(2, ["CD"], []), (2, [], ["CD"]), (3, ["CD"], ["EF"]), (3, ["CD", "EF"], [])],
)
def test_submit_bid_accepts_the_last_place_on_a_day(
    max_per_day: int, finalized: list[str], open_bids: list[str]
) -> None:
    state = full_day_state(max_per_day, finalized, open_bids)
    _, after = accept(state, submit_bid("AB", 2, days("07-01")))
    assert bid("AB", "07-01") in after.rounds[1].bids


def test_submit_bid_does_not_count_the_users_own_earlier_bid() -> None:
    state = scope(users=[user("AB")], rounds=[round_(1, "open", 1, bid("AB", "07-01"))])
    _, after = accept(state, submit_bid("AB", 1, days("07-01", "07-02")))
    assert after.rounds[0].bids == (bid("AB", "07-01", "07-02"),)


def test_submit_bid_counts_only_the_named_day() -> None:
    state = scope(users=[user("AB"), user("CD")], rounds=[round_(1, "open", 1, bid("CD", "07-03"))])
    _, after = accept(state, submit_bid("AB", 1, days("07-01", "07-02")))
    assert bid("AB", "07-01", "07-02") in after.rounds[0].bids


def test_submit_bid_refuses_a_repeated_day_naming_the_repeat() -> None:
    code, details = refuse(WITH_ROUND, submit_bid("AB", 1, days("07-01", "07-02", "07-01")))
    assert code == "invalid_message"
    assert details == {"path": "$.days[2]"}


def test_submit_bid_refuses_a_day_outside_the_bid_year() -> None:
    outside = (day("07-01"), day("01-01", YEAR + 1))
    code, details = refuse(WITH_ROUND, submit_bid("AB", 1, outside))
    assert code == "invalid_message"
    assert details == {"path": "$.days[1]"}


def test_submit_bid_accepts_the_first_and_last_day_of_the_year() -> None:
    _, after = accept(WITH_ROUND, submit_bid("AB", 1, days("12-31", "01-01")))
    assert after.rounds[0].bids == (bid("AB", "01-01", "12-31"),)


# --- withdraw_bid ---------------------------------------------------------------------

BIDDING = scope(
    users=[user("AB"), user("CD"), user("EF")],
    rounds=[round_(1, "open", 2, bid("AB", "07-01"), bid("CD", "07-01"))],
)


def test_withdraw_bid_removes_only_the_users_bid() -> None:
    _, after = accept(BIDDING, withdraw_bid("AB", 1))
    assert after.rounds[0].bids == (bid("CD", "07-01"),)


def test_withdraw_bid_frees_the_place() -> None:
    full = msgspec.structs.replace(BIDDING.rounds[0], max_per_day=2)
    state = msgspec.structs.replace(BIDDING, rounds=(full,))
    assert refuse(state, submit_bid("EF"))[0] == "day_full"
    _, after = accept(state, withdraw_bid("AB", 1))
    accept(after, submit_bid("EF"), context(12))


def test_withdraw_bid_refuses_when_no_round_is_open() -> None:
    state = scope(users=[user("AB")], rounds=[round_(1, "finalized", 2, bid("AB", "07-01"))])
    code, details = refuse(state, withdraw_bid("AB", 1))
    assert code == "round_not_open"
    assert details == {"round": 1, "open_round": None}


def test_withdraw_bid_refuses_another_round_than_the_open_one() -> None:
    code, details = refuse(BIDDING, withdraw_bid("AB", 2))
    assert code == "round_not_open"
    assert details == {"round": 2, "open_round": 1}


@pytest.mark.parametrize("initials", ["EF", "ZZ"])
def test_withdraw_bid_refuses_a_user_without_a_bid(initials: str) -> None:
    code, details = refuse(BIDDING, withdraw_bid(initials, 1))
    assert code == "no_bid"
    assert details == {"initials": initials, "round": 1}


# --- finalize_round -------------------------------------------------------------------


def test_finalize_round_closes_the_open_round_keeping_its_bids() -> None:
    event, after = accept(BIDDING, finalize_round(1))
    assert event.snapshot is True
    assert after.rounds == (msgspec.structs.replace(BIDDING.rounds[0], status="finalized"),)
    assert after.open_round() is None
    assert after.users == BIDDING.users


def test_finalize_round_refuses_when_no_round_is_open() -> None:
    code, details = refuse(scope(rounds=[round_(1, "finalized")]), finalize_round(1))
    assert code == "round_not_open"
    assert details == {"round": 1, "open_round": None}


def test_finalize_round_refuses_another_round_than_the_open_one() -> None:
    state = scope(rounds=[round_(1, "finalized"), round_(2)])
    code, details = refuse(state, finalize_round(1))
    assert code == "round_not_open"
    assert details == {"round": 1, "open_round": 2}


# --- checkpoint -----------------------------------------------------------------------


def test_checkpoint_changes_nothing_but_the_position() -> None:
    event, after = accept(BIDDING, checkpoint(label="before round 2"))
    assert event.snapshot is True
    assert event.detail == {"label": "before round 2"}
    assert position_only(BIDDING, after, event)


def test_checkpoint_without_a_label() -> None:
    event, after = accept(BIDDING, checkpoint())
    assert event.detail.get("label") is None
    assert position_only(BIDDING, after, event)


def test_checkpoint_refuses_a_missing_scope() -> None:
    code, _ = refuse(None, checkpoint())
    assert code == "unknown_area"


# --- rollback -------------------------------------------------------------------------

TARGET = scope(
    users=[user("AB")], rounds=[round_(1, "open", 2, bid("AB", "07-04"))], seq=2, head_event=5
)


def test_rollback_restores_the_target_as_the_new_head() -> None:
    event, after = accept(BIDDING, rollback(5), context(11, rollback_target=TARGET))
    assert event.snapshot is True
    assert event.detail.get("to_event") == 5
    assert (after.seq, after.head_event) == (BIDDING.seq + 1, 11)
    assert (after.users, after.rounds) == (TARGET.users, TARGET.rounds)


def test_rollback_to_the_scopes_first_event_empties_it() -> None:
    first = scope(seq=1, head_event=1)
    _, after = accept(BIDDING, rollback(1), context(rollback_target=first))
    assert (after.users, after.rounds) == ((), ())


def test_rollback_refuses_an_event_outside_the_scope() -> None:
    code, details = refuse(BIDDING, rollback(5), context(rollback_target=None))
    assert code == "invalid_rollback_target"
    assert details == {"to_event": 5, "head_event": BIDDING.head_event}


def test_rollback_refuses_the_head_itself() -> None:
    ctx = context(rollback_target=BIDDING)
    code, details = refuse(BIDDING, rollback(BIDDING.head_event), ctx)
    assert code == "invalid_rollback_target"
    assert details == {"to_event": BIDDING.head_event, "head_event": BIDDING.head_event}


def test_rollback_refuses_an_event_after_the_head() -> None:
    code, _ = refuse(BIDDING, rollback(BIDDING.head_event + 1))
    assert code == "invalid_rollback_target"


def test_rollback_refuses_a_target_that_is_not_the_named_event() -> None:
    code, details = refuse(BIDDING, rollback(4), context(rollback_target=TARGET))
    assert code == "invalid_rollback_target"
    assert details == {"to_event": 4, "head_event": BIDDING.head_event}


def test_rollback_refuses_restoring_initials_now_in_another_area() -> None:
    ctx = context(rollback_target=TARGET, other_initials={"AB": "South"})
    code, details = refuse(BIDDING, rollback(5), ctx)
    assert code == "rollback_conflict"
    assert details == {"initials": "AB", "area": "South"}


def test_rollback_ignores_other_areas_initials_it_does_not_restore() -> None:
    ctx = context(rollback_target=TARGET, other_initials={"CD": "South"})
    _, after = accept(BIDDING, rollback(5), ctx)
    assert [u.initials for u in after.users] == ["AB"]


def test_actor_role_is_checked_not_actor_id() -> None:
    other_admin = Actor(id="someone-else", role="admin")
    event, _ = accept(BIDDING, checkpoint(actor=other_admin))
    assert event.actor == other_admin
