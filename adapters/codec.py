"""The wire codec: one NDJSON line in, one typed message out; replies and NDJSON lines back.

Decoding tries the typed decoder first (the fast path for good messages). Only when that
fails is the line looked at again, shallowly, to tell the protocol's error codes apart and
to echo the message id when it is usable (PROTOCOL sections 3, 4 and 8).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from typing import Any

import msgspec

from adapters.canonical import canonical
from domain.commands import (
    AREA_PATTERN,
    INITIALS_PATTERN,
    MESSAGE_TYPES,
    RFC3339_PATTERN,
    AnyMessage,
    BaseCommand,
    MessageId,
)

__all__ = [
    "DecodeFailure",
    "Decoded",
    "ack_reply",
    "decode",
    "encode_json_line",
    "error_path",
    "error_reply",
    "result_reply",
]

_decoder = msgspec.json.Decoder(AnyMessage)
# Top-level keys with their values left undecoded: enough to find `id` and `type`.
_envelope_decoder = msgspec.json.Decoder(dict[str, msgspec.Raw])
_id_decoder = msgspec.json.Decoder(MessageId)
_str_decoder = msgspec.json.Decoder(str)
_encoder = msgspec.json.Encoder()

# msgspec ends most ValidationError messages with " - at `$.x[0].y`"; struct field names are
# identifiers, so a path is `$` followed by `.name` and `[index]` parts only.
_AT_PATH = re.compile(r" - at `(\$(?:\.\w+|\[\d+\])*)`\Z")
_UNKNOWN_FIELD = "Object contains unknown field `"
_MISSING_FIELD = "Object missing required field `"


class Decoded(msgspec.Struct, frozen=True):
    """A decoded message and, for a command, the digest of its body as received."""

    message: AnyMessage
    digest: str | None


class DecodeFailure(Exception):
    """A line is not an acceptable message; answer ``error_reply(message_id, code, ...)``."""

    def __init__(
        self, code: str, message: str, details: dict[str, Any], message_id: str | None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details
        self.message_id = message_id

    def reply(self) -> bytes:
        """The error reply line for this failure."""
        return error_reply(self.message_id, self.code, self.message, self.details)


def decode(line: bytes) -> Decoded:
    """Decode one line (without its newline); raise ``DecodeFailure`` if it is unacceptable."""
    try:
        message = _decoder.decode(line)
    except msgspec.ValidationError as exc:
        raise _classify(line, str(exc)) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise _malformed(exc, line) from None
    except RecursionError:
        raise _too_deep(line) from None
    # A command encodes back to exactly the canonical form of the line (see BaseCommand),
    # but for a repeated key: the decoder keeps its last value and drops the others, so
    # the canonical form has fewer quote characters than the line. Only a \u escape in
    # the line can add one (\u0022 is written back as \"): then look in full. A query
    # (rare, and with defaults its line lacks) is always looked at in full.
    canon = canonical(message) if isinstance(message, BaseCommand) else None
    if canon is None or canon.count(b'"') < line.count(b'"') or b"\\u" in line:
        _refuse_duplicate_keys(line, message.id)
    return Decoded(message, None if canon is None else hashlib.sha256(canon).hexdigest())


class _Object(list[tuple[str, Any]]):
    """A JSON object as its key-value pairs in order, repeated keys kept."""


def duplicate_key(line: bytes) -> str | None:
    """The path of the first key repeated in an object of ``line`` (valid JSON), if any.

    JSON leaves repeated names' meaning open and decoders keep the last value, so a
    message ``{"role": "system", "role": "admin"}`` would act as admin with the claim
    ignored, and its digest would not be of the message as sent: refused instead, as
    unknown fields are."""
    try:
        seen: dict[int, set[str]] = {}  # the keys of each object, by the object's id
        for path, key, owner in _walk(json.loads(line, object_pairs_hook=_Object), "$"):
            if owner is not None:
                keys = seen.setdefault(id(owner), set())
                if key in keys:
                    return path
                keys.add(key)
        return None
    except (ValueError, RecursionError):  # not for here to judge: the decoder does
        return None


def _walk(node: Any, path: str) -> Iterator[tuple[str, Any, _Object | None]]:
    """Depth first, in order: each key of an object as ``(path, key, the object)`` and
    each value that is neither an object nor an array as ``(path, value, None)``."""
    if isinstance(node, _Object):
        for key, value in node:
            child = _child(path, key)
            yield child, key, node
            yield from _walk(value, child)
    elif isinstance(node, list):
        for index, item in enumerate(node):
            yield from _walk(item, f"{path}[{index}]")
    else:
        yield path, node, None


def _refuse_duplicate_keys(line: bytes, message_id: str | None) -> None:
    failure = _duplicated(line, message_id)
    if failure is not None:
        raise failure


def _duplicated(line: bytes, message_id: str | None) -> DecodeFailure | None:
    path = duplicate_key(line)
    if path is None:
        return None
    return DecodeFailure(
        "invalid_message",
        f"a key may appear once in an object: {path} appears twice",
        _at(path),
        None if path == "$.id" else message_id,  # two ids: neither is usable
    )


def _classify(line: bytes, error: str) -> DecodeFailure:
    """Tell apart the ways a well-formed line can fail the schema, most basic first."""
    try:
        line.decode()  # msgspec skips unknown fields' values without checking their UTF-8
    except UnicodeDecodeError as exc:
        return _malformed(exc, line)
    try:
        envelope = _envelope_decoder.decode(line)
    except msgspec.ValidationError:
        return DecodeFailure("invalid_message", "a message must be a JSON object", _at("$"), None)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        return _malformed(exc, line)
    except RecursionError:
        return _too_deep(line)
    message_id = _usable_id(envelope.get("id"))
    repeated = _duplicated(line, message_id)
    if repeated is not None:
        return repeated
    if message_id is None:
        return DecodeFailure(
            "invalid_message", "`id` must be a string of 1 to 128 characters", _at("$.id"), None
        )
    message_type = _string(envelope.get("type"))
    if message_type is None:
        return DecodeFailure(
            "invalid_message", "`type` is missing or not a string", _at("$.type"), message_id
        )
    if message_type not in MESSAGE_TYPES:
        return DecodeFailure(
            "unknown_type",
            f"unknown message type {message_type!r}",
            {"type": message_type},
            message_id,
        )
    return DecodeFailure("invalid_message", _plain(error), _at(error_path(error)), message_id)


def _plain(error: str) -> str:
    """msgspec's message, with a regular expression it quotes said in words."""
    for quoted, words in _PATTERN_WORDS.items():
        if error.startswith(quoted):
            return words + error[len(quoted) :]
    return error


