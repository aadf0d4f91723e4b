"""The DVC layout a fresh clone relies on, checked on the committed files in a second (no DVC run):

- `data.dvc` (the example dataset, data/raw) and `models/chart-base.dvc` (the default's base model) name
  the example remote (`remote: example`), and that remote, `dvc-store/` in git, holds every object they
  list, so `dvc pull` serves them offline; the example remote is not the default, so `dvc push` of a
  user's own data does not go there.
- the headline figures `dvc metrics show` and `dvc exp show` list (dyme_core.steps.headline) and the
  smoothing of the training plots (dyme_core.evaluate.moving_mean).

`tests/dvc/test_dvc_pipeline.py` runs the same layout end to end (pull, repro, experiments, push).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from configobj import ConfigObj

from dyme_core.evaluate import moving_mean
from dyme_core.steps import headline

REPO = Path(__file__).resolve().parents[2]
TRACKED = {"data.dvc": "data/raw", "models/chart-base.dvc": "models/chart-base"}


def _object(md5: str) -> Path:
    return REPO / "dvc-store/files/md5" / md5[:2] / md5[2:]


@pytest.mark.parametrize("dvc_file, data_path", TRACKED.items())
def test_example_remote_serves_every_file_the_dvc_file_lists(dvc_file: str, data_path: str) -> None:
    [out] = yaml.safe_load((REPO / dvc_file).read_text())["outs"]
    assert (Path(dvc_file).parent / out["path"]).as_posix() == data_path
    assert out.get("remote") == "example", f"{dvc_file}: `dvc pull` would look in the default remote"
    listing = _object(out["md5"])
    assert listing.is_file(), f"{dvc_file}: {out['md5']} is not in dvc-store/ (run `dvc push {dvc_file}`)"
    entries = json.loads(listing.read_text())
    missing = [e["relpath"] for e in entries if not _object(e["md5"]).is_file()]
    assert not missing, f"{dvc_file}: dvc-store/ lacks {missing} (run `dvc push {dvc_file}`)"
    assert len(entries) == out["nfiles"]


def test_example_remote_is_not_the_default() -> None:
    config = ConfigObj(str(REPO / ".dvc/config"))  # DVC's own config format
    assert config['remote "example"']["url"] == "../dvc-store"
    assert "remote" not in config["core"], "a default remote would receive every `dvc push`"


def test_headline_is_short_and_averages_the_last_ten_steps(tmp_path: Path) -> None:
    metrics = {"relaxed_accuracy": 0.875, "format_rate": 1.0, "grounding_score": 0.99388,
               "mean_thinking_length": 250.078125, "n": 64, "accuracy/count": 1.0}
    history = tmp_path / "metrics.jsonl"
    # 12 steps: the first two all memorisation, the last ten half explore, half skip
    rows = [{"step": s, "reward/total": 1.0 if s > 2 else 0.0, "mode/memorize": 1.0 if s <= 2 else 0.0,
             "mode/explore": 0.0 if s <= 2 else 0.5, "mode/skip": 0.0 if s <= 2 else 0.5} for s in range(1, 13)]
    history.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert headline(metrics, history) == {
        "accuracy": 0.875, "format": 1.0, "grounding": 0.9939, "think_chars": 250.1,
        "reward": 1.0, "memorize": 0.0, "explore": 0.5, "skip": 0.5}
    # a model evaluated without a training run (the base): the evaluation's figures only
    assert headline(metrics, tmp_path / "no-run/metrics.jsonl") == {
        "accuracy": 0.875, "format": 1.0, "grounding": 0.9939, "think_chars": 250.1}


@pytest.mark.parametrize("values, window, expected", [
    ([0.0, 1.0, 0.0, 1.0], 2, [0.0, 0.5, 0.5, 0.5]),     # a batch-4 saw-tooth flattens to its mean
    ([1.0, 2.0, 3.0], 10, [1.0, 1.5, 2.0]),            # a run shorter than the window: mean so far
    ([0.25, 0.75], 1, [0.25, 0.75]),                    # window 1: the raw values
])
def test_moving_mean_is_trailing(values: list[float], window: int, expected: list[float]) -> None:
    assert moving_mean(values, window) == pytest.approx(expected)
