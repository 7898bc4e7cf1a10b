"""render(): PROTOCOL section 7's state shape exactly, in protocol order, nulls present."""

from __future__ import annotations

import json
from typing import Any

from domain.commands import Seniority
from domain.state import ScopeState, parse, render
from tests.unit.builders import (
    SENIORITY,
    YEAR,
    Harness,
    create_area,
    day,
    days,
    finalize_round,
    open_round,
    register_user,
    submit_bid,
    update_user,
)

NO_LOTTERY = Seniority(day("01-02"), day("01-03"), day("01-04"), day("01-05"), None)


def built_state() -> ScopeState:
    """Users, rounds and bids added out of order, with unset crew and lottery value."""
    h = Harness()
    return h.run(
        create_area(),
        register_user("CD", name="Cy Dee", user_type="Dev-D", seniority=NO_LOTTERY),
        register_user("AB", name="Ann Bell", crew=3),
        open_round(1, 2),
        submit_bid("CD", 1, days("07-02", "07-01")),
        submit_bid("AB", 1, days("08-01")),
        finalize_round(1),
        open_round(2, 1),
        submit_bid("CD", 2, days("09-03", "09-01", "09-02")),
        update_user("CD", name="Cy Dean"),
    )


SENIORITY_JSON = {
    "cumulative_natca_bu_date": "2015-01-04",
    "natca_bu_date": "2015-01-04",
    "eod_faa_date": "2014-06-30",
    "service_computation_date": "2014-06-30",
    "lottery_value": 17,
}
EXPECTED: dict[str, Any] = {
    "bid_year": YEAR,
    "area": "North",
    "seq": 10,
    "head_event": 10,
    "users": [
        {
            "initials": "AB",
            "name": "Ann Bell",
            "user_type": "CPC",
            "crew": 3,
            "seniority": SENIORITY_JSON,
        },
        {
            "initials": "CD",
            "name": "Cy Dean",
            "user_type": "Dev-D",
            "crew": None,
            "seniority": {
                "cumulative_natca_bu_date": "2026-01-02",
                "natca_bu_date": "2026-01-03",
                "eod_faa_date": "2026-01-04",
                "service_computation_date": "2026-01-05",
                "lottery_value": None,
            },
        },
    ],
    "rounds": [
        {
            "round": 1,
            "status": "finalized",
            "max_per_day": 2,
            "bids": [
                {"initials": "AB", "days": ["2026-08-01"]},
                {"initials": "CD", "days": ["2026-07-01", "2026-07-02"]},
            ],
        },
        {
            "round": 2,
            "status": "open",
            "max_per_day": 1,
            "bids": [{"initials": "CD", "days": ["2026-09-01", "2026-09-02", "2026-09-03"]}],
        },
    ],
}


def test_render_is_the_protocol_shape_exactly() -> None:
    assert render(built_state()) == EXPECTED


def test_render_is_plain_json() -> None:
    rendered = render(built_state())
    assert json.loads(json.dumps(rendered)) == rendered


def test_render_of_a_new_scope_has_every_field() -> None:
    state = Harness().run(create_area(area="South"))
    assert render(state) == {
        "bid_year": YEAR,
        "area": "South",
        "seq": 1,
        "head_event": 1,
        "users": [],
        "rounds": [],
    }


def test_a_round_without_bids_renders_an_empty_list() -> None:
    state = Harness().run(create_area(), open_round(1, 4))
    assert render(state)["rounds"] == [{"round": 1, "status": "open", "max_per_day": 4, "bids": []}]


def test_parse_inverts_render() -> None:
    state = built_state()
    assert parse(render(state)) == state
    assert parse(json.loads(json.dumps(render(state)))) == state


def test_seniority_renders_as_dates() -> None:
    state = Harness().run(create_area(), register_user("AB", seniority=SENIORITY))
    assert render(state)["users"][0]["seniority"] == SENIORITY_JSON
