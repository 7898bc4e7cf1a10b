"""Days of bids as ISO text and back, memoized in both directions (pure).

Events carry days as ``YYYY-MM-DD`` text; states hold ``datetime.date``. Both
directions run for every bid: ``decide`` writes the text, ``evolve`` reads it back.
``date.isoformat`` goes through C's printf (close to 3,000 machine instructions a day)
and ``msgspec.convert`` builds its date parser per call, against about 100 for a dict
lookup; bids name days of a few years, so one bounded table serves both ways.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

_TEXT: dict[dt.date, str] = {}
_DAY: dict[str, dt.date] = {}
_MAX = 10_000  # 27 years of days


def iso(days: Iterable[dt.date]) -> list[str]:
    """``days`` as ISO text, in the same order."""
    out = []
    for day in days:
        text = _TEXT.get(day)
        if text is None:
            text = remember(day)
        out.append(text)
    return out


def known(texts: object) -> tuple[dt.date, ...] | None:
    """The days of ``texts`` if it is a list of texts that ``iso`` produced, else None
    (the caller then parses and validates it the slow way)."""
    if type(texts) is not list:
        return None
    try:  # only texts are keys: anything else is missing (KeyError) or unhashable
        return tuple([_DAY[text] for text in texts])
    except (KeyError, TypeError):
        return None


def remember(day: dt.date) -> str:
    """Add ``day`` to the table; return its text."""
    if len(_TEXT) >= _MAX:
        forget()
    text = _TEXT[day] = day.isoformat()
    _DAY[text] = day
    return text


def forget() -> None:
    _TEXT.clear()
    _DAY.clear()
