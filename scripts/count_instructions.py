#!/usr/bin/env python3
"""Machine instructions per command of ``bidlog serve``, counted by valgrind's callgrind.

Seconds on a shared VM move by a third between runs of the same code; instruction counts
repeat to about 0.05%. So this is the measure to compare two versions of the code by:
it runs the worker under callgrind twice, on an empty stdin and on the benchmark's mix
(``scripts/bench.py``: set-up commands, then ``submit_bid`` by random users), and prints
the difference per command. It is a count, not a speed: it says nothing of cache misses,
the disk or threads waiting for each other. Valgrind hides the CPU's SHA instructions, so
SHA-256 is counted in software (about 30,000 instructions of a ``submit_bid``).

Usage: ``.venv/bin/python scripts/count_instructions.py [--commands N] [--seed N]``
(needs ``valgrind``; about a minute for the default 10,000 commands).
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

COLLECTED = re.compile(rb"Collected : (\d+)")


def count(stdin: Path, db: Path) -> int:
    """Instructions callgrind collected for ``bidlog serve`` reading ``stdin``."""
    for old in db.parent.glob(db.name + "*"):
        old.unlink()
    with stdin.open("rb") as feed:
        done = subprocess.run(
            ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", str(BIN),
             "serve", "--db", str(db), "--synchronous", "full", "--log-level", "warning"],
            stdin=feed, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False,
        )  # fmt: skip
    found = COLLECTED.search(done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"valgrind run failed:\n{done.stderr.decode(errors='replace')}")
    return int(found.group(1))


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
        start_only = count(empty, where / "db.sqlite3")
        total = count(mix, where / "db.sqlite3")
    per = (total - start_only) / len(lines)
    print(f"bidlog serve (stdin, synchronous=full): {per:,.0f} instructions per command")
    print(f"({len(lines):,} commands: {total:,} instructions, {start_only:,} of them start-up)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