_PATTERN_WORDS = {
    f"Expected `str` matching regex {pattern!r}": words
    for pattern, words in (
        (
            RFC3339_PATTERN,
            "Expected an RFC 3339 time with a time zone, such as `2026-01-01T00:00:00Z`",
        ),
        (
            AREA_PATTERN,
            "Expected an area name: 1-32 of A-Z, a-z, 0-9, space, `_` and `-`, "
            "not starting with a space, `_` or `-`",
        ),
        (INITIALS_PATTERN, "Expected initials: two capital letters A-Z"),
    )
}


def error_path(error: str) -> str:
    """The JSON path a msgspec ``ValidationError`` message names (the field itself for
    unknown and missing fields); ``$`` when it names none."""
    match = _AT_PATH.search(error)
    base, head = (match.group(1), error[: match.start()]) if match else ("$", error)
    for prefix in (_UNKNOWN_FIELD, _MISSING_FIELD):
        if head.startswith(prefix) and head.endswith("`"):
            return _child(base, head[len(prefix) : -1])
    return base


def _child(base: str, name: str) -> str:
    if name.isidentifier():
        return f"{base}.{name}"
    try:
        return f"{base}[{_encoder.encode(name).decode()}]"
    except UnicodeEncodeError:  # a lone surrogate: escaped, as UTF-8 cannot carry it
        return f"{base}[{json.dumps(name)}]"


def _usable_id(raw: msgspec.Raw | None) -> str | None:
    if raw is None:
        return None
    try:
        return _id_decoder.decode(raw)
    except msgspec.ValidationError:
        return None


def _string(raw: msgspec.Raw | None) -> str | None:
    if raw is None:
        return None
    try:
        return _str_decoder.decode(raw)
    except msgspec.ValidationError:
        return None


def _at(path: str) -> dict[str, Any]:
    return {"path": path}


def _malformed(exc: Exception, line: bytes) -> DecodeFailure:
    if isinstance(exc, UnicodeDecodeError):
        return DecodeFailure("malformed_json", f"invalid UTF-8: {exc.reason}", {}, None)
    lone = _lone_surrogate(line)
    if lone is not None:
        return lone
    return DecodeFailure("malformed_json", str(exc), {}, None)


