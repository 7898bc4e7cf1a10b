"""The progress line of the long operator commands, on a fake terminal and clock."""

from __future__ import annotations

import io

from worker.progress import CLEAR, Progress


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def drawn(out: io.StringIO) -> list[str]:
    """The lines drawn, in order ('' for an erase)."""
    return out.getvalue().split(CLEAR)[1:]


def test_first_call_draws_at_once_then_every_quarter_second_with_rate_and_eta() -> None:
    out, clock = io.StringIO(), Clock()
    progress = Progress("verify", out, clock=clock)
    clock.now += 3  # SQLite's check of the file: not in the rate
    progress.show("checking", 2_000, 10_000)
    clock.now += 0.1
    progress.show("checking", 2_500, 10_000)  # too soon: not drawn
    clock.now += 0.15
    progress.show("checking", 3_000, 10_000)
    clock.now += 0.75
    progress.show("checking", 6_000, 10_000)
    assert drawn(out) == [
        "verify: checking 2,000 of 10,000 events, 20%",  # no rate over no time
        "verify: checking 3,000 of 10,000 events, 4,000/s, 30%, ETA 2 s",
        "verify: checking 6,000 of 10,000 events, 4,000/s, 60%, ETA 1 s",
    ]
    progress.close()
    assert out.getvalue().endswith(CLEAR) and drawn(out)[-1] == ""
    progress.close()  # twice: nothing more
    assert len(drawn(out)) == 4


def test_a_later_phase_has_its_own_rate_and_a_phase_with_nothing_counted_shows_at_once() -> None:
    out, clock = io.StringIO(), Clock()
    with Progress("import", out, clock=clock) as progress:
        progress.show("reading", 1_024, noun="lines", fraction=0.01)
        clock.now += 1
        progress.show("reading", 11_024, noun="lines", fraction=0.5)
        progress.show("checking", 2_000, 20_000)  # new phase: first drawn a while later
        clock.now += 0.5
        progress.show("checking", 12_000, 20_000)
        progress.show("copying", 0)
    assert drawn(out) == [
        "import: reading 1,024 lines, 1%",
        "import: reading 11,024 lines, 10,000/s, 50%, ETA 1 s",
        "import: checking 12,000 of 20,000 events, 20,000/s, 60%, ETA 0 s",
        "import: copying",
        "",
    ]


def test_nothing_is_drawn_off_a_terminal_or_after_the_terminal_went_away() -> None:
    progress = Progress("export", None)
    progress.show("writing", 1, 2)
    progress.close()  # no error, nothing to write to

    class Gone(io.StringIO):
        def write(self, text: str) -> int:
            raise OSError(5, "Input/output error")

    gone = Progress("export", Gone())
    gone.show("writing", 1, 2)  # a hung-up terminal: no error, and no more tries
    assert gone.out is None
    gone.close()

    class GoesAway(io.StringIO):
        def write(self, text: str) -> int:
            if self.getvalue():
                raise OSError(5, "Input/output error")
            return super().write(text)

    # Gone after a line was drawn: closing must not fail the command that succeeded
    # (an AssertionError did, after an import had published its database: review).
    with Progress("import", GoesAway()) as later:
        later.show("reading", 1_024, noun="lines")
        later.show("checking", 2_000, 4_000)
        assert later.drawn and later.out is not None
        later.every = 0
        later.show("checking", 4_000, 4_000)
        assert later.out is None and not later.drawn
