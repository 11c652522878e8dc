#!/usr/bin/env bash
# Test prerequisites of tests/test_adversarial*.py and tests/test_sandbox*.py: the sandbox's
# isolation layers, so that no case is skipped for a missing layer in CI:
#  - bubblewrap (Debian's bwrap): host filesystem invisible, pid/network namespaces, tmpfs scratch;
#  - libseccomp2: the worker's seccomp filter is built with it through ctypes.
# (Landlock needs no package: Linux >= 5.13, TCP rules from 6.7.)
# Idempotent: skips what is installed. Installer output goes to the log; one summary line is printed.
set -euo pipefail
CACHE="${RLMFLOW_CACHE_DIR:-$HOME/.cache/rlmflow}"
LOG_DIR="$CACHE/logs"
LOG="$LOG_DIR/test-sandbox.log"
mkdir -p "$LOG_DIR"
: >"$LOG"

need=()
command -v bwrap >/dev/null 2>&1 || need+=(bubblewrap)
{ ldconfig -p 2>/dev/null || /sbin/ldconfig -p 2>/dev/null || true; } | grep -q 'libseccomp\.so\.2' || need+=(libseccomp2)

status="bubblewrap and libseccomp2 already installed"
if ((${#need[@]})); then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  export DEBIAN_FRONTEND=noninteractive
  if ! $SUDO apt-get install -y --no-install-recommends "${need[@]}" >>"$LOG" 2>&1; then
    $SUDO apt-get update >>"$LOG" 2>&1
    $SUDO apt-get install -y --no-install-recommends "${need[@]}" >>"$LOG" 2>&1 \
      || { echo "test-sandbox: installing ${need[*]} failed, see $LOG" >&2; exit 1; }
  fi
  status="installed ${need[*]}"
fi
# What the sandbox itself finds here, probed as it probes (rlmflow.sandbox.layers.host_layers runs
# bwrap with the namespaces and tmpfs the worker uses), then one strict session whose worker must
# report every layer. A bwrap that is installed but cannot create namespaces is no bubblewrap.
# Locally a missing layer is reported and the tests that need it skip; with CI=true (.ci/run) it fails.
PY=${VENV_PYTHON:-.venv/bin/python}
cd "$(dirname "$0")/../.."
missing="$("$PY" - 2>>"$LOG" <<'PYEOF'
import anyio
from rlmflow import LocalSandbox
from rlmflow.sandbox.layers import host_layers

host = host_layers()
missing = []
if host.bwrap is None:
    missing.append(host.bwrap_problem or "bubblewrap")
if not host.libseccomp:
    missing.append("libseccomp (libseccomp.so.2 not loadable)")
if host.landlock_abi < 4:
    missing.append(f"Landlock ABI >= 4 (TCP rules; this kernel has ABI {host.landlock_abi})")


async def session_report() -> None:
    async def bridge(fn, args):  # type: ignore[no-untyped-def]
        raise AssertionError(fn)

    try:
        async with LocalSandbox(isolation="strict").session("ctx", bridge) as sandbox:
            report = sandbox.report
    except Exception as exc:  # IsolationUnavailableError names the layer
        missing.append(f"strict sandbox session refused: {exc}")
        return
    missing.extend(report.missing)
    layers = " ".join(report.layers)
    absent = [name for name in ("bubblewrap", "seccomp", "landlock", "capabilities") if name not in layers]
    missing.extend(f"{name} (absent from a strict session's layers)" for name in absent)


anyio.run(session_report)
print("; ".join(dict.fromkeys(missing)))
PYEOF
)" || missing="the sandbox probe crashed (see $LOG)"
if [ -z "$missing" ]; then
  status="$status; bubblewrap (namespaces), seccomp, Landlock and capabilities all hold here"
elif [[ "${CI:-}" =~ ^([Tt][Rr][Uu][Ee]|1|[Yy][Ee][Ss])$ ]]; then
  echo "test-sandbox: FAILED in CI: missing $missing" >&2
  exit 1
else
  status="$status; MISSING here: $missing (the cases that need them will be skipped)"
fi
echo "test-sandbox: $status"