def _lone_surrogate(line: bytes) -> DecodeFailure | None:
    """A ``\\ud800`` escape with no pair is in JSON's grammar, but it is no character and
    UTF-8 cannot carry it; msgspec refuses it with a misleading message ("Input data was
    truncated"). If that is what is wrong with ``line``, say so: the line is JSON, so it
    is a field's value (or key) that is refused, named by its path, and the id is echoed
    when it is usable; else None. Runs only for lines msgspec refused."""
    try:
        value = json.loads(line, parse_constant=_no_constant, object_pairs_hook=_Object)
        path = next((at for at, text, _ in _walk(value, "$") if _is_surrogate(text)), None)
    except ValueError:
        return None
    except RecursionError:  # too deep to look for it: say what can be said
        return _too_deep(line)
    if path is None:
        return None
    message_id = dict(value).get("id") if isinstance(value, _Object) else None
    usable = isinstance(message_id, str) and 1 <= len(message_id) <= 128
    if usable and _is_surrogate(message_id):
        usable = False
    return DecodeFailure(
        "invalid_message",
        "a \\u escape names a lone UTF-16 surrogate, which is not a character",
        _at(path),
        message_id if usable else None,
    )


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _is_surrogate(text: Any) -> bool:
    """``text`` is a string holding a UTF-16 surrogate (no character)."""
    return isinstance(text, str) and any("\ud800" <= c <= "\udfff" for c in text)


def _too_deep(line: bytes) -> DecodeFailure:
    """A line too deep for the decoders: ``malformed_json`` if it is not JSON at all (so
    the fault is told as for any other such line), else too deep, its id echoed. The
    scan runs on the applier's thread, in Python: past ``SCAN_STEPS`` tokens it gives up
    (every other client would wait about 1 s for a 1 MiB line of small ones), and the
    line is too deep, with no id."""
    try:
        line.decode()
        raw = _scan(line)
    except _TooLong:
        return DecodeFailure("invalid_message", "JSON is nested too deeply", _at("$"), None)
    except Exception:  # not JSON; or the scan failed, and nothing it found is trusted
        message = "not JSON (and nested too deeply for a closer look)"
        return DecodeFailure("malformed_json", message, {}, None)
    return DecodeFailure("invalid_message", "JSON is nested too deeply", _at("$"), _id_of(raw))


# A scanner for JSON that does not recurse (the decoders do, and give up on deep lines),
# to find such a line's top-level id. Possessive quantifiers: no backtracking, linear.
_STRING = re.compile(rb'"(?:[^"\\\x00-\x1f]|\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4}))*+"')
_NUMBER = re.compile(rb"-?(?:0|[1-9][0-9]*+)(?:\.[0-9]++)?(?:[eE][+-]?[0-9]++)?")
_OPENERS = re.compile(rb"\[(?:[ \t\r\n]*+\[)*+")  # a run of '[': pushed at once
_CLOSERS = re.compile(rb"\](?:[ \t\r\n]*+\])*+")  # a run of ']': popped at once
_SPACE = re.compile(rb"[ \t\r\n]*+")
_LITERALS = (b"true", b"false", b"null")
_VALUE, _VALUE_OR_END, _KEY, _KEY_OR_END, _COLON, _AFTER = range(6)
_NOT_A_STRING = b"null"  # what a top-level id that is no string is taken as


def _id_of(raw: bytes | None) -> str | None:
    try:
        return None if raw is None else _usable_id(msgspec.Raw(raw))
    except Exception:  # a failure path must not fail: no id is trusted
        return None


class _TooLong(Exception):
    """The scan gave up: more than ``SCAN_STEPS`` tokens."""


SCAN_STEPS = 20_000  # tokens (a run of brackets is one): 10-40 ms


