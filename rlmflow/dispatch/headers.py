"""Rate-limit response headers, read into "pause this lane for N seconds".

OpenAI-compatible servers send ``x-ratelimit-remaining-requests`` / ``-tokens`` with
``x-ratelimit-reset-requests`` / ``-tokens`` as durations (``1s``, ``6m0s``, ``20ms``);
Anthropic sends ``anthropic-ratelimit-requests-remaining`` / ``-tokens-remaining`` with RFC 3339
``-reset`` times. Bedrock sends none. When a quota is at zero, the lane waits for its reset.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime, timezone

__all__ = ["pause_from_headers"]

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_SCALE = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def _duration(text: str) -> float | None:
    parts = _DURATION.findall(text.strip())
    if not parts:
        try:
            return float(text)
        except ValueError:
            return None
    return sum(float(value) * _SCALE[unit] for value, unit in parts)


def _until(text: str, now: datetime) -> float | None:
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return max(0.0, (when - now).total_seconds())


def pause_from_headers(headers: Mapping[str, str], *, now: datetime | None = None) -> float:
    """Seconds the lane should wait before its next call (0 when no quota is exhausted)."""
    now = now or datetime.now(timezone.utc)
    pause = 0.0
    for kind in ("requests", "tokens"):
        remaining = headers.get(f"x-ratelimit-remaining-{kind}")
        reset = headers.get(f"x-ratelimit-reset-{kind}")
        if remaining is not None and reset is not None and remaining.strip() == "0":
            pause = max(pause, _duration(reset) or 0.0)
        remaining = headers.get(f"anthropic-ratelimit-{kind}-remaining")
        reset = headers.get(f"anthropic-ratelimit-{kind}-reset")
        if remaining is not None and reset is not None and remaining.strip() == "0":
            pause = max(pause, _until(reset, now) or 0.0)
    return pause
