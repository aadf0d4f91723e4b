"""Fixtures for the pipeline tests: the repo root on the path and a kfp.local runner in tmp_path."""

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # `pipelines`/`components` may predate the editable install; the image installs them

@pytest.fixture
def params() -> str:
    return (ROOT / "params.yaml").read_text()


@pytest.fixture
def local_kfp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """kfp.local with the subprocess runner in this environment; yields the pipeline root.

    Components run as subprocesses that inherit the working directory (tmp_path, so nothing lands in
    the repo) and the environment: MLflow goes to a SQLite file in tmp_path.
    """
    import kfp.local
    from kfp.local.config import LocalExecutionConfig

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlruns.db")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    root = tmp_path / "pipeline_root"
    kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=str(root))
    yield root
    LocalExecutionConfig.instance = None  # later tests compile or call components without a local runner
