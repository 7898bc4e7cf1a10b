"""Wire-format message builders shared by the worker and e2e tests (plain JSON dicts)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import msgspec

ADMIN = {"id": "ops-1", "role": "admin"}
BIDDER = {"id": "desk-7", "role": "bidder"}
CAUSE = {"id": "TKT-1", "description": "test"}
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "session.ndjson"
_ids = itertools.count(1)

Msg = dict[str, Any]


def msg(type_: str, *, id: str | None = None, **fields: Any) -> Msg:
    """A message of ``type_``; commands get an admin actor and a cause unless given."""
    out: Msg = {"id": id or f"m{next(_ids)}", "type": type_}
    if type_ not in {"get_state", "timeline", "list_areas", "verify"}:
        out["actor"] = ADMIN
        out["cause"] = CAUSE
    out.update(fields)
    return out


def seniority(lottery: int | None = 1) -> Msg:
    day = "2015-01-04"
    return {
        "cumulative_natca_bu_date": day,
        "natca_bu_date": day,
        "eod_faa_date": day,
        "service_computation_date": day,
        "lottery_value": lottery,
    }


def create_area(area: str = "North", year: int = 2026, **kw: Any) -> Msg:
    return msg("create_area", bid_year=year, area=area, **kw)


def register(initials: str, area: str = "North", year: int = 2026, **kw: Any) -> Msg:
    fields: Msg = {
        "name": f"User {initials}",
        "user_type": "CPC",
        "crew": 1,
        "seniority": seniority(),
    }
    fields.update(kw)
    return msg("register_user", bid_year=year, area=area, initials=initials, **fields)


def open_round(number: int = 1, max_per_day: int = 1, area: str = "North", **kw: Any) -> Msg:
    return msg("open_round", bid_year=2026, area=area, round=number, max_per_day=max_per_day, **kw)


def bid(initials: str, days: list[str], number: int = 1, area: str = "North", **kw: Any) -> Msg:
    fields: Msg = {"actor": BIDDER}
    fields.update(kw)
    return msg(
        "submit_bid",
        bid_year=2026,
        area=area,
        round=number,
        initials=initials,
        days=days,
        **fields,
    )


def get_state(area: str = "North", **kw: Any) -> Msg:
    return msg("get_state", bid_year=2026, area=area, **kw)


def line(message: Msg) -> bytes:
    return msgspec.json.encode(message) + b"\n"


def example_lines() -> list[bytes]:
    return [ln + b"\n" for ln in EXAMPLE.read_bytes().splitlines() if ln.strip()]
