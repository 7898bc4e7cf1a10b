"""A progress line on stderr for long operator commands (``verify``, ``export``,
``import``, ``backup``), rewritten in place while stderr is a terminal; silent otherwise,
so logs and pipes get only the final result. ``replay`` has its own line, counting
replies (``worker.replay``)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

CLEAR = "\r\x1b[K"  # back to the start of the line, and erase it


class Progress:
    """``show`` at most every ``every`` seconds; ``close`` (or leaving its ``with``)
    erases the line it drew, before the command prints its result.

    Calls may come from a worker thread (import and backup run on one), never from two
    threads at once: the command's thread shows, then the event loop's thread closes.
    """

    def __init__(
        self,
        command: str,
        out: TextIO | None,
        *,
        every: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.command = command
        self.out = out
        self.every = every
        self.clock = clock
        self.phase = ""
        self.since = self.shown_at = clock()  # the phase's first call
        self.base = 0  # ``done`` then: the rate counts from there
        self.base_fraction = 0.0
        self.drawn = False  # a line is on the terminal now
        self.shown = False  # a line was drawn at some point

    @classmethod
    def on_terminal(cls, command: str) -> Progress:
        """Drawing on stderr if it is a terminal, else doing nothing."""
        return cls(command, sys.stderr if _is_terminal(sys.stderr) else None)

    def show(
        self,
        phase: str,
        done: int,
        total: int | None = None,
        *,
        noun: str = "events",
        fraction: float | None = None,
    ) -> None:
        """E.g. ``verify: checking 120,000 of 501,107 events, 45,210/s, 24%, ETA 8 s``.

        ``fraction`` is how much is done when ``total`` does not say (a file's bytes
        read, where ``done`` counts its lines); the rate and the ETA are the phase's own.
        The first call draws at once: the operator sees that long work began (a short
        one erases it before anyone could read it). So does a phase with nothing counted
        yet (``backup: copying``): it may be one long step. A later phase is first drawn
        ``every`` after it began. The rate and the ETA count from a phase's first call
        (a verify's first chunk comes after SQLite's check of the whole file).
        """
        if self.out is None:
            return
        now = self.clock()
        if phase != self.phase:
            self.since, self.base, self.base_fraction = now, done, fraction or 0.0
            if self.phase:
                self.shown_at = now
            self.phase = phase
            if not done and total is None:
                self._write(f"{CLEAR}{self.command}: {phase}")
                return
        if now - self.shown_at < self.every and self.shown:
            return
        self.shown_at = now
        seconds = now - self.since
        text = f"{self.command}: {phase} {done:,}"
        if total is not None:
            text += f" of {total:,}"
            fraction = min(done / total, 1.0) if total else None
        text += f" {noun}"
        eta = None
        if seconds >= self.every:  # a rate over less time would mislead
            rate = (done - self.base) / seconds
            text += f", {rate:,.0f}/s"
            if total is not None and rate > 0:
                eta = (total - done) / rate
            elif fraction and fraction > self.base_fraction:
                eta = seconds * (1 - fraction) / (fraction - self.base_fraction)
        if fraction is not None:
            text += f", {fraction:.0%}"
        if eta is not None:
            text += f", ETA {eta:,.0f} s"
        self._write(CLEAR + text)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self.drawn:
            self._write(CLEAR)

    def _write(self, text: str) -> None:
        """Draw ``text``; never raises: a progress line is not worth failing the work
        for (``close`` runs on the way out of any error, and after work that succeeded)."""
        out = self.out
        if out is None:
            return
        try:
            out.write(text)
            out.flush()
            self.drawn = text != CLEAR
            self.shown = self.shown or self.drawn
        except (OSError, ValueError):  # the terminal is gone (a hangup): stop drawing
            self.out, self.drawn = None, False


def _is_terminal(out: TextIO) -> bool:
    try:
        return out.isatty()
    except (OSError, ValueError):
        return False
