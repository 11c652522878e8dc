"""Host side of the isolation layers: what this machine offers, bubblewrap, and the session report.

The worker applies rlimits, capabilities, Landlock and seccomp to itself (see ``isolation.py``);
the host adds bubblewrap around it where it works, and turns the worker's account of its layers
into a :class:`SandboxReport`.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..telemetry.logs import get_logger
from . import isolation, seccomp
from .base import SandboxReport

__all__ = ["HostLayers", "bwrap_command", "host_layers", "make_report", "warn_once", "worker_command", "worker_env"]

_logger = get_logger("rlmflow.sandbox")
_warned: set[tuple[str, ...]] = set()


@dataclass(frozen=True, slots=True)
class HostLayers:
    """What this machine offers, probed once per process."""

    bwrap: str | None
    """Path of a working ``bwrap``; ``None`` when missing or when namespaces are refused."""
    bwrap_problem: str | None
    landlock_abi: int
    libseccomp: bool


@functools.cache
def host_layers() -> HostLayers:
    """Probe bubblewrap (by running it), Landlock and libseccomp. Blocking: call from a thread."""
    linux = sys.platform.startswith("linux")
    bwrap, problem = _probe_bwrap() if linux else (None, "bubblewrap: Linux only")
    return HostLayers(
        bwrap=bwrap,
        bwrap_problem=problem,
        landlock_abi=isolation.landlock_abi() if linux else 0,
        libseccomp=linux and seccomp.load_library() is not None,
    )


def _probe_bwrap() -> tuple[str | None, str | None]:
    path = shutil.which("bwrap")
    if path is None:
        return None, "bubblewrap (bwrap not installed: apt-get install bubblewrap)"
    probe = [path, "--unshare-all", "--die-with-parent", "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev"]
    probe += ["--size", str(1 << 20), "--tmpfs", "/tmp", "true"]
    try:
        done = subprocess.run(probe, capture_output=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"bubblewrap ({type(exc).__name__}: {exc})"
    if done.returncode != 0:
        reason = done.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["failed"]
        return None, f"bubblewrap (namespaces refused here: {reason[0]})"
    return path, None


def bwrap_command(
    bwrap: str, *, python: str, read_only: Sequence[str], scratch: str, scratch_bytes: int | None
) -> list[str]:
    """The bubblewrap prefix: a fresh root with only ``read_only`` bound, new pid, network, IPC,
    UTS and (where allowed) user namespaces, a size-capped tmpfs as scratch, no capabilities."""
    command = [bwrap, "--unshare-all", "--die-with-parent", "--new-session", "--proc", "/proc", "--dev", "/dev"]
    if os.geteuid() == 0:
        command += ["--cap-drop", "ALL"]
    paths = {"/usr", "/lib", "/lib64", "/bin", "/etc/ld.so.cache", *read_only}
    executable = Path(python)
    paths.update({str(executable.parent), str(executable.resolve().parent.parent)})
    for path in sorted(paths, key=len):
        if not os.path.lexists(path):
            continue
        if os.path.islink(path) and path in {"/lib", "/lib64", "/bin"}:
            command += ["--symlink", os.readlink(path), path]
        else:
            command += ["--ro-bind", path, path]
    if scratch_bytes:
        command += ["--size", str(scratch_bytes)]
    command += ["--tmpfs", scratch, "--chdir", scratch]
    return command


def worker_command(
    *,
    python: str,
    worker: Path,
    fd: int,
    bwrap: str | None,
    read_only: Sequence[str],
    scratch: str,
    scratch_bytes: int | None,
) -> list[str]:
    """The worker's command line: ``python -I worker.py FD``, inside bubblewrap when given."""
    command = [python, "-I", "-X", "faulthandler", str(worker), str(fd)]
    if bwrap is None:
        return command
    prefix = bwrap_command(
        bwrap, python=python, read_only=[*_python_paths(), *read_only], scratch=scratch, scratch_bytes=scratch_bytes
    )
    return [*prefix, "--", *command]


def worker_env(work: Path, extra: Mapping[str, str]) -> dict[str, str]:
    """The worker's whole environment: nothing of the host's but what is listed here."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(work),
        "TMPDIR": str(work),
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
        **extra,
    }


def _python_paths() -> list[str]:
    """Where the interpreter and its packages live (bound read-only under bubblewrap)."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    return sorted(p for p in paths if p and os.path.isdir(p))


def make_report(mode: str, worker: dict[str, Any], *, bwrap: bool, missing: Sequence[str]) -> SandboxReport:
    """Combine the worker's account of its layers (sent before any model code ran) with bubblewrap."""
    layers = [str(layer) for layer in worker.get("layers") or []]
    if bwrap:
        layers.insert(0, "bubblewrap(host fs invisible, pid+net+ipc namespaces, tmpfs scratch)")
    seccomp_on = bool(worker.get("seccomp"))
    return SandboxReport(
        backend="local",
        mode=mode,
        layers=tuple(layers),
        missing=tuple(dict.fromkeys([*missing, *(str(m) for m in worker.get("missing") or [])])),
        filesystem=bwrap or bool(worker.get("landlock_fs")),
        # Landlock alone covers TCP only; an empty network namespace covers every family.
        network=seccomp_on or bwrap,
        # Landlock denies execve by path, not memfd + execveat: only seccomp closes exec.
        exec=seccomp_on,
        processes=seccomp_on and bool(worker.get("capabilities")),
    )


def warn_once(report: SandboxReport) -> None:
    """Log one warning per process and per set of missing layers (``isolation="auto"``)."""
    if report.mode != "auto" or not report.missing:
        return
    key = tuple(report.missing)
    if key in _warned:
        return
    _warned.add(key)
    _logger.warning(
        "sandbox isolation degraded: missing " + "; ".join(report.missing),
        confined=report.confined,
        layers=list(report.layers),
    )
