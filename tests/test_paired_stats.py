"""codir_ds/paired_stats.py against hand computations: t interval, exact sign-flip p and its inverted interval,
Holm's adjustment, wins/ties/losses and the verdict words the docs may use."""
from __future__ import annotations

import itertools
import math

import pytest

from codir_ds import paired_stats as ps


def test_t_interval_by_hand():
    d = [0.01, 0.02, 0.03]  # mean 0.02, sd 0.01, t_{0.975, 2} = 4.302653
    lo, hi = ps.t_interval(d)
    half = 4.302652729911275 * 0.01 / math.sqrt(3)
    assert lo == pytest.approx(0.02 - half, abs=1e-12) and hi == pytest.approx(0.02 + half, abs=1e-12)
    assert ps.t_interval([0.1]) is None


def test_sign_flip_p_by_enumeration():
    d = [0.03, -0.01, 0.02, 0.04]
    observed = abs(sum(d) / 4)
    hits = sum(abs(sum(s * x for s, x in zip(signs, d)) / 4) >= observed - 1e-12
               for signs in itertools.product((1, -1), repeat=4))
    assert ps.sign_flip_p(d) == hits / 16 == 0.25
    assert ps.sign_flip_p([0.01] * 5) == 2 / 32  # the smallest p five pairs can give


def test_sign_flip_interval_is_unbounded_with_five_pairs_and_inverts_the_test_with_ten():
    assert ps.sign_flip_interval([0.05, 0.04, 0.06, 0.05, 0.07]) == (-math.inf, math.inf)
    d = [0.012, 0.025, -0.004, 0.031, 0.018, 0.009, 0.022, 0.015, -0.002, 0.027]
    lo, hi = ps.sign_flip_interval(d)
    assert lo < sum(d) / len(d) < hi
    # the edges are where the test starts to reject: just inside kept, just outside rejected
    assert ps.sign_flip_p(d, lo + 1e-6) > ps.ALPHA and ps.sign_flip_p(d, lo - 1e-4) <= ps.ALPHA
    assert ps.sign_flip_p(d, hi - 1e-6) > ps.ALPHA and ps.sign_flip_p(d, hi + 1e-4) <= ps.ALPHA


def test_holm_by_hand():
    # sorted 0.01, 0.02, 0.04 (and None left out): 3 x 0.01, max(0.03, 2 x 0.02), max(0.04, 1 x 0.04)
    assert ps.holm([0.04, None, 0.01, 0.02]) == [pytest.approx(0.04), None, pytest.approx(0.03), pytest.approx(0.04)]
    assert ps.holm([0.5, 0.6]) == [pytest.approx(1.0), pytest.approx(1.0)]  # capped at 1, monotone


def test_summary_counts_and_verdicts():
    s = ps.summarize([0.01, 0.0, -0.02, 0.03, 0.0])
    assert (s["wins"], s["ties"], s["losses"]) == (2, 2, 1)
    clear = ps.summarize([0.03 + 0.001 * i for i in range(10)])     # every seed +3 points: p = 2/1024
    small = ps.summarize([0.002 * (-1) ** i for i in range(10)])      # ±0.2 points around 0
    wide = ps.summarize([0.05, -0.04, 0.03, -0.05, 0.02])             # five seeds, wide spread
    ps.add_holm([clear, small, wide])
    assert clear["verdict"] == "A higher" and clear["p_holm"] == pytest.approx(3 * 2 / 1024)
    assert small["verdict"] == "level"  # both intervals inside ±1 point
    assert wide["verdict"] == "no difference shown"
    assert ps.interval_text(wide["sign_flip_interval"]) == "(unbounded)"
    assert ps.interval_text((-0.0078, 0.0049)) == "[-0.78, +0.49]"
