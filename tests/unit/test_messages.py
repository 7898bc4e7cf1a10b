"""Field rules declared on the message types: the decoder refuses a bad field and names
its JSON path; good boundary values pass."""

from __future__ import annotations

import copy
import datetime as dt
from typing import Any

import msgspec
import pytest

from domain.commands import (
    COMMAND_TYPES,
    MESSAGE_TYPES,
    AnyMessage,
    GetState,
    RegisterUser,
    SubmitBid,
    UpdateUser,
    parse_time,
)

ENVELOPE: dict[str, Any] = {
    "id": "m-1",
    "actor": {"id": "admin-1", "role": "admin"},
    "cause": {"id": "TCK-1", "description": "test"},
    "bid_year": 2026,
    "area": "North",
}
SENIORITY: dict[str, Any] = {
    "cumulative_natca_bu_date": "2015-01-04",
    "natca_bu_date": "2015-01-04",
    "eod_faa_date": "2014-06-30",
    "service_computation_date": "2014-06-30",
    "lottery_value": 17,
}
VALID: dict[str, dict[str, Any]] = {
    "create_area": {},
    "register_user": {
        "initials": "AB",
        "name": "Ann Bell",
        "user_type": "CPC",
        "crew": 3,
        "seniority": SENIORITY,
    },
    "update_user": {"initials": "AB", "name": "Ann Bell"},
    "open_round": {"round": 1, "max_per_day": 2},
    "submit_bid": {"round": 1, "initials": "AB", "days": ["2026-07-01", "2026-07-02"]},
    "withdraw_bid": {"round": 1, "initials": "AB"},
    "finalize_round": {"round": 1},
    "checkpoint": {"label": "before round 2"},
    "rollback": {"to_event": 3},
}
QUERIES: dict[str, dict[str, Any]] = {
    "get_state": {"id": "q-1", "bid_year": 2026, "area": "North", "at_event": 4},
    "timeline": {"id": "q-2", "bid_year": 2026, "area": "North", "limit": 10},
    "list_areas": {"id": "q-3", "bid_year": 2026},
    "verify": {"id": "q-4"},
}
DELETE = object()


def message(kind: str, **changes: Any) -> dict[str, Any]:
    """A valid message of ``kind`` with ``changes`` applied; ``a__b`` names a nested field."""
    if kind in QUERIES:
        msg = copy.deepcopy({"type": kind, **QUERIES[kind]})
    else:
        msg = copy.deepcopy({"type": kind, **ENVELOPE, **VALID[kind]})
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = msg
        for name in parents:
            node = node[name]
        if value is DELETE:
            del node[leaf]
        else:
            node[leaf] = value
    return msg


def decode(msg: dict[str, Any]) -> Any:
    return msgspec.json.decode(msgspec.json.encode(msg), type=AnyMessage)


def refused_at(msg: dict[str, Any]) -> str:
    with pytest.raises(msgspec.ValidationError) as caught:
        decode(msg)
    return str(caught.value)


def test_every_message_type_is_in_the_union() -> None:
    assert set(VALID) | set(QUERIES) == MESSAGE_TYPES


@pytest.mark.parametrize("kind", [*VALID, *QUERIES])
def test_a_valid_message_of_each_type_decodes_to_its_struct(kind: str) -> None:
    decoded = decode(message(kind))
    assert decoded.__struct_config__.tag == kind


def test_decoded_fields_have_their_python_types() -> None:
    decoded = decode(message("submit_bid"))
    assert isinstance(decoded, SubmitBid)
    assert decoded.days == (dt.date(2026, 7, 1), dt.date(2026, 7, 2))
    assert decoded.expected_seq is msgspec.UNSET  # left out: stays out when encoded again
    user = decode(message("register_user", crew=DELETE, seniority__lottery_value=None))
    assert isinstance(user, RegisterUser)
    assert user.crew is msgspec.UNSET
    assert user.seniority.lottery_value is None
    crewless = decode(message("register_user", crew=None, expected_seq=None))
    assert isinstance(crewless, RegisterUser)
    assert (crewless.crew, crewless.expected_seq) == (None, None)


def test_update_user_tells_left_out_from_null() -> None:
    left_out = decode(message("update_user"))
    cleared = decode(message("update_user", crew=None))
    assert isinstance(left_out, UpdateUser)
    assert isinstance(cleared, UpdateUser)
    assert left_out.crew is msgspec.UNSET
    assert left_out.user_type is msgspec.UNSET
    assert cleared.crew is None


