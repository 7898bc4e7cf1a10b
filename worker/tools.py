"""Operator commands: ``replay``, ``export``, ``import``, ``verify``, ``backup``.

Argument wiring and thin handlers; the work is in ``worker.replay`` and
``adapters.archive``. Every handler returns the exit status: 0 done, 1 failed (with a
one-line ``bidlog: ...`` message on stderr), 2 bad usage.
"""

from __future__ import annotations

import argparse
import os
import signal
import sqlite3
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar

import anyio
import msgspec

from adapters import archive
from adapters.sqlite_schema import StoreError
from domain.errors import DomainError, IntegrityError
from worker.bootstrap import Settings, open_store, serving
from worker.progress import Progress
from worker.replay import Replay, ReplayError, Source, report

T = TypeVar("T")

_REPLAY_HELP = """\
Output: progress on stderr while it is a terminal; at the end a summary of the replies,
as one JSON object on stdout ({"lines": lines answered, "ok", "duplicate", "failed",
"failures": the first 10 with file, line, id, code, message, "unanswered": lines read
from the files that got no reply because the worker went away or stopped; run the same
replay again for them}) and as text on stderr. Duplicates (commands already applied,
e.g. by an interrupted earlier run) are not failures. A second run sends again the lines
the first one saw refused: they are decided afresh, against the ledger as it is then.
Exit status: 0 if no line failed, 1 if any failed or the replay could not finish.
"""


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add the operator commands to the ``bidlog`` subparsers."""
    _add_replay(sub, common)
    export = sub.add_parser(
        "export",
        parents=[common],
        help="write the audit log as NDJSON (reads only)",
        description="Write every event in event_id order as canonical NDJSON, with the "
        "full state on snapshot events: the file alone rebuilds the database. Reads "
        "only; works while a worker serves, and writes the log as it stood when it began. "
        "With --out, progress on stderr while it is a terminal.",
    )
    export.add_argument(
        "--out",
        type=file_argument,
        metavar="FILE",
        help="write FILE (atomically) instead of stdout ('-' is stdout)",
    )
    export.set_defaults(handler=run_export)
    restore = sub.add_parser(
        "import",
        parents=[common],
        help="rebuild a new database from an export",
        description="Rebuild a new database (--db, which must not exist or be empty) from "
        "an export file, keeping ids, times and hashes. Every line's hash chain and every "
        "snapshot (recomputed by replay) is checked; a bad line is refused, naming it, "
        "and no database is left behind. Prints {events, snapshots} on stdout; progress "
        "on stderr while it is a terminal.",
    )
    restore.add_argument("file", metavar="FILE", help="the export file ('-' for stdin)")
    restore.set_defaults(handler=run_import)
    verify = sub.add_parser(
        "verify",
        parents=[common],
        help="check the hash chain and every snapshot",
        description="Check the hash chain end to end and every snapshot by replay. Prints "
        '{"events": n, "snapshots": m} and exits 0, or prints the integrity_error '
        "(code, message, details naming the first bad event) on stdout, a one-line "
        "message on stderr, and exits 1. Reads only. Progress on stderr while it is a "
        "terminal.",
    )
    verify.set_defaults(handler=run_verify)
    backup = sub.add_parser(
        "backup",
        parents=[common],
        help="copy a live database consistently (online backup)",
        description="Copy the database with SQLite's online backup API (a consistent "
        "point, while a worker keeps serving), verify the copy, then rename it to FILE. "
        "Prints the copy's {events, snapshots, out} on stdout; progress on stderr while "
        "it is a terminal.",
    )
    backup.add_argument("--out", type=file_argument, required=True, metavar="FILE", help="the copy")
    backup.set_defaults(handler=run_backup)


def path_argument(text: str) -> str:
    """A path given on the command line: never empty (an empty one would mean stdin,
    or the current directory, depending on the command)."""
    if not text:
        raise argparse.ArgumentTypeError("the path is empty")
    return text


def db_argument(text: str) -> Path:
    return Path(path_argument(text))


def file_argument(text: str) -> Path:
    """A file to write (``--out``): not empty, and not a directory."""
    path = Path(path_argument(text))
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory; give a file name")
    return path


def _add_replay(sub: Any, common: argparse.ArgumentParser) -> None:
    replay = sub.add_parser(
        "replay",
        parents=[common],
        help="re-feed message files into a database or a running worker",
        description="Send every line of the files (in order; '-' is stdin) as messages,\n"
        "pipelined, to the database (--db: runs the worker in-process, taking the\n"
        "database for writing, refused while another process has it) or to a running\n"
        "worker (--socket).",
        epilog=_REPLAY_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    replay.add_argument("files", nargs="+", metavar="FILE", help="message file ('-': stdin)")
    replay.add_argument(
        "--socket", type=path_argument, metavar="PATH", help="send to the worker serving PATH"
    )
    # The parent's --db default object: identity tells an explicit --db from the default.
    replay.set_defaults(handler=run_replay, default_db=common.get_default("db"))


def settings_of(args: argparse.Namespace) -> Settings:
    """The settings a command line gives (every command has the common options)."""
    return Settings(
        db=args.db,
        synchronous=args.synchronous,
        checkpoint_every=args.checkpoint_every,
        writer=getattr(args, "writer", "process"),  # serve's own option
    )


def output_closed(command: str) -> int:
    """Stdout's reader went away (``| head``): say so once, exit 1, no traceback."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
    return _fail(f"{command}: the reader closed the output early")


