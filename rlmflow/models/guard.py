"""The hook through which a test suite vets every outbound model request before it is sent.

Production code installs nothing: the hook is empty and a request costs one comparison. A test
suite installs a check, such as :func:`rlmflow.testing.network.allow_only_loopback` (only local
fakes on 127.0.0.1, ::1 or localhost may be called); a check refuses a request by raising
:class:`rlmflow.FatalModelError` before anything is sent.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["check_request_allowed", "install_request_check"]

_request_check: Callable[[str], None] | None = None


def install_request_check(check: Callable[[str], None] | None) -> None:
    """Run ``check(url)`` before every model request of this process (``None`` removes it)."""
    global _request_check
    _request_check = check


def check_request_allowed(url: str) -> None:
    """Run the installed check on ``url``, if a test suite installed one."""
    if _request_check is not None:
        _request_check(url)