def _scan(line: bytes) -> bytes | None:
    """The raw top-level ``id`` value of ``line``, scanned without recursion (the
    decoders recurse, and give up on deep lines); None if it has none.
    Raises ``ValueError`` if the line is not JSON (checked in full: brackets paired,
    strings, numbers and literals well formed). Like the decoders, the last of repeated
    ``id`` keys counts."""
    stack = bytearray()  # the open brackets
    found: bytes | None = None
    is_id = False  # the value about to come is the top-level id's
    at, end, state = _skip(line, 0), len(line), _VALUE
    if line[at : at + 1] != b"{":
        return None  # no object (the decoders said so already, before any depth)
    for _ in range(SCAN_STEPS):
        at = _skip(line, at)
        if at >= end:
            raise ValueError("the line ends inside a value")
        char = line[at : at + 1]
        if state in (_VALUE, _VALUE_OR_END):
            if char == b"]" and state == _VALUE_OR_END:
                at, state = _close(line, at, stack)
                continue
            top = len(stack) == 1 and is_id  # the top-level id's value starts here
            is_id = False
            if char == b"[":
                run = _OPENERS.match(line, at)
                assert run is not None
                stack += b"[" * run.group().count(b"[")
                at, state = run.end(), _VALUE_OR_END
            elif char == b"{":
                stack += b"{"
                at, state = at + 1, _KEY_OR_END
            else:
                token = _scalar(line, at)
                if token is None:
                    raise ValueError("not a value")
                if top:
                    found = token
                at, state = at + len(token), _AFTER
                continue
            if top:
                found = _NOT_A_STRING
        elif state in (_KEY, _KEY_OR_END):
            if char == b"}" and state == _KEY_OR_END:
                at, state = _close(line, at, stack)
                if not stack:
                    return _at_end(line, at, found)
                continue
            key = _STRING.match(line, at)
            if key is None:
                raise ValueError("not a key")
            is_id = len(stack) == 1 and _is_id_key(key.group())
            at, state = key.end(), _COLON
        elif state == _COLON:
            if char != b":":
                raise ValueError("no ':' after a key")
            at, state = at + 1, _VALUE
        elif char == b",":  # _AFTER a value
            at, state = at + 1, (_VALUE if stack[-1:] == b"[" else _KEY)
        else:
            at, state = _close(line, at, stack)
            if not stack:
                return _at_end(line, at, found)
    raise _TooLong


def _is_id_key(raw: bytes) -> bool:
    try:
        return _str_decoder.decode(raw) == "id"
    except msgspec.DecodeError:  # a lone surrogate escape: JSON, but no "id"
        return False


def _at_end(line: bytes, at: int, found: bytes | None) -> bytes | None:
    if _skip(line, at) != len(line):
        raise ValueError("something after the object")
    return found


def _skip(line: bytes, at: int) -> int:
    match = _SPACE.match(line, at)
    return at if match is None else match.end()


def _scalar(line: bytes, at: int) -> bytes | None:
    match = _STRING.match(line, at) or _NUMBER.match(line, at)
    if match is not None:
        return match.group()
    return next((word for word in _LITERALS if line.startswith(word, at)), None)


def _close(line: bytes, at: int, stack: bytearray) -> tuple[int, int]:
    """Close the bracket(s) at ``at``; raise ``ValueError`` if they do not pair."""
    if line[at : at + 1] == b"}":
        if stack[-1:] != b"{":
            raise ValueError("unpaired }")
        del stack[-1]
        return at + 1, _AFTER
    run = _CLOSERS.match(line, at)
    if run is None:
        raise ValueError("not a value, ',' or closing bracket")
    count = run.group().count(b"]")
    if len(stack) < count or stack[-count:] != b"[" * count:
        raise ValueError("unpaired ]")
    del stack[-count:]
    return run.end(), _AFTER


def ack_reply(
    message_id: str, event_id: int, seq: int, recorded_at: str, *, duplicate: bool = False
) -> bytes:
    """The reply to a committed command (a repeated one when ``duplicate``)."""
    reply: dict[str, Any] = {
        "id": message_id,
        "ok": True,
        "event_id": event_id,
        "seq": seq,
        "recorded_at": recorded_at,
    }
    if duplicate:
        reply["duplicate"] = True
    return encode_json_line(reply)


def result_reply(message_id: str, result: Any) -> bytes:
    """The reply to a query."""
    return encode_json_line({"id": message_id, "ok": True, "result": result})


def error_reply(
    message_id: str | None, code: str, message: str, details: dict[str, Any] | None = None
) -> bytes:
    """The reply to a refused message; ``details`` is always an object."""
    error = {"code": code, "message": message, "details": {} if details is None else details}
    return encode_json_line({"id": message_id, "ok": False, "error": error})


def encode_json_line(obj: Any) -> bytes:
    """``obj`` as one line of UTF-8 JSON, newline included (replies, NDJSON output)."""
    return _encoder.encode(obj) + b"\n"
