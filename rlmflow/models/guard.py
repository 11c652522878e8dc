"""A switch that keeps tests from reaching real model providers.

Test suites set ``rlmflow.models.guard.ALLOW_MODEL_REQUESTS = False``: remote models then refuse,
before anything is sent, any request to a host that is not on the loopback interface, so only
local fakes (127.0.0.1, ::1, localhost) can be called. Production code leaves it ``True``.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from .._exceptions import FatalModelError

__all__ = ["ALLOW_MODEL_REQUESTS", "check_request_allowed"]

ALLOW_MODEL_REQUESTS = True


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_request_allowed(url: str) -> None:
    """Raise :class:`FatalModelError` if requests are disabled and ``url`` is not on loopback."""
    if ALLOW_MODEL_REQUESTS:
        return
    host = urlsplit(url).hostname or ""
    if not _is_loopback(host):
        raise FatalModelError(
            f"model requests to {host!r} are disabled (rlmflow.models.guard.ALLOW_MODEL_REQUESTS is False); "
            "tests must use a local fake server"
        )
