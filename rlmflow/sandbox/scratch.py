"""Files on the host for sandbox sessions: shared read-only contexts and per-session scratch.

A context is written once per host process and shared, read-only, by every session that loads
the same text (a parent and the children it starts with the same document): files are keyed by
sha256 and reference-counted.

A host process that dies without cleaning up (SIGKILL, an OOM kill, a server that re-raises
SIGTERM past ``atexit``) leaves its directories behind; the next host removes them. Whether their
owner is alive is told by a lock, not a pid: each host holds an exclusive ``flock`` on its own
``rlmflow-L<token>.lock`` for as long as it lives, and its directories carry the same token. The
kernel drops the lock when the process dies, however it dies, and a lock means the same thing
in every pid namespace sharing the directory: a restarted container reclaims what the one before
it left. (Directories named by the pid scheme of earlier versions are still swept by pid.)
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from .base import Context

__all__ = [
    "ContextFile",
    "ScratchUsage",
    "acquire_context",
    "empty",
    "make_scratch",
    "measure",
    "release_context",
    "remove_tree",
]

_PREFIX = "rlmflow-"
# only what mkdtemp below names: rlmflow-L<owner token>-[contexts-]<8 random characters>
_OWNED = re.compile(rf"^{_PREFIX}L([0-9a-f]{{16}})-(?:contexts-)?[a-z0-9_]{{8}}$")
_LOCK = re.compile(rf"^{_PREFIX}L([0-9a-f]{{16}})\.lock$")
# earlier versions' names: rlmflow-<pid namespace>-<pid>-[contexts-]<8 random characters>
_STALE = re.compile(rf"^{_PREFIX}(\d+)-(\d+)-(?:contexts-)?[a-z0-9_]{{8}}$")
_lock = threading.Lock()
_contexts: dict[str, tuple[Path, int]] = {}  # sha256 -> (directory, references)
_root: Path | None = None
_swept = False
_owner: tuple[str, int] | None = None  # this process's token and the descriptor of its held lock
_owner_lock = threading.Lock()


@dataclass(frozen=True, slots=True)
class ContextFile:
    """A context on disk: its directory is the only thing the worker may read besides Python."""

    key: str
    path: Path
    kind: str  # "text" or "json"


def _context_root() -> Path:
    global _root
    if _root is None:
        _root = Path(tempfile.mkdtemp(prefix=f"{_prefix()}contexts-"))
        atexit.register(shutil.rmtree, _root, True)
    return _root


def acquire_context(context: Context) -> ContextFile:
    """Write ``context`` unless a live session already did; blocking (call from a thread)."""
    kind = "text" if isinstance(context, str) else "json"
    text = context if isinstance(context, str) else json.dumps(context, ensure_ascii=False)
    data = text.encode("utf-8")
    key = f"{kind}-{hashlib.sha256(data).hexdigest()}"
    name = "context.txt" if kind == "text" else "context.json"
    with _lock:
        entry = _contexts.get(key)
        if entry is not None:
            _contexts[key] = (entry[0], entry[1] + 1)
            return ContextFile(key, entry[0] / name, kind)
        directory = _context_root() / key
        directory.mkdir(mode=0o755)
        path = directory / name
        path.write_bytes(data)
        path.chmod(0o444)
        _contexts[key] = (directory, 1)
    return ContextFile(key, path, kind)


def release_context(context: ContextFile) -> None:
    """Drop one reference; the file goes with the last. Blocking."""
    with _lock:
        directory, references = _contexts[context.key]
        if references > 1:
            _contexts[context.key] = (directory, references - 1)
            return
        del _contexts[context.key]
    shutil.rmtree(directory, ignore_errors=True)


def make_scratch() -> Path:
    """A fresh scratch directory (``work`` inside it is the worker's cwd). Blocking.

    The first call in a process removes scratch left by hosts that died without cleaning up.
    """
    global _swept
    if not _swept:
        _swept = True
        _sweep_stale(Path(tempfile.gettempdir()))
    directory = Path(tempfile.mkdtemp(prefix=_prefix()))
    (directory / "work").mkdir()
    return directory


def _pid_namespace() -> int:
    """This process's pid namespace (0 where there is none): a pid means something only in it."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _prefix() -> str:
    return f"{_PREFIX}L{_owner_token()}-"


def _owner_token() -> str:
    """This process's token, its lock taken (once) and held until the process ends."""
    global _owner
    with _owner_lock:  # not _lock: acquire_context holds that one when it makes its directory
        while _owner is None:
            token = secrets.token_hex(8)
            path = Path(tempfile.gettempdir()) / f"{_PREFIX}L{token}.lock"
            fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if os.stat(path).st_ino != os.fstat(fd).st_ino:  # a sweep took the name meanwhile
                    raise BlockingIOError
            except OSError:
                os.close(fd)
                continue
            _owner = (token, fd)
            atexit.register(_unlink, path)
        return _owner[0]


def _unlink(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def _owner_gone(parent: Path, token: str) -> bool:
    """Whether the host of ``token`` has ended: its lock file is gone, or nobody holds its lock."""
    if _owner is not None and token == _owner[0]:
        return False
    try:
        fd = os.open(parent / f"{_PREFIX}L{token}.lock", os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    except OSError:
        return False  # not ours to judge
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False  # held: its host is alive, in this pid namespace or another
    finally:
        os.close(fd)  # (releases the lock if it was taken)
    return True


def _sweep_stale(parent: Path) -> None:
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    gone: dict[str, bool] = {}
    for entry in entries:  # directories of hosts that ended, then their lock files
        owned = _OWNED.match(entry.name)
        if owned is not None and entry.is_dir(follow_symlinks=False):
            token = owned.group(1)
            if gone.setdefault(token, _owner_gone(parent, token)):
                remove_tree(entry.path)
    for entry in entries:
        lock = _LOCK.match(entry.name)
        if lock is not None and gone.get(lock.group(1), _owner_gone(parent, lock.group(1))):
            _unlink(Path(entry.path))
    _sweep_by_pid(entries)


def _sweep_by_pid(entries: list[os.DirEntry[str]]) -> None:
    """Earlier versions' directories, named by their host's pid namespace and pid."""
    namespace = _pid_namespace()
    for entry in entries:
        match = _STALE.match(entry.name)
        if match is None or not entry.is_dir(follow_symlinks=False):
            continue
        # a host in another pid namespace (another container sharing /tmp) is not ours to judge
        if int(match.group(1)) != namespace:
            continue
        pid = int(match.group(2))
        if pid == os.getpid() or not 0 < pid < 1 << 22:  # beyond the kernel's largest pid: not ours
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            remove_tree(entry.path)
        except OSError:
            pass  # alive (someone else's), or not a pid we may ask about


@dataclass(frozen=True, slots=True)
class ScratchUsage:
    files: int
    bytes: int


def measure(directory: Path, *, stop_files: int, stop_bytes: int) -> ScratchUsage:
    """Count files and bytes under ``directory`` (not following links); stops early past a limit."""
    files = size = 0
    stack = [str(directory)]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries:
            files += 1
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                else:
                    size += entry.stat(follow_symlinks=False).st_blocks * 512
            except OSError:
                continue
            if files > stop_files or size > stop_bytes:
                return ScratchUsage(files, size)
    return ScratchUsage(files, size)


def empty(directory: Path) -> None:
    """Remove everything inside ``directory``, keeping it. Blocking; never raises."""
    remove_tree(directory, keep_root=True)


_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_BY_DESCRIPTOR = {os.open, os.unlink, os.rmdir} <= os.supports_dir_fd and os.scandir in os.supports_fd


def remove_tree(path: str | os.PathLike[str], *, keep_root: bool = False) -> None:
    """Remove ``path`` and everything under it, whatever its shape. Blocking; never raises.

    The tree was written by sandbox code: it may be a directory chain thousands of levels deep
    (``shutil.rmtree`` recurses and raises ``RecursionError``, which ``ignore_errors`` does not
    catch) and hold symbolic links to anything. This walks without recursion, never follows a
    link, and works through directory descriptors (``openat``/``unlinkat``), a few open at a
    time whatever the depth, so a directory renamed or swapped for a link while it runs cannot lead it outside the
    tree: it climbs back with ``..`` only to the directory it came from (checked by inode).
    What cannot be removed is left in place (best effort, like ``ignore_errors=True``).
    """
    try:
        if _BY_DESCRIPTOR:
            _remove_by_descriptor(os.fspath(path), keep_root)
        else:  # pragma: no cover - platforms without openat (the sandbox confines nothing there)
            _remove_by_path(os.fspath(path), keep_root)
    except OSError:
        pass


def _identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _clear(fd: int) -> list[str]:
    """Unlink every non-directory in the directory ``fd``; the names of its subdirectories."""
    subdirectories = []
    with os.scandir(fd) as entries:
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    subdirectories.append(entry.name)
                else:
                    os.unlink(entry.name, dir_fd=fd)
            except OSError:
                continue
    return subdirectories


def _remove_by_descriptor(path: str, keep_root: bool) -> None:
    try:
        fd = os.open(path, _DIR_FLAGS)
    except FileNotFoundError:
        return
    except OSError:  # a link or a file where a directory was expected: remove the name itself
        if not keep_root:
            os.unlink(path)
        return
    # the way back up: for each directory above the current one, its identity and what is left of it
    above: list[tuple[tuple[int, int], str, list[str]]] = []
    pending = _clear(fd)
    try:
        while True:
            if pending:
                name = pending.pop()
                try:
                    child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except OSError:  # gone, or no longer a directory: try it as a file
                    try:
                        os.unlink(name, dir_fd=fd)
                    except OSError:
                        pass
                    continue
                above.append((_identity(fd), name, pending))
                os.close(fd)
                fd = child
                pending = _clear(fd)
                continue
            if not above:
                break
            identity, name, pending = above.pop()
            parent = os.open("..", _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = parent
            if _identity(fd) != identity:  # moved under us: stop rather than act outside the tree
                return
            try:
                os.rmdir(name, dir_fd=fd)
            except OSError:
                pass
    finally:
        os.close(fd)
    if not keep_root:
        os.rmdir(path)


def _remove_by_path(path: str, keep_root: bool) -> None:  # pragma: no cover - see remove_tree
    if os.path.islink(path) or not os.path.isdir(path):
        if not keep_root:
            os.unlink(path)
        return
    stack = [(path, False)]
    while stack:
        current, visited = stack.pop()
        if visited:
            if current != path or not keep_root:
                try:
                    os.rmdir(current)
                except OSError:
                    pass
            continue
        stack.append((current, True))
        try:
            entries = list(os.scandir(current))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append((entry.path, False))
                else:
                    os.unlink(entry.path)
            except OSError:
                continue
