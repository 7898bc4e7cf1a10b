#!/usr/bin/env python3
"""End-to-end benchmark of bidlog: prints figures, never asserts on time.

Runs the installed ``bidlog`` (next to this Python, i.e. ``.venv/bin/bidlog``) with
``synchronous=FULL`` on a fresh database for each measurement, and raw ``sqlite3`` in
the same run as the baseline:

- throughput through stdin, and through the Unix socket with 1, 4 and 16 pipelining
  clients (each with a bounded window of lines in flight); each the median of three
  runs (one with ``--quick``), as the raw per-row baseline is the median of its three;
- acknowledgement latency p50 / p99 at a fixed offered load (1,000 commands/s);
- peak RSS of the worker, and RSS after 20,000 and 200,000 events with the same users;
- raw sqlite3 in WAL with synchronous=FULL: per-row commits and 100-row batches of rows
  the size of bidlog's stored ``submit_bid`` events;
- for reference, the worker's essential work done in this process, in one thread and
  without the pipeline (decode and digest, decide, reply, append 512 per transaction):
  what the worker costs above it is its event loop, transports and replies.

Usage: ``.venv/bin/python scripts/bench.py [--quick] [--dir DIR] [--seed N]``
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import random
import selectors
import shutil
import socket
import sqlite3
import statistics
import string
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

BIN = Path(sys.executable).parent / "bidlog"
YEAR = 2026
AREAS = ("North", "South", "East", "West")
USERS_PER_AREA = 150
MAX_PER_DAY = 1000  # > users per area: day_full never happens
WINDOW = 500
ADMIN = {"id": "bench-ops", "role": "admin"}
BIDDER = {"id": "bench-desk", "role": "bidder"}
CAUSE = {"id": "BENCH-1", "description": "benchmark"}
INITIALS = [a + b for a in string.ascii_uppercase for b in string.ascii_uppercase]
DAYS = [(dt.date(YEAR, 1, 1) + dt.timedelta(days=i)).isoformat() for i in range(365)]
OK = b'"ok":true'


@dataclass(frozen=True)
class Sizes:
    """How much work each measurement does."""

    stdin: int
    socket: int
    latency_seconds: float
    memory: tuple[int, int]
    raw_rows: int
    raw_batched_rows: int
    repeats: int  # runs of each end-to-end throughput: the median is judged


FULL = Sizes(40_000, 40_000, 10.0, (20_000, 200_000), 3_000, 40_000, 3)
QUICK = Sizes(10_000, 10_000, 3.0, (5_000, 50_000), 1_000, 10_000, 1)


# ---------------------------------------------------------------- the command mix


class Workload:
    """Areas, users and an open round in each area, then bids by random users."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.users = [
            (area, INITIALS[a * USERS_PER_AREA + u])
            for a, area in enumerate(AREAS)
            for u in range(USERS_PER_AREA)
        ]

    def setup(self) -> list[bytes]:
        lines = [_command("create_area", f"s-a{i}", area) for i, area in enumerate(AREAS)]
        for area, initials in self.users:
            lines.append(_register(area, initials))
        for i, area in enumerate(AREAS):
            lines.append(_command("open_round", f"s-o{i}", area, round=1, max_per_day=MAX_PER_DAY))
        return lines

    def bids(self, count: int, tag: str) -> list[bytes]:
        """``count`` submit_bid lines with ids ``b-<tag>-<n>``: 1-5 random days each."""
        out = []
        for n in range(count):
            area, initials = self.rng.choice(self.users)
            days = sorted(self.rng.sample(DAYS, self.rng.randint(1, 5)))
            out.append(
                _command(
                    "submit_bid",
                    f"b-{tag}-{n}",
                    area,
                    actor=BIDDER,
                    round=1,
                    initials=initials,
                    days=days,
                )
            )
        return out


MIX = (
    f"{len(AREAS)} create_area, {len(AREAS) * USERS_PER_AREA} register_user, "
    f"{len(AREAS)} open_round (max_per_day {MAX_PER_DAY}), then submit_bid only: a random "
    f"one of the {len(AREAS) * USERS_PER_AREA} users bids 1-5 random days of {YEAR} "
    "(a re-bid replaces the user's earlier bid); every command succeeds"
)