def _fail(message: str) -> int:
    say(message)
    return 1


def say(message: str) -> None:
    """``bidlog: MESSAGE`` on stderr. A stderr that is gone (a closed terminal) is no
    reason to fail: an export that published its file still exits 0."""
    try:
        print(f"bidlog: {message}", file=sys.stderr)
    except (OSError, ValueError):
        pass


def _print_json(value: Any) -> None:
    write_out(msgspec.json.encode(value) + b"\n")


def write_out(data: bytes, out: IO[bytes] | None = None, *, flush: bool = True) -> None:
    """Write all of ``data`` to ``out`` (stdout), then flush it unless told not to.

    A buffered write into a pipe whose reader left returns the short count it managed
    instead of raising; the next write then raises ``BrokenPipeError``, as callers expect.
    """
    out = out or sys.stdout.buffer
    view = memoryview(data)
    while view:
        written = out.write(view)
        if not written:
            raise BrokenPipeError("the output accepts nothing more")
        view = view[written:]
    if flush:
        out.flush()


# -- replay ----------------------------------------------------------------------------


async def run_replay(args: argparse.Namespace) -> int:
    if args.socket is not None and args.db is not args.default_db:
        print("bidlog replay: error: give --db or --socket, not both", file=sys.stderr)
        return 2
    sources: list[Source] = []
    try:
        for name in args.files:
            sources.append(Source.open(name))
        replay = Replay(sources)
        await _feed(args, replay)
    except ReplayError as exc:
        return _fail(str(exc))
    finally:
        for source in sources:
            source.close()
    return report(replay)


async def _feed(args: argparse.Namespace, replay: Replay) -> None:
    failure: Exception | None = None
    async with anyio.create_task_group() as tg:
        tg.start_soon(_stop_on_signal, replay)
        try:
            await _feed_until_done(args, replay)
        except Exception as exc:  # raised as itself below, not in an ExceptionGroup
            failure = exc
        tg.cancel_scope.cancel()
    if failure is not None:
        raise failure


