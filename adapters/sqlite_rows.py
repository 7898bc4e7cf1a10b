"""Events to rows and back, and the hash chain over them.

The hashed object is exactly the protocol's section-6 event without ``hash``: the
``Event`` fields plus ``prev_hash``. JSON columns hold canonical JSON text, so a row
decodes back to the very object that was hashed, and exports byte for byte the same.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Any, NoReturn

import msgspec

from adapters.canonical import ZERO_HASH, canonical
from adapters.sqlite_schema import InvalidBatch
from domain.commands import Actor, Cause
from domain.events import SCHEMA_VERSION, Event
from domain.records import Batch
from domain.state import ScopeState

EVENT_COLUMNS = (
    "event_id, seq, bid_year, area, recorded_at, action, actor, cause, message_id, "
    "message_digest, detail, before, after, snapshot, schema_version, prev_hash, hash"
)
INSERT_EVENT = f"INSERT INTO events ({EVENT_COLUMNS}) VALUES ({', '.join('?' * 17)})"
INSERT_SNAPSHOT = "INSERT INTO snapshots (event_id, bid_year, area, state) VALUES (?, ?, ?, ?)"
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z\Z")
TIME_FORM = "a UTC time with microseconds (2026-01-01T00:00:00.000000Z)"


def time_fault(event_id: int, at: object) -> str | None:
    """Why ``at`` is not a ``recorded_at`` the store writes (event ``event_id``'s)."""
    if isinstance(at, str) and TIMESTAMP.match(at) is not None:
        return None
    return f"event {event_id}: recorded_at {at!r} is not {TIME_FORM}"


Row = tuple[Any, ...]
_json = msgspec.json.Encoder(order="sorted").encode  # = adapters.canonical.canonical
_HASHED = (
    b'{"action":%b,"actor":%b,"after":%b,"area":%b,"before":%b,"bid_year":%d,"cause":%b,'
    b'"detail":%b,"event_id":%d,"message_digest":%b,"message_id":%b,"prev_hash":%b,'
    b'"recorded_at":%b,"seq":%d,"snapshot":%b}'
)
_decode_json = msgspec.json.Decoder()
_decode_actor = msgspec.json.Decoder(Actor)
_decode_cause = msgspec.json.Decoder(Cause)
_decode_state = msgspec.json.Decoder(ScopeState)


class Head(msgspec.Struct, frozen=True):
    """The end of the log: last event id (= number of events), its hash and time."""

    event_id: int = 0
    hash: str = ZERO_HASH
    recorded_at: str = ""


class Encoded(msgspec.Struct, frozen=True):
    """A batch as rows, ready for ``executemany``, and the head it leads to."""

    events: list[Row]
    snapshots: list[Row]
    head: Head


def encode_batch(batch: Batch, head: Head) -> Encoded:
    """Check the batch continues ``head`` and chain-hash it; raise ``InvalidBatch`` if not."""
    events: list[Row] = []
    snapshots: list[Row] = []
    last_id, prev_hash, last_at = head.event_id, head.hash, head.recorded_at
    matched = last_at or None  # a time known to be well formed (an empty log has none)
    for entry in batch.entries:
        event = entry.event
        at = event.recorded_at
        # Hot loop: a time equal to the last well-formed one needs no regex.
        if event.event_id != last_id + 1 or at < last_at or (at != matched and not _is_time(at)):
            _refuse(event, last_id, last_at)
        row = hashed_row(event, prev_hash)
        events.append(row)
        if event.snapshot:
            snapshots.append(snapshot_row(event, entry.state))
        last_id, prev_hash, last_at = event.event_id, row[16], at
        matched = at
    if batch.acks:
        _check_acks(batch)
    return Encoded(events, snapshots, Head(last_id, prev_hash, last_at))


def _is_time(value: str) -> bool:
    return TIMESTAMP.match(value) is not None


def _refuse(event: Event, last_id: int, last_at: str) -> NoReturn:
    if event.event_id != last_id + 1:
        raise InvalidBatch(f"event id {event.event_id} does not follow {last_id}")
    if not _is_time(event.recorded_at):
        raise InvalidBatch(f"event {event.event_id}: bad recorded_at {event.recorded_at!r}")
    raise InvalidBatch(
        f"event {event.event_id}: recorded_at {event.recorded_at} is before {last_at}"
    )


def hashed_row(event: Event, prev_hash: str) -> Row:
    """The event's row, its hash last: ``sha256(prev_hash + canonical(object))``.

    The canonical object (section-6 fields and ``prev_hash``, keys sorted) is assembled
    from the canonical bytes of its values, the same bytes the JSON columns store, so
    each value is encoded once; tests hold it to the protocol's ``json.dumps`` formula.
    """
    actor, cause = _json(event.actor), _json(event.cause)
    detail, before, after = _json(event.detail), _json(event.before), _json(event.after)
    body = _HASHED % (
        _json(event.action), actor, after, _json(event.area), before, event.bid_year,
        cause, detail, event.event_id, _json(event.message_digest), _json(event.message_id),
        _json(prev_hash), _json(event.recorded_at), event.seq,
        b"true" if event.snapshot else b"false",
    )  # fmt: skip
    hash_ = hashlib.sha256(prev_hash.encode("ascii") + body).hexdigest()
    return (
        event.event_id,
        event.seq,
        event.bid_year,
        event.area,
        event.recorded_at,
        event.action,
        actor.decode(),
        cause.decode(),
        event.message_id,
        event.message_digest,
        detail.decode(),
        None if event.before is None else before.decode(),
        None if event.after is None else after.decode(),
        int(event.snapshot),
        SCHEMA_VERSION,
        prev_hash,
        hash_,
    )


def row_hash(row: Row) -> str:
    """The chain hash of a stored row, from its stored texts: the JSON columns hold the
    canonical bytes ``hashed_row`` hashed, so nothing is decoded. For a row bidlog
    wrote this equals ``chain_hash`` of its section-6 object; a row changed behind the
    store's back (even only re-spaced) may differ. Raises if a column has a wrong type."""
    if not (type(row[0]) is type(row[1]) is type(row[2]) is int):  # %d would truncate 3.5
        raise TypeError("an integer column holds something else")
    before = b"null" if row[11] is None else row[11].encode()
    after = b"null" if row[12] is None else row[12].encode()
    body = _HASHED % (
        _json(row[5]), row[6].encode(), after, _json(row[3]), before, row[2],
        row[7].encode(), row[10].encode(), row[0], _json(row[9]), _json(row[8]),
        _json(row[15]), _json(row[4]), row[1], b"true" if row[13] else b"false",
    )  # fmt: skip
    return hashlib.sha256(row[15].encode("ascii") + body).hexdigest()


def event_object(event: Event, prev_hash: str) -> dict[str, Any]:
    """The section-6 object that is hashed: the event's fields plus ``prev_hash``."""
    obj: dict[str, Any] = msgspec.to_builtins(event)
    obj["prev_hash"] = prev_hash
    return obj


def event_row(obj: dict[str, Any], hash_: str) -> Row:
    """The row of a section-6 object (``event_object``) whose hash is already known."""
    return (
        obj["event_id"],
        obj["seq"],
        obj["bid_year"],
        obj["area"],
        obj["recorded_at"],
        obj["action"],
        _json(obj["actor"]).decode(),
        _json(obj["cause"]).decode(),
        obj["message_id"],
        obj["message_digest"],
        _json(obj["detail"]).decode(),
        None if obj["before"] is None else _json(obj["before"]).decode(),
        None if obj["after"] is None else _json(obj["after"]).decode(),
        int(obj["snapshot"]),
        SCHEMA_VERSION,
        obj["prev_hash"],
        hash_,
    )


def snapshot_row(event: Event, state: ScopeState | None) -> Row:
    if state is None:
        raise InvalidBatch(f"snapshot event {event.event_id} comes without its state")
    if state.key != event.scope or state.head_event != event.event_id:
        raise InvalidBatch(f"snapshot of event {event.event_id} is not the state after it")
    return (event.event_id, event.bid_year, event.area, state_text(state))


def state_text(state: ScopeState) -> str:
    """Canonical JSON of ``render(state)`` (msgspec sorts struct fields the same way)."""
    return canonical(state).decode()


def _check_acks(batch: Batch) -> None:
    """An acknowledgement is stored as its event row: it must be exactly that event's."""
    entries = batch.entries
    first = entries[0].event.event_id if entries else 0
    for ack in batch.acks:
        index = ack.event_id - first
        event = entries[index].event if 0 <= index < len(entries) else None
        if event is None:
            raise InvalidBatch(f"ack {ack.message_id!r} names event {ack.event_id}, not in batch")
        stored = (event.message_id, event.message_digest, event.seq, event.recorded_at)
        if stored != (ack.message_id, ack.digest, ack.seq, ack.recorded_at):
            raise InvalidBatch(f"ack {ack.message_id!r} does not match event {ack.event_id}")


def _nullable_json(text: str | None) -> Any:
    return None if text is None else _decode_json.decode(text)


def event_dict(row: Sequence[Any]) -> dict[str, Any]:
    """A stored event (``EVENT_COLUMNS`` order) as its section-6 object, ``hash`` included."""
    return {
        "event_id": row[0],
        "seq": row[1],
        "bid_year": row[2],
        "area": row[3],
        "recorded_at": row[4],
        "action": row[5],
        "actor": _decode_json.decode(row[6]),
        "cause": _decode_json.decode(row[7]),
        "message_id": row[8],
        "message_digest": row[9],
        "detail": _decode_json.decode(row[10]),
        "before": _nullable_json(row[11]),
        "after": _nullable_json(row[12]),
        "snapshot": bool(row[13]),
        "prev_hash": row[15],
        "hash": row[16],
    }


def row_event(row: Sequence[Any]) -> Event:
    """A stored event (``EVENT_COLUMNS`` order) as the domain's ``Event``."""
    return Event(
        event_id=row[0],
        seq=row[1],
        bid_year=row[2],
        area=row[3],
        recorded_at=row[4],
        action=row[5],
        actor=_decode_actor.decode(row[6]),
        cause=_decode_cause.decode(row[7]),
        message_id=row[8],
        message_digest=row[9],
        detail=_decode_json.decode(row[10]),
        before=_nullable_json(row[11]),
        after=_nullable_json(row[12]),
        snapshot=bool(row[13]),
    )


def decode_state(text: str) -> ScopeState:
    return _decode_state.decode(text)


def decode_rendered(text: str) -> dict[str, Any]:
    """A stored snapshot as ``render(state)`` builtins, without building the structs."""
    value: dict[str, Any] = _decode_json.decode(text)
    return value
