"""The process-wide default Dispatcher, shared by every ``RLM`` not given its own.

Provider quotas are per account and model, so separate ``RLM`` objects of one service must
share lanes to respect them together: that is what the default is for. An application that
wants other limits, retries or prices builds its own and installs it with
:func:`set_default_dispatcher`, or passes ``dispatcher=`` to each ``RLM``.
"""

from __future__ import annotations

from .dispatcher import Dispatcher

__all__ = ["default_dispatcher", "set_default_dispatcher"]

_default: Dispatcher | None = None


def default_dispatcher() -> Dispatcher:
    """The process's shared Dispatcher, created on first use with the default limits."""
    global _default
    if _default is None:
        _default = Dispatcher()
    return _default


def set_default_dispatcher(dispatcher: Dispatcher | None) -> None:
    """Install ``dispatcher`` as the process's default (``None``: a fresh one on next use)."""
    global _default
    _default = dispatcher
