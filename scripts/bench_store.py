#!/usr/bin/env python3
"""Benchmark of the SQLite store alone (no pipeline): prints figures, asserts nothing.

- append rate with ``synchronous=FULL`` for batches of 1, 10 and 100 events, beside raw
  ``sqlite3`` (WAL, FULL) inserting rows of the same size as the store's event rows,
  committed per row and in 100-row batches, in the same run on the same disk;
- point-in-time read (``state_at(key, at_event=N)``, N random) on a 50,000-event scope
  with the default automatic checkpoint every 1,000 events: median and max;
- recovery (open + ``recover()``) of 100 scopes x 1,000 events without snapshots, so
  every scope is replayed from its first event (the worst case), and ``verify()``.

Events are ``submit_bid`` (and a few set-up commands) decided by the real Ledger before
the clock starts; only the store is timed.

Usage: ``.venv/bin/python scripts/bench_store.py [--quick] [--dir DIR] [--seed N]``
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import os
import platform
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import msgspec

from adapters.canonical import digest
from adapters.sqlite_store import SqliteStore
from domain.commands import Actor, Cause, Command, CreateArea, OpenRound, RegisterUser, Seniority
from domain.commands import SubmitBid as Bid
from domain.ledger import Ledger
from domain.records import Ack, Batch
from domain.state import ScopeKey

ADMIN = Actor(id="bench", role="admin")
CAUSE = Cause(id="BENCH-1", description="store benchmark")
SENIORITY = Seniority(
    cumulative_natca_bu_date=dt.date(2015, 1, 4),
    natca_bu_date=dt.date(2015, 1, 4),
    eod_faa_date=dt.date(2014, 6, 30),
    service_computation_date=dt.date(2014, 6, 30),
    lottery_value=17,
)
USERS = [a + b for a in "ABCDEFGH" for b in "XY"]
START = dt.datetime(2026, 11, 25, 20, 0, tzinfo=dt.UTC)


class Sizes(msgspec.Struct, frozen=True):
    appends: dict[int, int]  # batch size -> events appended
    raw_rows: int
    raw_batched: int
    big_scope: int
    reads: int
    scopes: int
    per_scope: int


FULL = Sizes({1: 2_000, 10: 10_000, 100: 50_000}, 2_000, 50_000, 50_000, 300, 100, 1_000)
QUICK = Sizes({1: 200, 10: 1_000, 100: 5_000}, 200, 5_000, 5_000, 50, 10, 1_000)


def commands(key: ScopeKey, count: int, rng: random.Random) -> Iterator[Command]:
    """``create_area``, 16 users, round 1 open, then ``submit_bid`` up to ``count``."""
    envelope: dict[str, Any] = {"actor": ADMIN, "cause": CAUSE, "bid_year": key[0], "area": key[1]}
    ids = (f"{key[0]}-{key[1]}-{n}" for n in range(count))
    yield CreateArea(id=next(ids), **envelope)
    for initials in USERS:
        yield RegisterUser(
            id=next(ids), initials=initials, name=f"Controller {initials}", user_type="CPC",
            seniority=SENIORITY, **envelope,
        )  # fmt: skip
    yield OpenRound(id=next(ids), round=1, max_per_day=1000, **envelope)
    for message_id in ids:
        chosen = sorted(rng.sample(range(1, 32), rng.randint(1, 5)))
        days = tuple(dt.date(key[0], 7, d) for d in chosen)
        initials = rng.choice(USERS)
        yield Bid(id=message_id, round=1, initials=initials, days=days, **envelope)


def batches(
    keys: list[ScopeKey], per_scope: int, size: int, *, checkpoint_every: int, seed: int
) -> list[Batch]:
    """The scopes' commands interleaved, decided by the Ledger, ``size`` per batch."""
    rng = random.Random(seed)
    streams = [commands(key, per_scope, rng) for key in keys]
    ordered = [c for group in zip(*streams, strict=True) for c in group]
    ledger = Ledger(checkpoint_every=checkpoint_every)
    now = START
    out: list[Batch] = []
    for start in range(0, len(ordered), size):
        draft = ledger.draft()
        acks = []
        for command in ordered[start : start + size]:
            now += dt.timedelta(microseconds=250)
            body = digest(msgspec.to_builtins(command))
            event = draft.apply(command, now=now, digest=body)[0].event
            acks.append(Ack(command.id, body, event.event_id, event.seq, event.recorded_at))
        ledger.commit(draft)
        out.append(Batch(tuple(draft.entries), tuple(acks)))
    return out


def events_in(work: list[Batch]) -> int:
    return sum(len(b.entries) for b in work)


async def append_all(path: Path, work: list[Batch], synchronous: str = "full") -> float:
    """Seconds to append ``work`` batch by batch into a new database."""
    store = await SqliteStore.open(path, synchronous=synchronous)
    try:
        began = time.perf_counter()
        for batch in work:
            await store.append(batch)
        return time.perf_counter() - began
    finally:
        await store.close()


def stored_row_bytes(path: Path) -> int:
    """Average bytes of the store's event rows (every column), for the raw baseline."""
    columns = (
        "area", "recorded_at", "action", "actor", "cause", "message_id", "message_digest",
        "detail", "before", "after", "prev_hash", "hash",
    )  # fmt: skip
    total = " + ".join(f"coalesce(length({c}), 0)" for c in columns)
    with sqlite3.connect(path) as conn:
        (size,) = conn.execute(f"SELECT avg({total}) + 40 FROM events").fetchone()
    return int(size)


