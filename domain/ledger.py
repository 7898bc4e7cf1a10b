"""All scopes' current states, and drafts that apply commands to a working copy.

The worker decides a batch of commands against a ``Draft``; only after the batch commits
does ``Ledger.commit`` make the draft current. A discarded draft changes nothing, which
is how a failed commit leaves in-memory state as it was.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TypeVar

from domain.commands import Command, RegisterUser, Rollback, SubmitBid, WithdrawBid
from domain.decide import Context, decide
from domain.evolve import auto_checkpoint, evolve
from domain.records import Entry, Recovered
from domain.state import ScopeKey, ScopeState, User
from domain.working import Working, thaw


def format_timestamp(moment: dt.datetime) -> str:
    """RFC 3339 in UTC with microseconds and ``Z``.

    Every command is stamped. ``isoformat`` goes through C's printf: about 15,000 machine
    instructions a call. Keeping the text up to the minute, once per minute, and adding
    seconds and microseconds from a table and ``str`` takes about 6,000.
    """
    if moment.tzinfo is not dt.UTC:
        moment = moment.astimezone(dt.UTC)
    minute = (moment.year, moment.month, moment.day, moment.hour, moment.minute)
    prefix = _MINUTES.get(minute)
    if prefix is None:
        if len(_MINUTES) >= 1000:
            _MINUTES.clear()
        year, month, day, hour, minutes = minute
        prefix = _MINUTES[minute] = f"{year:04d}-{month:02d}-{day:02d}T{hour:02d}:{minutes:02d}:"
    return prefix + _SECONDS[moment.second] + str(1_000_000 + moment.microsecond)[1:] + "Z"


K = TypeVar("K")
V = TypeVar("V")
_MINUTES: dict[tuple[int, int, int, int, int], str] = {}
_SECONDS = [f"{second:02d}." for second in range(60)]
_BIDS = (SubmitBid, WithdrawBid)  # decided on a scope kept mutable (domain.working)
_NO_INITIALS: Mapping[str, str] = MappingProxyType({})  # one, read-only, for most commands


class Ledger:
    """The committed state of every scope, plus what the next event gets."""

    def __init__(self, recovered: Recovered | None = None, *, checkpoint_every: int = 1000):
        found = recovered or Recovered()
        self.scopes: dict[ScopeKey, ScopeState] = dict(found.scopes)
        self.since_snapshot: dict[ScopeKey, int] = dict(found.since_snapshot)
        self.head_event = found.head_event
        self.last_recorded_at = found.last_recorded_at
        self.checkpoint_every = checkpoint_every

    def state(self, key: ScopeKey) -> ScopeState | None:
        return self.scopes.get(key)

    def draft(self) -> Draft:
        return Draft(self)

    def commit(self, draft: Draft) -> Undo:
        """Make ``draft`` current: after its batch is durably committed, or while a
        writer commits it, keeping what ``undo`` needs to put things back if that fails.
        Drafts begun after this one build on it, so undo those first (or discard them)."""
        undo = Undo(
            {key: self.scopes.get(key) for key in draft.scopes},
            {key: self.since_snapshot.get(key) for key in draft.since_snapshot},
            self.head_event,
            self.last_recorded_at,
        )
        for key, found in draft.scopes.items():
            if isinstance(found, Working):
                found = draft.scopes[key] = found.freeze()
            self.scopes[key] = found
        self.since_snapshot.update(draft.since_snapshot)
        self.head_event = draft.head_event
        self.last_recorded_at = draft.last_recorded_at
        return undo

    def undo(self, undo: Undo) -> None:
        """Put back what the ``commit`` that returned ``undo`` changed (its batch failed)."""
        _restore(self.scopes, undo.scopes)
        _restore(self.since_snapshot, undo.since_snapshot)
        self.head_event = undo.head_event
        self.last_recorded_at = undo.last_recorded_at


@dataclass(frozen=True)
class Undo:
    """What one ``Ledger.commit`` replaced: None for what did not exist before it."""

    scopes: dict[ScopeKey, ScopeState | None]
    since_snapshot: dict[ScopeKey, int | None]
    head_event: int
    last_recorded_at: str


def _restore(values: dict[K, V], previous: Mapping[K, V | None]) -> None:
    for key, value in previous.items():
        if value is None:
            values.pop(key, None)
        else:
            values[key] = value


class Draft:
    """A working copy over a ledger: the changes of a batch not yet committed.

    A scope that receives bids is kept as a ``Working`` (changed in place) until the
    draft is committed or another kind of command comes for it (see ``domain.working``).
    """

    def __init__(self, ledger: Ledger):
        self.ledger = ledger
        self.scopes: dict[ScopeKey, ScopeState | Working] = {}
        self.since_snapshot: dict[ScopeKey, int] = {}
        self.head_event = ledger.head_event
        self.last_recorded_at = ledger.last_recorded_at
        self.entries: list[Entry] = []
        self._now: dt.datetime | None = None
        self._stamp = ""

    def state(self, key: ScopeKey) -> ScopeState | None:
        found = self._current(key)
        return found.peek() if isinstance(found, Working) else found

    def _current(self, key: ScopeKey) -> ScopeState | Working | None:
        found = self.scopes.get(key)
        return found if found is not None else self.ledger.scopes.get(key)

    def apply(
        self,
        command: Command,
        *,
        now: dt.datetime,
        digest: str | None = None,
        rollback_target: ScopeState | None = None,
    ) -> list[Entry]:
        """Decide ``command`` against the draft; raise DomainError and change nothing,
        or record and return its entry (and an automatic checkpoint's, when one is due)."""
        key = (command.bid_year, command.area)
        current = self._current(key)
        if type(command) in _BIDS:
            if type(current) is ScopeState:
                current = self.scopes[key] = thaw(current)  # the same state, kept mutable
        elif isinstance(current, Working):
            current = self.scopes[key] = current.freeze()
        if now is not self._now:  # a batch's commands usually share one reading of the clock
            self._now, self._stamp = now, format_timestamp(now)
        recorded_at = max(self._stamp, self.last_recorded_at)
        context = Context(
            event_id=self.head_event + 1,
            recorded_at=recorded_at,
            message_digest=digest,
            other_initials=self._other_initials(command),
            rollback_target=rollback_target,
        )
        event = decide(current, command, context)
        after: ScopeState | Working
        if isinstance(current, Working):
            current.put_bid(event)
            after, entry = current, Entry(event, None)
        else:
            after = evolve(current, event)
            entry = Entry(event, after)
        since = self._record(key, entry, after)
        every = self.ledger.checkpoint_every
        if not 0 < every <= since:
            return [entry]
        state = after.freeze() if isinstance(after, Working) else after
        auto = auto_checkpoint(state, event_id=event.event_id + 1, recorded_at=recorded_at)
        checkpointed = evolve(state, auto)
        checkpoint = Entry(auto, checkpointed)
        self._record(key, checkpoint, checkpointed)
        return [entry, checkpoint]

    def _record(self, key: ScopeKey, entry: Entry, state: ScopeState | Working) -> int:
        """Add ``entry`` (an event of scope ``key``, which is now ``state``); return the
        scope's events since its last snapshot."""
        event = entry.event
        self.scopes[key] = state
        if event.snapshot:
            since = 0
        else:
            since = self.since_snapshot.get(key, self.ledger.since_snapshot.get(key, 0)) + 1
        self.since_snapshot[key] = since
        self.head_event = event.event_id
        self.last_recorded_at = event.recorded_at
        self.entries.append(entry)
        return since

    def _other_initials(self, command: Command) -> Mapping[str, str]:
        if not isinstance(command, (RegisterUser, Rollback)):
            return _NO_INITIALS
        return {
            user.initials: area
            for (year, area) in self._keys()
            if year == command.bid_year and area != command.area
            for user in self._users(year, area)
        }

    def _keys(self) -> set[ScopeKey]:
        return set(self.ledger.scopes) | set(self.scopes)

    def _users(self, year: int, area: str) -> tuple[User, ...]:
        state = self._current((year, area))
        return state.users if state is not None else ()
