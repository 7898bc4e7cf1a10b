"""Clocks for ``recorded_at``: the system's, and a fixed one for tests and replays."""

from __future__ import annotations

import datetime as dt


class SystemClock:
    """The machine's UTC time."""

    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC)


class FixedClock:
    """A clock that returns ``start`` and moves only when told (``advance``)."""

    def __init__(self, start: dt.datetime) -> None:
        self.moment = start

    def now(self) -> dt.datetime:
        return self.moment

    def advance(self, seconds: float) -> None:
        self.moment += dt.timedelta(seconds=seconds)
