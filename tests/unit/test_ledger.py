"""The Ledger and its drafts: ids, times, cross-area facts, automatic checkpoints, and
that a refused command or a discarded draft changes nothing."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st

from domain import days as days_module
from domain import ledger
from domain.commands import Command
from domain.errors import DomainError
from domain.events import SYSTEM_ACTOR
from domain.evolve import replay
from domain.ledger import Ledger, format_timestamp
from domain.records import Recovered
from domain.state import ScopeState
from tests.unit.builders import (
    AREA,
    KEY,
    NOW,
    NOW_TEXT,
    YEAR,
    Harness,
    bid,
    checkpoint,
    create_area,
    days,
    finalize_round,
    open_round,
    register_user,
    rollback,
    submit_bid,
    withdraw_bid,
    without_position,
)

SOUTH = (YEAR, "South")


def test_event_ids_are_global_and_seq_is_per_scope() -> None:
    h = Harness()
    h.run(create_area(), create_area(area="South"), register_user("AB"))
    h.run(register_user("CD", area="South"), checkpoint())
    got = [(e.event.event_id, e.event.area, e.event.seq) for e in h.entries]
    assert got == [(1, AREA, 1), (2, "South", 1), (3, AREA, 2), (4, "South", 2), (5, AREA, 3)]
    assert h.ledger.head_event == 5
    assert (h.state().seq, h.state().head_event) == (3, 5)


def test_recorded_at_is_utc_with_microseconds_and_z() -> None:
    h = Harness()
    plus_two = dt.timezone(dt.timedelta(hours=2))
    (entry,) = h.apply(create_area(), now=NOW.astimezone(plus_two))
    assert entry.event.recorded_at == NOW_TEXT


OFFSETS = st.integers(-23 * 60, 23 * 60).map(lambda m: dt.timezone(dt.timedelta(minutes=m)))


@given(
    st.datetimes(
        min_value=dt.datetime(1900, 1, 1),
        max_value=dt.datetime(2200, 1, 1),
        timezones=st.one_of(st.just(dt.UTC), OFFSETS),
    )
)
def test_format_timestamp_is_isoformat_in_utc_with_z(moment: dt.datetime) -> None:
    # format_timestamp keeps the text up to the minute; it must equal isoformat anyway,
    # including once that memo has been emptied.
    expected = moment.astimezone(dt.UTC).isoformat(timespec="microseconds")[:-6] + "Z"
    assert format_timestamp(moment) == expected
    ledger._MINUTES.clear()
    assert format_timestamp(moment) == expected


@given(st.lists(st.dates(), max_size=8))
def test_days_are_written_as_isoformat(dates: list[dt.date]) -> None:
    expected = [day.isoformat() for day in dates]
    assert days_module.iso(dates) == expected
    assert days_module.iso(dates) == expected  # from the memo
    days_module.forget()
    assert days_module.iso(dates) == expected


def test_recorded_at_never_decreases_when_the_clock_steps_back() -> None:
    h = Harness()
    h.apply(create_area(), now=NOW)
    (entry,) = h.apply(register_user("AB"), now=NOW - dt.timedelta(seconds=5))
    assert entry.event.recorded_at == NOW_TEXT
    (later,) = h.apply(register_user("CD"), now=NOW + dt.timedelta(microseconds=1))
    assert later.event.recorded_at == "2026-11-25T20:33:00.123457Z"


def test_apply_stamps_the_digest() -> None:
    draft = Ledger().draft()
    (entry,) = draft.apply(create_area(), now=NOW, digest="f" * 64)
    assert entry.event.message_digest == "f" * 64
    assert entry.event.message_id == "m-1"


def test_entry_state_is_the_scope_state_after_the_event() -> None:
    draft = Ledger().draft()
    draft.apply(create_area(), now=NOW)
    (entry,) = draft.apply(register_user("AB"), now=NOW)
    assert entry.state == draft.state(KEY)
    assert entry.snapshot is None


def test_a_refused_command_leaves_the_draft_unchanged() -> None:
    ledger = Ledger()
    draft = ledger.draft()
    draft.apply(create_area(), now=NOW)
    draft.apply(register_user("AB"), now=NOW)
    before = (draft.state(KEY), list(draft.entries))
    with pytest.raises(DomainError):
        draft.apply(register_user("AB"), now=NOW + dt.timedelta(days=1))
    assert (draft.state(KEY), list(draft.entries)) == before
    (entry,) = draft.apply(register_user("CD"), now=NOW)
    assert entry.event.event_id == 3
    assert entry.event.recorded_at == NOW_TEXT


def test_a_discarded_draft_changes_nothing() -> None:
    ledger = Ledger()
    first = ledger.draft()
    first.apply(create_area(), now=NOW)
    ledger.commit(first)
    committed = ledger.state(KEY)

    discarded = ledger.draft()
    discarded.apply(register_user("AB"), now=NOW + dt.timedelta(days=1))
    discarded.apply(create_area(area="South"), now=NOW)
    assert ledger.state(KEY) == committed
    assert ledger.state(SOUTH) is None
    assert ledger.head_event == 1

    again = ledger.draft()
    (entry,) = again.apply(register_user("AB"), now=NOW)
    assert entry.event.event_id == 2
    assert entry.event.recorded_at == NOW_TEXT


def test_commit_makes_the_draft_current() -> None:
    ledger = Ledger()
    draft = ledger.draft()
    draft.apply(create_area(), now=NOW)
    draft.apply(register_user("AB"), now=NOW)
    assert ledger.state(KEY) is None
    ledger.commit(draft)
    assert ledger.state(KEY) == draft.state(KEY)
    assert ledger.head_event == 2


def test_a_draft_sees_its_own_uncommitted_events() -> None:
    ledger = Ledger()
    draft = ledger.draft()
    draft.apply(create_area(), now=NOW)
    draft.apply(create_area(area="South"), now=NOW)
    draft.apply(register_user("AB", area="South"), now=NOW)
    with pytest.raises(DomainError) as caught:
        draft.apply(register_user("AB"), now=NOW)
    assert caught.value.code == "duplicate_initials"
    assert caught.value.details == {"initials": "AB", "area": "South"}


def test_initials_are_unique_across_the_areas_of_a_bid_year_only() -> None:
    h = Harness()
    h.run(create_area(), create_area(area="South"), create_area(bid_year=YEAR + 1))
    h.run(register_user("AB", area="South"), register_user("AB", bid_year=YEAR + 1))
    with pytest.raises(DomainError) as caught:
        h.apply(register_user("AB"))
    assert caught.value.code == "duplicate_initials"
    assert caught.value.details == {"initials": "AB", "area": "South"}


def test_rollback_to_before_a_rollback_undoes_it() -> None:
    h = Harness()
    h.run(create_area(), register_user("AB"), open_round(1))
    as_of_4 = h.run(submit_bid("AB", 1, days("07-01")))
    rolled = h.run(rollback(2))
    assert (rolled.users, rolled.rounds) == (as_of_4.users, ())
    undone = h.run(rollback(4))
    assert without_position(undone) == without_position(as_of_4)
    assert (undone.seq, undone.head_event) == (6, 6)


def test_rollback_to_a_rollback_event_restores_its_result() -> None:
    h = Harness()
    h.run(create_area(), register_user("AB"), register_user("CD"))
    after_rollback = h.run(rollback(2))
    h.run(register_user("EF"))
    restored = h.run(rollback(4))
    assert without_position(restored) == without_position(after_rollback)


def test_rollback_refuses_another_scopes_event() -> None:
    h = Harness()
    h.run(create_area(), create_area(area="South"), register_user("AB"))
    with pytest.raises(DomainError) as caught:
        h.apply(rollback(2))
    assert caught.value.code == "invalid_rollback_target"
    assert caught.value.details == {"to_event": 2, "head_event": 3}


def test_rollback_conflict_with_initials_registered_elsewhere_since() -> None:
    h = Harness()
    h.run(create_area(), register_user("AB"), create_area(area="South"))
    h.run(rollback(1), register_user("AB", area="South"))
    with pytest.raises(DomainError) as caught:
        h.apply(rollback(2))
    assert caught.value.code == "rollback_conflict"
    assert caught.value.details == {"initials": "AB", "area": "South"}
    assert h.run(rollback(1)).users == ()


def test_day_full_across_rounds_through_the_ledger() -> None:
    h = Harness()
    h.run(create_area(), register_user("AB"), register_user("CD"), register_user("EF"))
    h.run(open_round(1, 1), submit_bid("CD", 1, days("07-01")), finalize_round(1))
    h.run(open_round(2, 2), submit_bid("EF", 2, days("07-01")))
    with pytest.raises(DomainError) as caught:
        h.apply(submit_bid("AB", 2, days("07-01")))
    assert caught.value.code == "day_full"
    state = h.run(submit_bid("AB", 2, days("07-02")))
    assert state.rounds[1].bids == (bid("AB", "07-02"), bid("EF", "07-01"))


# --- automatic checkpoints ------------------------------------------------------------


def test_an_automatic_checkpoint_follows_every_n_events_since_a_snapshot() -> None:
    h = Harness(checkpoint_every=3)
    assert len(h.apply(create_area())) == 1
    assert len(h.apply(register_user("AB"))) == 1
    command_entry, auto = h.apply(register_user("CD"))
    event = auto.event
    assert (event.event_id, event.seq) == (4, 4)
    assert event.action == "checkpoint"
    assert event.actor == SYSTEM_ACTOR
    assert (event.message_id, event.message_digest) == (None, None)
    assert event.snapshot is True
    assert event.recorded_at == command_entry.event.recorded_at
    assert without_position(auto.state) == without_position(command_entry.state)
    assert auto.event.snapshot
    assert auto.state == h.state()


def test_a_snapshot_event_restarts_the_count() -> None:
    h = Harness(checkpoint_every=3)
    h.run(create_area(), register_user("AB"), checkpoint())
    assert len(h.apply(register_user("CD"))) == 1
    assert len(h.apply(open_round(1))) == 1
    assert len(h.apply(finalize_round(1))) == 1
    assert len(h.apply(register_user("EF"))) == 1


def test_scopes_count_their_own_events() -> None:
    h = Harness(checkpoint_every=2)
    assert len(h.apply(create_area())) == 1
    assert len(h.apply(create_area(area="South"))) == 1
    assert len(h.apply(register_user("AB"))) == 2


def test_checkpoint_every_0_disables_automatic_checkpoints() -> None:
    h = Harness(checkpoint_every=0)
    h.run(create_area(), *(register_user(i) for i in ("AA", "AB", "AC", "AD", "AE")))
    assert [e.event.action for e in h.entries].count("checkpoint") == 0


def test_a_refused_command_does_not_count_towards_a_checkpoint() -> None:
    h = Harness(checkpoint_every=3)
    h.run(create_area(), register_user("AB"))
    with pytest.raises(DomainError):
        h.apply(register_user("AB"))
    assert len(h.apply(register_user("CD"))) == 2


def test_a_recovered_ledger_continues_ids_times_and_counts() -> None:
    state = ScopeState(bid_year=YEAR, area=AREA, seq=4, head_event=9)
    later = "2027-01-01T00:00:00.000000Z"
    recovered = Recovered(
        scopes={KEY: state}, since_snapshot={KEY: 2}, head_event=12, last_recorded_at=later
    )
    ledger = Ledger(recovered, checkpoint_every=3)
    assert ledger.state(KEY) == state
    draft = ledger.draft()
    command_entry, auto = draft.apply(register_user("AB"), now=NOW)
    assert (command_entry.event.event_id, command_entry.event.seq) == (13, 5)
    assert command_entry.event.recorded_at == later
    assert (auto.event.event_id, auto.event.seq) == (14, 6)


def test_a_discarded_draft_of_bids_leaves_the_ledger_deciding_as_before() -> None:
    h = Harness()
    h.run(create_area(), register_user("AB"), register_user("CD"), open_round(1, 1))
    committed = h.run(submit_bid("AB", 1, days("07-01")))
    draft = h.ledger.draft()  # bids are decided on a mutable copy of the open round
    draft.apply(submit_bid("AB", 1, days("07-02")), now=NOW)
    draft.apply(submit_bid("CD", 1, days("07-01")), now=NOW)
    # The draft is dropped, as after a failed commit: 07-01 is AB's again, and full.
    assert h.state() == committed
    with pytest.raises(DomainError) as caught:
        h.ledger.draft().apply(submit_bid("CD", 1, days("07-01")), now=NOW)
    assert caught.value.code == "day_full"


def test_bids_around_other_commands_in_one_draft_commit_what_evolve_gives() -> None:
    h = Harness()
    h.run(create_area(), register_user("AB"), register_user("CD"), open_round(1, 2))
    start = h.state()
    draft = h.ledger.draft()
    commands: list[Command] = [
        submit_bid("AB", 1, days("07-01")),
        submit_bid("CD", 1, days("07-01", "07-02")),
        register_user("EF"),  # the scope is frozen for it, and taken up again after
        submit_bid("EF", 1, days("07-02")),
        withdraw_bid("AB", 1),
        submit_bid("AB", 1, days("07-03")),
    ]
    events = [draft.apply(c, now=NOW)[0].event for c in commands]
    assert draft.state(KEY) == replay(start, events)  # peeking changes nothing
    h.ledger.commit(draft)
    assert h.state() == replay(start, events)
    assert [(b.initials, b.days) for b in h.state().rounds[0].bids] == [
        ("AB", days("07-03")),
        ("CD", days("07-01", "07-02")),
        ("EF", days("07-02")),
    ]


@pytest.mark.parametrize("bidders", [1, 3, 12])  # the sorted bids rebuilt or patched
def test_a_draft_of_many_or_few_bids_commits_what_evolve_gives(bidders: int) -> None:
    h = Harness()
    names = [f"{a}{b}" for a in "QPO" for b in "ZYXW"][:bidders]
    h.run(create_area(), *[register_user(n) for n in names], open_round(1, 3))
    h.run(submit_bid(names[-1], 1, days("03-03")), submit_bid("QZ", 1, days("03-01")))
    start = h.state()
    draft = h.ledger.draft()
    commands: list[Command] = [
        submit_bid(n, 1, days(f"04-{i + 1:02d}")) for i, n in enumerate(names)
    ]
    commands.append(withdraw_bid(names[-1], 1))
    events = [draft.apply(c, now=NOW)[0].event for c in commands]
    h.ledger.commit(draft)
    assert h.state() == replay(start, events)
    bidders_left = sorted(set(names) - {names[-1]})  # the last one withdrew
    assert [b.initials for b in h.state().rounds[0].bids] == bidders_left


def _snapshot(book: Ledger) -> tuple[object, ...]:
    return (dict(book.scopes), dict(book.since_snapshot), book.head_event, book.last_recorded_at)


def test_undo_puts_back_exactly_what_a_commit_changed() -> None:
    """A writer process commits a batch while the next is decided: the ledger takes the
    batch as it is sent, and gives it back if the commit fails."""
    book = Ledger(checkpoint_every=3)
    first = book.draft()
    first.apply(create_area(), now=NOW)
    first.apply(register_user("AB"), now=NOW)
    book.commit(first)
    before = _snapshot(book)

    second = book.draft()
    second.apply(register_user("CD"), now=NOW + dt.timedelta(seconds=1))  # a checkpoint too
    second.apply(open_round(), now=NOW + dt.timedelta(seconds=1))
    second.apply(submit_bid("AB"), now=NOW + dt.timedelta(seconds=1))
    second.apply(create_area(area="South"), now=NOW + dt.timedelta(seconds=1))
    undo = book.commit(second)
    assert _snapshot(book) != before and book.state(SOUTH) is not None

    book.undo(undo)
    assert _snapshot(book) == before
    assert book.state(SOUTH) is None and SOUTH not in book.since_snapshot
    again = book.draft()
    entry, checkpoint_due = again.apply(register_user("CD"), now=NOW)  # the third again
    assert (entry.event.event_id, checkpoint_due.event.action) == (3, "checkpoint")


def test_undos_taken_in_reverse_order_restore_the_start() -> None:
    book = Ledger()
    start = _snapshot(book)
    undos = []
    for initials in ("AB", "CD", "EF"):
        draft = book.draft()
        if book.state(KEY) is None:
            draft.apply(create_area(), now=NOW)
        draft.apply(register_user(initials), now=NOW)
        undos.append(book.commit(draft))
    for undo in reversed(undos):
        book.undo(undo)
    assert _snapshot(book) == start
