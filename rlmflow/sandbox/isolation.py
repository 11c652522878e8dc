"""Isolation layers the worker applies to itself before it reads the context.

Standard library only (the worker loads this file by path). Each layer is probed and reported;
a layer the kernel lacks is skipped and named in the report, never silently assumed. In order:

- ``rlimits``: address space, open files, file size, no core dumps. Always.
- ``lifecycle``: a parent-death signal (SIGKILL), then a check that the parent is still the
  process that started the worker (it could have died in between). Linux.
- ``capabilities``: the bounding set, ambient, inheritable, permitted and effective sets emptied
  and root's special treatment locked off (securebits), even when started as root; then
  ``no_new_privs``. Linux.
- ``landlock``: the filesystem becomes read-only except the scratch directory, and only the
  Python installation, the context and a few device files are readable at all (so the worker
  cannot read ``/proc/<host>/environ`` or the user's home); ``execve`` is denied; from ABI 4
  TCP bind/connect are denied; from ABI 6 signals and abstract Unix sockets are scoped to the
  sandbox. Linux >= 5.13, no privileges needed.
- ``seccomp``: see :mod:`seccomp` (no sockets, processes, exec, kernel attack surface). Its
  library is loaded before Landlock narrows the readable paths; the filter is loaded last.

The environment allowlist, ``python -I``, the process group and bubblewrap (host filesystem
invisible, pid and network namespaces, size-capped scratch) are applied by the host when it
spawns the worker.
"""

from __future__ import annotations

import ctypes
import os
import struct
import sys
from typing import Any

try:
    from . import seccomp
except ImportError:  # loaded by path inside the worker, beside seccomp.py
    import seccomp  # type: ignore[no-redef,import-not-found]

_PR_SET_PDEATHSIG = 1
_PR_CAPBSET_DROP = 24
_PR_SET_SECUREBITS = 28
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
# NOROOT, NO_SETUID_FIXUP, NO_CAP_AMBIENT_RAISE set and locked, KEEP_CAPS clear and locked:
# uid 0 gains nothing from exec or setuid.
_SECUREBITS_LOCKED = 0xEF
_CAP_VERSION_3 = 0x20080522
_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446  # same on x86_64 and arm64
_RULE_PATH_BENEATH = 1
_CREATE_RULESET_VERSION = 1

_FS_EXECUTE = 1 << 0
_FS_WRITE_FILE = 1 << 1
_FS_READ_FILE = 1 << 2
_FS_READ_DIR = 1 << 3
_FS_ALL_V1 = (1 << 13) - 1
_FS_REFER = 1 << 13  # ABI 2
_FS_TRUNCATE = 1 << 14  # ABI 3
_FS_IOCTL_DEV = 1 << 15  # ABI 5
_FILE_RIGHTS = _FS_EXECUTE | _FS_WRITE_FILE | _FS_READ_FILE | _FS_TRUNCATE | _FS_IOCTL_DEV
_NET_BIND_TCP, _NET_CONNECT_TCP = 1 << 0, 1 << 1  # ABI 4
_SCOPE_ABSTRACT_UNIX, _SCOPE_SIGNAL = 1 << 0, 1 << 1  # ABI 6

_DEVICE_FILES = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random")


