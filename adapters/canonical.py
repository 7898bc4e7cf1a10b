"""Canonical JSON (PROTOCOL section 6) and the digests built on it.

``canonical(x)`` equals ``json.dumps(x, sort_keys=True, separators=(",", ":"),
ensure_ascii=False).encode()`` for JSON values; msgspec produces the same bytes faster.
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec

ZERO_HASH = "0" * 64
_encoder = msgspec.json.Encoder(order="sorted")


def canonical(value: Any) -> bytes:
    """Keys sorted, no whitespace, UTF-8, non-ASCII unescaped."""
    return _encoder.encode(value)


def digest(value: Any) -> str:
    """SHA-256 hex of the canonical encoding (a message's ``message_digest``)."""
    return hashlib.sha256(_encoder.encode(value)).hexdigest()


def chain_hash(prev_hash: str, event_without_hash: Any) -> str:
    """``sha256(prev_hash + canonical(event without "hash"))`` in hex."""
    h = hashlib.sha256(prev_hash.encode("ascii"))
    h.update(_encoder.encode(event_without_hash))
    return h.hexdigest()
