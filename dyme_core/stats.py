"""Paired-bootstrap confidence intervals for accuracy differences on the same test rows (DESIGN.md section 6).

Two runs (or methods) evaluated on the same test questions are compared paired: one resample draws question
indices with replacement, and the SAME indices score both, so an interval for a difference carries only the
variation of the questions on which the two disagree (much tighter than two independent intervals would
suggest). Intervals are percentile intervals of the resampled means: the (1 - confidence)/2 and
1 - (1 - confidence)/2 quantiles of `n_boot` resampled means, seeded, so the same inputs give the same interval.
Percentile intervals are rough on small groups (under about 30 rows they are too narrow).

- `paired_difference(a, b)`: mean(a - b) with its interval; `group_differences(a, b, groups)`: the same over all
  rows and per group (question type), with each side's mean and the rows on which each side alone scores higher.
  Both resample in chunks (at most CHUNK_ELEMENTS indices held at once, whatever `n_boot`), drawing the same indices as
  `bootstrap_indices` for the same seed.
- `difference_table(rows)`, `plot_differences(rows, path)`: the rows of `group_differences` as a text table and
  as a PNG of the intervals (matplotlib, imported when plotting).
- `paired_intervals(methods, pairs)`, `per_question_mean`, `bootstrap_indices`, `interval`: several methods over
  one shared set of resamples, a method with several seeds entering as its per-question mean over seeds (the
  method table of bench/method_table.py).

numpy (and matplotlib for the plot), no tracking: `dyme compare --paired` (dyme_core/tracking.py) prints and
logs these.
Tests: tests/core/test_stats.py.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

CHUNK_ELEMENTS = 4_000_000  # resampled indices held at once (32 MB of int64)
SMALL_GROUP = 30  # rows under which a percentile interval is too narrow to take at face value


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


@dataclass(frozen=True)
class GroupDifference:
    """`a - b` on one group of paired rows: n, each side's mean, the rows where each side alone scores higher,
    and the interval of the mean difference."""

    group: str
    n: int
    mean_a: float
    mean_b: float
    a_higher: int
    b_higher: int
    diff: Interval


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


def _percentile_interval(point: float, means: np.ndarray, confidence: float) -> Interval:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    # exact arithmetic can put the point a hair outside [lo, hi] when every resample is equal
    return Interval(point, float(min(lo, point)), float(max(hi, point)))


def interval(scores: np.ndarray, idx: np.ndarray, confidence: float = 0.95) -> Interval:
    """Mean of `scores` (n_questions,) with its paired-bootstrap interval over the resamples `idx`."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (idx.shape[1],):
        raise ValueError(f"scores cover {scores.shape} questions, the resamples {idx.shape[1]}")
    means = scores[idx].mean(axis=1)  # (n_boot,)
    return _percentile_interval(float(scores.mean()), means, confidence)


def resampled_means(scores: np.ndarray, n_boot: int, seed: int = 0) -> np.ndarray:
    """(n_boot,) means of `scores` over resamples with replacement: the resamples of
    `bootstrap_indices(len(scores), n_boot, seed)`, drawn a chunk at a time."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1 or len(scores) < 1 or n_boot < 1:
        raise ValueError(f"need a non-empty score vector and at least one resample, got {scores.shape} and {n_boot}")
    rng = np.random.default_rng(seed)
    rows = max(1, CHUNK_ELEMENTS // len(scores))
    means = np.empty(n_boot)
    for lo in range(0, n_boot, rows):
        m = min(rows, n_boot - lo)
        means[lo : lo + m] = scores[rng.integers(0, len(scores), size=(m, len(scores)))].mean(axis=1)
    return means


def _paired_arrays(a: Sequence[float], b: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape or len(a) == 0:
        raise ValueError(f"paired scores must be two non-empty vectors of one length, got {a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("paired scores must be finite numbers")
    return a, b


def paired_difference(a: Sequence[float], b: Sequence[float], n_boot: int = 10_000, seed: int = 0,
                      confidence: float = 0.95) -> Interval:
    """mean(a - b) over paired rows (a[i] and b[i] score the same question) with its paired-bootstrap
    percentile interval."""
    a, b = _paired_arrays(a, b)
    d = a - b
    return _percentile_interval(float(d.mean()), resampled_means(d, n_boot, seed), confidence)


def group_differences(a: Sequence[float], b: Sequence[float], groups: Sequence[str], n_boot: int = 10_000,
                      seed: int = 0, confidence: float = 0.95) -> list[GroupDifference]:
    """`a - b` over all rows (group "all"), then per group in sorted order, each resampled within itself.

    a, b: per-row scores of the two sides (the same rows in the same order); groups: each row's group
    (question type). Every group is resampled with the same `seed`.
    """
    a, b = _paired_arrays(a, b)
    groups = np.asarray([str(g) for g in groups])
    if groups.shape != a.shape:
        raise ValueError(f"{len(groups)} group labels for {len(a)} paired rows")

    def one(name: str, mask: np.ndarray) -> GroupDifference:
        x, y = a[mask], b[mask]
        return GroupDifference(name, int(mask.sum()), float(x.mean()), float(y.mean()), int((x > y).sum()),
                               int((y > x).sum()), paired_difference(x, y, n_boot, seed, confidence))

    everything = np.ones(len(a), dtype=bool)
    return [one("all", everything), *(one(g, groups == g) for g in sorted(set(groups.tolist())))]


def _points(x: float, sign: bool = False) -> str:
    return f"{100 * x:+.1f}" if sign else f"{100 * x:.1f}"


def difference_table(rows: Sequence[GroupDifference], a: str = "B", b: str = "A", group: str = "group") -> str:
    """`group_differences(a_scores, b_scores, ...)` as a text table in percentage points: n, each side's mean,
    a - b with its interval (`*` when it excludes 0), and the rows on which each side alone scores higher."""
    header = [group, "n", f"{b} acc %", f"{a} acc %", f"{a} - {b} (pts)", "95% interval (pts)", f"{a} only",
              f"{b} only"]
    cells = [header] + [
        [r.group, str(r.n), _points(r.mean_b), _points(r.mean_a), _points(r.diff.point, True),
         f"[{_points(r.diff.lo, True)}, {_points(r.diff.hi, True)}]{' *' if r.diff.excludes_zero else ''}",
         str(r.a_higher), str(r.b_higher)]
        for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def plot_differences(rows: Sequence[GroupDifference], path: str | Path, title: str) -> Path:
    """A PNG of each row's `a - b` (points) with its interval, one line per group, zero marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(rows)
    y = list(range(len(rows)))[::-1]  # the first row ("all") on top
    points = [100 * r.diff.point for r in rows]
    err = [[100 * (r.diff.point - r.diff.lo) for r in rows], [100 * (r.diff.hi - r.diff.point) for r in rows]]
    fig, ax = plt.subplots(figsize=(6.5, 1.2 + 0.42 * len(rows)))
    ax.axvline(0, color="0.5", lw=1)
    ax.errorbar(points, y, xerr=err, fmt="o", color="#4c72b0", ecolor="#4c72b0", capsize=4)
    ax.set_yticks(y, [f"{r.group} (n={r.n})" for r in rows])
    ax.set_xlabel("difference in accuracy (percentage points), 95% paired-bootstrap interval")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)
    return path


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
