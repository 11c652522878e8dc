from __future__ import annotations

import pytest

from rlmflow.models import guard

# Only local fakes on 127.0.0.1 may be called from the tests; anything else fails before sending.
guard.ALLOW_MODEL_REQUESTS = False


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
