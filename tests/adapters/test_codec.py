"""The wire codec against real msgspec errors: every field rule names its path, every
failure gets its protocol code, and replies have exactly the section-4 shapes."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import subprocess
import sys
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from adapters import codec
from adapters.canonical import digest
from adapters.codec import (
    Decoded,
    DecodeFailure,
    ack_reply,
    decode,
    encode_json_line,
    error_path,
    error_reply,
    result_reply,
)
from domain.commands import GetState, RegisterUser, Seniority, SubmitBid, Verify

ACTOR = {"id": "ops-1", "role": "admin"}
CAUSE = {"id": "T-1", "description": "setup"}
SENIORITY = {
    "cumulative_natca_bu_date": "2015-01-04",
    "natca_bu_date": "2015-01-04",
    "eod_faa_date": "2014-06-30",
    "service_computation_date": "2014-06-30",
    "lottery_value": 17,
}
SCOPE = {"bid_year": 2026, "area": "North"}


def command(type_: str, **fields: Any) -> dict[str, Any]:
    return {"id": "m-1", "type": type_, "actor": ACTOR, "cause": CAUSE, **SCOPE, **fields}


def register(**fields: Any) -> dict[str, Any]:
    body = command(
        "register_user",
        initials="AB",
        name="Ann Bell",
        user_type="CPC",
        crew=3,
        seniority=SENIORITY,
    )
    return {**body, **fields}


def submit(**fields: Any) -> dict[str, Any]:
    return {**command("submit_bid", round=1, initials="AB", days=["2026-07-01"]), **fields}


def get_state(**fields: Any) -> dict[str, Any]:
    return {"id": "q-1", "type": "get_state", **SCOPE, **fields}


def raw(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode()


def failure(line: bytes) -> DecodeFailure:
    with pytest.raises(DecodeFailure) as info:
        decode(line)
    return info.value


# --- good messages ------------------------------------------------------------------------------


def test_a_command_decodes_with_the_digest_of_its_body_as_received() -> None:
    body = register()
    decoded = decode(raw(body))
    assert isinstance(decoded, Decoded)
    assert isinstance(decoded.message, RegisterUser)
    assert decoded.message.seniority == msgspec.convert(SENIORITY, Seniority)
    assert decoded.message.crew == 3
    assert decoded.digest == digest(body)


def test_the_digest_ignores_key_order_and_whitespace_but_not_content() -> None:
    body = register()
    reordered = dict(reversed(list(body.items())))
    spaced = json.dumps(reordered, indent=2).replace("\n", " ").encode()
    assert decode(spaced).digest == decode(raw(body)).digest
    without_crew = {k: v for k, v in body.items() if k != "crew"}
    assert decode(raw(without_crew)).digest != decode(raw({**without_crew, "crew": None})).digest


def test_the_digest_keeps_non_ascii_text_as_received() -> None:
    body = register(name="Zoë Ångström")
    assert decode(raw(body)).digest == digest(body)
    escaped = json.dumps(body).encode()  # \u00eb escapes: same JSON value, same digest
    assert decode(escaped).digest == digest(body)


# The digest is taken from the decoded command, not from a second decoding of the line: it
# must still be PROTOCOL section 6's formula over the message as received, whatever fields
# are left out or null, whatever the text, key order or spacing.
TEXT = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=12)
DAY = st.dates(min_value=dt.date(2000, 1, 1), max_value=dt.date(2100, 12, 31)).map(str)
BIG = st.integers(0, 2**63 - 1)
LEFT_OUT = object()


def _optional(values: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.just(LEFT_OUT), st.none(), values)


SENIORITY_VALUES = st.fixed_dictionaries(
    {
        "cumulative_natca_bu_date": DAY,
        "natca_bu_date": DAY,
        "eod_faa_date": DAY,
        "service_computation_date": DAY,
        "lottery_value": st.one_of(st.none(), BIG),
    }
)
INITIALS = st.from_regex(r"\A[A-Z]{2}\Z")
FIELDS: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "create_area": {},
    "register_user": {
        "initials": INITIALS,
        "name": TEXT,
        "user_type": st.sampled_from(["CPC", "CPC-IT", "Dev-D", "Dev-R"]),
        "crew": _optional(st.integers(1, 7)),
        "seniority": SENIORITY_VALUES,
    },
    "update_user": {
        "initials": INITIALS,
        "name": st.one_of(st.just(LEFT_OUT), TEXT),
        "crew": _optional(st.integers(1, 7)),
        "seniority": st.one_of(st.just(LEFT_OUT), SENIORITY_VALUES),
    },
    "open_round": {"round": st.integers(1, 2**63 - 1), "max_per_day": st.integers(1, 1000)},
    "submit_bid": {
        "round": st.integers(1, 9),
        "initials": INITIALS,
        "days": st.lists(DAY, min_size=1, max_size=5),
    },
    "withdraw_bid": {"round": st.integers(1, 9), "initials": INITIALS},
    "finalize_round": {"round": st.integers(1, 9)},
    "checkpoint": {"label": _optional(TEXT)},
    "rollback": {"to_event": st.integers(1, 2**63 - 1)},
}


@st.composite
def command_lines(draw: st.DrawFn) -> bytes:
    type_ = draw(st.sampled_from(sorted(FIELDS)))
    body: dict[str, Any] = {
        "id": draw(TEXT),
        "type": type_,
        "actor": {"id": draw(TEXT), "role": draw(st.sampled_from(["admin", "bidder"]))},
        "cause": {"id": draw(TEXT), "description": draw(st.text(max_size=20))},
        "bid_year": draw(st.integers(2000, 2100)),
        "area": draw(st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9 _-]{0,31}\Z")),
        "expected_seq": draw(_optional(BIG)),
    }
    body.update({name: draw(values) for name, values in FIELDS[type_].items()})
    body = {k: v for k, v in body.items() if v is not LEFT_OUT}
    keys = draw(st.permutations(list(body)))
    ascii_only, indent = draw(st.booleans()), draw(st.sampled_from([None, 0, 2]))
    return json.dumps({k: body[k] for k in keys}, ensure_ascii=ascii_only, indent=indent).encode()


@given(command_lines())
def test_the_digest_is_the_protocols_formula_over_the_message_as_received(line: bytes) -> None:
    decoded = decode(line)
    received = json.loads(line)
    canonical = json.dumps(received, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert decoded.digest == hashlib.sha256(canonical.encode()).hexdigest()


def test_a_query_decodes_without_a_digest() -> None:
    decoded = decode(b'{"id":"q-1","type":"verify"}')
    assert decoded == Decoded(Verify(id="q-1"), None)
    state = decode(raw(get_state(at_time="2026-07-01T12:00:00+02:00"))).message
    assert isinstance(state, GetState)
    assert state.at_time == "2026-07-01T12:00:00+02:00"  # read by domain.commands.parse_time


def test_a_submitted_bid_has_dates() -> None:
    message = decode(raw(submit(days=["2026-07-02", "2026-07-01"]))).message
    assert isinstance(message, SubmitBid)
    assert [d.isoformat() for d in message.days] == ["2026-07-02", "2026-07-01"]


def test_the_reserved_system_role_passes_decoding_and_is_left_to_authorization() -> None:
    assert decode(raw(command("create_area", actor={"id": "x", "role": "system"}))).digest


# --- malformed JSON -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        b"{bad",
        b"not json",
        b'{"id":"m-1","type":"verify"',
        b'{"id":"m-1","type":"verify"} trailing',
        b'{"id":"m-1","type":"verify"}{"id":"m-2","type":"verify"}',
        b'{"id":"m-\xff","type":"verify"}',
        b'{"id":"m-1","type":"verify"}\xff',
        # Invalid UTF-8 where msgspec would stop at a schema error without reading it.
        b'{"id":"m-1","type":"create_area","name":"\xff"}',
        b'{"id":"m-1","type":"verify","\xff":1}',
        b'{"id":"m-1","type":"verify","x":{"y":["\xc3"]}}',
        b'{"id":"m-1","type":"register_user","user_type":"CPC\xff"}',
        b'{"id":"m-1","type":"verif\xff"}',
        b'{"id":"\xc3","type":"verify"}',
        b'\xef\xbb\xbf{"id":"m-1","type":"verify"}',
        b'{"id":"m-1","type":"verify","expected_seq":NaN}',
        # The schema fails first (unknown field), then the JSON turns out to be broken.
        b'{"id":"m-1","type":"verify","zz":1,',
    ],
)
def test_lines_that_are_not_json_are_malformed_with_a_null_id(line: bytes) -> None:
    error = failure(line)
    assert (error.code, error.message_id, error.details) == ("malformed_json", None, {})
    assert error.message


@pytest.mark.parametrize(
    ("line", "path", "message_id"),
    [
        (b'{"id":"m-1","type":"get_state","bid_year":2026,"area":"\\ud800"}', "$.area", "m-1"),
        (b'{"id":"m-1","type":"verify","x":"a\\udc00b"}', "$.x", "m-1"),  # schema fails first
        (b'{"\\ud800":1,"id":"m-1","type":"verify"}', '$["\\ud800"]', "m-1"),
        (b'{"id":"m-1","type":"verify","x":[1,{"y":"\\udfff"}]}', "$.x[1].y", "m-1"),
        (b'{"id":"\\ud800","type":"verify"}', "$.id", None),  # the id itself is no text
        (b'{"id":"m-1","type":"verify","x":"\\ud800","x":"y"}', "$.x", "m-1"),  # shadowed
    ],
)
def test_a_lone_surrogate_escape_is_named_and_a_usable_id_echoed(
    line: bytes, path: str, message_id: str | None
) -> None:
    """The line is JSON (the grammar allows the escape): a field is refused, by its
    path, not the line as malformed JSON with its id echoed (fifth audit)."""
    error = failure(line)
    assert (error.code, error.message_id) == ("invalid_message", message_id)
    assert error.details == {"path": path}
    assert "lone UTF-16 surrogate" in error.message  # not msgspec's "truncated"


# --- envelope -----------------------------------------------------------------------------------


@pytest.mark.parametrize("line", [b"[1]", b'"m-1"', b"1", b"null", b"true", b"[]"])
def test_json_that_is_not_an_object_is_invalid_at_the_root(line: bytes) -> None:
    error = failure(line)
    assert (error.code, error.message_id, error.details) == ("invalid_message", None, {"path": "$"})


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"id": None},
        {"id": 7},
        {"id": ["m-1"]},
        {"id": ""},
        {"id": "x" * 129},
    ],
)
def test_an_object_without_a_usable_id_is_invalid_with_a_null_id(fields: dict[str, Any]) -> None:
    body = {k: v for k, v in command("create_area").items() if k != "id"} | fields
    error = failure(raw(body))
    assert (error.code, error.message_id) == ("invalid_message", None)
    assert error.details == {"path": "$.id"}


def test_the_id_rule_comes_before_the_type_rule() -> None:
    error = failure(b'{"type":"no_such_type"}')
    assert (error.code, error.message_id, error.details) == (
        "invalid_message",
        None,
        {"path": "$.id"},
    )


def test_an_id_of_128_characters_is_usable() -> None:
    assert decode(raw({"id": "x" * 128, "type": "verify"})).message == Verify(id="x" * 128)


@pytest.mark.parametrize("fields", [{}, {"type": None}, {"type": 3}, {"type": {"a": 1}}])
def test_a_missing_or_non_string_type_is_invalid_and_echoes_the_id(fields: dict[str, Any]) -> None:
    error = failure(raw({"id": "m-9", **fields}))
    assert (error.code, error.message_id) == ("invalid_message", "m-9")
    assert error.details == {"path": "$.type"}


@pytest.mark.parametrize("type_", ["no_such_type", "", "Create_Area", "create_area "])
def test_a_type_outside_the_protocol_is_unknown(type_: str) -> None:
    error = failure(raw({**command("create_area"), "type": type_}))
    assert (error.code, error.message_id, error.details) == ("unknown_type", "m-1", {"type": type_})


SYSTEM_THEN_ADMIN = b'"role": "system", "role": "admin"'


@pytest.mark.parametrize(
    ("line", "path", "message_id"),
    [
        (raw({**command("create_area")})[:-1] + b',"area":"South"}', "$.area", "m-1"),
        (b'{"id":"m-1","id":"m-2","type":"verify"}', "$.id", None),  # which id? neither
        (b'{"id":5,"id":"m-2","type":"verify"}', "$.id", None),
        (b'{"id":"m-1","type":"nope","type":"verify"}', "$.type", "m-1"),  # either order,
        (b'{"id":"m-1","type":"verify","type":"nope"}', "$.type", "m-1"),  # the same answer
        (b'{"id":"m-1","type":"verify","type":"verify"}', "$.type", "m-1"),
        (b'{"id":"q","type":"get_state","bid_year":2026,"area":"N","at_event":1,"at_event":null}',
         "$.at_event", "q"),
        (raw(command("create_area")).replace(b'"role": "admin"', SYSTEM_THEN_ADMIN),
         "$.actor.role", "m-1"),
        (raw(command("submit_bid", round=1, initials="AB", days=["2026-07-01"])).replace(
            b'"days"', b'"days":["2026-07-02"],"days"'), "$.days", "m-1"),
        # Escapes that add quote characters when written back must not hide one.
        (raw({**command("create_area"), "cause": {"id": "T", "description": '""""'}})
         .replace(b'\\"', b"\\u0022")[:-1] + b',"area":"South"}', "$.area", "m-1"),
        (b'{"id":"m-1","type":"verify","x":{"a":1,"b":[{"c":1,"c":2}]}}', "$.x.b[0].c", "m-1"),
    ],
)  # fmt: skip
def test_a_key_repeated_in_an_object_is_refused_naming_it(
    line: bytes, path: str, message_id: str | None
) -> None:
    """Decoders keep a repeated key's last value: a "system" role claim followed by
    "admin" acted as admin, and left no trace in the log (fifth audit)."""
    error = failure(line)
    assert (error.code, error.message_id, error.details) == (
        "invalid_message",
        message_id,
        {"path": path},
    )
    assert "appears twice" in error.message


