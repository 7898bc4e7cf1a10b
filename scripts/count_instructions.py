#!/usr/bin/env python3
"""Machine instructions per command of ``bidlog serve``, counted by valgrind's callgrind.

Seconds on a shared VM move by a third between runs of the same code; instruction counts
repeat to about 0.05%. So this is the measure to compare two versions of the code by:
it runs the worker under callgrind twice, on an empty stdin and on the benchmark's mix
(``scripts/bench.py``: set-up commands, then ``submit_bid`` by random users), and prints
the difference per command: with the writer process (the worker's and the writer's
counts, the child traced too), and with ``--writer thread`` (one process). It is a
count, not a speed: it says nothing of cache misses, the disk or threads waiting for
each other. Valgrind hides the CPU's SHA instructions, so
SHA-256 is counted in software (about 30,000 instructions of a ``submit_bid``).

Usage: ``.venv/bin/python scripts/count_instructions.py [--commands N] [--seed N]``
(needs ``valgrind``; about two minutes for the default 10,000 commands).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench import BIN, Workload  # scripts/bench.py, beside this file

PER_PROCESS = re.compile(rb"==(\d+)== Collected : (\d+)")


def count(stdin: Path, db: Path, writer: str) -> tuple[int, int]:
    """Instructions callgrind collected for ``bidlog serve`` reading ``stdin``: the
    worker's, and its writer process's (0 with ``--writer thread``)."""
    for old in db.parent.glob(db.name + "*"):
        old.unlink()
    with stdin.open("rb") as feed:
        done = subprocess.run(
            ["valgrind", "--tool=callgrind", "--trace-children=yes",
             "--callgrind-out-file=/dev/null", str(BIN), "serve", "--db", str(db),
             "--synchronous", "full", "--log-level", "warning", "--writer", writer],
            stdin=feed, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False,
        )  # fmt: skip
    # One line per process, each prefixed with its pid: the writer process ends first.
    found = [(int(pid), int(n)) for pid, n in PER_PROCESS.findall(done.stderr)]
    if done.returncode != 0 or not found:
        raise RuntimeError(f"valgrind run failed:\n{done.stderr.decode(errors='replace')}")
    worker_pid = min(pid for pid, _ in found)  # the worker started first
    worker = sum(n for pid, n in found if pid == worker_pid)
    return worker, sum(n for pid, n in found if pid != worker_pid)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--commands", type=int, default=10_000, help="commands in the mix")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None:
        print("count_instructions: valgrind is not installed", file=sys.stderr)
        return 2
    work = Workload(args.seed)
    setup = work.setup()
    lines = setup + work.bids(max(args.commands - len(setup), 0), "count")
    with tempfile.TemporaryDirectory(prefix="bidlog-count-") as tmp:
        where = Path(tmp)
        empty, mix = where / "empty.ndjson", where / "mix.ndjson"
        empty.write_bytes(b"")
        mix.write_bytes(b"".join(lines))
        print(f"counting {len(lines):,} commands under callgrind ...", file=sys.stderr)
        for writer in ("process", "thread"):
            start_only = count(empty, where / "db.sqlite3", writer)
            total = count(mix, where / "db.sqlite3", writer)
            per = [(t - s) / len(lines) for t, s in zip(total, start_only, strict=True)]
            label = f"bidlog serve --writer {writer} (stdin, synchronous=full)"
            if writer == "process":
                print(
                    f"{label}: {sum(per):,.0f} instructions per command, "
                    f"{per[0]:,.0f} in the worker and {per[1]:,.0f} in its writer process"
                )
            else:
                print(f"{label}: {per[0]:,.0f} instructions per command")
    return 0


if __name__ == "__main__":
    sys.exit(main())
