"""Scratch left by dead hosts is swept, and nothing else; contexts are shared and reference-counted."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from rlmflow.sandbox import scratch


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_sweep_removes_only_dead_hosts_of_this_pid_namespace(tmp_path: Path) -> None:
    namespace = os.stat("/proc/self/ns/pid").st_ino
    dead = _dead_pid()
    names = {
        f"rlmflow-{namespace}-{dead}-abcd_123": False,  # a dead host's scratch: swept
        f"rlmflow-{namespace}-{dead}-contexts-abcd_123": False,  # and its shared contexts
        f"rlmflow-{namespace}-{os.getpid()}-abcd_123": True,  # this process
        f"rlmflow-{namespace + 1}-{dead}-abcd_123": True,  # another container's pid namespace
        f"rlmflow-{namespace}-99999999999-abcd_123": True,  # not a pid
        f"rlmflow-{dead}-abcd_123": True,  # not a name we make
        "rlmflow-notes": True,
    }
    for name in names:
        (tmp_path / name).mkdir()
    (tmp_path / f"rlmflow-{namespace}-{dead}-file0000").write_text("a file, not a directory")
    scratch._sweep_stale(tmp_path)
    for name, kept in names.items():
        assert (tmp_path / name).exists() == kept, name
    assert (tmp_path / f"rlmflow-{namespace}-{dead}-file0000").exists()


def test_contexts_are_shared_until_the_last_release() -> None:
    first = scratch.acquire_context("shared text")
    second = scratch.acquire_context("shared text")
    other = scratch.acquire_context(["shared text"])  # a list is a different (json) context
    assert first.path == second.path and other.path != first.path and other.kind == "json"
    assert oct(first.path.stat().st_mode & 0o777) == "0o444"
    scratch.release_context(first)
    assert second.path.exists()
    scratch.release_context(second)
    scratch.release_context(other)
    assert not second.path.exists() and not other.path.exists()
