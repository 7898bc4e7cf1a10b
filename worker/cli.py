"""``bidlog``: argument parsing, then ``anyio.run`` on the asyncio backend (aiosqlite).

Exit status: 0 success, 1 fatal error (database cannot be opened, integrity failure,
nothing found), 2 bad usage.
"""

from __future__ import annotations

import argparse
import datetime as dt
import errno
import logging
import math
import os
import re
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import anyio

from adapters import codec, logs
from adapters.transports import StdioStream, TransportError, UnixListener, bind_unix
from domain.commands import AREA_PATTERN, MAX_INT, parse_time
from domain.errors import DomainError
from domain.state import render
from worker import tools
from worker.bootstrap import FatalError, open_store, serving
from worker.pipeline import Worker

log = logging.getLogger("bidlog")
Handler = Callable[[argparse.Namespace], Awaitable[int]]
AREA = re.compile(AREA_PATTERN)
_DECIMAL = re.compile(r"-?[0-9]+")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bidlog`` console script."""
    args = build_parser().parse_args(argv)
    logs.setup(args.log_level)
    handler: Handler = args.handler
    try:
        return anyio.run(handler, args, backend="asyncio")
    except FatalError as exc:
        tools.say(str(exc))
        return 1
    except BrokenPipeError:
        return tools.output_closed(args.command)
    except OSError as exc:  # e.g. stdout on a full disk: one line, not a traceback
        tools.say(f"{args.command}: {exc.strerror or exc}")
        return 1
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bidlog", description="Audited, rollback-capable leave-bidding ledger."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _common_options()
    serve = sub.add_parser(
        "serve", parents=[common], help="apply NDJSON messages from stdin or a Unix socket"
    )
    serve.add_argument(
        "--socket",
        type=tools.path_argument,
        metavar="PATH",
        help="serve a Unix stream socket (mode 0600)",
    )
    serve.add_argument(
        "--writer",
        choices=("process", "thread"),
        default="process",
        help="where commits run: a writer process, overlapping the next batch's "
        "decisions (default), or a thread of this process",
    )
    serve.set_defaults(handler=run_serve)
    state = sub.add_parser("state", parents=[common], help="print a scope's state as JSON")
    _scope_options(state)
    point = state.add_mutually_exclusive_group()
    point.add_argument("--at-event", type=_natural, metavar="N", help="as of global event N")
    point.add_argument("--at-time", type=_timestamp, metavar="T", help="as of RFC 3339 time T")
    state.set_defaults(handler=run_state)
    timeline = sub.add_parser("timeline", parents=[common], help="print a scope's events as NDJSON")
    _scope_options(timeline)
    timeline.add_argument("--after-event", type=_natural, default=0, metavar="N")
    timeline.set_defaults(handler=run_timeline)
    tools.add_commands(sub, common)  # replay, export, import, verify, backup
    return parser


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--db",
        type=tools.db_argument,
        default=Path(os.environ.get("BIDLOG_DB") or "bidlog.sqlite3"),
        help="database file (default: $BIDLOG_DB, else ./bidlog.sqlite3)",
    )
    common.add_argument(
        "--checkpoint-every",
        type=_natural,
        default=1000,
        metavar="N",
        help="automatic snapshot after N events of a scope (0 = off; default 1000)",
    )
    common.add_argument(
        "--synchronous",
        choices=("full", "normal"),
        default="full",
        help="SQLite synchronous level (default full: acknowledged means on disk)",
    )
    common.add_argument(
        "--log-level", choices=("debug", "info", "warning", "error"), default="info"
    )
    return common


def _scope_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bid-year", type=_bid_year, required=True, metavar="Y")
    parser.add_argument("--area", type=_area, required=True, metavar="A")


def _integer(text: str) -> int:
    """Plain decimal digits only: ``int`` would also take ``2_026``, spaces and other
    scripts' digits, which no operator means."""
    if _DECIMAL.fullmatch(text) is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number in decimal digits")
    return int(text)


def _natural(text: str) -> int:
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    if value > MAX_INT:
        raise argparse.ArgumentTypeError(f"{text} is larger than any event id ({MAX_INT})")
    return value


def _area(text: str) -> str:
    if AREA.fullmatch(text) is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an area name (letters, digits, space, _ or -; 1-32, "
            "starting with a letter or digit)"
        )
    return text


def _bid_year(text: str) -> int:
    value = _integer(text)
    if not 2000 <= value <= 2100:
        raise argparse.ArgumentTypeError(f"{text} is not a bid year (2000-2100)")
    return value


def _timestamp(text: str) -> dt.datetime:
    """As the protocol's ``at_time`` (``domain.commands.parse_time``)."""
    try:
        return parse_time(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not an RFC 3339 time with a time zone (2026-07-01T12:00:00Z): {text}"
        ) from None


