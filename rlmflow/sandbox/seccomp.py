"""The worker's seccomp filter, built with the system's libseccomp through ctypes (no new dependency).

Standard library only: the worker loads this file by path. The filter allows by default and
refuses what model code has no business doing (a deny list: Python needs too many system calls
for an allow list to stay correct across versions):

- new sockets of any family (``socket``, ``socketpair``; the worker keeps the connected socket it
  was started with), ``io_uring`` (which can open sockets and files behind the other rules);
- new processes: ``fork``, ``vfork``, ``clone`` without ``CLONE_THREAD`` (threads still work),
  ``clone3`` answers ENOSYS so the C library falls back to ``clone``; ``execve``, ``execveat``,
  ``memfd_create``; ``setsid``/``setpgid`` (leaving the process group the host kills);
- signals to anything but the worker itself (``kill``, ``tgkill``, ``rt_*sigqueueinfo`` with
  another pid, ``tkill``, pidfds); setting limits with ``prlimit64`` on any pid but 0 (itself);
  ``prctl(PR_SET_PDEATHSIG)``;
- what root could otherwise still do: ``bpf``, ``ptrace``, ``process_vm_*``, ``mknod``, mounts,
  namespaces, keyrings, modules, ``perf_event_open``, ``userfaultfd``, file handles, SysV and
  POSIX message-queue IPC, clock and host name changes;
- file metadata, which Landlock does not govern: ``chmod``/``chown``/``utime`` families, extended
  attributes, and the ``chattr`` ioctls (immutable flags would outlive the scratch directory).

- other processes' scheduling (``setpriority``, ``sched_set*``, ``ioprio_set`` on anything but
  itself);
- every system call numbered after the newest one listed here answers ENOSYS, as on an older
  kernel, so the list does not open up when the kernel grows.

Other architectures' system calls (the i386 ABI on x86_64) kill the worker.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from typing import Any

_ACT_ALLOW = 0x7FFF0000
_ACT_KILL_PROCESS = 0x80000000
_ATTR_ACT_BADARCH = 2
_ATTR_CTL_TSYNC = 4
_ATTR_CTL_OPTIMIZE = 8
_CMP_NE, _CMP_MASKED_EQ = 1, 7
_LOW32 = 0xFFFFFFFF

_CLONE_THREAD = 0x00010000
_PR_SET_PDEATHSIG = 1
_IOPRIO_WHO_PROCESS = 1
# The first system call number after removexattrat (Linux 6.13); numbers are shared by every
# architecture since 4.x for new calls.
_FIRST_UNLISTED = 467
# ioctl requests: chattr (FS_IOC_SETFLAGS and its 32-bit twin, FS_IOC_FSSETXATTR) and terminal
# input injection (TIOCSTI, TIOCLINUX).
_DENIED_IOCTLS = (0x40086602, 0x40046602, 0x401C5820, 0x5412, 0x541C)

DENIED = (
    "socket", "socketpair", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "fork", "vfork", "execve", "execveat", "memfd_create", "memfd_secret", "setsid", "setpgid",
    "tkill", "pidfd_open", "pidfd_send_signal", "pidfd_getfd",
    "bpf", "ptrace", "process_vm_readv", "process_vm_writev", "process_madvise", "kcmp",
    "mknod", "mknodat", "mount", "umount2", "pivot_root", "chroot", "unshare", "setns",
    "fsopen", "fsconfig", "fsmount", "fspick", "move_mount", "open_tree", "mount_setattr",
    "keyctl", "add_key", "request_key", "init_module", "finit_module", "delete_module",
    "kexec_load", "kexec_file_load", "reboot", "swapon", "swapoff", "acct", "quotactl", "quotactl_fd",
    "perf_event_open", "userfaultfd", "fanotify_init", "name_to_handle_at", "open_by_handle_at",
    "lookup_dcookie", "syslog", "iopl", "ioperm", "vhangup", "uselib", "migrate_pages", "move_pages",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "sethostname", "setdomainname",
    "shmget", "shmat", "shmctl", "msgget", "msgsnd", "msgrcv", "msgctl", "semget", "semop", "semctl",
    "semtimedop", "mq_open", "mq_unlink", "mq_timedsend", "mq_timedreceive", "mq_notify", "mq_getsetattr",
    "chmod", "fchmod", "fchmodat", "fchmodat2", "chown", "fchown", "lchown", "fchownat",
    "utime", "utimes", "utimensat", "futimesat",
    "setxattr", "lsetxattr", "fsetxattr", "removexattr", "lremovexattr", "fremovexattr",
    "setxattrat", "removexattrat",
)  # fmt: skip
# Newer than some libseccomp releases: resolved by number when the name is unknown (x86_64, arm64 agree).
_NUMBERS = {"fchmodat2": 452, "setxattrat": 463, "removexattrat": 466, "memfd_secret": 447, "quotactl_fd": 443}


class _ArgCmp(ctypes.Structure):
    _fields_ = (
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    )


def _errno_action(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


def load_library() -> Any:
    """libseccomp, or ``None`` where it is missing. Load it before Landlock narrows the filesystem."""
    try:
        lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    except OSError:
        name = ctypes.util.find_library("seccomp")  # runs ldconfig: only when the usual soname fails
        if name is None:
            return None
        try:
            lib = ctypes.CDLL(name, use_errno=True)
        except OSError:
            return None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = (ctypes.c_uint32,)
    lib.seccomp_release.argtypes = (ctypes.c_void_p,)
    lib.seccomp_load.argtypes = (ctypes.c_void_p,)
    lib.seccomp_attr_set.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32)
    lib.seccomp_syscall_resolve_name.argtypes = (ctypes.c_char_p,)
    lib.seccomp_rule_add_array.argtypes = (
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(_ArgCmp),
    )
    return lib


class Filter:
    """A filter being built; :meth:`load` installs it on every thread of the process."""

    def __init__(self, lib: Any) -> None:
        self._lib = lib
        self._ctx = lib.seccomp_init(_ACT_ALLOW)
        if not self._ctx:
            raise OSError(errno.ENOMEM, "seccomp_init failed")
        self.unknown: list[str] = []
        lib.seccomp_attr_set(self._ctx, _ATTR_ACT_BADARCH, _ACT_KILL_PROCESS)
        lib.seccomp_attr_set(self._ctx, _ATTR_CTL_TSYNC, 1)
        lib.seccomp_attr_set(self._ctx, _ATTR_CTL_OPTIMIZE, 2)  # a binary tree: every system call pays log(n)

    def _number(self, name: str) -> int | None:
        number = int(self._lib.seccomp_syscall_resolve_name(name.encode()))
        if number < 0:
            number = _NUMBERS.get(name, -1)
        return number if number >= 0 else None

    def rule(self, action: int, name: str, *conditions: tuple[int, int, int, int]) -> None:
        number = self._number(name)
        if number is None:
            self.unknown.append(name)  # absent from this kernel's architecture: nothing to deny
            return
        self.rule_number(action, number, *conditions, name=name)

    def rule_number(
        self, action: int, number: int, *conditions: tuple[int, int, int, int], name: str | None = None
    ) -> None:
        array = (_ArgCmp * max(1, len(conditions)))(*(_ArgCmp(*c) for c in conditions))
        rc = self._lib.seccomp_rule_add_array(self._ctx, action, number, len(conditions), array)
        if rc < 0:
            raise OSError(-rc, f"seccomp_rule_add({name or number}) failed: {os.strerror(-rc)}")

    def load(self) -> None:
        try:
            rc = self._lib.seccomp_load(self._ctx)
            if rc < 0:
                raise OSError(-rc, f"seccomp_load failed: {os.strerror(-rc)}")
        finally:
            self._lib.seccomp_release(self._ctx)


def build(lib: Any) -> Filter:
    """The worker's filter for this process (``kill`` and friends may name only ``os.getpid()``)."""
    deny = _errno_action(errno.EPERM)
    pid = os.getpid()
    flt = Filter(lib)
    for name in DENIED:
        flt.rule(deny, name)
    flt.rule(_errno_action(errno.ENOSYS), "clone3")  # flags live in memory seccomp cannot read
    flt.rule(deny, "clone", (0, _CMP_MASKED_EQ, _CLONE_THREAD, 0))  # a process, not a thread
    for name in ("kill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo"):
        flt.rule(deny, name, (0, _CMP_NE, pid, 0))
    # setting another process's limits (pid 0 means this one; one comparison per argument)
    flt.rule(deny, "prlimit64", (0, _CMP_NE, 0, 0), (2, _CMP_NE, 0, 0))
    # int arguments: the kernel reads the low 32 bits, so compare only those
    flt.rule(deny, "prctl", (0, _CMP_MASKED_EQ, _LOW32, _PR_SET_PDEATHSIG))
    # scheduling of other processes (renice or pin the host: same uid needs no capability)
    flt.rule(deny, "setpriority", (0, _CMP_NE, 0, 0))  # only PRIO_PROCESS...
    flt.rule(deny, "setpriority", (1, _CMP_NE, 0, 0))  # ...of itself
    for name in ("sched_setaffinity", "sched_setscheduler", "sched_setparam", "sched_setattr", "get_robust_list"):
        flt.rule(deny, name, (0, _CMP_NE, 0, 0))
    flt.rule(deny, "ioprio_set", (0, _CMP_NE, _IOPRIO_WHO_PROCESS, 0))
    flt.rule(deny, "ioprio_set", (1, _CMP_NE, 0, 0))
    # System calls newer than this list answer ENOSYS, as on an older kernel: a deny list must
    # not open up when the kernel grows (file_setattr, for one, sets the immutable flag).
    for number in range(_FIRST_UNLISTED, _FIRST_UNLISTED + 128):
        flt.rule_number(_errno_action(errno.ENOSYS), number)
    for request in _DENIED_IOCTLS:
        flt.rule(deny, "ioctl", (1, _CMP_MASKED_EQ, _LOW32, request))
    return flt
