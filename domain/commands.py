"""Every inbound message of the protocol: one frozen Struct each, tagged by its wire ``type``.

Field rules that the schema can express live on the types, so the decoder (not hand-written
checks) refuses a bad year, name or crew and names the JSON path. Rules that span fields
(days inside the bid year, distinct days, at least one field to update) are in ``rules``.
"""

from __future__ import annotations

import calendar
import datetime as dt
import re
from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

MessageId = Annotated[str, Meta(min_length=1, max_length=128)]
BidYear = Annotated[int, Meta(ge=2000, le=2100)]
AREA_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9 _-]{0,31}\Z"
AreaName = Annotated[str, Meta(pattern=AREA_PATTERN)]
INITIALS_PATTERN = r"^[A-Z]{2}\Z"
Initials = Annotated[str, Meta(pattern=INITIALS_PATTERN)]
UserName = Annotated[str, Meta(min_length=1, max_length=100)]
UserType = Literal["CPC", "CPC-IT", "Dev-D", "Dev-R"]
Crew = Annotated[int, Meta(ge=1, le=7)]
MAX_INT = 2**63 - 1  # SQLite INTEGER
RoundNumber = Annotated[int, Meta(ge=1, le=MAX_INT)]
MaxPerDay = Annotated[int, Meta(ge=1, le=1000)]
Days = Annotated[tuple[dt.date, ...], Meta(min_length=1, max_length=60)]
MAX_LABEL = 100
Label = Annotated[str, Meta(max_length=MAX_LABEL)]
# Any event id SQLite can hold; one that is not an earlier event of the scope is a rule
# error (invalid_rollback_target), as PROTOCOL section 5 has it, not a schema error.
EventId = Annotated[int, Meta(ge=-MAX_INT - 1, le=MAX_INT)]
Seq = Annotated[int, Meta(ge=0, le=MAX_INT)]
Text = Annotated[str, Meta(max_length=10000)]
Role = Literal["admin", "bidder", "system"]
# RFC 3339 date-time (section 5.6), kept as text: ``parse_time`` reads it, dropping digits
# past the microsecond (never rounding up past an event recorded after that time).
RFC3339_PATTERN = r"^\d{4}-\d\d-\d\d[Tt]\d\d:\d\d:\d\d(\.\d+)?([Zz]|[+-]\d\d:\d\d)\Z"
Timestamp = Annotated[str, Meta(pattern=RFC3339_PATTERN)]
_FRACTION = re.compile(r"\.(\d{1,6})\d*")
_MINUTE = dt.timedelta(minutes=1)


