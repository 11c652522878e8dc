from __future__ import annotations

from collections.abc import Iterator

import pytest

from rlmflow import set_default_dispatcher
from rlmflow.testing.network import allow_only_loopback

from .redis_server import RedisServer

# Only local fakes on 127.0.0.1 may be called from the tests; anything else fails before sending.
allow_only_loopback()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def fresh_default_dispatcher() -> Iterator[None]:
    """Each test starts with its own process-wide Dispatcher (lanes and their state are shared)."""
    set_default_dispatcher(None)
    yield
    set_default_dispatcher(None)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server on a free port of 127.0.0.1 (skips when the binary is missing)."""
    try:
        server = RedisServer()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    server.start()
    try:
        yield server
    finally:
        server.close()
