#!/usr/bin/env python3
"""Crash harness: SIGKILL a socket worker at random instants while clients stream commands.

Each client owns one area of bid year 2026 and streams, in order, ``create_area``,
registrations (initials distinct across all areas), ``open_round`` and then bids, each
with a unique message id. The worker (``bidlog serve --socket`` on a fresh database) is
killed with SIGKILL at a random instant (seeded: uniform in ``[0, --max-delay]`` seconds
after it is spawned, so some kills land during startup and recovery) and restarted,
``--crashes`` times; after each restart every client resumes at its first command not
acknowledged. Every acknowledgement received before a kill is recorded.

Then, against the final database:

- every acknowledged command is stored exactly once, and its stored event has the
  ``event_id``, ``seq`` and ``recorded_at`` of the acknowledgement (else it is *lost*);
- re-sending every command ever sent answers each acknowledged id with a repeat of its
  acknowledgement and ``"duplicate": true``, and no ``message_id`` has more than one event
  (else it is *applied twice*);
- every area holds all its users, and ``bidlog verify`` passes.

Exit status 0 when nothing was lost or applied twice and everything checks; 1 otherwise.

Usage: ``.venv/bin/python scripts/crash_test.py [--crashes 20] [--seed 1] [--clients 4]``
"""

from __future__ import annotations

import argparse
import os
import random
import selectors
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

BIN = Path(sys.executable).parent / "bidlog"
YEAR = 2026
WINDOW = 200
ADMIN = {"id": "crash-ops", "role": "admin"}
BIDDER = {"id": "crash-desk", "role": "bidder"}
CAUSE = {"id": "CRASH-1", "description": "crash harness"}
INITIALS = [a + b for a in string.ascii_uppercase for b in string.ascii_uppercase]
SENIORITY = {
    "cumulative_natca_bu_date": "2015-01-04",
    "natca_bu_date": "2015-01-04",
    "eod_faa_date": "2015-01-04",
    "service_computation_date": "2015-01-04",
    "lottery_value": 3,
}
Ack = tuple[int, int, str]  # event_id, seq, recorded_at
_decode = msgspec.json.Decoder()


# ---------------------------------------------------------------- command streams


class Stream:
    """One client's commands: its area's setup, then bids without end (made on demand,
    so a line's content never changes once made)."""

    def __init__(self, index: int, users: int, rng: random.Random) -> None:
        self.area = f"Area{index}"
        self.users = INITIALS[index * users : (index + 1) * users]
        self.rng = rng
        self.pieces = random.Random(rng.random())  # how many lines each send carries
        self.ids: list[str] = []
        self.lines: list[bytes] = []
        self._add("create_area", f"c{index}")
        for initials in self.users:
            self._add(
                "register_user",
                f"r{index}-{initials}",
                initials=initials,
                name=f"Controller {initials}",
                user_type="CPC",
                crew=None,
                seniority=SENIORITY,
            )
        self._add("open_round", f"o{index}", round=1, max_per_day=1000)
        self.setup = len(self.lines)
        self.prefix = f"b{index}-"

    def ensure(self, count: int) -> None:
        """Make lines up to ``count`` (bids by random users of this area)."""
        while len(self.lines) < count:
            days = sorted(self.rng.sample(range(1, 29), self.rng.randint(1, 4)))
            self._add(
                "submit_bid",
                f"{self.prefix}{len(self.lines) - self.setup}",
                actor=BIDDER,
                round=1,
                initials=self.rng.choice(self.users),
                days=[f"{YEAR}-07-{d:02d}" for d in days],
            )

    def _add(self, type_: str, id_: str, **fields: Any) -> None:
        message: dict[str, Any] = {"id": id_, "type": type_, "actor": ADMIN, "cause": CAUSE}
        message.update(bid_year=YEAR, area=self.area, **fields)
        self.ids.append(id_)
        self.lines.append(msgspec.json.encode(message) + b"\n")


