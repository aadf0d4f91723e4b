"""Paired-bootstrap intervals of the method table (bench/stats.py): known cases a reader can check."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for `bench`

from bench.stats import bootstrap_indices, interval, paired_intervals, per_question_mean  # noqa: E402


def _rng_vector(n: int, p: float, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random(n) < p).astype(float)


def test_identical_methods_differ_by_exactly_zero() -> None:
    a = _rng_vector(300, 0.4, 1)
    single, diffs = paired_intervals({"a": a, "b": a.copy()}, [("a", "b")], n_boot=500)
    d = diffs["a-b"]
    assert (d.point, d.lo, d.hi) == (0.0, 0.0, 0.0)  # same questions every resample: width 0
    assert not d.excludes_zero
    assert single["a"] == single["b"]


def test_a_method_right_on_strictly_more_questions_has_a_positive_interval() -> None:
    base = _rng_vector(400, 0.3, 2)
    better = base.copy()
    wrong = np.flatnonzero(base == 0)
    better[wrong[:30]] = 1.0  # right everywhere base is, and on 30 more questions
    _, diffs = paired_intervals({"better": better, "base": base}, [("better", "base")], n_boot=2000)
    d = diffs["better-base"]
    assert d.point == pytest.approx(30 / 400)
    assert 0 < d.lo <= d.point <= d.hi
    assert d.excludes_zero


def test_pairing_is_tighter_than_independent_intervals() -> None:
    """Two methods that agree on most questions: the difference interval is narrower than either
    method's own interval (that is what sharing the resampled questions buys)."""
    a = _rng_vector(500, 0.5, 3)
    b = a.copy()
    b[:20] = 1 - b[:20]
    single, diffs = paired_intervals({"a": a, "b": b}, [("a", "b")], n_boot=2000)
    width = diffs["a-b"].hi - diffs["a-b"].lo
    assert width < 0.5 * (single["a"].hi - single["a"].lo)


def test_intervals_contain_their_point_estimate_and_cover_95_percent_of_resamples() -> None:
    v = _rng_vector(250, 0.35, 4)
    idx = bootstrap_indices(250, 4000, seed=7)
    iv = interval(v, idx)
    assert iv.point == pytest.approx(v.mean())
    assert iv.lo <= iv.point <= iv.hi
    means = v[idx].mean(axis=1)
    inside = np.mean((means >= iv.lo) & (means <= iv.hi))
    assert 0.94 <= inside <= 0.97


def test_seeds_are_averaged_per_question() -> None:
    assert per_question_mean([[1, 0, 1], [1, 1, 0]]).tolist() == [1.0, 0.5, 0.5]


@pytest.mark.parametrize(("methods", "pairs", "message"), [
    ({"a": np.ones(3), "b": np.ones(4)}, [("a", "b")], "different question sets"),
    ({"a": np.ones(3)}, [("a", "missing")], "without scores"),
])
def test_bad_input_is_named(methods, pairs, message) -> None:
    with pytest.raises(ValueError, match=message):
        paired_intervals(methods, pairs, n_boot=10)
