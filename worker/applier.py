"""The applier: decode, authorize, decide, commit a batch, and only then reply.

One applier task owns the ledger and is the only writer of the store. A batch of
requests is decided against a draft; the draft's events, snapshots and idempotency
records are appended in one transaction; the ledger moves and the replies go out only
after that commit returns. If it fails, every command of the transaction is answered
``persistence_failed`` and the ledger is left as it was.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import anyio

from adapters import codec
from adapters.transports import TooLarge
from domain import errors
from domain.commands import BaseCommand, BaseQuery, Command, Query, Rollback
from domain.ledger import Draft, Ledger, Undo
from domain.records import Ack, Batch, OutcomeUnknown, StoredAlready
from domain.state import ScopeState
from worker import queries
from worker.ports import Clock, Store

log = logging.getLogger("bidlog.applier")


def _never_full() -> bool:
    return False


@dataclass(eq=False)
class Outbox:
    """Where one connection's replies go: ``send((data, count))`` never blocks (the
    connection's window bounds it); ``count`` is how many replies ``data`` holds.

    ``full()`` says the connection has too many replies unwritten to be sent a large one
    (a query's): its lines then wait (``process`` hands them back) until it takes some.
    """

    send: Callable[[tuple[bytes, int]], None]
    full: Callable[[], bool] = _never_full


@dataclass(eq=False)
class Request:
    """Framed lines from one read of one connection, and where their replies go."""

    frames: list[bytes | TooLarge]
    outbox: Outbox
    size: int = 0  # bytes read for them (for the connection's bound on waiting input)


Item = codec.Decoded | codec.DecodeFailure
_READS_LOG = (BaseQuery, Rollback)
SEND_AT = 128  # lines decided that go to an idle writer at once
# A batch decided while another commits is kept open (more lines join it) while it is
# smaller than the batch in flight, and below these many lines and bytes read; past
# them (also as later reads join it), the applier waits for the commit and sends it.
# It holds its lines until its own commit, as the batch in flight does.
OPEN_LINES = 1024
OPEN_BYTES = 4 << 20


@dataclass(slots=True)
class _Reply:
    outbox: Outbox
    data: bytes
    tentative: bool  # depends on the pending transaction's commit
    message_id: str | None = None


@dataclass(slots=True)
class _Line:
    """A line of the current transaction, kept so that it can be decided again."""

    outbox: Outbox
    item: Item
    target: ScopeState | None = None  # a rollback's target, read from the log
    reply: _Reply | None = None  # answered already (a query): kept as it is


@dataclass
class _Run:
    """The working state of one batch of requests."""

    draft: Draft
    now: dt.datetime  # when the batch is decided: the time of all its events
    # Idempotency records stored, or (after a part of the batch was sent early) being
    # stored: forgotten again if that part turns out not stored as sent (_settled).
    known: dict[str, Ack] = field(default_factory=dict)
    fresh: dict[str, None] = field(default_factory=dict)  # ids decided as new, in order
    pending_acks: dict[str, Ack] = field(default_factory=dict)
    replies: list[_Reply] = field(default_factory=list)
    lines: list[_Line] = field(default_factory=list)  # since the last commit
    size: int = 0  # bytes read for them, about


class Applier:
    """Turns batches of requests into at most a few transactions and ordered replies.

    Commands are decided as if their message ids were new; the transaction that stores
    them first checks that (``Batch.fresh``). If some are stored already, nothing is
    written and the lines are decided again knowing those records, so a repeated
    command gets its original reply. One trip to the store per batch, not two.
    """

    def __init__(
        self, store: Store, ledger: Ledger, clock: Clock, *, send_at: int = SEND_AT
    ) -> None:
        self.store = store
        self.ledger = ledger
        self.clock = clock
        # A store with a writer of its own (a process) commits one batch while the next
        # is decided: the ledger takes that batch's changes as it is sent (undone if
        # its commit fails), and its replies wait in ``_sent`` for the outcome.
        self._writer = store if isinstance(store, Pipelined) else None
        self._sent: _Sent | None = None
        # Decided while ``_sent`` commits, not sent yet: more lines join it (``process``)
        # until that commit is answered (``advance``). Only ever there with ``_sent``.
        self._open: _Run | None = None
        self.sent = anyio.Event()  # set when a batch goes to the writer
        self.send_at = send_at

    def _writer_idle(self, run: _Run) -> bool:
        """Whether to send what ``run`` has decided so far: ``send_at`` lines or more,
        and nothing in flight. The writer then commits them while the rest of the
        batch is decided, and their replies go out sooner: a client whose window is
        about one batch waits for them before it sends more (one client with 500 lines
        in flight: 18,000-21,500 commands/s against 15,900-17,300 sending only at the
        end, alternating runs). Sending early also while a commit is in flight, as
        soon as it is answered, cut batches small and cost throughput with 16 clients.
        """
        return self._writer is not None and self._sent is None and len(run.lines) >= self.send_at

    @property
    def busy(self) -> bool:
        """A batch is being committed (and perhaps another decided meanwhile):
        ``advance()`` answers it, ``settle()`` answers everything."""
        return self._sent is not None

    @property
    def pipelined(self) -> bool:
        """The store commits one batch while the next is decided."""
        return self._writer is not None

    def has_answer(self) -> bool:
        """The batch in flight is answered: ``advance()`` will not wait for it."""
        return self._writer is not None and self._sent is not None and self._writer.has_answer()

    async def answered(self) -> None:
        """Wait for a batch to be sent, then for its answer (for the worker's watcher)."""
        await self.sent.wait()
        self.sent = anyio.Event()
        if self._writer is not None:
            await self._writer.answered()

    async def writer_lost(self) -> None:
        """Raise ``OutcomeUnknown`` when the writer process ends before it is closed
        (never returns otherwise): the worker stops then, not at its next commit."""
        if self._writer is not None:
            raise await self._writer.ended()
        await anyio.sleep_forever()

    async def advance(self) -> None:
        """Wait for the batch being committed and send its replies; then send the batch
        decided meanwhile, if any (it is then the one in flight)."""
        run, self._open = self._open, None
        await self._settled(run)
        if run is not None:
            await self._flush(run, settle=False)

    async def settle(self) -> None:
        """Answer everything: the batch being committed, and the one decided meanwhile."""
        while self.busy:
            await self.advance()

    async def process(
        self, requests: Sequence[Request], *, turn: float = math.inf
    ) -> tuple[list[Request], Outbox | None]:
        """Handle the lines of ``requests`` in order; each gets exactly one reply.

        Reads (queries, rollbacks) can take long: once ``turn`` seconds have passed, the
        batch stops after the read that used them up; and it stops before a read for a
        connection whose outbox is ``full``. Returned: the requests (or the rest of one)
        not handled, for the caller to hand back later, and the outbox of the connection
        that ended the batch (None if none did). With a plain store, everything handled
        is committed and answered before this returns. With a pipelined store the last
        batch may still be in flight (``busy``), and the lines decided while it commits
        may wait, open, to be sent after it: a later call adds its lines to them (up to
        the bounds of ``_keeps_open``), ``advance()`` sends them once the batch in
        flight is answered, ``settle()`` answers everything.
        """
        run, self._open = self._open, None
        joining = run is not None  # lines join an open batch only up to its bounds
        if run is None:
            run = _Run(self.ledger.draft(), self.clock.now())
        else:
            # Its lines from now on take the clock as it is now, not as when it opened:
            # no event's time is earlier than its line's arrival.
            run.now = self.clock.now()
        started = time.monotonic()
        for at, request in enumerate(requests):
            outbox, frames = request.outbox, request.frames
            run.size += request.size
            for i, frame in enumerate(frames):
                item = _decode(frame)
                if isinstance(item, codec.Decoded) and isinstance(item.message, _READS_LOG):
                    joining = False  # what was waiting commits first
                    if outbox.full():  # this line and the rest wait for the reader
                        await self._flush(run, settle=False)
                        return [Request(frames[i:], outbox), *requests[at + 1 :]], outbox
                    await self._handle_read(run, outbox, item)
                    if time.monotonic() - started >= turn:
                        await self._flush(run, settle=False)
                        rest = [Request(frames[i + 1 :], outbox)] if i + 1 < len(frames) else []
                        return rest + list(requests[at + 1 :]), outbox
                else:
                    self._take(run, _Line(outbox, item))
                    if self._writer_idle(run) or (joining and _too_large(run)):
                        # The open batch is as large as it may grow: it waits for the
                        # commit in flight and goes; the rest makes a new batch.
                        joining = False
                        await self._flush(run, settle=False)
        if self._keeps_open(run):
            self._open = run
        else:
            await self._flush(run, settle=False)
        return [], None

    def _keeps_open(self, run: _Run) -> bool:
        """Whether ``run`` waits, open, for the batch in flight (not answered yet) rather
        than the applier waiting for it there: lines that come meanwhile are decided
        into it, where they used to wait for that commit. With 1 or 4 clients keeping
        500 lines in flight each, the worker was 76-77% busy, 84-92% with this, and
        answered 13-14% more commands a second (paired runs; 16 clients and stdin, busy
        already, unchanged).

        Only while it is smaller than the batch in flight: batches then keep their
        size. Left to grow, they merged to half as many again, and a client whose
        window holds about two batches waited longer for each (1 client: -5%).

        A later ``process`` call adds all its lines to it, up to OPEN_LINES lines or
        OPEN_BYTES read (then it waits for the commit and sends it). Stopping it at the
        size of the batch in flight there too made it wait for the commit twice in one
        call: 2% and 4% slower with 1 and 4 clients, where this measured 1% and 2%
        (six pairs each, against no bound; within the noise)."""
        sent = self._sent
        return (
            sent is not None
            and 0 < len(run.lines) < sent.events
            and not _too_large(run)
            and not self.has_answer()
        )

    async def _handle_read(self, run: _Run, outbox: Outbox, item: codec.Decoded) -> None:
        """A query or a rollback: both read the log, so what is waiting commits first."""
        await self._flush(run)
        message = item.message
        try:
            if isinstance(message, Rollback):
                key = (message.bid_year, message.area)
                target = await self.store.event_state(key, message.to_event)
                self._take(run, _Line(outbox, item, target))
                return
            assert isinstance(message, BaseQuery)
            reply = _Reply(outbox, await self._query(message), tentative=False)
        except errors.DomainError as exc:  # the log does not check out (integrity_error)
            log.error("%s refused: %s", message.id, exc.message)
            reply = _Reply(outbox, _error(message.id, exc), tentative=False)
        except Exception:
            log.exception("internal error while handling a message")
            reply = _Reply(outbox, _internal(item), tentative=False)
        self._take(run, _Line(outbox, item, reply=reply))

    async def _query(self, query: Query) -> bytes:
        if query.actor is not None and query.actor.role == "system":
            tag = type(query).__struct_config__.tag
            exc = errors.Unauthorized("role system is reserved", role="system", type=tag)
            return _error(query.id, exc)
        try:
            result = await queries.answer(query, self.ledger, self.store)
        except errors.DomainError as exc:
            return _error(query.id, exc)
        return codec.result_reply(query.id, result)

    def _take(self, run: _Run, line: _Line) -> None:
        run.lines.append(line)
        self._decide(run, line)

    def _decide(self, run: _Run, line: _Line) -> None:
        """Add the line's reply to the run, deciding its command into the draft."""
        item = line.item
        try:
            if line.reply is not None:
                run.replies.append(line.reply)
            elif isinstance(item, codec.DecodeFailure):
                data = codec.error_reply(item.message_id, item.code, item.message, item.details)
                run.replies.append(_Reply(line.outbox, data, tentative=False))
            else:
                command = item.message
                assert isinstance(command, BaseCommand)
                self._command(run, line.outbox, command, item.digest or "", line.target)
        except Exception:
            log.exception("internal error while handling a message")
            run.replies.append(_Reply(line.outbox, _internal(item), tentative=False))

    def _command(
        self, run: _Run, request: Outbox, command: Command, digest: str, target: ScopeState | None
    ) -> None:
        previous = run.known.get(command.id) or run.pending_acks.get(command.id)
        if previous is not None:
            tentative = command.id in run.pending_acks
            data = _repeat(command.id, previous, digest)
            run.replies.append(_Reply(request, data, tentative, command.id))
            return
        run.fresh[command.id] = None  # decided as new: the transaction checks that
        try:
            entries = run.draft.apply(
                command,
                now=run.now,
                digest=digest,
                rollback_target=target,
            )
        except errors.DomainError as exc:
            # Tentative too: the id may turn out to be stored (then this is a repeat).
            run.replies.append(_Reply(request, _error(command.id, exc), True, command.id))
            return
        event = entries[0].event
        ack = Ack(command.id, digest, event.event_id, event.seq, event.recorded_at)
        run.pending_acks[command.id] = ack
        data = codec.ack_reply(command.id, ack.event_id, ack.seq, ack.recorded_at)
        run.replies.append(_Reply(request, data, True, command.id))

    async def _flush(self, run: _Run, *, settle: bool = True) -> None:
        """Commit the run's lines (checking their ids are new), then send their replies.

        With a pipelined store and ``settle`` False, a run with events is only sent: it
        is answered when the next flush (or ``settle()``) has its outcome."""
        if not settle and not run.lines:
            return  # nothing to send: what is in flight can stay so (one sent early)
        await self._settled(run)
        if self._writer is not None and not settle and run.draft.entries:
            await self._send(self._writer, run)
            return
        await self._commit(run)
        self._reset(run)

    async def _commit(self, run: _Run) -> None:
        """Commit the run's lines now, then send their replies."""
        while True:
            fresh = tuple(run.fresh)
            try:
                failed = not await self._store(run, fresh)
            except StoredAlready as stored:
                if stored.acks.keys() <= run.known.keys():  # no progress: never loop
                    log.error("the store repeats known records; the batch is refused")
                    failed = True
                    break
                run.known.update(stored.acks)
                self._decide_again(run)
                continue
            break
        _deliver(run.replies, failed)
        if not failed:
            run.known.update(run.pending_acks)

    def _reset(self, run: _Run) -> None:
        """Begin the run's next transaction."""
        run.replies = []
        run.fresh = {}
        run.pending_acks = {}
        run.lines = []
        run.size = 0
        run.draft = self.ledger.draft()
        run.now = self.clock.now()

    async def _send(self, writer: Pipelined, run: _Run) -> None:
        """Hand the run's batch to the writer and go on: the ledger moves now (undone if
        the commit fails); its replies wait for the outcome."""
        batch = Batch(tuple(run.draft.entries), tuple(run.pending_acks.values()), tuple(run.fresh))
        try:
            await writer.submit(batch)
        except OutcomeUnknown:
            raise
        except Exception as exc:  # it could not be encoded: nothing was sent
            _log_failed(len(batch.entries), exc)
            _deliver(run.replies, failed=True)
            self._reset(run)
            return
        undo = self.ledger.commit(run.draft)
        sent = _Run(
            run.draft, run.now, dict(run.known), run.fresh, run.pending_acks, run.replies, run.lines
        )
        self._sent = _Sent(sent, undo, len(batch.entries), time.perf_counter())
        self.sent.set()
        # The rest of a batch sent early repeats its ids as duplicates; if it turns out
        # not stored, they are forgotten and the rest is decided again (_settled).
        run.known.update(run.pending_acks)
        self._reset(run)

    async def _settled(self, run: _Run | None) -> None:
        """Wait for the batch in flight, if any, and answer it. If it was not committed
        as sent, the ledger goes back and ``run`` (decided after it) is decided again."""
        sent, self._sent = self._sent, None
        if sent is None:
            return
        assert self._writer is not None
        as_sent = True
        sent_ids = tuple(sent.run.pending_acks)  # run.known has them, as if stored
        try:
            await self._writer.outcome()
        except StoredAlready as stored:
            # Nothing written: decide its lines again knowing those records, and commit
            # them now (rare: a re-sent command in the batch).
            as_sent = False
            self.ledger.undo(sent.undo)
            sent.run.known.update(stored.acks)
            self._decide_again(sent.run)
            await self._commit(sent.run)
        except OutcomeUnknown:
            raise
        except Exception as exc:
            as_sent = False
            self.ledger.undo(sent.undo)
            _log_failed(sent.events, exc)
            _deliver(sent.run.replies, failed=True)
        else:
            _deliver(sent.run.replies, failed=False)
            _log_committed(sent.events, sent.started)
        if not as_sent and run is not None:
            # Forget what the batch was sent with (deciding it again replaced its acks),
            # and learn what its outcome taught: stored records, and what it committed.
            for message_id in sent_ids:
                run.known.pop(message_id, None)
            run.known.update(sent.run.known)
            if run.lines:
                self._decide_again(run)

    async def _store(self, run: _Run, fresh: tuple[str, ...]) -> bool:
        """Append the draft (or, with no events, look the ids up); False if that failed."""
        if not run.draft.entries:
            if not fresh:
                return True
            try:
                found = await self.store.acks(fresh)
            except Exception:
                log.exception("idempotency lookup failed; the batch is refused")
                return False
            if found:
                raise StoredAlready(found)
            return True
        batch = Batch(tuple(run.draft.entries), tuple(run.pending_acks.values()), fresh)
        started = time.perf_counter()
        try:
            await self.store.append(batch)
        except (StoredAlready, OutcomeUnknown):
            raise
        except Exception as exc:
            _log_failed(len(batch.entries), exc)
            return False
        self.ledger.commit(run.draft)
        _log_committed(len(batch.entries), started)
        return True

    def _decide_again(self, run: _Run) -> None:
        """Nothing was written: decide the run's lines again, knowing more records."""
        run.draft = self.ledger.draft()
        run.fresh.clear()
        run.pending_acks.clear()
        run.replies.clear()
        for line in run.lines:
            self._decide(run, line)


def _too_large(run: _Run) -> bool:
    """Whether ``run``, decided while a batch commits, is too large to wait open."""
    return len(run.lines) >= OPEN_LINES or run.size >= OPEN_BYTES


@dataclass(slots=True)
class _Sent:
    """A batch the writer is committing: its run (lines, replies) and the ledger's undo."""

    run: _Run
    undo: Undo
    events: int
    started: float


@runtime_checkable
class Pipelined(Protocol):
    """A store whose appends can be waited for later: ``submit`` sends a batch,
    ``outcome`` returns when it is committed or raises as ``Store.append`` does."""

    async def submit(self, batch: Batch) -> None: ...

    def has_answer(self) -> bool: ...

    async def answered(self) -> None: ...

    async def ended(self) -> OutcomeUnknown: ...

    async def outcome(self) -> None: ...


def _log_failed(events: int, exc: Exception) -> None:
    log.error("commit failed; %d events not stored: %s", events, exc, extra={"events": events})


def _log_committed(events: int, started: float) -> None:
    elapsed = round((time.perf_counter() - started) * 1000, 3)
    log.debug("batch committed", extra={"events": events, "commit_ms": elapsed})


def _deliver(replies: list[_Reply], failed: bool) -> None:
    """Send replies in order, one message per run of replies to the same connection."""
    i = 0
    while i < len(replies):
        outbox, start = replies[i].outbox, i
        while i < len(replies) and replies[i].outbox is outbox:
            i += 1
        if failed:
            data = [_final(r, failed) for r in replies[start:i]]
        else:
            data = [r.data for r in replies[start:i]]
        outbox.send((b"".join(data), len(data)))


def _final(reply: _Reply, failed: bool) -> bytes:
    if failed and reply.tentative:
        return _persistence_failed(reply.message_id)
    return reply.data


def _decode(frame: bytes | TooLarge) -> codec.Decoded | codec.DecodeFailure:
    if isinstance(frame, TooLarge):
        return codec.DecodeFailure(
            "message_too_large", "line is longer than 1 MiB; discarded", {}, None
        )
    try:
        return codec.decode(frame)
    except codec.DecodeFailure as failure:
        # Kept until the batch commits: without its traceback, which holds the decoder's
        # frames and so the line (up to 1 MiB) as long as the failure lives.
        return failure.with_traceback(None)
    except Exception:  # a bug in the codec must cost one line its answer, not the worker
        log.exception("internal error while decoding a line")
        return codec.DecodeFailure("internal", "internal error; see the worker's log", {}, None)


def _repeat(message_id: str, previous: Ack, digest: str) -> bytes:
    if previous.digest != digest:
        exc = errors.IdReused(
            f"id {message_id} was already used for a different message",
            event_id=previous.event_id,
        )
        return _error(message_id, exc)
    return codec.ack_reply(
        message_id, previous.event_id, previous.seq, previous.recorded_at, duplicate=True
    )


def _error(message_id: str | None, exc: errors.DomainError) -> bytes:
    return codec.error_reply(message_id, exc.code, exc.message, exc.details)


def _persistence_failed(message_id: str | None) -> bytes:
    exc = errors.PersistenceFailed("the commit failed; nothing was applied; safe to retry")
    return _error(message_id, exc)


def _message_id(item: codec.Decoded | codec.DecodeFailure) -> str | None:
    return item.message.id if isinstance(item, codec.Decoded) else item.message_id


def _internal(item: codec.Decoded | codec.DecodeFailure) -> bytes:
    message = "internal error; see the worker's log"
    return codec.error_reply(_message_id(item), "internal", message, {})
