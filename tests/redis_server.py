"""A real ``redis-server`` for tests: a free port on 127.0.0.1, no persistence, a temporary dir.

``scripts/setup/test-redis.sh`` installs the Debian package; tests that need it skip when the
binary is missing. The server can be stopped and started again on the same port (the tests of
losing Redis mid-run).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: run scripts/setup/test-redis.sh")
        self.binary = binary
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="rlmflow-redis-"))
        self.process: subprocess.Popen[bytes] | None = None
        self.started = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start redis-server and wait until it answers. Redis cannot bind port 0 and report the port,
        so the first start takes a free port and, should another process take it first (redis exits
        failing to bind, or a stranger answers), tries another; a restart keeps its port."""
        for _ in range(5):
            if self._launch():
                self.started = True
                return
            if self.started:
                break
            self.port = free_port()
        raise RuntimeError(f"redis-server did not start on 127.0.0.1:{self.port}")

    def _launch(self) -> bool:
        process = self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.dir), "--protected-mode", "yes", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and process.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"INFO server\r\n")
                    reply = b""
                    while b"process_id:" not in reply or not reply.endswith(b"\r\n"):
                        chunk = sock.recv(65536)
                        if not chunk:
                            break
                        reply += chunk
                # ours, not a stranger that took the port first
                if f"process_id:{process.pid}\r\n".encode() in reply:
                    return True
                if b"process_id:" in reply:
                    break
            except OSError:
                time.sleep(0.02)
        self.stop()
        return False

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