def parse_time(text: str) -> dt.datetime:
    """An RFC 3339 date-time (see ``Timestamp``) as an aware datetime, truncated to the
    microsecond; ``ValueError`` if it is not one or names no real instant (Feb 30)."""
    if re.match(RFC3339_PATTERN, text) is None:
        raise ValueError(f"not an RFC 3339 time: {text}")
    normal = _FRACTION.sub(lambda m: "." + m.group(1).ljust(6, "0"), text.upper(), count=1)
    if normal[17:19] != "60":
        return dt.datetime.fromisoformat(normal.replace("Z", "+00:00"))
    # A leap second, which RFC 3339 allows at the end of a month's last UTC minute: read
    # as the last microsecond of that minute, all of it that a clock without leap seconds
    # (events' times) can tell apart.
    moment = dt.datetime.fromisoformat(
        (normal[:17] + "59.999999" + normal[19:].lstrip(".0123456789")).replace("Z", "+00:00")
    )
    offset = moment.utcoffset() or dt.timedelta()
    # The UTC minute and day, by arithmetic: its UTC form may be outside the calendar.
    shift, minute = divmod(moment.hour * 60 + moment.minute - offset // _MINUTE, 24 * 60)
    last_day = calendar.monthrange(moment.year, moment.month)[1]
    month_end = {-1: moment.day == 1, 0: moment.day == last_day, 1: moment.day == last_day - 1}
    if minute != 23 * 60 + 59 or not month_end[shift]:
        raise ValueError(f"{text} is not at the end of a month's last UTC minute")
    return moment


class Actor(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Who acts. ``system`` is reserved for bidlog itself and refused on the wire."""

    id: Annotated[str, Meta(min_length=1, max_length=128)]
    role: Role


class Cause(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Why: a request id or ticket, and a description."""

    id: Annotated[str, Meta(min_length=1, max_length=128)]
    description: Text


class Seniority(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A user's seniority dates; replaced whole on update."""

    cumulative_natca_bu_date: dt.date
    natca_bu_date: dt.date
    eod_faa_date: dt.date
    service_computation_date: dt.date
    lottery_value: Annotated[int, Meta(ge=0, le=MAX_INT)] | None


class Message(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="type"
):
    """Envelope shared by every message."""

    id: MessageId


class BaseCommand(Message, frozen=True, kw_only=True):
    """A command: changes one scope and, on success, appends exactly one event.

    Optional fields default to ``UNSET``, not ``None``: a field left out stays out when
    the command is encoded again, and one sent as ``null`` stays ``null``. So a decoded
    command encodes (keys sorted) to the canonical form of the message as received, and
    its digest is taken from it without decoding the line a second time.
    """

    actor: Actor
    cause: Cause
    expected_seq: Seq | UnsetType | None = UNSET
    bid_year: BidYear
    area: AreaName


class CreateArea(BaseCommand, frozen=True, kw_only=True, tag="create_area"):
    """Create the scope (bid year, area)."""


class RegisterUser(BaseCommand, frozen=True, kw_only=True, tag="register_user"):
    """Register a controller in the scope."""

    initials: Initials
    name: UserName
    user_type: UserType
    crew: Crew | UnsetType | None = UNSET
    seniority: Seniority


class UpdateUser(BaseCommand, frozen=True, kw_only=True, tag="update_user"):
    """Change some fields of a user; a field left out is unchanged, ``crew: null`` clears."""

    initials: Initials
    name: UserName | UnsetType = UNSET
    user_type: UserType | UnsetType = UNSET
    crew: Crew | UnsetType | None = UNSET
    seniority: Seniority | UnsetType = UNSET


class OpenRound(BaseCommand, frozen=True, kw_only=True, tag="open_round"):
    """Open the next bidding round."""

    round: RoundNumber
    max_per_day: MaxPerDay


class SubmitBid(BaseCommand, frozen=True, kw_only=True, tag="submit_bid"):
    """Bid for days off in the open round, replacing the user's earlier bid in it."""

    round: RoundNumber
    initials: Initials
    days: Days


class WithdrawBid(BaseCommand, frozen=True, kw_only=True, tag="withdraw_bid"):
    """Withdraw the user's bid from the open round."""

    round: RoundNumber
    initials: Initials


class FinalizeRound(BaseCommand, frozen=True, kw_only=True, tag="finalize_round"):
    """Close the open round; its bids become held days."""

    round: RoundNumber


class Checkpoint(BaseCommand, frozen=True, kw_only=True, tag="checkpoint"):
    """Record a full snapshot of the scope; changes no state."""

    label: Label | UnsetType | None = UNSET


class Rollback(BaseCommand, frozen=True, kw_only=True, tag="rollback"):
    """Make the scope's state as of an earlier event its state going forward."""

    to_event: EventId


class BaseQuery(Message, frozen=True, kw_only=True):
    """A query: reads committed state, appends nothing."""

    actor: Actor | None = None
    cause: Cause | None = None
    expected_seq: Seq | None = None


class GetState(BaseQuery, frozen=True, kw_only=True, tag="get_state"):
    """A scope's state now, as of a global event id, or as of a time."""

    bid_year: BidYear
    area: AreaName
    at_event: Annotated[int, Meta(ge=0, le=MAX_INT)] | None = None
    at_time: Timestamp | None = None


class Timeline(BaseQuery, frozen=True, kw_only=True, tag="timeline"):
    """A page of a scope's events, in order."""

    bid_year: BidYear
    area: AreaName
    after_event: Annotated[int, Meta(ge=0, le=MAX_INT)] = 0
    limit: Annotated[int, Meta(ge=1, le=10000)] = 1000


class ListAreas(BaseQuery, frozen=True, kw_only=True, tag="list_areas"):
    """Every scope, optionally of one bid year."""

    bid_year: BidYear | None = None


class Verify(BaseQuery, frozen=True, kw_only=True, tag="verify"):
    """Check the hash chain and every snapshot."""


Command = (
    CreateArea
    | RegisterUser
    | UpdateUser
    | OpenRound
    | SubmitBid
    | WithdrawBid
    | FinalizeRound
    | Checkpoint
    | Rollback
)
Query = GetState | Timeline | ListAreas | Verify
AnyMessage = Command | Query

COMMAND_TYPES: tuple[type[BaseCommand], ...] = (
    CreateArea,
    RegisterUser,
    UpdateUser,
    OpenRound,
    SubmitBid,
    WithdrawBid,
    FinalizeRound,
    Checkpoint,
    Rollback,
)
QUERY_TYPES: tuple[type[BaseQuery], ...] = (GetState, Timeline, ListAreas, Verify)
MESSAGE_TYPES: frozenset[str] = frozenset(
    str(t.__struct_config__.tag) for t in (*COMMAND_TYPES, *QUERY_TYPES)
)
BIDDER_COMMANDS: frozenset[str] = frozenset({"submit_bid", "withdraw_bid"})
