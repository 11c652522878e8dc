"""What every benchmark shares: percentiles, GC pauses, a process's CPU, and where results go.

The benchmarks run as scripts (``python benchmarks/x.py``: ``sys.path[0]`` is ``benchmarks/``).
Importing this module puts the repository root on ``sys.path`` too, so the project's test doubles
import as ``tests.fakes`` (and ``tests.redis_server``): import ``_common`` before them.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(1, str(ROOT))  # after benchmarks/, before site-packages (as pytest puts it for tests/)
RESULTS = Path(__file__).with_name("results")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def write_result(name: str, result: dict[str, Any]) -> None:
    """Write benchmarks/results/<name>.json and say so."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


def process_cpu_s(pid: int) -> float:
    """CPU seconds process ``pid`` has used so far, from /proc: its time on a CPU in nanoseconds
    (``schedstat``) where the kernel keeps it, else user + system time in 10 ms ticks (``stat``)."""
    try:
        with open(f"/proc/{pid}/schedstat", encoding="ascii") as fh:
            on_cpu_ns = int(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        on_cpu_ns = 0
    if on_cpu_ns:
        return on_cpu_ns / 1e9
    with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
        # the command name (field 2) may hold spaces: fields 14 and 15 counted after its ")"
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class GCPauses:
    """This process's garbage-collector pauses while inside ``with``, from ``gc.callbacks``.

    ``freeze=True`` first collects and freezes what exists (``gc.freeze()``, undone on exit), as
    a service might once it has started: full passes then skip the imported modules.
    """

    def __init__(self, *, freeze: bool = False) -> None:
        self.pauses: list[tuple[int, float]] = []  # (generation, seconds)
        self.freeze = freeze
        self._started = 0.0

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pauses.append((info["generation"], time.perf_counter() - self._started))

    def __enter__(self) -> GCPauses:
        if self.freeze:
            gc.collect()
            gc.freeze()
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc_info: object) -> None:
        gc.callbacks.remove(self._callback)
        if self.freeze:
            gc.unfreeze()

    def report(self) -> dict[str, Any]:
        """Count and total milliseconds per generation, the total and the longest pause."""
        out: dict[str, Any] = {}
        for generation in range(3):
            mine = [s for g, s in self.pauses if g == generation]
            out[f"gen{generation}"] = {"count": len(mine), "total_ms": round(sum(mine) * 1000, 2)}
        out["total_ms"] = round(sum(s for _, s in self.pauses) * 1000, 2)
        out["longest_ms"] = round(max((s for _, s in self.pauses), default=0.0) * 1000, 2)
        out["frozen_before"] = self.freeze
        return out

    def line(self) -> str:
        """The report in a few words, for a printout."""
        r = self.report()
        frozen = " (frozen first)" if self.freeze else ""
        return (f"{r['total_ms']:.0f} ms/{len(self.pauses)} pauses{frozen} (gen2 {r['gen2']['count']}: "
                f"{r['gen2']['total_ms']:.0f} ms), longest {r['longest_ms']:.0f} ms")