def _libc() -> Any:
    return ctypes.CDLL(None, use_errno=True)


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 when unavailable."""
    if not sys.platform.startswith("linux"):
        return 0
    libc = _libc()
    libc.syscall.restype = ctypes.c_long
    version = int(libc.syscall(_SYS_CREATE_RULESET, None, ctypes.c_size_t(0), _CREATE_RULESET_VERSION))
    return max(version, 0)


def _apply_rlimits(config: dict[str, Any]) -> list[str]:
    import resource

    applied = []
    limits = {
        "RLIMIT_AS": config.get("memory_bytes"),
        "RLIMIT_NOFILE": config.get("max_open_files"),
        "RLIMIT_FSIZE": config.get("max_file_bytes"),
        "RLIMIT_CORE": 0,
    }
    for name, value in limits.items():
        if value is None or not hasattr(resource, name):
            continue
        which = getattr(resource, name)
        _, hard = resource.getrlimit(which)
        value = int(value) if hard == resource.RLIM_INFINITY else min(int(value), hard)
        resource.setrlimit(which, (value, value))
        applied.append(f"{name}={value}")
    return applied


def _landlock(read_paths: list[str], write_paths: list[str]) -> str | None:
    abi = landlock_abi()
    if abi < 1:
        return None
    libc = _libc()
    libc.syscall.restype = ctypes.c_long
    handled_fs = _FS_ALL_V1
    if abi >= 2:
        handled_fs |= _FS_REFER
    if abi >= 3:
        handled_fs |= _FS_TRUNCATE
    if abi >= 5:
        handled_fs |= _FS_IOCTL_DEV
    handled_net = (_NET_BIND_TCP | _NET_CONNECT_TCP) if abi >= 4 else 0
    scoped = (_SCOPE_ABSTRACT_UNIX | _SCOPE_SIGNAL) if abi >= 6 else 0
    if abi >= 6:
        attr = struct.pack("=QQQ", handled_fs, handled_net, scoped)
    elif abi >= 4:
        attr = struct.pack("=QQ", handled_fs, handled_net)
    else:
        attr = struct.pack("=Q", handled_fs)
    buffer = ctypes.create_string_buffer(attr, len(attr))
    ruleset = int(libc.syscall(_SYS_CREATE_RULESET, buffer, ctypes.c_size_t(len(attr)), 0))
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset failed")
    read_access = _FS_READ_FILE | _FS_READ_DIR
    write_access = handled_fs & ~_FS_EXECUTE
    try:
        for paths, access in ((read_paths, read_access), (write_paths, write_access)):
            for path in paths:
                try:
                    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
                except OSError:
                    continue  # a path that does not exist needs no rule
                try:
                    rule_access = access
                    if not os.path.isdir(path):  # file rules may only carry file rights
                        rule_access &= _FILE_RIGHTS
                    rule = struct.pack("=Qi", rule_access, fd)
                    rule_buffer = ctypes.create_string_buffer(rule, len(rule))
                    if libc.syscall(_SYS_ADD_RULE, ruleset, _RULE_PATH_BENEATH, rule_buffer, 0) < 0:
                        raise OSError(ctypes.get_errno(), f"landlock_add_rule failed for {path}")
                finally:
                    os.close(fd)
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(NO_NEW_PRIVS) failed")
        if libc.syscall(_SYS_RESTRICT_SELF, ruleset, 0) < 0:
            raise OSError(ctypes.get_errno(), "landlock_restrict_self failed")
    finally:
        os.close(ruleset)
    parts = [f"landlock(abi={abi}, fs"]
    if handled_net:
        parts.append("tcp-deny")
    if scoped:
        parts.append("signal+unix-scope")
    return ", ".join(parts) + ")"


def _lifecycle(parent_pid: int | None) -> bool:
    """Die with the parent. False when the parent is already gone (the caller exits)."""
    libc = _libc()
    if libc.prctl(_PR_SET_PDEATHSIG, 9, 0, 0, 0) != 0:  # SIGKILL
        raise OSError(ctypes.get_errno(), "prctl(PDEATHSIG) failed")
    # The signal fires on a later death only: a parent that died before the prctl is noticed here.
    return os.getppid() == parent_pid if parent_pid else os.getppid() != 0


def _capability_sets() -> dict[str, int]:
    sets = {}
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("Cap"):
                name, value = line.split(":")
                sets[name] = int(value.strip(), 16)
    return sets


def _drop_capabilities() -> str:
    """Empty every capability set; set and lock the securebits; no_new_privs. Returns a description."""
    libc = _libc()
    try:
        with open("/proc/sys/kernel/cap_last_cap", encoding="ascii") as fh:
            last = int(fh.read())
    except OSError:
        last = 63
    for cap in range(last + 1):
        libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0)  # EPERM without CAP_SETPCAP: checked below
    libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    libc.prctl(_PR_SET_SECUREBITS, _SECUREBITS_LOCKED, 0, 0, 0)
    header = struct.pack("=Ii", _CAP_VERSION_3, 0)
    data = bytes(24)  # two {effective, permitted, inheritable} u32 triples, all zero
    if libc.capset(ctypes.c_char_p(header), ctypes.c_char_p(data)) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(NO_NEW_PRIVS) failed")
    sets = _capability_sets()
    held = [name for name in ("CapEff", "CapPrm", "CapInh", "CapAmb") if sets.get(name)]
    if held:
        raise OSError(0, f"capabilities still held after dropping: {held}")
    bounding = "bounding set empty" if not sets.get("CapBnd") else "bounding set kept (no CAP_SETPCAP)"
    return f"capabilities(none held, {bounding}, no_new_privs)"


def python_read_paths() -> list[str]:
    """Directories the interpreter needs to import modules, plus shared libraries."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    paths.update(p for p in sys.path if p and os.path.exists(p))
    paths.update(("/usr/lib", "/usr/lib64", "/lib", "/lib64", "/usr/share/zoneinfo", "/etc/localtime"))
    return sorted(paths)