@given(command_lines(), st.data())
def test_any_key_of_a_command_given_twice_is_refused(line: bytes, data: st.DataObject) -> None:
    """Whatever the key, the text and its escapes, and whichever value comes last."""
    body = json.loads(line)
    key = data.draw(st.sampled_from(sorted(body)))
    again = json.dumps(data.draw(st.sampled_from([body[key], None, "x", 1])))
    ascii_only = data.draw(st.booleans())
    first = json.dumps(body, ensure_ascii=ascii_only).encode()
    twice = first[:-1] + f', "{key}": {again}}}'.encode()
    error = failure(twice)
    assert (error.code, error.details) == ("invalid_message", {"path": f"$.{key}"})


def test_escapes_alone_are_not_taken_for_a_repeated_key() -> None:
    body = {**command("create_area"), "cause": {"id": "T", "description": 'say "hi" \\u'}}
    line = json.dumps(body, ensure_ascii=True).encode().replace(b"say", b"\\u0073ay")
    assert b"\\u" in line
    assert decode(line).digest == digest(body)


def test_a_deeply_nested_line_is_refused_without_crashing() -> None:
    deep = b"[" * 200_000 + b"]" * 200_000
    for line in (
        deep,
        b'{"id":"m-1","type":"verify","x":' + deep + b"}",
        b'{"id":"m-1","x":' + deep + b',"type":"verify"}',
    ):
        error = failure(line)
        assert error.code == "invalid_message"
        assert error.details["path"] in ("$", "$.x")
        assert error.message_id == (None if line == deep else "m-1")  # JSON, usable id


