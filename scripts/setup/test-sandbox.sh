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
# bubblewrap needs namespaces; a container may refuse them (the tests then skip with the reason)
if bwrap --unshare-all --die-with-parent --ro-bind / / --proc /proc --dev /dev true >>"$LOG" 2>&1; then
  status="$status; bwrap works here"
else
  status="$status; bwrap cannot create namespaces here (bubblewrap cases will be skipped)"
fi
echo "test-sandbox: $status"