def raw_rate(path: Path, rows: int, per_commit: int, row_bytes: int) -> float:
    """Rows/s of plain sqlite3 inserts (WAL, FULL), ``per_commit`` rows per transaction."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("CREATE TABLE raw (id INTEGER PRIMARY KEY, body TEXT NOT NULL)")
    body = "x" * row_bytes
    began = time.perf_counter()
    for start in range(0, rows, per_commit):
        conn.execute("BEGIN")
        count = min(per_commit, rows - start)
        conn.executemany("INSERT INTO raw (body) VALUES (?)", [(body,)] * count)
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - began
    conn.close()
    return rows / elapsed


async def bench_appends(
    folder: Path, sizes: Sizes, seed: int, repeat: int
) -> list[tuple[str, str]]:
    """Each rate is the median of ``repeat`` runs; store and raw runs alternate, so a
    disturbance of the disk hits both sides alike."""
    keys = [(2026 + n, f"Area {n}") for n in range(4)]  # initials are unique per year
    work = {
        size: batches(keys, count // len(keys), size, checkpoint_every=1000, seed=seed)
        for size, count in sizes.appends.items()
    }
    rates: dict[str, list[float]] = {}
    for run in range(repeat):
        for size, batched in work.items():
            path = folder / f"append-{size}-{run}.sqlite3"
            rate = events_in(batched) / await append_all(path, batched)
            rates.setdefault(f"store append, batches of {size} (FULL)", []).append(rate)
            row_bytes = stored_row_bytes(path)
        raw = f"raw sqlite3 (FULL), {row_bytes}-byte rows,"
        for per_commit, rows in ((1, sizes.raw_rows), (100, sizes.raw_batched)):
            path = folder / f"raw-{per_commit}-{run}.sqlite3"
            rate = raw_rate(path, rows, per_commit, row_bytes)
            what = "commit per row" if per_commit == 1 else "100 per commit"
            rates.setdefault(f"{raw} {what}", []).append(rate)
    medians = {name: statistics.median(found) for name, found in rates.items()}
    unit = {True: "events/s", False: "rows/s"}
    lines = [
        (name, f"{rate:,.0f} {unit[name.startswith('store')]}") for name, rate in medians.items()
    ]
    found = list(rates.values())
    ratio = list(medians.values())[2] / list(medians.values())[-1]
    each = ", ".join(f"{s / r:.0%}" for s, r in zip(found[2], found[-1], strict=True))
    lines.append(
        ("store 100-event batches / raw 100-row batches", f"{ratio:.0%} (each run: {each})")
    )
    return lines


async def bench_reads(folder: Path, sizes: Sizes, seed: int) -> list[tuple[str, str]]:
    key = (2026, "Big")
    work = batches([key], sizes.big_scope, 1000, checkpoint_every=1000, seed=seed)
    path = folder / "big.sqlite3"
    await append_all(path, work, synchronous="normal")
    del work
    gc.collect()  # the decided batches are garbage now: keep their collection out of reads
    store = await SqliteStore.open(path, writer=False)
    head = (await store.head()).event_id
    rng = random.Random(seed)
    times = []
    try:
        for _ in range(sizes.reads):
            point = rng.randint(1, head)
            began = time.perf_counter()
            await store.state_at(key, at_event=point)
            times.append(time.perf_counter() - began)
    finally:
        await store.close()
    label = f"state_at(at_event=N) on a {head:,}-event scope ({sizes.reads} random N)"
    median, worst = statistics.median(times) * 1e3, max(times) * 1e3
    return [(label, f"median {median:.2f} ms, max {worst:.2f} ms")]


async def bench_recovery(folder: Path, sizes: Sizes, seed: int) -> list[tuple[str, str]]:
    keys = [(2000 + n, f"Area {n:03}") for n in range(sizes.scopes)]
    work = batches(keys, sizes.per_scope, 1000, checkpoint_every=0, seed=seed)
    path = folder / "recovery.sqlite3"
    await append_all(path, work, synchronous="normal")
    del work
    gc.collect()
    began = time.perf_counter()
    store = await SqliteStore.open(path)
    recovered = await store.recover()
    recovery = time.perf_counter() - began
    began = time.perf_counter()
    verified = await store.verify()
    checking = time.perf_counter() - began
    await store.close()
    what = f"{len(recovered.scopes)} scopes x {sizes.per_scope:,} events, no snapshots"
    return [
        (f"open + recover(), {what}", f"{recovery:.2f} s"),
        (f"verify(), {verified['events']:,} events", f"{checking:.2f} s"),
    ]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if "model name" in line)
    except (OSError, StopIteration):
        pass
    return (
        f"{cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"SQLite {sqlite3.sqlite_version}, {platform.system()} {platform.release()}"
    )


def print_table(rows: list[tuple[str, str]]) -> None:
    width = max(len(name) for name, _ in rows)
    print(f"| {'measure'.ljust(width)} | result |")
    print(f"|{'-' * (width + 2)}|--------|")
    for name, value in rows:
        print(f"| {name.ljust(width)} | {value} |")


async def main(args: argparse.Namespace) -> None:
    sizes = QUICK if args.quick else FULL
    folder = Path(tempfile.mkdtemp(prefix="bench-store-", dir=args.dir))
    print(f"# bidlog store benchmark, {dt.date.today()}, {machine()}")
    print(f"# database files in {folder}{' (--quick)' if args.quick else ''}; append rates:")
    print(f"# median of {args.repeat} runs, store and raw alternating", flush=True)
    try:
        rows = await bench_appends(folder, sizes, args.seed, args.repeat)
        rows += await bench_reads(folder, sizes, args.seed)
        rows += await bench_recovery(folder, sizes, args.seed)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print_table(rows)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small sizes, a few seconds")
    parser.add_argument("--dir", default=None, help="where to put the databases (the disk!)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--repeat", type=int, default=5, help="runs per append measure")
    return parser.parse_args(argv)


if __name__ == "__main__":
    anyio.run(main, parse(sys.argv[1:]), backend="asyncio")