def _command(type_: str, id_: str, area: str, **fields: Any) -> bytes:
    message: dict[str, Any] = {"id": id_, "type": type_, "actor": ADMIN, "cause": CAUSE}
    message.update(bid_year=YEAR, area=area, **fields)
    return msgspec.json.encode(message) + b"\n"


def _register(area: str, initials: str) -> bytes:
    day = "2015-01-04"
    seniority = {
        "cumulative_natca_bu_date": day,
        "natca_bu_date": day,
        "eod_faa_date": day,
        "service_computation_date": day,
        "lottery_value": 7,
    }
    return _command(
        "register_user",
        f"s-r-{initials}",
        area,
        initials=initials,
        name=f"Controller {initials}",
        user_type="CPC",
        crew=3,
        seniority=seniority,
    )


def split(lines: Sequence[bytes], parts: int) -> list[list[bytes]]:
    return [list(lines[i::parts]) for i in range(parts)]


# ---------------------------------------------------------------- the worker process


def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of ``pid`` in KiB."""
    out = {}
    for row in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = row.partition(":")
        if key in {"VmRSS", "VmHWM"}:
            out[key] = int(value.split()[0])
    return out


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time ``pid`` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (a worker's writer process)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(child) for child in text.split()]


def writer_cpu(pid: int) -> float:
    """CPU time used so far by the children of ``pid`` (its writer process)."""
    total = 0.0
    for child in children(pid):
        with contextlib.suppress(OSError):
            total += cpu_seconds(child)
    return total


@dataclass(frozen=True)
class Throughput:
    """Commands answered in ``seconds``, and the worker's CPU time meanwhile (and its
    writer process's, if it has one)."""

    commands: int
    seconds: float
    cpu: float
    writer_cpu: float = 0.0

    @property
    def rate(self) -> float:
        return self.commands / self.seconds

    def describe(self, whose: str = "worker") -> str:
        """The rate, and each process's CPU a command and share of the time busy (a
        process busy nearly all the time bounds the rate; one less busy waited)."""
        per = self.cpu / self.commands * 1e6
        text = f"{self.rate:,.0f} commands/s ({whose} CPU {per:.0f} µs/command, "
        text += f"busy {self.cpu / self.seconds:.0%}"
        if self.writer_cpu:
            per = self.writer_cpu / self.commands * 1e6
            text += f"; its writer process {per:.0f}, busy {self.writer_cpu / self.seconds:.0%}"
        return text + ")"