async def run_serve(args: argparse.Namespace) -> int:
    # Signals are taken from here on: one that comes while the worker starts (opening the
    # database, recovering, starting its writer process) stops it once it has started,
    # cleanly, instead of killing it half-way.
    with anyio.open_signal_receiver(*_STOP_SIGNALS) as signals:
        return await _serve(args, signals)


async def _serve(args: argparse.Namespace, signals: AsyncIterator[signal.Signals]) -> int:
    if not args.socket:
        async with serving(tools.settings_of(args)) as worker:
            await _until_done(worker, worker.serve(StdioStream(), one_peer=False), signals)
        if worker.dropped:  # everything read was committed, but not every reply written
            print(
                "bidlog: not every reply was written (stdout closed, or took none for too "
                "long; see the log); every line read was committed",
                file=sys.stderr,
            )
            return 1
        return 0
    # Bind before opening the database: a live socket means another worker is serving,
    # and the process umask is narrowed only while nothing else creates files.
    listener = await _bind(args.socket)
    async with listener, serving(tools.settings_of(args)) as worker:
        log.info("listening", extra={"socket": args.socket})
        await _until_done(worker, _accept(listener, worker), signals)
    return 0


async def _until_done(
    worker: Worker, serving: Awaitable[None], signals: AsyncIterator[signal.Signals]
) -> None:
    """Run ``serving``; SIGINT or SIGTERM stop the worker's readers (what was read is
    still committed and answered)."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(_stop_on_signal, worker, signals)
        await serving
        tg.cancel_scope.cancel()


async def _bind(path: str) -> UnixListener:
    try:
        return await bind_unix(path)
    except (TransportError, OSError) as exc:
        raise FatalError(f"cannot listen on {path}: {exc}") from exc


# accept() errors that pass: out of file descriptors or memory, a peer gone before it
# was accepted. The worker waits a little and accepts again; connected clients go on.
_PASSING = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED}
ACCEPT_BACKOFF = 0.1


async def _accept(listener: UnixListener, worker: Worker) -> None:
    async with anyio.create_task_group() as tg:
        tg.start_soon(_accept_forever, listener, worker)
        await worker.stopped.wait()
        tg.cancel_scope.cancel()


async def _accept_forever(listener: UnixListener, worker: Worker) -> None:
    warned = -math.inf  # one warning per 10 s while it lasts, not one per retry
    while True:
        try:
            stream = await listener.accept()
        except anyio.BrokenResourceError as exc:
            cause = exc.__cause__
            if not isinstance(cause, OSError) or cause.errno not in _PASSING:
                raise
            if anyio.current_time() - warned >= 10:
                warned = anyio.current_time()
                log.warning(
                    "cannot accept a connection now (%s); retrying every %g s",
                    cause.strerror,
                    ACCEPT_BACKOFF,
                )
            await anyio.sleep(ACCEPT_BACKOFF)
            continue
        # Connections live in the worker's task group: cancelling the accept loop
        # must not cut off replies still owed to connected clients.
        worker.task_group.start_soon(worker.serve, stream)


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


async def _stop_on_signal(worker: Worker, signals: AsyncIterator[signal.Signals]) -> None:
    async for signum in signals:
        log.info("stopping on %s", signal.Signals(signum).name)
        worker.stop_reading()
        return


async def run_state(args: argparse.Namespace) -> int:
    store = await open_store(tools.settings_of(args), writer=False)
    try:
        key = (args.bid_year, args.area)
        if args.at_event is None and args.at_time is None:
            state = await store.state_at(key)
        else:
            state = await store.state_at(key, at_event=args.at_event, at_time=args.at_time)
    except DomainError as exc:
        print(f"bidlog: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    except sqlite3.Error as exc:  # a damaged file, or the disk failing under it
        return _unreadable(args.db, exc)
    finally:
        await store.close()
    if state is None:
        now = args.at_event is None and args.at_time is None
        what = "does not exist" if now else "had no event by then"
        print(f"bidlog: area {args.bid_year}/{args.area} {what}", file=sys.stderr)
        return 1
    try:
        tools.write_out(codec.encode_json_line(render(state)))
    except BrokenPipeError:
        return tools.output_closed("state")
    return 0


async def run_timeline(args: argparse.Namespace) -> int:
    store = await open_store(tools.settings_of(args), writer=False)
    try:
        after: int | None = args.after_event
        while after is not None:
            page = await store.timeline((args.bid_year, args.area), after_event=after)
            if page is None:
                print(f"bidlog: area {args.bid_year}/{args.area} never existed", file=sys.stderr)
                return 1
            events, after = page
            tools.write_out(b"".join(codec.encode_json_line(e) for e in events))
    except BrokenPipeError:
        return tools.output_closed("timeline")
    except DomainError as exc:
        print(f"bidlog: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    except sqlite3.Error as exc:
        return _unreadable(args.db, exc)
    finally:
        await store.close()
    return 0


def _unreadable(db: Path, exc: sqlite3.Error) -> int:
    print(f"bidlog: cannot read {db}: {exc}; run `bidlog verify`", file=sys.stderr)
    return 1
