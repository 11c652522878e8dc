#!/usr/bin/env bash
# Test prerequisite: redis-server (Debian package) for the shared-lane tests, and the `redis` extra
# (redis-py's asyncio client) in ./.venv. The tests start their own server on a free 127.0.0.1 port.
set -euo pipefail
cd "$(dirname "$0")/../.."
LOGS=${RLMFLOW_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/rlmflow}/logs
mkdir -p "$LOGS"
LOG="$LOGS/test-redis.log"
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
PY=${VENV_PYTHON:-.venv/bin/python}
{
  if ! command -v redis-server >/dev/null; then
    # update the package lists only when the candidate is unknown (a fresh machine)
    apt-cache show redis-server >/dev/null 2>&1 || $SUDO apt-get update -qq
    $SUDO apt-get install -y --no-install-recommends redis-server
  fi
  if ! "$PY" -c "import redis, sys; sys.exit(int(redis.__version__.split('.')[0]) < 5)" 2>/dev/null; then
    "$PY" -m pip install -q --disable-pip-version-check -e ".[redis]"
  fi
} >>"$LOG" 2>&1 || { echo "test-redis: FAILED (see $LOG)"; exit 1; }
echo "test-redis: $(redis-server --version | cut -d' ' -f1-3), redis-py $("$PY" -c 'import redis; print(redis.__version__)') (log: $LOG)"