@pytest.mark.parametrize(
    ("line", "message_id"),
    [
        (b'{"x":%s,"id":"m-9"}', "m-9"),
        (b'{"id":5,"x":%s,"id":"m-2"}', "m-2"),  # the last one counts, as in the decoders
        (b' { "id" : "sp" , "x" : %s } ', "sp"),
        (b'{"\\u0069d":"esc","x":%s}', "esc"),
        (b'{"id":"m","s":"[[\\"[{","x":%s}', "m"),  # brackets in strings do not count
        (b'{"x":%s}', None),
        (b'{"id":"%s"}', None),
        (b'{"id":7,"x":%s}', None),
        (b'{"\\ud800":1,"x":%s,"id":"m"}', "m"),  # JSON: the escape is in its grammar
        (b'{"id":"m","\\ud800":1,"x":%s}', "m"),  # msgspec stops at it, before the depth
        (b'{"id":"m","b":"\\udc00","x":%s}', "m"),
    ],
)
def test_a_too_deep_line_echoes_its_top_level_id(line: bytes, message_id: str | None) -> None:
    deep = b"[" * 10_000 + b"]" * 10_000
    error = failure(line.replace(b"%s", deep))
    assert (error.code, error.message_id) == ("invalid_message", message_id)


@pytest.mark.parametrize(
    "line",
    [
        b'{"x":%s,"id":"\\ud800"}',  # raised DecodeError out of the codec: worker died
        b'{"x":%s,"id":"\xff"}',  # raised UnicodeDecodeError
        b'{"x":%s,"id":"a\x01"}',  # a raw control character
        b'{"id":"m","x":[[[%s}}}}',  # brackets that do not pair
        b'{"id":"m","x":[%s,tru]}',  # a literal that is not one
        b'{"id":"m","x":[%s,01]}',  # nor a number
        b'{"id":"m","x":[%s,"\\q"]}',  # nor a string escape
        b'{"id":"m","x":%s}x',  # something after the object
        b'\x0b{"id":"m","x":%s}',  # not JSON whitespace
        b'{"id":"m-1","x":%s',  # the line ends inside the object
        b'{"id":"m-1","type":"verify","x":[[[[%s',  # and deeper still (fifth audit)
    ],
)
def test_a_too_deep_line_that_is_not_json_gets_no_id_and_never_an_exception(line: bytes) -> None:
    """Not JSON, however deep: malformed_json, as for a shallow line (it said "nested
    too deeply", invalid_message, where the same line 20 deep was malformed_json)."""
    deep = b"[" * 10_000 + b"]" * 10_000
    error = failure(line.replace(b"%s", deep))
    assert error.message_id is None
    if b"\\ud800" not in line:  # JSON's grammar allows the escape: either code will do
        assert (error.code, error.details) == ("malformed_json", {})


