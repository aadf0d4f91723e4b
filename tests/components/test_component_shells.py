"""The component functions themselves (their Python bodies, called in-process on tiny data): each
reads its input artifacts, writes its outputs where KFP expects them, and validate_op stops the DAG
on bad data. The whole pipeline under kfp.local is tests/pipelines/test_local_run.py."""

import json
from pathlib import Path

import pytest
from kfp.dsl import Artifact, Dataset, Metrics

from components.steps import refine_op, validate_op
from dyme_core.steps import ValidationFailed


def _validate(params: str, data: Path, out: Path) -> tuple[Artifact, Metrics]:
    report, metrics = Artifact(uri=str(out / "report")), Metrics(uri=str(out / "metrics"))
    validate_op.python_func(params=params, overrides=[], data=Dataset(uri=str(data)), report=report,
                            metrics=metrics)
    return report, metrics


def test_validate_op_passes_good_data_and_logs_counts(params: str, tiny_dataset: Path, tmp_path: Path) -> None:
    report, metrics = _validate(params, tiny_dataset, tmp_path)
    assert json.loads(Path(report.path).read_text())["success"] is True
    assert metrics.metadata == {"n_rows": 4, "n_failures": 0}


def test_validate_op_fails_on_a_corrupt_image_and_names_the_row(params: str, tiny_dataset: Path,
                                                                tmp_path: Path) -> None:
    row = json.loads((tiny_dataset / "samples.jsonl").read_text().splitlines()[0])
    (tiny_dataset / row["image"]).write_bytes(b"not a png")
    with pytest.raises(ValidationFailed, match="failed validation"):
        _validate(params, tiny_dataset, tmp_path)
    report = json.loads((tmp_path / "report").read_text())  # written before failing, for the logs
    assert report["success"] is False
    assert row["id"] in {f["id"] for f in report["failures"]}


def test_refine_op_writes_one_target_per_train_sample_into_its_artifact(
        params: str, tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    refined = Dataset(uri=str(tmp_path / "refined"))
    refine_op.python_func(params=params, overrides=[], data=Dataset(uri=str(tiny_dataset)), refined=refined)
    rows = [json.loads(line) for line in (Path(refined.path) / "targets.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [s["id"] for s in map(json.loads, (tiny_dataset / "samples.jsonl").open())
                                       if s["split"] == "train"]
    assert all(r["trace"] for r in rows)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "refined"]  # no cache or pool left in cwd
