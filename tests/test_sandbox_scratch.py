"""Scratch left by dead hosts is swept, and nothing else; contexts are shared and reference-counted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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


HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(600)
"""


def test_a_directory_is_swept_once_its_owners_lock_is_free_whatever_its_pid_namespace(tmp_path: Path) -> None:
    token = "0123456789abcdef"
    owned = [tmp_path / f"rlmflow-L{token}-abcd_123", tmp_path / f"rlmflow-L{token}-contexts-abcd_123"]
    for directory in owned:
        (directory / "work").mkdir(parents=True)
    lock = tmp_path / f"rlmflow-L{token}.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        scratch._sweep_stale(tmp_path)
        assert all(d.exists() for d in owned) and lock.exists()  # its host is alive: kept
    finally:
        holder.kill()  # SIGKILL: no atexit, no cleanup; only the kernel drops the lock
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
    scratch._sweep_stale(tmp_path)
    assert not any(d.exists() for d in owned) and not lock.exists()


def test_a_hosts_own_directories_are_never_swept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scratch.tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(scratch, "_owner", None)
    mine = Path(scratch.tempfile.mkdtemp(prefix=scratch._prefix(), dir=tmp_path))
    scratch._sweep_stale(tmp_path)
    assert mine.exists()
    assert scratch._owner is not None
    os.close(scratch._owner[1])  # as if this host had died: its lock is free
    monkeypatch.setattr(scratch, "_owner", None)
    scratch._sweep_stale(tmp_path)
    assert not mine.exists()
