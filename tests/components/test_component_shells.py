"""The component functions themselves (their Python bodies, called in-process on tiny data): data_op
ingests like `dyme ingest`, each step reads its input artifacts and only its params sections, writes
its outputs where KFP expects them, and validate_op stops the DAG on bad data. The whole pipeline
under kfp.local is tests/pipelines/test_local_run.py."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from kfp.dsl import Artifact, Dataset, Metrics

from components.steps import data_op, refine_op, select_params_op, validate_op
from dyme_core.config import load_config
from dyme_core.steps import ValidationFailed

ROOT = Path(__file__).resolve().parents[2]
# 112 px: the smallest chart the default style (synth.style readable) draws
TINY = ["synth.n_train=2", "synth.n_val=1", "synth.n_test=1", "synth.image_size=112"]


@pytest.fixture
def sections() -> dict[str, dict]:
    return load_config(ROOT / "params.yaml", TINY).to_dict()


@pytest.fixture
def ingested(sections: dict, tmp_path: Path) -> Path:
    """data_op's `dataset` artifact: the synthetic data (data_path unset) in the project format."""
    dataset, report = Dataset(uri=str(tmp_path / "dataset")), Artifact(uri=str(tmp_path / "ingest.json"))
    data_op.python_func(data_params=sections["data"], synth_params=sections["synth"],
                        validate_params=sections["validate"], data_path="", dataset=dataset, report=report)
    return Path(dataset.path)


def _validate(sections: dict, data: Path, out: Path) -> tuple[Artifact, Metrics]:
    report, metrics = Artifact(uri=str(out / "report")), Metrics(uri=str(out / "metrics"))
    validate_op.python_func(data_params=sections["data"], validate_params=sections["validate"],
                            data=Dataset(uri=str(data)), report=report, metrics=metrics)
    return report, metrics


def test_data_op_ingests_into_its_artifact(ingested: Path, tmp_path: Path) -> None:
    manifest = json.loads((ingested / "manifest.json").read_text())
    assert manifest["source"] == "synthetic" and manifest["rows_per_split"] == {"train": 2, "val": 1, "test": 1}
    assert pq.read_table(ingested / "samples.parquet").num_rows == 4
    assert json.loads((tmp_path / "ingest.json").read_text())["n_rows"] == 4  # the ingest report artifact


def test_validate_op_passes_good_data_and_logs_counts(sections: dict, ingested: Path, tmp_path: Path) -> None:
    report, metrics = _validate(sections, ingested, tmp_path)
    assert json.loads(Path(report.path).read_text())["success"] is True
    assert metrics.metadata == {"n_rows": 4, "n_failures": 0}


def test_validate_op_fails_on_a_corrupt_image_and_names_the_row(sections: dict, ingested: Path,
                                                                tmp_path: Path) -> None:
    row = pq.read_table(ingested / "samples.parquet").to_pylist()[0]
    (ingested / row["image"]).write_bytes(b"not a png")
    with pytest.raises(ValidationFailed, match="failed validation"):
        _validate(sections, ingested, tmp_path)
    report = json.loads((tmp_path / "report").read_text())  # written before failing, for the logs
    assert report["success"] is False
    assert row["id"] in {f["id"] for f in report["failures"]}


def test_refine_op_writes_one_target_per_train_sample_into_its_artifact(
        sections: dict, ingested: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    refined = Dataset(uri=str(tmp_path / "refined"))
    model_params = select_params_op.python_func(section=sections["model"], keys=["name_or_path"])
    assert model_params == {"name_or_path": sections["model"]["name_or_path"]}  # what the pipeline hands it
    refine_op.python_func(model_params=model_params, refine_params=sections["refine"],
                          data=Dataset(uri=str(ingested)), refined=refined)
    rows = [json.loads(line) for line in (Path(refined.path) / "targets.jsonl").read_text().splitlines()]
    train_ids = [r["id"] for r in pq.read_table(ingested / "samples.parquet").to_pylist() if r["split"] == "train"]
    assert sorted(r["id"] for r in rows) == sorted(train_ids)
    assert all(r["trace"] for r in rows)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset", "ingest.json", "refined"]  # nothing else in cwd