@contextmanager
def socket_worker(
    workdir: Path, name: str, *extra: str
) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """A fresh database and ``bidlog serve --socket`` on it, stopped with SIGTERM after;
    its log is ``<name>.log``."""
    db, sock = workdir / f"{name}.sqlite3", workdir / f"{name}.sock"
    with (workdir / f"{name}.log").open("ab") as log:
        proc = subprocess.Popen(
            [BIN, "serve", "--socket", sock, "--db", db, "--synchronous", "full", *extra],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    try:
        _wait_listening(proc, sock)
        yield proc, sock
    finally:
        proc.terminate()
        proc.wait(60)


def _wait_listening(proc: subprocess.Popen[bytes], sock: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"bidlog exited with status {proc.returncode}")
        try:
            with socket.socket(socket.AF_UNIX) as probe:
                probe.connect(str(sock))
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError("bidlog did not start listening")


# ---------------------------------------------------------------- pipelining clients


@dataclass(eq=False)
class _Conn:
    """One pipelining connection: at most ``window`` lines sent and not yet answered."""

    sock: socket.socket
    lines: list[bytes]
    window: int
    sent: int = 0
    received: int = 0
    ok: int = 0
    out: bytes = b""
    tail: bytes = b""
    mask: int = 0
    failures: list[bytes] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.received == len(self.lines)

    def fill(self) -> None:
        room = self.window - (self.sent - self.received)
        if not self.out and room > 0 and self.sent < len(self.lines):
            take = min(room, len(self.lines) - self.sent)
            self.out = b"".join(self.lines[self.sent : self.sent + take])
            self.sent += take

    def write(self) -> None:
        if self.out:
            self.out = self.out[self.sock.send(self.out) :]

    def read(self) -> None:
        data = self.sock.recv(1 << 18)
        if not data:
            raise ConnectionError("bidlog closed the connection")
        buf = self.tail + data
        cut = buf.rfind(b"\n") + 1
        done, self.tail = buf[:cut], buf[cut:]
        count, ok = done.count(b"\n"), done.count(OK)
        self.received += count
        self.ok += ok
        if ok != count and len(self.failures) < 3:
            self.failures.extend(x for x in done.splitlines() if OK not in x)


@dataclass(frozen=True)
class PumpResult:
    replies: int
    ok: int
    seconds: float
    failures: list[bytes]


def pump(path: Path, streams: Sequence[list[bytes]], window: int = WINDOW) -> PumpResult:
    """Send every stream on its own connection, pipelined, until every line is answered."""
    conns = [_Conn(_connect(path), lines, window) for lines in streams]
    sel = selectors.DefaultSelector()
    for conn in conns:
        conn.sock.setblocking(False)
        conn.mask = selectors.EVENT_READ
        sel.register(conn.sock, conn.mask, conn)
    started = time.perf_counter()
    try:
        _run_selector(sel, conns)
    finally:
        sel.close()
        for conn in conns:
            conn.sock.close()
    seconds = time.perf_counter() - started
    failures = [f for c in conns for f in c.failures]
    return PumpResult(sum(c.received for c in conns), sum(c.ok for c in conns), seconds, failures)


def _run_selector(sel: selectors.BaseSelector, conns: list[_Conn]) -> None:
    while not all(c.done for c in conns):
        for conn in conns:
            conn.fill()
            mask = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.out else 0)
            if mask != conn.mask:
                sel.modify(conn.sock, mask, conn)
                conn.mask = mask
        events = sel.select(timeout=60)
        if not events:
            raise TimeoutError("no reply from bidlog for 60 s")
        for key, ready in events:
            conn = key.data
            if ready & selectors.EVENT_WRITE:
                conn.write()
            if ready & selectors.EVENT_READ:
                conn.read()


def _connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(str(path))
    return sock


def require_ok(result: PumpResult, what: str) -> None:
    if result.ok != result.replies:
        sample = b"\n".join(result.failures[:3]).decode(errors="replace")
        raise RuntimeError(f"{what}: {result.replies - result.ok} commands failed:\n{sample}")


# ---------------------------------------------------------------- measurements


@dataclass
class Row:
    """One line of the result table."""

    measure: str
    value: str
    target: str = ""
    verdict: str = ""
    rate: float | None = None  # a bidlog throughput, judged against raw per-row commits
    reference: bool = False  # compared with raw per-row commits, but not a target


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    peak_rss_kib: int = 0
    raw_samples: list[float] = field(default_factory=list)
    raw_label: str = ""
    notes: list[str] = field(default_factory=list)

    def add(self, measure: str, value: str, target: str = "", verdict: str = "") -> None:
        self.rows.append(Row(measure, value, target, verdict))
        print(f"  {measure}: {value} {verdict}", file=sys.stderr, flush=True)

    def peak(self, pid: int) -> None:
        self.peak_rss_kib = max(self.peak_rss_kib, rss_kib(pid).get("VmHWM", 0))

    def finish(self) -> None:
        """Put the raw per-row baseline (median of its runs, spread over the whole
        benchmark because the disk's flush time drifts) first, and judge throughputs."""
        base = statistics.median(self.raw_samples)
        runs = ", ".join(f"{x:,.0f}" for x in self.raw_samples)
        measure = f"raw sqlite3, per-row commit, median of {len(self.raw_samples)} runs of "
        self.rows.insert(0, Row(measure + self.raw_label, f"{base:,.0f} rows/s ({runs})"))
        for row in self.rows:
            if row.rate is not None and row.reference:
                row.verdict = f"{row.rate / base:.2f}x raw per-row (reference)"
            elif row.rate is not None:
                row.target = f">= 5x raw per-row ({5 * base:,.0f}/s)"
                row.verdict = _verdict(row.rate >= 5 * base, row.rate / base)


