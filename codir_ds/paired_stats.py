"""Statistics of a paired multi-seed comparison (A − B on the same seeds), for the study scripts' tables.

For the per-seed differences d_1..d_n of one comparison:

- mean difference and the 95 % t interval (mean ± t_{0.975, n−1} · s / √n);
- the 95 % interval of the exact sign-flip test: every shift δ whose two-sided sign-flip p-value of
  d − δ is above 0.05 (the test inverted, exact over the 2^n sign assignments, no normality
  assumed). With n ≤ 5 no shift can be rejected (the smallest p-value is 2/2^n ≥ 0.0625): the
  interval is unbounded, and says so;
- wins / ties / losses of A (a tie: |d| < 1e-9);
- the exact two-sided sign-flip p-value of the mean, and Holm's step-down adjustment over the
  study's family of comparisons;
- "level" only where the whole t interval and the whole sign-flip interval lie inside ± a margin
  stated before the runs (:data:`LEVEL_MARGIN`); "A higher" / "A lower" only where the Holm-adjusted
  p is below 0.05; anything else is "no difference shown".
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

LEVEL_MARGIN = 0.01      # ± 1 point of accuracy (differences are fractions): the equivalence margin
ALPHA = 0.05
TIE = 1e-9
MAX_EXACT = 16           # 2^16 sign assignments


def _signs(n: int) -> np.ndarray:
    """Every ±1 assignment of n signs, ``[2^n, n]``."""
    idx = np.arange(2 ** n)[:, None]
    return 1 - 2 * ((idx >> np.arange(n)[None, :]) & 1)


def sign_flip_p(diffs: Sequence[float], shift: float = 0.0) -> Optional[float]:
    """Exact two-sided p-value of mean(d − shift) under random sign flips; None beyond ``MAX_EXACT`` pairs."""
    d = np.asarray(diffs, dtype=np.float64) - shift
    n = len(d)
    if n == 0 or n > MAX_EXACT:
        return None
    observed = abs(d.mean())
    means = np.abs((_signs(n) * d).mean(axis=1))
    return float((means >= observed - 1e-12).mean())


def _edge(diffs: Sequence[float], inside: float, outside: float) -> float:
    """Bisection for the boundary between a shift the test keeps (``inside``) and one it rejects."""
    for _ in range(60):
        mid = (inside + outside) / 2
        if sign_flip_p(diffs, mid) > ALPHA:
            inside = mid
        else:
            outside = mid
    return inside


def sign_flip_interval(diffs: Sequence[float]) -> Optional[tuple[float, float]]:
    """95 % interval from inverting the exact sign-flip test: ``(-inf, inf)`` when n is too small to reject."""
    n = len(diffs)
    if n == 0 or n > MAX_EXACT:
        return None
    if 2 / 2 ** n > ALPHA:
        return (-math.inf, math.inf)
    mean = float(np.mean(diffs))
    reach = 2 * (max(diffs) - min(diffs)) + 1e-6 + abs(mean)
    return (_edge(diffs, mean, mean - reach), _edge(diffs, mean, mean + reach))


def t_interval(diffs: Sequence[float]) -> Optional[tuple[float, float]]:
    """95 % Student-t interval of the mean difference (None below 2 pairs)."""
    from scipy import stats
    n = len(diffs)
    if n < 2:
        return None
    mean, sd = float(np.mean(diffs)), float(np.std(diffs, ddof=1))
    half = float(stats.t.ppf(1 - ALPHA / 2, n - 1)) * sd / math.sqrt(n)
    return (mean - half, mean + half)


def holm(ps: Sequence[Optional[float]]) -> list[Optional[float]]:
    """Holm's step-down adjusted p-values (None entries stay None and do not count in the family)."""
    known = sorted((p, i) for i, p in enumerate(ps) if p is not None)
    m, out, running = len(known), [None] * len(ps), 0.0
    for rank, (p, i) in enumerate(known):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def verdict(summary: dict, margin: float = LEVEL_MARGIN) -> str:
    """What the data say, in the words the docs may use (see the module docstring)."""
    adjusted = summary.get("p_holm")
    if adjusted is not None and adjusted < ALPHA:
        return "A higher" if summary["mean"] > 0 else "A lower"
    t, sf = summary.get("t_interval"), summary.get("sign_flip_interval")
    if t and sf and all(-margin < x < margin for x in (*t, *sf)):
        return "level"
    return "no difference shown"


def summarize(diffs: Sequence[float]) -> dict:
    """Everything but the Holm adjustment (which needs the family: :func:`add_holm`)."""
    d = [float(x) for x in diffs]
    return {"n": len(d), "diffs": d, "mean": float(np.mean(d)) if d else None,
            "std": float(np.std(d, ddof=1)) if len(d) > 1 else None,
            "t_interval": t_interval(d), "sign_flip_interval": sign_flip_interval(d),
            "wins": sum(x > TIE for x in d), "ties": sum(abs(x) <= TIE for x in d), "losses": sum(x < -TIE for x in d),
            "p": sign_flip_p(d)}


def add_holm(summaries: list[Optional[dict]]) -> None:
    """Fill ``p_holm`` and ``verdict`` of every summary of one study's family, in place."""
    adjusted = holm([s["p"] if s else None for s in summaries])
    for s, p in zip(summaries, adjusted):
        if s:
            s["p_holm"] = p
            s["verdict"] = verdict(s)


def interval_text(iv: Optional[tuple[float, float]], scale: float = 100) -> str:
    """``[-0.78, +0.49]`` in points; ``(unbounded)`` for an interval the data cannot bound."""
    if iv is None:
        return "–"
    if not all(math.isfinite(x) for x in iv):
        return "(unbounded)"
    return f"[{iv[0] * scale:+.2f}, {iv[1] * scale:+.2f}]"
