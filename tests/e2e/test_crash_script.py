"""The crash harness, short: a few SIGKILLs mid-stream lose nothing and apply nothing twice."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "crash_test.py"


def test_crash_script_loses_nothing_and_applies_nothing_twice() -> None:
    args = ["--crashes", "3", "--clients", "3", "--users", "20", "--max-delay", "1.2"]
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--seed", "7"],
        capture_output=True,
        timeout=90,
        check=False,
    )
    out = done.stdout.decode()
    assert done.returncode == 0, out + done.stderr.decode()[-2000:]
    assert re.search(r"^crashes survived: 3 ", out, re.MULTILINE), out
    assert re.search(r"^lost: 0$", out, re.MULTILINE), out
    assert re.search(r"^applied twice: 0$", out, re.MULTILINE), out
    checked = re.search(r"^acknowledged commands checked: (\d+)$", out, re.MULTILINE)
    assert checked, out
    assert int(checked.group(1)) > 0, out
