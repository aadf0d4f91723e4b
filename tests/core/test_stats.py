"""Paired-bootstrap intervals (dyme_core/stats.py): known cases a reader can check, and coverage of the
true difference in a seeded simulation."""

from __future__ import annotations

import numpy as np
import pytest

from dyme_core.stats import (
    bootstrap_indices,
    group_differences,
    interval,
    paired_difference,
    paired_intervals,
    per_question_mean,
    resampled_means,
)


def _rng_vector(n: int, p: float, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random(n) < p).astype(float)


def test_identical_runs_differ_by_exactly_zero() -> None:
    a = _rng_vector(300, 0.4, 1)
    d = paired_difference(a, a.copy(), n_boot=500)
    assert (d.point, d.lo, d.hi) == (0.0, 0.0, 0.0)  # the same rows every resample: width 0
    assert not d.excludes_zero
    single, diffs = paired_intervals({"a": a, "b": a.copy()}, [("a", "b")], n_boot=500)
    assert (diffs["a-b"].lo, diffs["a-b"].hi) == (0.0, 0.0) and single["a"] == single["b"]


def test_right_on_every_row_the_other_misses() -> None:
    # one run right everywhere, the other nowhere: the difference is exactly 1 on every resample
    d = paired_difference(np.ones(50), np.zeros(50), n_boot=200)
    assert (d.point, d.lo, d.hi) == (1.0, 1.0, 1.0)
    # right wherever the other is, and on 30 more of its misses: exactly +30/400, interval above zero
    base = _rng_vector(400, 0.3, 2)
    better = base.copy()
    better[np.flatnonzero(base == 0)[:30]] = 1.0
    d = paired_difference(better, base, n_boot=2000)
    assert d.point == pytest.approx(30 / 400)
    assert 0 < d.lo <= d.point <= d.hi and d.excludes_zero
    # and the sign follows the order of the arguments
    flipped = paired_difference(base, better, n_boot=2000)
    assert (flipped.point, flipped.lo, flipped.hi) == pytest.approx((-d.point, -d.hi, -d.lo))


def test_pairing_is_tighter_than_independent_intervals() -> None:
    """Two runs that agree on most rows: the difference interval is narrower than either run's own interval
    (that is what sharing the resampled rows buys)."""
    a = _rng_vector(500, 0.5, 3)
    b = a.copy()
    b[:20] = 1 - b[:20]
    single, diffs = paired_intervals({"a": a, "b": b}, [("a", "b")], n_boot=2000)
    assert diffs["a-b"].hi - diffs["a-b"].lo < 0.5 * (single["a"].hi - single["a"].lo)


def test_the_interval_covers_the_true_difference_about_95_percent_of_the_time() -> None:
    """400 simulated test sets of 300 rows from a known joint law of (a correct, b correct): P(a)=0.60,
    P(b)=0.65, the two agreeing on 75% of rows; true difference b - a = +0.05. A 95% paired interval must
    cover +0.05 in about 95% of the sets (binomial SE 1.1 points). An interval that ignored the pairing
    (resampling the runs independently) would cover about 99%; a 68% one about 68%."""
    probs = np.array([0.25, 0.10, 0.15, 0.50])  # (a, b) = (0,0), (1,0), (0,1), (1,1)
    pairs = np.array([[0, 0], [1, 0], [0, 1], [1, 1]], dtype=float)
    rng = np.random.default_rng(2026)
    covered = []
    for rep in range(400):
        rows = pairs[rng.choice(4, size=300, p=probs)]
        d = paired_difference(rows[:, 1], rows[:, 0], n_boot=1000, seed=rep)
        covered.append(d.lo <= 0.05 <= d.hi)
    assert 0.91 <= np.mean(covered) <= 0.98, np.mean(covered)


def test_groups_are_compared_within_themselves() -> None:
    a = np.array([1, 1, 1, 0, 1, 0, 0, 0], dtype=float)
    b = np.array([1, 0, 0, 0, 1, 1, 0, 0], dtype=float)
    groups = ["sum", "sum", "sum", "sum", "max", "max", "max", "max"]
    rows = {r.group: r for r in group_differences(a, b, groups, n_boot=500)}
    assert list(rows) == ["all", "max", "sum"]
    assert (rows["all"].n, rows["all"].mean_a, rows["all"].mean_b) == (8, 0.5, 0.375)
    assert rows["all"].diff.point == pytest.approx(0.125)
    assert (rows["sum"].n, rows["sum"].a_higher, rows["sum"].b_higher) == (4, 2, 0)
    assert (rows["sum"].diff.point, rows["sum"].diff.hi) == (0.5, 1.0)  # resamples of {0,1,1,0}: up to 4/4
    assert (rows["max"].a_higher, rows["max"].b_higher, rows["max"].diff.point) == (0, 1, -0.25)


def test_seeded_and_the_same_resamples_as_the_shared_indices() -> None:
    d = np.random.default_rng(5).normal(size=37)
    idx = bootstrap_indices(37, 3000, seed=11)
    # drawn a chunk at a time, the resamples are those of one big index matrix for the same seed
    assert np.allclose(resampled_means(d, 3000, seed=11), d[idx].mean(axis=1))
    assert paired_difference(d, np.zeros(37), n_boot=3000, seed=11) == interval(d, idx)
    assert paired_difference(d, np.zeros(37), n_boot=300, seed=1) == paired_difference(d, np.zeros(37), n_boot=300,
                                                                                     seed=1)


def test_chunks_do_not_change_the_draws(monkeypatch: pytest.MonkeyPatch) -> None:
    import dyme_core.stats as stats

    d = np.random.default_rng(6).normal(size=40)
    whole = resampled_means(d, 500, seed=3)
    monkeypatch.setattr(stats, "CHUNK_ELEMENTS", 7 * 40)  # 7 resamples a chunk, the last chunk partial
    assert np.array_equal(resampled_means(d, 500, seed=3), whole)


def test_intervals_contain_their_point_and_95_percent_of_resamples() -> None:
    v = _rng_vector(250, 0.35, 4)
    idx = bootstrap_indices(250, 4000, seed=7)
    iv = interval(v, idx)
    assert iv.point == pytest.approx(v.mean()) and iv.lo <= iv.point <= iv.hi
    means = v[idx].mean(axis=1)
    assert 0.94 <= np.mean((means >= iv.lo) & (means <= iv.hi)) <= 0.97


def test_seeds_are_averaged_per_question() -> None:
    assert per_question_mean([[1, 0, 1], [1, 1, 0]]).tolist() == [1.0, 0.5, 0.5]


@pytest.mark.parametrize(("call", "message"), [
    (lambda: paired_intervals({"a": np.ones(3), "b": np.ones(4)}, [("a", "b")], n_boot=10), "different question sets"),
    (lambda: paired_intervals({"a": np.ones(3)}, [("a", "missing")], n_boot=10), "without scores"),
    (lambda: paired_difference([1, 0], [1, 0, 1]), "one length"),  # not paired
    (lambda: paired_difference([], []), "non-empty"),
    (lambda: paired_difference([1, float("nan")], [1, 0]), "finite"),
    (lambda: paired_difference([1, 0], [1, 0], confidence=95), r"confidence must be in \(0, 1\)"),
    (lambda: group_differences([1, 0], [1, 0], ["x"]), "1 group labels for 2 paired rows"),
])
def test_bad_input_is_named(call, message) -> None:
    with pytest.raises(ValueError, match=message):
        call()
