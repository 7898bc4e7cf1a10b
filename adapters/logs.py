"""Structured log lines on stderr (stdout carries replies only)."""

from __future__ import annotations

import datetime as dt
import logging
import sys
from typing import Any

import msgspec

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message"}
_encoder = msgspec.json.Encoder()


class JsonLines(logging.Formatter):
    """One JSON object per line: time, level, logger, message, then ``fields`` (the same
    on every line) and any ``extra`` fields."""

    def __init__(self, **fields: Any) -> None:
        super().__init__()
        self.fields = fields

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **self.fields,
        }
        line.update((k, v) for k, v in record.__dict__.items() if k not in _STANDARD)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return _encoder.encode(line).decode()


def setup(level: str = "info", **fields: Any) -> None:
    """Send every ``bidlog.*`` log record to stderr as JSON lines, with ``fields``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines(**fields))
    root = logging.getLogger("bidlog")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
