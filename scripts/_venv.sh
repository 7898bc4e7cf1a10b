# Sourced by scripts/check and scripts/bidlog: make sure .venv exists and holds
# what pyproject.toml asks for. Reinstalls only when pyproject.toml changed.
#
# The interpreter: $BIDLOG_PYTHON if set; else the operating system's own python3 if it
# is 3.11 or newer (distributions build it with profile-guided optimisation and LTO,
# which runs bidlog about 10% faster than a plain source build such as pyenv's);
# else the first python3 on PATH. A .venv made from another interpreter is remade.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STAMP="$VENV/.bidlog-installed"
MADE_WITH="$VENV/.bidlog-python"

_usable() {  # Python >= 3.11 that can make a venv with pip
  "$1" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null
}

_pick_python() {
  if [ -n "${BIDLOG_PYTHON:-}" ]; then
    _usable "$BIDLOG_PYTHON" || {
      echo "bidlog: BIDLOG_PYTHON=$BIDLOG_PYTHON is not a Python >= 3.11 with venv" >&2
      return 1
    }
    command -v "$BIDLOG_PYTHON"
    return
  fi
  for candidate in /usr/bin/python3 python3; do
    if command -v "$candidate" >/dev/null && _usable "$candidate"; then
      command -v "$candidate"
      return
    fi
  done
  echo "bidlog: needs Python >= 3.11 with its venv module (or set BIDLOG_PYTHON)" >&2
  return 1
}

python="$(_pick_python)"
if [ -x "$VENV/bin/python" ] && [ "$(cat "$MADE_WITH" 2>/dev/null)" != "$python" ]; then
  echo "bidlog: remaking $VENV with $python" >&2
  rm -rf "$VENV"
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "bidlog: creating $VENV with $python ($("$python" -V 2>&1))" >&2
  "$python" -m venv "$VENV"
  echo "$python" > "$MADE_WITH"
fi
want="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  echo "bidlog: installing bidlog and its tools into $VENV (first run only)" >&2
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip >&2
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$ROOT[dev]" >&2
  echo "$want" > "$STAMP"
fi
