from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

from rlmflow import set_default_dispatcher
from rlmflow.testing.network import allow_only_loopback

from .ci_skips import IN_CI, register_skips_fail
from .redis_server import RedisServer

# Only local fakes on 127.0.0.1 may be called from the tests; anything else fails before sending.
allow_only_loopback()

# Hypothesis: locally its defaults (random, with its example database). In CI the examples are
# derandomized (a seed from each test's own source, so a red CI run fails the same way again) and
# a failure prints the blob that replays it (@reproduce_failure); `ci-random` is the same with a
# fresh seed, for a scheduled run (HYPOTHESIS_PROFILE=ci-random). A test's own @settings win.
settings.register_profile(
    "ci", derandomize=True, print_blob=True, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("ci-random", settings.get_profile("ci"), derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if IN_CI else "default"))


def pytest_configure(config: pytest.Config) -> None:
    if IN_CI:
        register_skips_fail(config)


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