def test_the_scan_of_a_deep_line_gives_up_on_a_long_one() -> None:
    """The scan for a deep line's id is Python on the applier's thread: a 1 MiB line of
    small tokens held every other client for about a second (review). Past SCAN_STEPS
    tokens it gives up: too deep, no id looked for."""
    deep = b"[" * 3000 + b"1," * (codec.SCAN_STEPS // 2) + b"1" + b"]" * 3000
    error = failure(b'{"id":"m","a":' + deep + b"}")
    assert (error.code, error.message_id) == ("invalid_message", None)
    short = b"[" * 3000 + b"1," * 10 + b"1" + b"]" * 3000
    assert failure(b'{"id":"m","a":' + short + b"}").message_id == "m"


def test_scanning_a_deep_line_takes_time_in_proportion_to_it() -> None:
    """The scan for the id of a too-deep line is linear: an unclosed string full of
    escaped quotes made the first version try a match from every quote (a 200 KiB line
    took two minutes; a 1 MiB one, about an hour). Run where a hang can be cut off."""
    program = (
        "from adapters import codec\n"
        "for tail in (b'\\\\\"' * 500_000, b'\\\\' * 1_000_000, b'\"x' * 500_000):\n"
        '    line = b\'{"id":"a","x":\' + b\'[\' * 2000 + b\'"\' + tail\n'
        "    try:\n"
        "        codec.decode(line)\n"
        "    except codec.DecodeFailure as failure:\n"
        "        assert failure.message_id is None, failure.message_id\n"
        "print('done')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, timeout=60, check=False
    )
    assert done.stdout == b"done\n", done.stderr


# --- field rules: each names its path -----------------------------------------------------------


def drop(body: dict[str, Any], *path: str) -> dict[str, Any]:
    """A copy of ``body`` without the field at ``path``."""
    copy = json.loads(json.dumps(body))
    target = copy
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    return dict(copy)


FIELD_RULES: list[tuple[str, dict[str, Any], str]] = [
    ("year below 2000", register(bid_year=1999), "$.bid_year"),
    ("year above 2100", register(bid_year=2101), "$.bid_year"),
    ("year as string", register(bid_year="2026"), "$.bid_year"),
    ("year as float", register(bid_year=2026.0), "$.bid_year"),
    ("area empty", register(area=""), "$.area"),
    ("area leading dash", register(area="-North"), "$.area"),
    ("area 33 chars", register(area="A" * 33), "$.area"),
    ("area bad char", register(area="North/2"), "$.area"),
    ("initials lower", register(initials="ab"), "$.initials"),
    ("initials three", register(initials="ABC"), "$.initials"),
    ("crew zero", register(crew=0), "$.crew"),
    ("crew eight", register(crew=8), "$.crew"),
    ("crew string", register(crew="3"), "$.crew"),
    ("crew bool", register(crew=True), "$.crew"),
    ("user_type", register(user_type="ATC"), "$.user_type"),
    ("name empty", register(name=""), "$.name"),
    ("name too long", register(name="x" * 101), "$.name"),
    (
        "seniority date",
        register(seniority={**SENIORITY, "eod_faa_date": "2014-13-01"}),
        "$.seniority.eod_faa_date",
    ),
    (
        "seniority datetime",
        register(seniority={**SENIORITY, "natca_bu_date": "2015-01-04T00:00:00Z"}),
        "$.seniority.natca_bu_date",
    ),
    (
        "lottery negative",
        register(seniority={**SENIORITY, "lottery_value": -1}),
        "$.seniority.lottery_value",
    ),
    ("unknown top-level field", register(zz=1), "$.zz"),
    ("typo of a field", {**drop(register(), "crew"), "crews": 3}, "$.crews"),
    ("unknown actor field", register(actor={**ACTOR, "zz": 1}), "$.actor.zz"),
    ("unknown seniority field", register(seniority={**SENIORITY, "zz": 1}), "$.seniority.zz"),
    ("missing name", drop(register(), "name"), "$.name"),
    ("missing actor", drop(register(), "actor"), "$.actor"),
    ("missing bid_year", drop(register(), "bid_year"), "$.bid_year"),
    (
        "missing seniority date",
        drop(register(), "seniority", "natca_bu_date"),
        "$.seniority.natca_bu_date",
    ),
    ("missing actor role", drop(register(), "actor", "role"), "$.actor.role"),
    ("role", register(actor={"id": "x", "role": "root"}), "$.actor.role"),
    ("actor id empty", register(actor={"id": "", "role": "admin"}), "$.actor.id"),
    ("actor not an object", register(actor="ops-1"), "$.actor"),
    (
        "cause too long",
        register(cause={"id": "c", "description": "x" * 10001}),
        "$.cause.description",
    ),
    ("expected_seq negative", register(expected_seq=-1), "$.expected_seq"),
    ("expected_seq string", register(expected_seq="3"), "$.expected_seq"),
    ("days empty", submit(days=[]), "$.days"),
    (
        "days 61",
        submit(days=[f"2026-07-{d:02}" for d in range(1, 31)] * 2 + ["2026-08-01"]),
        "$.days",
    ),
    ("day invalid", submit(days=["2026-07-01", "2026-02-30"]), "$.days[1]"),
    ("day not a string", submit(days=[20260701]), "$.days[0]"),
    ("days not a list", submit(days="2026-07-01"), "$.days"),
    ("round zero", submit(round=0), "$.round"),
    ("max_per_day zero", command("open_round", round=1, max_per_day=0), "$.max_per_day"),
    ("max_per_day 1001", command("open_round", round=1, max_per_day=1001), "$.max_per_day"),
    ("label 101", command("checkpoint", label="x" * 101), "$.label"),
    ("to_event too large", command("rollback", to_event=2**63), "$.to_event"),
    ("update crew", command("update_user", initials="AB", crew=9), "$.crew"),
    ("at_time without timezone", get_state(at_time="2026-07-01T12:00:00"), "$.at_time"),
    ("at_time garbage", get_state(at_time="yesterday"), "$.at_time"),
    ("at_event negative", get_state(at_event=-1), "$.at_event"),
    ("timeline limit", {"id": "q", "type": "timeline", **SCOPE, "limit": 10001}, "$.limit"),
    ("query with command field", get_state(initials="AB"), "$.initials"),
    ("list_areas year", {"id": "q", "type": "list_areas", "bid_year": 1999}, "$.bid_year"),
]


@pytest.mark.parametrize(
    ("body", "path"), [(b, p) for _, b, p in FIELD_RULES], ids=[n for n, _, _ in FIELD_RULES]
)
def test_a_field_rule_violation_is_invalid_and_names_the_field(
    body: dict[str, Any], path: str
) -> None:
    error = failure(raw(body))
    assert (error.code, error.message_id) == ("invalid_message", body["id"])
    assert error.details == {"path": path}
    assert error.message


@pytest.mark.parametrize(
    ("message", "path"),
    [
        ("Expected `int` >= 2000 - at `$.bid_year`", "$.bid_year"),
        ("Invalid RFC3339 encoded date - at `$.days[12]`", "$.days[12]"),
        ("Object contains unknown field `zz`", "$.zz"),
        ("Object contains unknown field `zz` - at `$.actor`", "$.actor.zz"),
        ("Object contains unknown field `a b`", '$["a b"]'),
        ("Object contains unknown field `a`b`", '$["a`b"]'),
        (
            "Object missing required field `natca_bu_date` - at `$.seniority`",
            "$.seniority.natca_bu_date",
        ),
        ("Object missing required field `name`", "$.name"),
        ("Expected `object`, got `array`", "$"),
        ("something else entirely", "$"),
    ],
)
def test_error_path_reads_msgspec_messages(message: str, path: str) -> None:
    assert error_path(message) == path


def test_an_unknown_field_with_an_odd_name_is_quoted_in_the_path() -> None:
    error = failure(raw({"id": "m-1", "type": "verify", "a.b c": 1}))
    assert error.details == {"path": '$["a.b c"]'}


# --- replies ------------------------------------------------------------------------------------


def test_an_ack_has_exactly_the_protocol_shape() -> None:
    line = ack_reply("m-7", 42, 7, "2026-11-25T20:33:00.123456Z")
    assert line == (
        b'{"id":"m-7","ok":true,"event_id":42,"seq":7,"recorded_at":"2026-11-25T20:33:00.123456Z"}\n'
    )


def test_a_repeated_ack_says_duplicate() -> None:
    line = ack_reply("m-7", 42, 7, "2026-11-25T20:33:00.123456Z", duplicate=True)
    assert json.loads(line) == {
        "id": "m-7",
        "ok": True,
        "event_id": 42,
        "seq": 7,
        "recorded_at": "2026-11-25T20:33:00.123456Z",
        "duplicate": True,
    }


def test_a_result_reply_wraps_the_result() -> None:
    assert result_reply("q-1", {"events": 3, "snapshots": 1}) == (
        b'{"id":"q-1","ok":true,"result":{"events":3,"snapshots":1}}\n'
    )


def test_an_error_reply_always_has_a_details_object() -> None:
    assert error_reply(None, "malformed_json", "JSON is malformed") == (
        b'{"id":null,"ok":false,"error":{"code":"malformed_json","message":"JSON is malformed",'
        b'"details":{}}}\n'
    )
    line = error_reply(
        "m-8", "duplicate_initials", "initials AB are already registered", {"initials": "AB"}
    )
    assert json.loads(line)["error"] == {
        "code": "duplicate_initials",
        "message": "initials AB are already registered",
        "details": {"initials": "AB"},
    }


def test_replies_are_one_line_of_utf8_with_text_unescaped() -> None:
    line = error_reply("m-ü", "unknown_user", "no user Zoë\nhere", {"name": "Zoë"})
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert "Zoë".encode() in line
    assert json.loads(line)["error"]["message"] == "no user Zoë\nhere"


def test_a_decode_failure_renders_its_own_reply() -> None:
    reply = json.loads(failure(raw({"id": "m-3", "type": "nope"})).reply())
    assert reply == {
        "id": "m-3",
        "ok": False,
        "error": {
            "code": "unknown_type",
            "message": reply["error"]["message"],
            "details": {"type": "nope"},
        },
    }


def test_encode_json_line_handles_structs_and_builtins() -> None:
    assert (
        encode_json_line(Verify(id="q"))
        == b'{"type":"verify","id":"q","actor":null,"cause":null,"expected_seq":null}\n'
    )
    assert encode_json_line([1, "é"]) == '[1,"é"]\n'.encode()


@pytest.mark.parametrize(
    ("message", "path", "says"),
    [
        (
            get_state(at_time="2026-11-26 10:58:15Z"),
            "$.at_time",
            "an RFC 3339 time with a time zone",
        ),
        (get_state(area="_North"), "$.area", "an area name: 1-32 of A-Z, a-z, 0-9"),
        (submit(initials="a1"), "$.initials", "two capital letters"),
    ],
)
def test_a_value_refused_by_a_pattern_is_described_in_words(
    message: dict[str, Any], path: str, says: str
) -> None:
    error = failure(raw(message))
    assert (error.code, error.details) == ("invalid_message", {"path": path})
    assert says in error.message and f"at `{path}`" in error.message
    assert "regex" not in error.message