async def _stop_on_signal(replay: Replay) -> None:
    """SIGINT, SIGTERM or SIGHUP (a closed terminal): stop sending, take the replies owed,
    then print the summary; a second one stops waiting for the replies."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async for signum in signals:
            replay.stop(signal.Signals(signum).name)


async def _feed_until_done(args: argparse.Namespace, replay: Replay) -> None:
    progress = sys.stderr if sys.stderr.isatty() else None
    if args.socket is None:
        async with serving(settings_of(args)) as worker:
            stream = await worker.connect()
            async with stream:
                await replay.run(stream, progress)
        return
    try:
        sock = await anyio.connect_unix(args.socket)
    except OSError as exc:
        raise ReplayError(f"cannot connect to {args.socket}: {exc.strerror or exc}") from None
    async with sock:
        await replay.run(sock, progress)


# -- export / import -------------------------------------------------------------------


async def run_export(args: argparse.Namespace) -> int:
    if args.out == Path("-"):
        args.out = None  # stdout, as `replay` reads `-` as stdin
    if args.out is not None:
        try:
            archive.refuse_overwrite(args.db, args.out, writing="export")
        except archive.ArchiveError as exc:
            return _fail(f"export: {exc}")
    store = await open_store(settings_of(args), writer=False)
    try:
        if args.out is None:  # no progress: it would be drawn among the lines, or a pager
            count = await _export(store, sys.stdout.buffer, Progress("export", None))
        else:
            with archive.temporary_beside(args.out) as tmp:
                with tmp.open("wb") as out:
                    count = await _export(store, out, Progress.on_terminal("export"))
                archive.publish(tmp, args.out)
            say(f"exported {count} events to {args.out}")
    except BrokenPipeError:
        return output_closed("export")
    except OSError as exc:
        return _fail(f"export: cannot write {args.out or 'stdout'}: {exc.strerror or exc}")
    except (sqlite3.Error, StoreError) as exc:
        return _fail(f"export: cannot read {args.db}: {exc}")
    except DomainError as exc:  # integrity_error: nothing is published to --out
        return _fail(f"export: {exc.code}: {exc.message}")
    finally:
        await store.close()
    return 0


async def _export(store: Any, out: IO[bytes], progress: Progress) -> int:
    """The log as it stands now: events a worker appends meanwhile are left out."""
    count, total = 0, (await store.head()).event_id
    with progress:
        async for line in archive.export_lines(store, upto=total):
            write_out(line, out, flush=False)
            count += 1
            if count % 1000 == 0:
                progress.show("writing", count, total)
        out.flush()
    return count


async def run_import(args: argparse.Namespace) -> int:
    stopping = _Stop()
    try:
        counts = await stopping.run(lambda: _import(args.file, args.db, stopping.event))
    except archive.Interrupted:
        return stopping.report(f"import: stopped by {stopping.name}; nothing was imported")
    except archive.BadLine as exc:
        return _fail(f"import: {args.file}: {exc}; nothing was imported")
    except (archive.ArchiveError, StoreError, sqlite3.Error) as exc:
        return _fail(f"import: {exc}")
    except OSError as exc:
        return _fail(f"import: {exc.filename or args.file}: {exc.strerror or exc}")
    _print_json(counts)
    return 0


def _import(name: str, target: Path, stop: threading.Event) -> dict[str, int]:
    with Progress.on_terminal("import") as progress:
        if name == "-":
            return archive.import_export(sys.stdin.buffer, target, stop, progress.show)
        with open(name, "rb") as lines:
            return archive.import_export(lines, target, stop, _reading(lines, progress))


def _reading(file: IO[bytes], progress: Progress) -> Callable[[str, int, int | None], None]:
    """``progress.show``, with how much of ``file`` is read while its lines are (an
    export's lines vary in size: bytes tell the ETA, lines would not)."""
    try:
        size = os.fstat(file.fileno()).st_size
    except OSError:
        size = 0

    def tick(phase: str, done: int, total: int | None) -> None:
        if phase == "reading" and size:
            progress.show("reading", done, noun="lines", fraction=file.tell() / size)
        else:
            progress.show(phase, done, total, noun="lines" if phase == "reading" else "events")

    return tick


def _outcome(work: Callable[[], T]) -> tuple[T | None, Exception | None]:
    try:
        return work(), None
    except Exception as exc:
        return None, exc


class _Stop:
    """Long work in a thread, stopped at its next check by SIGINT or SIGTERM (the thread
    cannot be cancelled: without this, Ctrl-C waited for the end, then exited 130 with
    a complete file in place and not a word)."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signum = 0

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    async def run(self, work: Callable[[], T]) -> T:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._watch)
            try:  # the work's own exception is carried out, not raised in the group
                value, error = await anyio.to_thread.run_sync(_outcome, work)
            finally:
                tg.cancel_scope.cancel()
        if error is not None:
            raise error
        assert value is not None
        return value

    async def _watch(self) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                self.signum = signum
                self.event.set()
                return

    def report(self, message: str) -> int:
        say(message)
        return 128 + self.signum


# -- verify / backup -------------------------------------------------------------------


async def run_verify(args: argparse.Namespace) -> int:
    store = await open_store(settings_of(args), writer=False)
    try:
        with Progress.on_terminal("verify") as progress:
            counts = await store.verify(progress.show)
    except IntegrityError as exc:
        _print_json({"code": exc.code, "message": exc.message, "details": exc.details})
        first = exc.details.get("event_id")
        where = f" (first bad event: {first})" if first else ""  # 0: the file, no event
        return _fail(f"{exc.code}: {exc.message}{where}")
    except (sqlite3.Error, StoreError) as exc:
        return _fail(f"verify: cannot read {args.db}: {exc}")
    finally:
        await store.close()
    _print_json(counts)
    return 0


async def run_backup(args: argparse.Namespace) -> int:
    stopping = _Stop()
    try:
        counts = await stopping.run(lambda: _backup(args.db, args.out, stopping.event))
    except archive.Interrupted:
        return stopping.report(f"backup: stopped by {stopping.name}; {args.out} is unchanged")
    except (archive.ArchiveError, StoreError, OSError, sqlite3.Error) as exc:
        return _fail(f"backup: {exc}")
    _print_json({**counts, "out": str(args.out)})
    return 0


def _backup(db: Path, out: Path, stop: threading.Event) -> dict[str, int]:
    with Progress.on_terminal("backup") as progress:
        return archive.backup(db, out, stop, progress.show)
