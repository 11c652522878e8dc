"""Tables and charts from results files.

The Markdown table has the reference format (model, approach, success rate, accuracy), then a
table of cost, latency (p50/p95), turns and sub-calls per model and approach. Charts need
matplotlib (the ``eval`` extra): accuracy and success rate by approach, and accuracy against
context length.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .._exceptions import ConfigurationError
from .runner import ItemResult

__all__ = ["Summary", "format_markdown", "length_bins", "summarise", "write_charts"]


def _percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1)."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    rank = max(1, -(-int(q * 1000) * len(ordered) // 1000))  # ceil(q * n) without float error
    return ordered[min(len(ordered), rank) - 1]


@dataclass(frozen=True)
class Summary:
    """One model and approach over its items."""

    model: str
    approach: str
    items: int
    successes: int
    correct: int
    cost_usd: float | None  # None when any item's cost is unknown
    latency_p50: float
    latency_p95: float
    mean_turns: float
    mean_sub_calls: float
    input_tokens: int
    output_tokens: int
    errors: dict[str, int]
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    uncached_cost_usd: float | None = None  # the same calls with no prompt cache; None when unknown

    @property
    def success_rate(self) -> float:
        return self.successes / self.items if self.items else 0.0

    @property
    def accuracy(self) -> float:
        return self.correct / self.items if self.items else 0.0


def summarise(results: Iterable[ItemResult]) -> list[Summary]:
    """Per (model, approach), in first-seen order."""
    groups: dict[tuple[str, str], list[ItemResult]] = {}
    for result in results:
        groups.setdefault((result.model, result.approach), []).append(result)
    summaries = []
    for (model, approach), rows in groups.items():
        latencies = [r.latency_s for r in rows]
        cost: float | None = 0.0
        uncached: float | None = 0.0
        errors: dict[str, int] = {}
        for r in rows:
            cost = None if cost is None or r.cost_usd is None else cost + r.cost_usd
            # an item with no cache tokens cost the same without a cache (results files from before
            # the cache was counted have no uncached cost)
            plain = r.cost_usd if not (r.cache_read_tokens or r.cache_write_tokens) else None
            item = r.uncached_cost_usd if r.uncached_cost_usd is not None else plain
            uncached = None if uncached is None or item is None else uncached + item
            if r.error_type:
                errors[r.error_type] = errors.get(r.error_type, 0) + 1
        summaries.append(Summary(
            model=model, approach=approach, items=len(rows), successes=sum(r.success for r in rows),
            correct=sum(r.correct for r in rows), cost_usd=cost, latency_p50=_percentile(latencies, 0.5),
            latency_p95=_percentile(latencies, 0.95), mean_turns=sum(r.turns for r in rows) / len(rows),
            mean_sub_calls=sum(r.sub_calls for r in rows) / len(rows),
            input_tokens=sum(r.input_tokens for r in rows), output_tokens=sum(r.output_tokens for r in rows),
            errors=errors, cache_read_tokens=sum(r.cache_read_tokens for r in rows),
            cache_write_tokens=sum(r.cache_write_tokens for r in rows), uncached_cost_usd=uncached,
        ))
    return summaries


_APPROACH_LABELS = {"base": "Base", "long-context": "Long Context", "rlm": "RLM"}


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _cost(value: float | None) -> str:
    return "unknown" if value is None else f"${value:.4f}" if value < 1 else f"${value:.2f}"


def format_markdown(results: Sequence[ItemResult], *, title: str | None = None) -> str:
    """The reference table, then cost, latency and work per approach, then errors."""
    summaries = summarise(results)
    lines = [f"## {title}", ""] if title else []
    lines += ["| Model | Approach | Success Rate | Accuracy |", "|---|---|---:|---:|"]
    for s in summaries:
        lines.append(f"| {s.model} | {_APPROACH_LABELS.get(s.approach, s.approach)} | "
                     f"{_pct(s.success_rate)} ({s.successes}/{s.items}) | {_pct(s.accuracy)} ({s.correct}/{s.items}) |")
    lines += [
        "",
        "| Model | Approach | Items | Cost (total) | Cost / item | Latency p50 | Latency p95 | Turns (mean) "
        "| Sub-calls (mean) | Tokens in / out |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summaries:
        per_item = None if s.cost_usd is None else s.cost_usd / s.items
        lines.append(
            f"| {s.model} | {_APPROACH_LABELS.get(s.approach, s.approach)} | {s.items} | {_cost(s.cost_usd)} | "
            f"{_cost(per_item)} | {s.latency_p50:.1f} s | {s.latency_p95:.1f} s | {s.mean_turns:.1f} | "
            f"{s.mean_sub_calls:.1f} | {s.input_tokens:,} / {s.output_tokens:,} |"
        )
    cached = [s for s in summaries if s.cache_read_tokens or s.cache_write_tokens]
    if cached:
        lines += [
            "",
            "| Model | Approach | Cost / item | Cost / item without the cache | Cache reads / writes (tokens) "
            "| Input read from the cache |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for s in cached:
            per_item = None if s.cost_usd is None else s.cost_usd / s.items
            without = None if s.uncached_cost_usd is None else s.uncached_cost_usd / s.items
            share = s.cache_read_tokens / s.input_tokens if s.input_tokens else 0.0
            lines.append(
                f"| {s.model} | {_APPROACH_LABELS.get(s.approach, s.approach)} | {_cost(per_item)} | "
                f"{_cost(without)} | {s.cache_read_tokens:,} / {s.cache_write_tokens:,} | {_pct(share)} |"
            )
    failing = [s for s in summaries if s.errors]
    if failing:
        lines += ["", "Errors and unanswered items:", ""]
        for s in failing:
            detail = ", ".join(f"{kind} x{count}" for kind, count in sorted(s.errors.items()))
            lines.append(f"- {s.model} / {s.approach}: {detail}")
    return "\n".join(lines) + "\n"


def length_bins(results: Sequence[ItemResult], *, bins: int = 4) -> list[tuple[int, int]]:
    """Context-length bins (characters): log-spaced between the smallest and largest context, or
    one bin per distinct size when there are only a few sizes."""
    sizes = sorted({max(1, r.context_chars) for r in results})
    if not sizes:
        return []
    if len(sizes) <= bins + 2:  # few sizes (generated tasks): one point per size
        return [(size, size) for size in sizes]
    low, high = sizes[0], sizes[-1]
    if low == high:
        return [(low, high)]
    ratio = (high / low) ** (1 / bins)
    edges = [int(low * ratio**i) for i in range(bins)] + [high]
    return [(edges[i], edges[i + 1]) for i in range(bins)]


def _size(chars: float) -> str:
    for unit, scale in (("MB", 1e6), ("KB", 1e3)):
        if chars >= scale:
            return f"{chars / scale:.3g} {unit}"
    return f"{int(chars)} B"


def write_charts(results: Sequence[ItemResult], directory: str | Path, *, prefix: str = "eval") -> list[Path]:
    """Write ``<prefix>_by_approach.png`` and ``<prefix>_by_length.png``; return their paths.

    Raises :class:`ConfigurationError` when matplotlib (the ``eval`` extra) is missing.
    """
    try:
        from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend
        from matplotlib.ticker import FuncFormatter, NullFormatter
    except ImportError as exc:
        raise ConfigurationError("charts need matplotlib: pip install 'rlmflow[eval]'") from exc
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    summaries = summarise(results)
    labels = [f"{s.model}\n{_APPROACH_LABELS.get(s.approach, s.approach)}" for s in summaries]
    written = []

    fig = Figure(figsize=(max(5.0, 1.6 * len(summaries) + 2), 4))
    ax = fig.subplots()
    xs = range(len(summaries))
    width = 0.38
    ax.bar([x - width / 2 for x in xs], [100 * s.success_rate for s in summaries], width, label="success rate")
    ax.bar([x + width / 2 for x in xs], [100 * s.accuracy for s in summaries], width, label="accuracy")
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_ylim(0, 105)
    ax.set_ylabel("%")
    ax.set_title("Success rate and accuracy by approach")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path = directory / f"{prefix}_by_approach.png"
    fig.savefig(path, dpi=120)
    written.append(path)

    bins = length_bins(results)
    fig = Figure(figsize=(6.5, 4))
    ax = fig.subplots()
    for s in summaries:
        rows = [r for r in results if r.model == s.model and r.approach == s.approach]
        binned: dict[int, list[ItemResult]] = {}
        for r in rows:  # each item in the first bin whose upper edge holds it
            index = next(i for i, (_, high) in enumerate(bins) if max(1, r.context_chars) <= high or i == len(bins) - 1)
            binned.setdefault(index, []).append(r)
        points = [
            ((bins[i][0] * bins[i][1]) ** 0.5, 100 * sum(r.correct for r in inside) / len(inside))
            for i, inside in sorted(binned.items())
        ]
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                    label=f"{s.model} / {_APPROACH_LABELS.get(s.approach, s.approach)}")
    ax.set_xscale("log")
    ax.set_ylim(-5, 105)
    ax.set_xlabel("context length (characters, log scale)")
    ax.set_ylabel("accuracy %")
    ax.set_title("Accuracy against context length")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: _size(v)))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = directory / f"{prefix}_by_length.png"
    fig.savefig(path, dpi=120)
    written.append(path)
    return written
