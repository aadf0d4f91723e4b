"""components.runtime: artifact paths reach the config exactly and win over the params sections; the
tracking environment is resolved as the CLI does; `data_path` picks the ingest source."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from components.runtime import fetch_data, step_config

SECTIONS = {"train": {"max_steps": 7}, "data": {"path": "somewhere", "out_dir": "data/dataset"}}


@pytest.mark.parametrize("path", [
    "/tmp/root/run/data-op/dataset",  # a plain local path
    "/minio/mlpipeline/v2/artifacts/dyme/1f2e/data-op/dataset",  # where KFP's launcher puts artifacts
    "/tmp/a: b/#c",  # YAML would read ": " as a mapping and "#" as a comment
    "123",  # YAML would read a number
    "true",  # YAML would read a boolean
])
def test_artifact_path_is_kept_verbatim(path: str) -> None:
    cfg = step_config(SECTIONS, {"data.out_dir": path})
    assert cfg.data.out_dir == path


def test_artifact_paths_win_over_the_sections_and_the_rest_is_kept() -> None:
    cfg = step_config(SECTIONS, {"data.out_dir": "/artifact", "register.tags": {"kfp.run_id": "r-1"}})
    assert cfg.data.out_dir == "/artifact"  # the params cannot point a step away from its input
    assert (cfg.train.max_steps, cfg.data.path) == (7, "somewhere")
    assert cfg.register.tags == {"kfp.run_id": "r-1"}


def test_the_tracking_uri_comes_from_the_pods_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # the ConfigMap dyme-mlflow sets MLFLOW_TRACKING_URI in the pod; the library never reads it itself
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.dyme.svc:5000")
    assert step_config(SECTIONS, {}).register.tracking_uri == "http://mlflow.dyme.svc:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert step_config(SECTIONS, {}).register.tracking_uri.startswith("sqlite:////")  # absolute


@pytest.mark.parametrize(("data_path", "expected"), [
    ("", "synthetic"),  # unset: the embedded synthetic data
    ("HuggingFaceM4/ChartQA", "HuggingFaceM4/ChartQA"),  # a hub id: ingest downloads it
    ("/data/chartqa", "/data/chartqa"),  # a path on the data volume
])
def test_data_path_names_the_ingest_source(data_path: str, expected: str, tmp_path: Path) -> None:
    assert fetch_data(data_path, tmp_path) == expected


def test_a_dvc_uri_needs_the_path_inside_the_repo(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="after '#'"):
        fetch_data("dvc+https://example.invalid/repo.git", tmp_path)


@pytest.mark.slow
def test_a_dvc_uri_is_fetched_with_dvc_get(tmp_path: Path) -> None:
    """A DVC-tracked dataset in another git repository (pushed to its remote) arrives as a local copy."""
    repo, remote = tmp_path / "datarepo", tmp_path / "remote"
    (repo / "data" / "mini").mkdir(parents=True)
    (repo / "data" / "mini" / "rows.json").write_text('[{"question": "q", "answer": "1"}]')
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    dvc = str(Path(sys.executable).with_name("dvc"))
    for cmd in (["git", "init", "-q"], [dvc, "init", "-q"], [dvc, "remote", "add", "-d", "store", str(remote)],
                [dvc, "add", "-q", "data/mini"], ["git", "add", "-A"], ["git", "commit", "-qm", "data"],
                [dvc, "push", "-q"]):
        subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True, timeout=300)
    got = Path(fetch_data(f"dvc+{repo}#data/mini", tmp_path / "work"))
    assert got == tmp_path / "work" / "mini"
    assert (got / "rows.json").read_text() == '[{"question": "q", "answer": "1"}]'
