"""Timing statistics for scripts/tools/benchmark.py that survive a noisy machine.

Variants are timed in interleaved rounds (A B C A B C ...): load that drifts over minutes slows every
variant of a round alike, so the *per-round ratio* is stable even when absolute times are not. A ratio is
reported as the median of its per-round ratios with a distribution-free 95 % confidence interval of that
median (order statistics of the sorted per-round ratios, :func:`median_ci_ranks`) and the min..max; when the
interval's width over the median exceeds a stated bound the ratio is marked "too noisy" and no number is
claimed. A goal is "met" only when the whole interval lies at or under it (:func:`goal_verdict`).

Why an interval and not min..max: the range of n noisy rounds only widens as rounds are added (one
disturbed round is enough), so more rounds could never make a ratio "ok"; the median's interval narrows as
rounds are added, and it still says how sure the figure is. On this project's shared CPU two identical
back-to-back calls differ by up to 13 %.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

#: Default bound on the width of the median's 95 % interval over the median, above which a ratio is "too noisy".
MAX_RELATIVE_SPREAD = 0.25
CONFIDENCE = 0.95


def median_ci_ranks(n: int, confidence: float = CONFIDENCE) -> tuple[int, int] | None:
    """1-based ranks (k, n + 1 - k) of the sorted sample that bound its median with at least ``confidence``.

    Distribution-free: the median lies below the k-th smallest of n values with probability
    P(Binomial(n, 1/2) < k); k is the largest rank whose two tails together stay within 1 - confidence.
    None when n is too small for that confidence (n < 6 at 95 %).
    """
    tail = (1.0 - confidence) / 2
    k, below = 0, 0.0
    while k < n:
        nxt = below + math.comb(n, k) / 2**n  # P(Binomial(n, 1/2) <= k)
        if nxt > tail:
            break
        below, k = nxt, k + 1
    return (k, n + 1 - k) if k >= 1 else None


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
    """Median of per-round ratios numerator[i] / denominator[i], its 95 % interval, min/max, and a verdict.

    ``spread`` = (ci_high - ci_low) / median; ``verdict`` is "ok" when it is <= ``max_spread``, else "too
    noisy" (and ``ratio`` is None, so a caller cannot print a number the run does not support). Too few rounds
    for an interval (< 6) is "too noisy" as well.
    """
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError(f"need paired rounds, got {len(numerator)} and {len(denominator)}")
    per_round = [n / d for n, d in zip(numerator, denominator)]
    med = statistics.median(per_round)
    lo, hi = min(per_round), max(per_round)
    ranks = median_ci_ranks(len(per_round))
    ordered = sorted(per_round)
    ci = (ordered[ranks[0] - 1], ordered[ranks[1] - 1]) if ranks else (lo, hi)
    # a median <= 0 (a part that saves no time) has no relative spread: None (JSON null, printed "n/a"),
    # never Infinity, which is no JSON
    spread = (ci[1] - ci[0]) / med if med > 0 and ranks else None
    ok = spread is not None and spread <= max_spread
    return {
        "ratio": round(med, 3) if ok else None,
        "median": round(med, 3),
        "ci_low": round(ci[0], 3),
        "ci_high": round(ci[1], 3),
        "confidence": CONFIDENCE,
        "min": round(lo, 3),
        "max": round(hi, 3),
        "spread": None if spread is None else round(spread, 3),
        "max_spread": max_spread,
        "rounds": len(per_round),
        "verdict": "ok" if ok else "too noisy",
    }


def with_goal(summary: dict[str, object], goal: float) -> dict[str, object]:
    """``summary`` with ``goal`` and its :func:`goal_verdict` (what the README prints)."""
    return {**summary, "goal": goal, "goal_verdict": goal_verdict(summary, goal)}


def goal_verdict(summary: dict[str, object], goal: float) -> str:
    """ "met" when the ratio's whole 95 % interval is <= ``goal``, "missed" when all of it is above, else
    "undecided" (also for a "too noisy" ratio: the run cannot tell)."""
    if summary.get("verdict") != "ok":
        return "undecided"
    if summary["ci_high"] <= goal:
        return "met"
    return "missed" if summary["ci_low"] > goal else "undecided"


def median_seconds(times: list[float]) -> float:
    return round(statistics.median(times), 4)


def format_ratio(summary: dict[str, object]) -> str:
    """``1.123x (95 % CI 1.10..1.15, 9 rounds)`` or ``too noisy (spread 0.41 > 0.25, 9 rounds)``."""
    if summary["verdict"] != "ok":
        if summary["rounds"] < 6:
            return f"too few rounds ({summary['rounds']}) for a 95 % interval"
        spread = "n/a" if summary["spread"] is None else summary["spread"]
        return f"too noisy (spread {spread} > {summary['max_spread']}, {summary['rounds']} rounds)"
    return (
        f"{summary['ratio']:.3f}x (95 % CI {summary['ci_low']:.3f}..{summary['ci_high']:.3f}, "
        f"{summary['rounds']} rounds)"
    )
