#!/usr/bin/env bash
# Test prerequisite: Ray (the `ray` extra) in ./.venv for tests/test_ray*.py; the tests start a local
# Ray instance (ray.init(num_cpus=2)) and shut it down.
set -euo pipefail
cd "$(dirname "$0")/../.."
LOGS=${RLMFLOW_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/rlmflow}/logs
mkdir -p "$LOGS"
LOG="$LOGS/test-ray.log"
PY=${VENV_PYTHON:-.venv/bin/python}
{
  if ! "$PY" -c "import ray" 2>/dev/null; then
    "$PY" -m pip install -q --disable-pip-version-check -e ".[ray]"
  fi
} >>"$LOG" 2>&1 || { echo "test-ray: FAILED (see $LOG)"; exit 1; }
echo "test-ray: ray $("$PY" -c 'import ray; print(ray.__version__)') (log: $LOG)"
