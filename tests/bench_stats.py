"""Timing statistics for tests/benchmark.py that survive a noisy machine.

Variants are timed in interleaved rounds (A B C A B C ...): load that drifts over minutes slows every
variant of a round alike, so the *per-round ratio* is stable even when absolute times are not. A ratio is
reported as the median of its per-round ratios with the min..max spread; when the spread (max - min over
the median) exceeds a stated bound the ratio is marked "too noisy" and no number is claimed.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

#: Default bound on (max - min) / median of the per-round ratios above which a ratio is "too noisy".
MAX_RELATIVE_SPREAD = 0.25


def interleaved_times(
    variants: dict[str, Callable[[], object]], rounds: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each variant, one call of every variant per round, variants in a fixed order."""
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def ratio_summary(
    numerator: list[float], denominator: list[float], max_spread: float = MAX_RELATIVE_SPREAD
) -> dict[str, object]:
    """Median of per-round ratios numerator[i] / denominator[i], its min/max, and a verdict.

    ``verdict`` is "ok" when (max - min) / median <= ``max_spread``, else "too noisy" (and ``ratio`` is None,
    so a caller cannot print a number the run does not support).
    """
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError(f"need paired rounds, got {len(numerator)} and {len(denominator)}")
    per_round = [n / d for n, d in zip(numerator, denominator)]
    med = statistics.median(per_round)
    lo, hi = min(per_round), max(per_round)
    # a median <= 0 (a part that saves no time) has no relative spread: None (JSON null, printed "n/a"),
    # never Infinity, which is no JSON
    spread = (hi - lo) / med if med > 0 else None
    ok = spread is not None and spread <= max_spread
    return {
        "ratio": round(med, 3) if ok else None,
        "median": round(med, 3),
        "min": round(lo, 3),
        "max": round(hi, 3),
        "spread": None if spread is None else round(spread, 3),
        "max_spread": max_spread,
        "rounds": len(per_round),
        "verdict": "ok" if ok else "too noisy",
    }


def median_seconds(times: list[float]) -> float:
    return round(statistics.median(times), 4)


def format_ratio(summary: dict[str, object]) -> str:
    """``1.123x (1.10..1.15, 9 rounds)`` or ``too noisy (spread 0.41 > 0.25, 9 rounds)``."""
    if summary["verdict"] != "ok":
        spread = "n/a" if summary["spread"] is None else summary["spread"]
        return f"too noisy (spread {spread} > {summary['max_spread']}, {summary['rounds']} rounds)"
    return f"{summary['ratio']:.3f}x ({summary['min']:.3f}..{summary['max']:.3f}, {summary['rounds']} rounds)"