# ---------------------------------------------------------------- the run's record


@dataclass
class Record:
    """What the clients saw, across every worker life."""

    acked: dict[str, Ack] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)  # unexpected error replies
    crashes: int = 0
    in_flight_kills: int = 0
    startup_kills: int = 0

    def reply(self, message_id: str, reply: dict[str, Any]) -> None:
        if reply.get("id") != message_id:
            self.errors.append(f"reply out of order: sent {message_id}, got {reply}")
        elif not reply.get("ok"):
            self.errors.append(f"{message_id}: {reply.get('error')}")
        elif message_id not in self.acked:
            self.acked[message_id] = (reply["event_id"], reply["seq"], reply["recorded_at"])


# ---------------------------------------------------------------- the worker


class Worker:
    """``bidlog serve --socket`` on the harness's database."""

    def __init__(self, workdir: Path) -> None:
        self.db = workdir / "crash.sqlite3"
        self.sock = workdir / "s"
        self.log = workdir / "worker.log"

    def spawn(self) -> subprocess.Popen[bytes]:
        with self.log.open("ab") as log:
            return subprocess.Popen(
                [str(BIN), "serve", "--socket", str(self.sock), "--db", str(self.db)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )

    def wait_listening(self, proc: subprocess.Popen[bytes], timeout: float = 30) -> bool:
        """True once the socket accepts; False if the process died first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return False
            try:
                with socket.socket(socket.AF_UNIX) as probe:
                    probe.connect(str(self.sock))
                return True
            except OSError:
                time.sleep(0.01)
        raise RuntimeError(f"bidlog did not start listening; see {self.log}")

    def bidlog(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [str(BIN), *args, "--db", str(self.db)], capture_output=True, timeout=300, check=False
        )


# ---------------------------------------------------------------- streaming clients


@dataclass(eq=False)
class Client:
    """One connection streaming ``stream`` from ``start``; replies are recorded in order."""

    stream: Stream
    sock: socket.socket
    start: int
    stop: int | None  # None: without end
    window: int = WINDOW
    sent: int = 0
    received: int = 0
    out: bytes = b""
    tail: bytes = b""
    alive: bool = True

    def __post_init__(self) -> None:
        self.sent = self.received = self.start

    @property
    def finished(self) -> bool:
        return not self.alive or (self.stop is not None and self.received >= self.stop)

    def fill(self) -> None:
        room = self.window - (self.sent - self.received)
        end = self.stop if self.stop is not None else self.sent + room
        # Sends of random sizes, so kills land between and inside the worker's batches.
        take = min(room, end - self.sent, self.stream.pieces.randint(1, 64))
        if not self.out and take > 0:
            self.stream.ensure(self.sent + take)
            self.out = b"".join(self.stream.lines[self.sent : self.sent + take])
            self.sent += take

    def write(self) -> None:
        try:
            self.out = self.out[self.sock.send(self.out) :]
        except OSError:
            self.out = b""  # the worker is gone; what it answered is still to be read

    def read(self, record: Record, replies: list[dict[str, Any]] | None = None) -> None:
        try:
            data = self.sock.recv(1 << 18)
        except OSError:
            data = b""
        if not data:
            self.alive = False
            return
        *lines, self.tail = (self.tail + data).split(b"\n")
        for line in lines:
            reply = _decode.decode(line)
            record.reply(self.stream.ids[self.received], reply)
            if replies is not None:
                replies.append(reply)
            self.received += 1


def stream_until_dead(clients: list[Client], record: Record, replies: list[Any] | None) -> None:
    """Run every client until its connection ends (or, with a ``stop``, it is done)."""
    sel = selectors.DefaultSelector()
    masks: dict[Client, int] = {}
    for client in clients:
        client.sock.setblocking(False)
        masks[client] = selectors.EVENT_READ
        sel.register(client.sock, selectors.EVENT_READ, client)
    try:
        while not all(c.finished for c in clients):
            _update_masks(sel, clients, masks)
            events = sel.select(timeout=60)
            if not events:
                raise RuntimeError("no progress for 60 s: the worker hangs")
            for key, ready in events:
                client = key.data
                if ready & selectors.EVENT_WRITE:
                    client.write()
                if ready & selectors.EVENT_READ and client.alive:
                    client.read(record, replies)
    finally:
        sel.close()
        for client in clients:
            client.sock.close()


def _update_masks(
    sel: selectors.BaseSelector, clients: list[Client], masks: dict[Client, int]
) -> None:
    for client in clients:
        if client.finished:
            if masks.get(client):
                sel.unregister(client.sock)
                masks[client] = 0
            continue
        client.fill()
        mask = selectors.EVENT_READ | (selectors.EVENT_WRITE if client.out else 0)
        if mask != masks[client]:
            sel.modify(client.sock, mask, client)
            masks[client] = mask


def connect(path: Path) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        return None
    return sock


# ---------------------------------------------------------------- the crash loop


def crash_once(
    worker: Worker, streams: list[Stream], acked_upto: list[int], delay: float, record: Record
) -> None:
    """Spawn the worker, stream from each client's first unacknowledged command, and
    SIGKILL the worker ``delay`` seconds after spawning it."""
    proc = worker.spawn()
    timer = threading.Timer(delay, os.kill, (proc.pid, signal.SIGKILL))
    timer.start()
    try:
        if not worker.wait_listening(proc):
            record.startup_kills += 1
            return
        clients = []
        for stream, start in zip(streams, acked_upto, strict=True):
            sock = connect(worker.sock)
            if sock is not None:
                clients.append(Client(stream, sock, start, None))
        stream_until_dead(clients, record, None)
        for client in clients:
            acked_upto[streams.index(client.stream)] = client.received
        if any(c.sent > c.received for c in clients):
            record.in_flight_kills += 1
    finally:
        timer.join()
        proc.wait(30)
        record.crashes += 1
        if proc.returncode != -signal.SIGKILL:
            record.errors.append(f"worker ended with status {proc.returncode}, not SIGKILL")


@dataclass
class Verdict:
    checked: int = 0
    lost: list[str] = field(default_factory=list)
    twice: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.twice or self.problems)


def check_stored(worker: Worker, record: Record, verdict: Verdict) -> None:
    """Every acknowledged id has exactly one stored event, the one its ack named."""
    events = export(worker, verdict)
    by_id = Counter(e["message_id"] for e in events if e["message_id"] is not None)
    stored = {e["message_id"]: (e["event_id"], e["seq"], e["recorded_at"]) for e in events}
    for message_id, ack in record.acked.items():
        verdict.checked += 1
        if stored.get(message_id) != ack:
            verdict.lost.append(f"{message_id}: acked {ack}, stored {stored.get(message_id)}")
        elif by_id[message_id] > 1:
            verdict.twice.append(f"{message_id}: {by_id[message_id]} events")


def check_resend(worker: Worker, streams: list[Stream], record: Record, verdict: Verdict) -> None:
    """Re-send everything ever sent: acked ids must answer with their ack, as duplicates."""
    originals = dict(record.acked)
    replies: list[dict[str, Any]] = []
    high = [len(s.lines) for s in streams]
    clients = []
    for stream, stop in zip(streams, high, strict=True):
        sock = connect(worker.sock)
        if sock is None:
            raise RuntimeError("cannot connect to the restarted worker")
        clients.append(Client(stream, sock, 0, stop))
    stream_until_dead(clients, record, replies)
    if any(c.received < c.stop for c in clients if c.stop is not None):
        verdict.problems.append("the worker closed a connection during the re-send")
    for reply in replies:
        ack = originals.get(reply["id"])
        if ack is None:
            continue
        same = (reply.get("event_id"), reply.get("seq"), reply.get("recorded_at")) == ack
        if not (reply.get("ok") and reply.get("duplicate") is True and same):
            verdict.twice.append(f"{reply['id']}: acked {ack}, re-sent: {reply}")


def check_final(worker: Worker, streams: list[Stream], verdict: Verdict) -> None:
    """After the re-send: one event per message id, every user present, verify passes."""
    events = export(worker, verdict)
    counts = Counter(e["message_id"] for e in events if e["message_id"] is not None)
    verdict.twice.extend(f"{mid}: {n} events" for mid, n in counts.items() if n > 1)
    for stream in streams:
        state = worker.bidlog("state", "--bid-year", str(YEAR), "--area", stream.area)
        users = _decode.decode(state.stdout)["users"] if state.returncode == 0 else []
        if [u["initials"] for u in users] != sorted(stream.users):
            verdict.problems.append(f"{stream.area}: users {len(users)} of {len(stream.users)}")
    check = worker.bidlog("verify")
    if check.returncode != 0:
        verdict.problems.append(f"bidlog verify failed: {check.stdout!r} {check.stderr!r}")


def export(worker: Worker, verdict: Verdict) -> list[dict[str, Any]]:
    done = worker.bidlog("export")
    if done.returncode != 0:
        verdict.problems.append(f"bidlog export failed: {done.stderr!r}")
        return []
    return [_decode.decode(line) for line in done.stdout.splitlines()]


def run(args: argparse.Namespace, workdir: Path) -> tuple[Record, Verdict]:
    rng = random.Random(args.seed)
    streams = [
        Stream(i, args.users, random.Random(f"{args.seed}-{i}")) for i in range(args.clients)
    ]
    worker, record, verdict = Worker(workdir), Record(), Verdict()
    acked_upto = [0] * len(streams)
    for n in range(args.crashes):
        delay = rng.uniform(0, args.max_delay)
        crash_once(worker, streams, acked_upto, delay, record)
        print(f"crash {n + 1}: after {delay:.3f}s, {len(record.acked)} acked", file=sys.stderr)
    proc = worker.spawn()
    try:
        if not worker.wait_listening(proc):
            raise RuntimeError(f"the worker did not restart; see {worker.log}")
        check_stored(worker, record, verdict)
        check_resend(worker, streams, record, verdict)
    finally:
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(60)
    if status != 0:
        verdict.problems.append(f"the last worker exited with status {status} on SIGTERM")
    check_final(worker, streams, verdict)
    return record, verdict


def report(record: Record, verdict: Verdict) -> None:
    print(
        f"crashes survived: {record.crashes} "
        f"({record.in_flight_kills} with commands in flight, "
        f"{record.startup_kills} during startup)"
    )
    print(f"acknowledged commands checked: {verdict.checked}")
    print(f"lost: {len(verdict.lost)}")
    print(f"applied twice: {len(verdict.twice)}")
    print(f"unexpected errors: {len(record.errors) + len(verdict.problems)}")
    for line in (verdict.lost + verdict.twice + record.errors + verdict.problems)[:10]:
        print(f"  {line}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--crashes", type=int, default=20, help="kills (default 20)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--clients", type=int, default=4, help="clients, one area each")
    parser.add_argument("--users", type=int, default=40, help="users per area (default 40)")
    parser.add_argument(
        "--max-delay", type=float, default=1.5, help="kill within this many seconds of spawning"
    )
    parser.add_argument("--keep", action="store_true", help="keep the database and the log")
    args = parser.parse_args(argv)
    if args.clients * args.users > len(INITIALS):
        parser.error(f"--clients x --users must be at most {len(INITIALS)}")
    workdir = Path(tempfile.mkdtemp(prefix="blc"))  # short: AF_UNIX paths are limited
    try:
        record, verdict = run(args, workdir)
    except RuntimeError as exc:
        print(f"crash_test: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    report(record, verdict)
    return 0 if verdict.ok and not record.errors else 1


if __name__ == "__main__":
    sys.exit(main())