def _verdict(met: bool, ratio: float) -> str:
    return f"{ratio:.2f}x: {'met' if met else 'MISSED'}"


def bench_stdin(
    workdir: Path, count: int, seed: int, report: Report, run: int = 1
) -> tuple[Path, Throughput]:
    """Pipe the whole mix into ``bidlog serve``; time from the first byte to the last reply
    (the clock starts once the worker has logged that it started)."""
    work = Workload(seed)
    setup = work.setup()
    lines = setup + work.bids(count - len(setup), "stdin")
    db = workdir / f"stdin-{run}.sqlite3"
    proc = subprocess.Popen(
        [str(BIN), "serve", "--db", str(db), "--synchronous", "full"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin and proc.stdout and proc.stderr
    started_line = proc.stderr.readline()
    if b"worker started" not in started_line:
        raise RuntimeError(f"bidlog serve did not start: {started_line!r}")
    drain = threading.Thread(target=proc.stderr.read, daemon=True)
    drain.start()
    feeder = threading.Thread(target=_feed, args=(proc.stdin, lines), daemon=True)
    started, cpu, wcpu = time.perf_counter(), cpu_seconds(proc.pid), writer_cpu(proc.pid)
    feeder.start()
    received = ok = 0
    tail = b""
    while received < len(lines):
        chunk = os.read(proc.stdout.fileno(), 1 << 18)
        if not chunk:
            raise RuntimeError("bidlog serve closed stdout early")
        buf = tail + chunk
        cut = buf.rfind(b"\n") + 1
        received += buf.count(b"\n", 0, cut)
        ok += buf.count(OK, 0, cut)
        tail = buf[cut:]
    seconds = time.perf_counter() - started
    done = Throughput(len(lines), seconds, cpu_seconds(proc.pid) - cpu, writer_cpu(proc.pid) - wcpu)
    report.peak(proc.pid)
    proc.stdin.close()
    proc.wait(60)
    if ok != received:
        raise RuntimeError(f"stdin: {received - ok} commands failed")
    return db, done


def add_throughput(report: Report, name: str, runs: Sequence[Throughput]) -> None:
    """A row for the median of ``runs`` (by rate; all of them shown): one run's minute
    on a shared VM moves its rate by up to a third, as the raw baseline's."""
    done = sorted(runs, key=lambda run: run.rate)[len(runs) // 2]
    value = done.describe()
    if len(runs) > 1:
        each = ", ".join(f"{run.rate:,.0f}" for run in runs)
        value = f"{value}, median of {len(runs)} runs ({each})"
    report.add(f"{name}, {done.commands:,} commands", value)
    report.rows[-1].rate = done.rate


def bench_floor(workdir: Path, count: int, seed: int, report: Report) -> None:
    """The worker's essential work for the stdin mix, in this process and one thread:
    decode and digest each line, decide it into a draft, build its reply, and append
    every 512 with the store (one transaction, one trip to its thread), as ``serve``
    does but with no event loop work between, no transport and no reply written."""
    import asyncio

    from adapters import codec
    from adapters.clock import SystemClock
    from adapters.gc_policy import tune_gc
    from adapters.sqlite_store import SqliteStore
    from domain.ledger import Ledger
    from domain.records import Ack, Batch

    work = Workload(seed)
    setup = work.setup()
    lines = setup + work.bids(count - len(setup), "floor")

    async def run() -> Throughput:
        store = await SqliteStore.open(workdir / "floor.sqlite3", synchronous="full")
        ledger, clock = Ledger(await store.recover()), SystemClock()
        tune_gc()
        started, cpu = time.perf_counter(), time.process_time()
        for start in range(0, len(lines), 512):
            draft, acks, replies = ledger.draft(), [], []
            now = clock.now()  # as the worker: one reading of the clock per transaction
            for line in lines[start : start + 512]:
                item = codec.decode(line.rstrip(b"\n"))
                command, digest = item.message, item.digest or ""
                # Every line of the mix is a command (not a query).
                event = draft.apply(command, now=now, digest=digest)[0].event  # type: ignore[arg-type]
                acks.append(Ack(command.id, digest, event.event_id, event.seq, event.recorded_at))
                replies.append(
                    codec.ack_reply(command.id, event.event_id, event.seq, event.recorded_at)
                )
            fresh = tuple(ack.message_id for ack in acks)
            await store.append(Batch(tuple(draft.entries), tuple(acks), fresh))
            ledger.commit(draft)
        done = Throughput(len(lines), time.perf_counter() - started, time.process_time() - cpu)
        await store.close()
        return done

    done = asyncio.run(run())
    measure = f"for reference: the same work in one thread, no pipeline, {done.commands:,} commands"
    report.add(measure, done.describe("the process's"))
    report.rows[-1].rate = done.rate
    report.rows[-1].reference = True


def _feed(pipe: Any, lines: list[bytes]) -> None:
    for i in range(0, len(lines), 1000):
        pipe.write(b"".join(lines[i : i + 1000]))
    pipe.flush()


def bench_socket(
    workdir: Path, clients: int, count: int, seed: int, report: Report, repeats: int = 1
) -> None:
    """Set up through one connection, then ``clients`` connections pipeline the bids;
    the rate counts every command (setup included) over the whole time. ``repeats``
    runs, each on a fresh database."""
    work = Workload(seed)
    setup = work.setup()
    bids = work.bids(count - len(setup), f"c{clients}")
    runs = []
    for run in range(1, repeats + 1):
        with socket_worker(workdir, f"sock{clients}-{run}") as (proc, sock):
            cpu, wcpu = cpu_seconds(proc.pid), writer_cpu(proc.pid)
            first = pump(sock, [setup])
            require_ok(first, "setup")
            second = pump(sock, split(bids, clients))
            require_ok(second, f"{clients} clients")
            cpu, wcpu = cpu_seconds(proc.pid) - cpu, writer_cpu(proc.pid) - wcpu
            report.peak(proc.pid)
        runs.append(Throughput(count, first.seconds + second.seconds, cpu, wcpu))
    plural = "s" if clients > 1 else ""
    add_throughput(report, f"socket, {clients} client{plural} (window {WINDOW})", runs)


def bench_latency(workdir: Path, seconds: float, seed: int, report: Report) -> None:
    """Offer 1,000 commands/s on a schedule through one connection; each line's latency
    is from its send to its reply (replies come in order). The first 200 are warm-up.

    The worker logs at debug level (one line per committed batch, with the time its
    append took): that splits the tail between the disk and the rest of the pipeline."""
    rate = 1000.0
    work = Workload(seed)
    lines = work.bids(int(seconds * rate), "lat")
    with socket_worker(workdir, "latency", "--log-level", "debug") as (proc, sock):
        require_ok(pump(sock, [work.setup()]), "setup")
        latencies, late = _scheduled(sock, lines, rate)
        report.peak(proc.pid)
    samples = sorted(latencies[200:])
    p50 = statistics.median(samples) * 1000
    p99 = samples[int(len(samples) * 0.99)] * 1000
    top = samples[-1] * 1000
    report.add("ack latency p50 at 1,000 commands/s", f"{p50:.2f} ms")
    report.add(
        f"ack latency p99 at 1,000 commands/s ({len(samples):,} samples, max {top:.1f} ms)",
        f"{p99:.2f} ms",
        "< 5 ms",
        _verdict(p99 < 5, p99 / 5),
    )
    commits = sorted(_commit_ms(workdir / "latency.log"))
    if commits:
        c50, c99 = statistics.median(commits), commits[int(len(commits) * 0.99)]
        report.add(
            f"of which: store append per batch, p50 / p99 / max ({len(commits):,} commits)",
            f"{c50:.2f} / {c99:.2f} / {commits[-1]:.1f} ms",
        )
    if late > 0.001:
        report.notes.append(f"the latency client fell up to {late * 1000:.1f} ms behind schedule")


def _commit_ms(log: Path) -> list[float]:
    """``commit_ms`` of every "batch committed" line of a debug-level worker log."""
    out = []
    for line in log.read_bytes().splitlines():
        if b"commit_ms" in line:
            out.append(float(msgspec.json.decode(line)["commit_ms"]))
    return out


def _scheduled(path: Path, lines: list[bytes], rate: float) -> tuple[list[float], float]:
    sock = _connect(path)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    sent_at: list[float] = []
    replied_at: list[float] = []
    tail, late = b"", 0.0
    start = time.perf_counter() + 0.05
    try:
        while len(replied_at) < len(lines):
            now = time.perf_counter()
            while len(sent_at) < len(lines) and start + len(sent_at) / rate <= now:
                late = max(late, now - (start + len(sent_at) / rate))
                sock.sendall(lines[len(sent_at)])
                sent_at.append(time.perf_counter())
            due = start + len(sent_at) / rate if len(sent_at) < len(lines) else now + 5
            if sel.select(timeout=max(0.0, due - time.perf_counter())):
                tail = _read_stamped(sock, tail, replied_at)
    finally:
        sel.close()
        sock.close()
    return [r - s for s, r in zip(sent_at, replied_at, strict=True)], late


def _read_stamped(sock: socket.socket, tail: bytes, replied_at: list[float]) -> bytes:
    data = sock.recv(1 << 16)
    now = time.perf_counter()
    if not data:
        raise ConnectionError("bidlog closed the connection")
    buf = tail + data
    for reply in buf.split(b"\n")[:-1]:
        if OK not in reply:
            raise RuntimeError(f"latency run: a command failed: {reply!r}")
        replied_at.append(now)
    return buf[buf.rfind(b"\n") + 1 :]


def bench_memory(workdir: Path, marks: tuple[int, int], seed: int, report: Report) -> None:
    """Stream bids by the same 600 users through 4 connections; read the RSS of the
    worker and of its writer process when ``marks[0]`` and then ``marks[1]`` commands
    have been acknowledged. The target holds their sum."""
    work = Workload(seed)
    setup = work.setup()
    rss: list[tuple[int, int]] = []
    with socket_worker(workdir, "memory") as (proc, sock):
        require_ok(pump(sock, [setup]), "setup")
        done = len(setup)
        for step, mark in enumerate(marks):
            bids = work.bids(mark - done, f"mem{step}")
            require_ok(pump(sock, split(bids, 4)), "memory run")
            done = mark
            writer = sum(rss_kib(child)["VmRSS"] for child in children(proc.pid))
            rss.append((rss_kib(proc.pid)["VmRSS"], writer))
        report.peak(proc.pid)
        for child in children(proc.pid):
            report.peak(child)
    ratio = sum(rss[1]) / sum(rss[0])
    for (worker, writer), mark, target, verdict in (
        (rss[0], marks[0], "", ""),
        (
            rss[1],
            marks[1],
            "<= 1.5x the first",
            f"{ratio:.2f}x: {'met' if ratio <= 1.5 else 'MISSED'}",
        ),
    ):
        label = f"RSS after {mark:,} events, worker + writer process"
        if mark == marks[1]:
            label += " (same users)"
        value = f"{_mib(worker + writer)} ({_mib(worker)} + {_mib(writer)})"
        report.add(label, value, target, verdict)


def _mib(kib: int) -> str:
    return f"{kib / 1024:.1f} MiB"


# ---------------------------------------------------------------- raw sqlite3 baseline


def event_payloads(db: Path, limit: int = 1000) -> list[str]:
    """Stored ``submit_bid`` event rows of a bidlog database, each as one JSON text."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        conn.row_factory = sqlite3.Row
        rows = conn.execute(
            "SELECT * FROM events WHERE action = 'submit_bid' LIMIT ?", (limit,)
        ).fetchall()
    finally:
        conn.close()
    return [json.dumps(dict(row), separators=(",", ":")) for row in rows]


def bench_raw(workdir: Path, payloads: list[str], sizes: Sizes, report: Report) -> None:
    size = statistics.mean(len(p.encode()) for p in payloads)
    report.raw_label = f"{sizes.raw_rows:,} rows of {size:.0f} bytes (stored submit_bid events)"
    sample_per_row(workdir, payloads, sizes, report)
    batched = _raw_rate(workdir / "raw100.sqlite3", payloads, sizes.raw_batched_rows, batch=100)
    report.add(
        f"raw sqlite3, 100-row batches, {sizes.raw_batched_rows:,} rows", f"{batched:,.0f} rows/s"
    )


def sample_per_row(workdir: Path, payloads: list[str], sizes: Sizes, report: Report) -> None:
    path = workdir / f"raw1-{len(report.raw_samples)}.sqlite3"
    report.raw_samples.append(_raw_rate(path, payloads, sizes.raw_rows, batch=1))
    print(f"  raw per-row commit: {report.raw_samples[-1]:,.0f} rows/s", file=sys.stderr)


def _raw_rate(path: Path, payloads: list[str], count: int, batch: int) -> float:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("CREATE TABLE log (id INTEGER PRIMARY KEY, payload TEXT NOT NULL)")
        started = time.perf_counter()
        for first in range(0, count, batch):
            conn.execute("BEGIN")
            conn.executemany(
                "INSERT INTO log (id, payload) VALUES (?, ?)",
                ((i + 1, payloads[i % len(payloads)]) for i in range(first, first + batch)),
            )
            conn.execute("COMMIT")
        return count / (time.perf_counter() - started)
    finally:
        conn.close()


# ---------------------------------------------------------------- output


def machine(workdir: Path) -> list[str]:
    model = "unknown CPU"
    for row in Path("/proc/cpuinfo").read_text().splitlines():
        if row.startswith("model name"):
            model = row.partition(":")[2].strip()
            break
    return [
        f"- date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
        f"- machine: {os.cpu_count()} CPUs (nproc {_nproc()}), {model}, "
        f"{platform.system()} {platform.release()}",
        f"- Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}, "
        f"database directory on {_fs_type(workdir)}",
        f"- load average before the run: {_loadavg()} (other work on the machine skews figures)",
    ]


def _loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _nproc() -> str:
    return str(len(os.sched_getaffinity(0)))


def _fs_type(path: Path) -> str:
    best, kind = "", "unknown"
    for row in Path("/proc/mounts").read_text().splitlines():
        parts = row.split()
        mount = parts[1]
        if str(path).startswith(mount) and len(mount) > len(best):
            best, kind = mount, parts[2]
    return f"{kind} ({best})"


def print_report(report: Report, header: list[str], quick: bool) -> None:
    print(f"## bidlog benchmark{' (--quick)' if quick else ''}\n")
    print("\n".join(header))
    print("- bidlog: `serve --synchronous full` (WAL), fresh database per measurement")
    print(f"- command mix: {MIX}\n")
    print("| measure | value | target | ratio: verdict |")
    print("|---|---|---|---|")
    for row in report.rows:
        print(f"| {row.measure} | {row.value} | {row.target} | {row.verdict} |")
    print(
        "| peak RSS of one process (VmHWM, largest of all runs, worker or writer) "
        f"| {_mib(report.peak_rss_kib)} | | |"
    )
    print(f"\nLoad average after the run: {_loadavg()}.")
    for note in report.notes:
        print(f"\nNote: {note}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--quick", action="store_true", help="a smaller run, one of each (about 15 s; full: 1 min)"
    )
    parser.add_argument("--dir", type=Path, help="where the databases go (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the databases")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    workdir = Path(tempfile.mkdtemp(prefix="bidlog-bench-", dir=args.dir))
    report = Report()
    try:
        header = machine(workdir)
        print("stdin ...", file=sys.stderr)
        db, done = bench_stdin(workdir, sizes.stdin, args.seed, report)
        stdin_runs = [done]
        print("raw sqlite3 ...", file=sys.stderr)
        payloads = event_payloads(db)
        bench_raw(workdir, payloads, sizes, report)
        for run in range(2, sizes.repeats + 1):
            stdin_runs.append(bench_stdin(workdir, sizes.stdin, args.seed, report, run)[1])
        add_throughput(report, "stdin", stdin_runs)
        print("in-process reference ...", file=sys.stderr)
        bench_floor(workdir, sizes.stdin, args.seed, report)
        for clients in (1, 4, 16):
            bench_socket(workdir, clients, sizes.socket, args.seed, report, sizes.repeats)
        sample_per_row(workdir, payloads, sizes, report)
        bench_latency(workdir, sizes.latency_seconds, args.seed, report)
        bench_memory(workdir, sizes.memory, args.seed, report)
        sample_per_row(workdir, payloads, sizes, report)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    report.finish()
    print_report(report, header, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