def test_get_state_at_time_is_timezone_aware() -> None:
    decoded = decode(message("get_state", at_event=DELETE, at_time="2026-11-25T20:33:00Z"))
    assert isinstance(decoded, GetState)
    assert decoded.at_time is not None
    assert parse_time(decoded.at_time) == dt.datetime(2026, 11, 25, 20, 33, tzinfo=dt.UTC)
    for no_zone in ("2026-11-25T20:33:00", "2026-11-25T20:33:00,5Z", "2026-11-25 20:33:00Z"):
        assert "$.at_time" in refused_at(message("get_state", at_time=no_zone))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-25T20:33:22.268262Z", dt.datetime(2026, 11, 25, 20, 33, 22, 268262, dt.UTC)),
        # Past the microsecond, digits are dropped, never rounded up (to a later event).
        ("2026-11-25T20:33:22.2682619999Z", dt.datetime(2026, 11, 25, 20, 33, 22, 268261, dt.UTC)),
        ("2026-11-25T20:33:22.5+01:00", dt.datetime(2026, 11, 25, 19, 33, 22, 500000, dt.UTC)),
        ("2026-11-25t20:33:22z", dt.datetime(2026, 11, 25, 20, 33, 22, tzinfo=dt.UTC)),
        # A leap second: the last microsecond of its minute (events carry no :60).
        ("2016-12-31T23:59:60Z", dt.datetime(2016, 12, 31, 23, 59, 59, 999999, dt.UTC)),
        ("2017-01-01T00:59:60.5+01:00", dt.datetime(2016, 12, 31, 23, 59, 59, 999999, dt.UTC)),
        ("9999-12-31T23:59:60Z", dt.datetime(9999, 12, 31, 23, 59, 59, 999999, dt.UTC)),
        (  # a leap second whose UTC form is outside the calendar: still read, as a time
            "0001-01-01T00:59:60+01:00",
            dt.datetime(1, 1, 1, 0, 59, 59, 999999, dt.timezone(dt.timedelta(hours=1))),
        ),
    ],
)
def test_parse_time_reads_rfc_3339_down_to_the_microsecond(
    text: str, expected: dt.datetime
) -> None:
    assert parse_time(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "2026-02-30T00:00:00Z",
        "2026-11-25T24:00:00Z",
        "2026-11-25T20:33:60Z",  # a leap second only ends a month's last UTC minute
        "2016-12-31T23:58:60Z",
        "2016-12-31T23:59:61Z",
        "9999-12-31T23:59:60-05:00",  # 04:59 UTC on a first of January
        "0001-01-01T00:00:60+05:00",
        "x",
    ],
)
def test_parse_time_refuses_what_names_no_instant(text: str) -> None:
    with pytest.raises(ValueError):
        parse_time(text)


def days_of(n: int) -> list[str]:
    start = dt.date(2026, 1, 1)
    return [(start + dt.timedelta(days=i)).isoformat() for i in range(n)]


BAD: list[tuple[str, dict[str, Any], str]] = [
    ("create_area", {"id": ""}, "$.id"),
    ("create_area", {"id": "x" * 129}, "$.id"),
    ("create_area", {"id": 7}, "$.id"),
    ("create_area", {"bid_year": 1999}, "$.bid_year"),
    ("create_area", {"bid_year": 2101}, "$.bid_year"),
    ("create_area", {"bid_year": "2026"}, "$.bid_year"),
    ("create_area", {"area": ""}, "$.area"),
    ("create_area", {"area": " North"}, "$.area"),
    ("create_area", {"area": "-North"}, "$.area"),
    ("create_area", {"area": "N" * 33}, "$.area"),
    ("create_area", {"area": "North/East"}, "$.area"),
    ("create_area", {"area": "Nörth"}, "$.area"),
    ("create_area", {"actor__role": "root"}, "$.actor.role"),
    ("create_area", {"actor__id": ""}, "$.actor.id"),
    ("create_area", {"actor__extra": 1}, "$.actor"),
    ("create_area", {"actor": DELETE}, "actor"),
    ("create_area", {"cause": DELETE}, "cause"),
    ("create_area", {"cause__description": DELETE}, "$.cause"),
    ("create_area", {"expected_seq": -1}, "$.expected_seq"),
    ("register_user", {"initials": "ab"}, "$.initials"),
    ("register_user", {"initials": "ABC"}, "$.initials"),
    ("register_user", {"initials": "A"}, "$.initials"),
    ("register_user", {"initials": "ÄB"}, "$.initials"),
    ("register_user", {"name": ""}, "$.name"),
    ("register_user", {"name": "n" * 101}, "$.name"),
    ("register_user", {"user_type": "cpc"}, "$.user_type"),
    ("register_user", {"user_type": "Dev"}, "$.user_type"),
    ("register_user", {"crew": 0}, "$.crew"),
    ("register_user", {"crew": 8}, "$.crew"),
    ("register_user", {"crew": "3"}, "$.crew"),
    ("register_user", {"seniority": DELETE}, "seniority"),
    ("register_user", {"seniority__eod_faa_date": "2014-13-01"}, "$.seniority.eod_faa_date"),
    ("register_user", {"seniority__natca_bu_date": "2014-6-30"}, "$.seniority.natca_bu_date"),
    ("register_user", {"seniority__lottery_value": -1}, "$.seniority.lottery_value"),
    ("register_user", {"seniority__extra": 1}, "$.seniority"),
    ("update_user", {"crew": 9}, "$.crew"),
    ("update_user", {"name": ""}, "$.name"),
    ("update_user", {"user_type": "ATC"}, "$.user_type"),
    ("update_user", {"seniority": {"natca_bu_date": "2015-01-04"}}, "$.seniority"),
    ("open_round", {"round": 0}, "$.round"),
    ("open_round", {"max_per_day": 0}, "$.max_per_day"),
    ("open_round", {"max_per_day": 1001}, "$.max_per_day"),
    ("open_round", {"max_per_day": DELETE}, "max_per_day"),
    ("submit_bid", {"days": []}, "$.days"),
    ("submit_bid", {"days": days_of(61)}, "$.days"),
    ("submit_bid", {"days": ["2026-02-30"]}, "$.days[0]"),
    ("submit_bid", {"days": ["2026-07-01", "July 2"]}, "$.days[1]"),
    ("submit_bid", {"days": "2026-07-01"}, "$.days"),
    ("submit_bid", {"round": -1}, "$.round"),
    ("withdraw_bid", {"initials": "A1"}, "$.initials"),
    ("finalize_round", {"round": 0}, "$.round"),
    ("checkpoint", {"label": "l" * 101}, "$.label"),
    ("rollback", {"to_event": 2**63}, "$.to_event"),
    ("rollback", {"to_event": DELETE}, "to_event"),
    ("get_state", {"at_event": -1}, "$.at_event"),
    ("timeline", {"limit": 10001}, "$.limit"),
    ("timeline", {"limit": 0}, "$.limit"),
    ("timeline", {"after_event": -1}, "$.after_event"),
    ("list_areas", {"bid_year": 1999}, "$.bid_year"),
]


