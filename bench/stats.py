"""Paired-bootstrap confidence intervals for the method table (bench/method_table.py; issue 12).

Every method is evaluated on the same test questions, so the comparison is paired: one resample draws
question indices with replacement, and the SAME indices score every method. An interval for a
difference then carries only the variation of the questions on which the two methods disagree, which
is much tighter than two independent intervals would suggest. A method with several seeds enters as its
per-question mean over seeds (a value in [0, 1] per question), so seed noise is averaged before
resampling questions. Intervals are percentile intervals of the resampled means.

Pure numpy, no GPU; tests: tests/bench/test_stats.py.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    """A point estimate on the full question set and its bootstrap percentile interval."""

    point: float
    lo: float
    hi: float

    @property
    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0

    def as_dict(self, scale: float = 1.0) -> dict[str, float | bool]:
        return {**{k: v * scale for k, v in asdict(self).items()}, "excludes_zero": self.excludes_zero}


def per_question_mean(vectors: Sequence[Sequence[float]]) -> np.ndarray:
    """Mean over seeds of per-question scores: (n_seeds, n_questions) -> (n_questions,)."""
    arr = np.asarray(vectors, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise ValueError(f"expected a non-empty list of equally long per-question vectors, got shape {arr.shape}")
    return arr.mean(axis=0)


def bootstrap_indices(n_questions: int, n_boot: int, seed: int = 0) -> np.ndarray:
    """(n_boot, n_questions) question indices drawn with replacement; share them across methods."""
    if n_questions < 1 or n_boot < 1:
        raise ValueError(f"need at least one question and one resample, got {n_questions} and {n_boot}")
    return np.random.default_rng(seed).integers(0, n_questions, size=(n_boot, n_questions))


def interval(scores: np.ndarray, idx: np.ndarray, confidence: float = 0.95) -> Interval:
    """Mean of `scores` (n_questions,) with its paired-bootstrap interval over the resamples `idx`."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (idx.shape[1],):
        raise ValueError(f"scores cover {scores.shape} questions, the resamples {idx.shape[1]}")
    means = scores[idx].mean(axis=1)  # (n_boot,)
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    # exact arithmetic can put the point a hair outside [lo, hi] when every resample is equal
    point = float(scores.mean())
    return Interval(point, float(min(lo, point)), float(max(hi, point)))


def paired_intervals(methods: Mapping[str, np.ndarray], pairs: Sequence[tuple[str, str]], n_boot: int = 2000,
                     seed: int = 0, confidence: float = 0.95) -> tuple[dict[str, Interval], dict[str, Interval]]:
    """Intervals for each method's accuracy and for each difference `a - b` in `pairs` ("a-b" keys).

    `methods`: name -> per-question score vector, all over the same questions in the same order.
    """
    lengths = {name: len(v) for name, v in methods.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"methods are scored on different question sets: {lengths}")
    if missing := sorted({m for pair in pairs for m in pair} - set(methods)):
        raise ValueError(f"pairs name methods without scores: {missing}")
    idx = bootstrap_indices(next(iter(lengths.values())), n_boot, seed)
    single = {name: interval(v, idx, confidence) for name, v in methods.items()}
    diffs = {f"{a}-{b}": interval(np.asarray(methods[a]) - np.asarray(methods[b]), idx, confidence)
             for a, b in pairs}
    return single, diffs