def harden(config: dict[str, Any]) -> dict[str, Any]:
    """Apply the configured layers to this process; return what holds.

    The result maps ``layers`` to a description of each applied layer, ``missing`` to the
    layers asked for but unavailable (with the reason), and each of ``landlock_fs``,
    ``landlock_tcp``, ``landlock_scope``, ``seccomp``, ``capabilities``, ``pdeathsig`` to a bool.
    Call from the main thread before any other thread starts (Landlock binds the calling thread
    and the threads it creates afterwards; the seccomp filter is synchronised to all threads).
    ``SystemExit`` when the parent already died.
    """
    report: dict[str, Any] = {"layers": _apply_rlimits(config.get("rlimits") or {}), "missing": []}
    layers: list[str] = report["layers"]
    missing: list[str] = report["missing"]
    linux = sys.platform.startswith("linux")
    if linux:
        if not _lifecycle(config.get("parent_pid")):
            raise SystemExit(4)
        report["pdeathsig"] = True
        layers.append("pdeathsig(SIGKILL)")
    if config.get("capabilities") and linux:
        try:
            layers.append(_drop_capabilities())
            report["capabilities"] = True
        except OSError as exc:
            missing.append(f"capabilities ({exc.strerror or exc})")
    flt = None
    if config.get("seccomp") and linux:
        lib = seccomp.load_library()
        if lib is None:
            missing.append("seccomp (libseccomp.so.2 not found: apt-get install libseccomp2)")
        else:
            try:
                flt = seccomp.build(lib)
            except OSError as exc:
                missing.append(f"seccomp ({exc})")
    if config.get("landlock") and linux:
        read_paths = [*python_read_paths(), *(config.get("read_paths") or []), *_DEVICE_FILES]
        write_paths = [*(config.get("write_paths") or []), "/dev/null"]
        try:
            described = _landlock(read_paths, write_paths)
            if described is None:
                missing.append("landlock (kernel without Landlock, Linux >= 5.13 needed)")
        except OSError as exc:  # a kernel or container that refuses it: reported, never fatal
            described = None
            missing.append(f"landlock ({exc})")
        if described is not None:
            layers.append(described)
            report["landlock_fs"] = True
            report["landlock_tcp"] = "tcp-deny" in described
            report["landlock_scope"] = "scope" in described
    if flt is not None:
        try:
            flt.load()
        except OSError as exc:  # a kernel without seccomp filters
            missing.append(f"seccomp ({exc})")
        else:
            report["seccomp"] = True
            layers.append("seccomp(deny-list: sockets, processes, exec, privileged and metadata calls)")
    if not linux:
        missing.extend(f"{name} (Linux only)" for name in ("capabilities", "landlock", "seccomp") if config.get(name))
    if report.get("landlock_fs") and not report.get("landlock_tcp") and not report.get("seccomp"):
        missing.append("landlock TCP rules (Linux >= 6.7 needed) and seccomp: TCP is open")
    return report