@pytest.mark.parametrize(("kind", "changes", "path"), BAD)
def test_a_bad_field_is_refused_naming_its_path(
    kind: str, changes: dict[str, Any], path: str
) -> None:
    assert path in refused_at(message(kind, **changes))


TRAILING_NEWLINE: list[tuple[str, dict[str, Any], str]] = [
    ("create_area", {"area": "North\n"}, "$.area"),
    ("register_user", {"initials": "AB\n"}, "$.initials"),
    ("withdraw_bid", {"initials": "AB\n"}, "$.initials"),
    ("get_state", {"area": "North\n"}, "$.area"),
]


@pytest.mark.parametrize(("kind", "changes", "path"), TRAILING_NEWLINE)
def test_a_trailing_newline_does_not_match_a_pattern(
    kind: str, changes: dict[str, Any], path: str
) -> None:
    assert path in refused_at(message(kind, **changes))


@pytest.mark.parametrize("kind", [*VALID, *QUERIES])
def test_unknown_fields_are_refused(kind: str) -> None:
    assert "unknown field `colour`" in refused_at(message(kind, colour="blue"))


def test_an_unknown_type_is_refused_at_type() -> None:
    assert "$.type" in refused_at(message("create_area", type="create_arena"))


def test_a_message_without_a_type_is_refused() -> None:
    assert "`type`" in refused_at({k: v for k, v in message("create_area").items() if k != "type"})


GOOD: list[tuple[str, dict[str, Any]]] = [
    ("create_area", {"id": "x"}),
    ("create_area", {"id": "x" * 128}),
    ("create_area", {"bid_year": 2000}),
    ("create_area", {"bid_year": 2100}),
    ("create_area", {"area": "N"}),
    ("create_area", {"area": "9"}),
    ("create_area", {"area": "N" * 32}),
    ("create_area", {"area": "North East_2-b"}),
    ("create_area", {"expected_seq": 0}),
    ("register_user", {"name": "n" * 100}),
    ("register_user", {"name": "Zoë Ångström"}),
    ("register_user", {"crew": 1}),
    ("register_user", {"crew": 7}),
    ("register_user", {"crew": None}),
    ("register_user", {"user_type": "CPC-IT"}),
    ("register_user", {"user_type": "Dev-D"}),
    ("register_user", {"user_type": "Dev-R"}),
    ("register_user", {"seniority__lottery_value": 0}),
    ("update_user", {"name": DELETE, "seniority": SENIORITY}),
    ("update_user", {"name": DELETE}),
    ("open_round", {"max_per_day": 1}),
    ("open_round", {"max_per_day": 1000}),
    ("submit_bid", {"days": days_of(60)}),
    ("submit_bid", {"days": ["2026-07-01"]}),
    ("checkpoint", {"label": "l" * 100}),
    ("checkpoint", {"label": DELETE}),
    ("rollback", {"to_event": 1}),
    ("timeline", {"limit": 10000}),
    ("list_areas", {"bid_year": DELETE}),
]


@pytest.mark.parametrize(("kind", "changes"), GOOD)
def test_a_boundary_value_is_accepted(kind: str, changes: dict[str, Any]) -> None:
    decode(message(kind, **changes))


def test_cross_field_rules_are_not_the_decoders() -> None:
    """Repeated days, days of another year, and an empty update decode; decide refuses them."""
    decode(message("submit_bid", days=["2026-07-01", "2026-07-01"]))
    decode(message("submit_bid", days=["2027-07-01"]))
    decode(message("update_user", name=DELETE))


def test_every_command_type_is_a_command() -> None:
    assert {str(t.__struct_config__.tag) for t in COMMAND_TYPES} == set(VALID)
