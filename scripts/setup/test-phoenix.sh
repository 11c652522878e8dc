#!/usr/bin/env bash
# Test prerequisites of tests/test_phoenix_e2e.py and the docs/tracing.md screenshots:
#  - Arize Phoenix (PyPI arize-phoenix) in a virtual environment of its own, apart from rlmflow's;
#  - Debian's chromium, for the headless screenshots of Phoenix's UI (scripts/setup/phoenix-screenshots.sh).
# Idempotent: skips what is installed. Installer output goes to the log; one summary line is printed.
set -euo pipefail
PHOENIX_VERSION="${RLMFLOW_PHOENIX_VERSION:-20.26.1}"
CACHE="${RLMFLOW_CACHE_DIR:-$HOME/.cache/rlmflow}"
VENV="${RLMFLOW_PHOENIX_VENV:-$CACHE/venv-phoenix}"
LOG_DIR="$CACHE/logs"
LOG="$LOG_DIR/test-phoenix.log"
mkdir -p "$LOG_DIR"
: >"$LOG"

PYTHON="${RLMFLOW_PHOENIX_PYTHON:-}"
if [ -z "$PYTHON" ]; then
  for candidate in python3.12 python3.11 python3; do
    # a pyenv shim exists even when its version is not selected: ask the interpreter itself
    if "$candidate" -c 'import sys; assert (3, 10) <= sys.version_info[:2] < (3, 14); import venv' >/dev/null 2>&1; then
      PYTHON="$candidate"; break
    fi
  done
fi

status="phoenix $PHOENIX_VERSION already in $VENV"
installed="$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("arize-phoenix"))' 2>/dev/null || true)"
if [ "$installed" != "$PHOENIX_VERSION" ]; then
  [ -n "$PYTHON" ] || { echo "test-phoenix: no Python 3.10-3.13 with venv found" >&2; exit 1; }
  {
    set -e
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q "arize-phoenix==$PHOENIX_VERSION"
  } >>"$LOG" 2>&1 || { echo "test-phoenix: installing arize-phoenix failed, see $LOG" >&2; exit 1; }
  status="phoenix $PHOENIX_VERSION installed in $VENV"
fi

if ! command -v chromium >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y --no-install-recommends chromium >>"$LOG" 2>&1; then
    apt-get update >>"$LOG" 2>&1
    apt-get install -y --no-install-recommends chromium >>"$LOG" 2>&1 \
      || { echo "test-phoenix: installing chromium failed, see $LOG" >&2; exit 1; }
  fi
  status="$status; chromium installed"
fi
echo "test-phoenix: $status"
