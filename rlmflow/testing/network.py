"""Keeps a test suite's model requests on this machine.

    from rlmflow.testing.network import allow_only_loopback
    allow_only_loopback()  # in conftest.py: a remote model aimed off 127.0.0.1 fails before sending
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from .._exceptions import FatalModelError
from ..models import guard

__all__ = ["allow_only_loopback"]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _loopback_only(url: str) -> None:
    host = urlsplit(url).hostname or ""
    if not _is_loopback(host):
        raise FatalModelError(
            f"model requests to {host!r} are refused in tests (rlmflow.testing.network.allow_only_loopback); "
            "use a local fake server"
        )


def allow_only_loopback() -> None:
    """Refuse, before sending, every model request to a host not on the loopback interface."""
    guard.install_request_check(_loopback_only)
