"""dyme_core.tracking against a real `mlflow server` (SQLite backend, proxied artifacts) on 127.0.0.1:
per-step metrics, data version, registration with the champion/challenger gate, promotion by hand,
the comparison table, and serving the champion as a pyfunc on a tiny random model."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from dyme_core import tracking
from dyme_core.config import Config, InitModelConfig, RegisterConfig
from dyme_core.models import init_tiny_model

pytestmark = [pytest.mark.server, pytest.mark.slow]
# mlflow is reached through dyme_core.tracking, which disables its telemetry before importing it

MODEL_NAME = "dyme-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real MLflow server; MLFLOW_TRACKING_URI points at it for the module."""
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    log = open(root / "server.log", "w")  # noqa: SIM115  (closed after the server stops)
    proc = subprocess.Popen(
        [str(mlflow_cli), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
         "--artifacts-destination", str(root / "artifacts")],
        env=env, stdout=subprocess.DEVNULL, stderr=log,
    )
    try:
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"mlflow server did not start:\n{(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.3)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MLFLOW_TRACKING_URI", url)
            mp.delenv("MLFLOW_RUN_ID", raising=False)
            yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _config(tmp: Path, **register: object) -> Config:
    cfg = Config()
    cfg.train.output_dir = str(tmp / "train")
    cfg.register = RegisterConfig(
        model_name=MODEL_NAME, experiment="dyme-test", tracking_uri="sqlite:///unused.db", **register
    )
    return cfg


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "model"
    texts = ["What is the value of A?", "The bar for A reaches 12. Answer: 12", "Which is largest? B"]
    init = InitModelConfig(out_dir=str(out), vocab_size=300, hidden_size=32, num_layers=1,
                           vision_hidden_size=32, vision_layers=1, image_size=32, patch_size=8)
    return init_tiny_model(init, texts)


@pytest.fixture(scope="module")
def png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("img") / "chart.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(path)
    return path


def _train_and_eval_dirs(root: Path, model: Path, accuracy: float) -> tuple[Path, Path]:
    """A training run dir (model/, metrics.jsonl) and an evaluation dir (metrics.json, predictions, plot)."""
    train, evaluation = root / "train", root / "eval"
    shutil.copytree(model, train / "model")
    rows = [{"step": s, "loss": 1 - s / 10, "reward/accuracy": s / 5, "mode/memorize": 0.5} for s in range(3)]
    (train / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    evaluation.mkdir()
    metrics = {"relaxed_accuracy": accuracy, "format_rate": 0.9, "grounding_score": 0.5,
               "mean_thinking_length": 40.0, "accuracy/bar": accuracy, "n": 8}
    (evaluation / "metrics.json").write_text(json.dumps(metrics))
    (evaluation / "predictions.jsonl").write_text('{"id": "0", "completion": "x Answer: 1"}\n')
    Image.new("RGB", (8, 8)).save(evaluation / "accuracy_per_type.png")
    return train, evaluation


@pytest.fixture(scope="module")
def registered(server: str, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Three registrations: v1 (0.50, into the training run), v2 (0.30, worse), v3 (0.60, better)."""
    results = []
    for accuracy, method, seed in [(0.5, "dyme", 1), (0.3, "grpo", 2), (0.6, "dyme", 3)]:
        root = tmp_path_factory.mktemp(f"reg{seed}")
        train, evaluation = _train_and_eval_dirs(root, tiny_model, accuracy)
        cfg = _config(root, gate_margin=0.05)
        cfg.train.method, cfg.train.seed = method, seed
        if seed == 1:  # the trainer's reporter wrote mlflow_run_id: registration reuses that run
            reporter = tracking.MlflowReporter(cfg, run_name="train-v1")
            reporter.log_metrics({"reward/accuracy": 0.4}, step=0)
            reporter.close()
        results.append(tracking.register_model(cfg, train, evaluation))
    return results


def _aliases(version: int) -> list[str]:
    return sorted(tracking.MlflowClient().get_model_version(MODEL_NAME, str(version)).aliases)


def test_gate_promotes_only_when_not_worse(registered: list[dict]) -> None:
    first, worse, better = registered
    assert (first["version"], first["promoted"], first["champion_version"]) == (1, True, None)
    # 0.30 < 0.50 - 0.05: registered as challenger, champion stays v1
    assert (worse["version"], worse["promoted"]) == (2, False)
    assert (worse["champion_version"], worse["champion_metric"]) == (1, 0.5)
    assert (better["version"], better["promoted"], better["champion_version"]) == (3, True, 1)
    assert _aliases(1) == [] and _aliases(2) == [] and _aliases(3) == ["challenger", "champion"]
    client = tracking.MlflowClient()
    # v1 went into the reporter's training run; v2 got its own run with config and training curve
    assert client.get_run(first["run_id"]).info.run_name == "train-v1"
    run2 = client.get_run(worse["run_id"])
    assert run2.data.params["train.method"] == "grpo"
    assert run2.data.metrics["eval/relaxed_accuracy"] == pytest.approx(0.3)
    assert [m.step for m in client.get_metric_history(worse["run_id"], "reward/accuracy")] == [0, 1, 2]
    artifacts = {a.path for a in client.list_artifacts(worse["run_id"], "eval")}
    assert artifacts == {"eval/metrics.json", "eval/predictions.jsonl", "eval/accuracy_per_type.png"}


def test_promote_by_hand_and_unknown_version(registered: list[dict], tmp_path: Path) -> None:
    cfg = _config(tmp_path).register
    tracking.promote(cfg, 1)
    assert "champion" in _aliases(1) and "champion" not in _aliases(3)
    with pytest.raises(ValueError, match=r"no version 99 \(versions: \[1, 2, 3\]\)"):
        tracking.promote(cfg, 99)


def test_compare_table(registered: list[dict], tmp_path: Path) -> None:
    table = tracking.compare(_config(tmp_path).register)
    names = [tracking.MlflowClient().get_run(r["run_id"]).info.run_name for r in registered]
    assert all(name in table for name in names)
    assert "eval/relaxed_accuracy" in table and "0.3000" in table and "0.6000" in table
    assert "grpo" in table


def test_champion_serves_completions(registered: list[dict], png: Path, tmp_path: Path) -> None:
    model = tracking.load_champion(_config(tmp_path).register)
    b64 = base64.b64encode(png.read_bytes()).decode()
    frame = pd.DataFrame({"image": [str(png), png.read_bytes(), b64], "question": ["What is A?"] * 3})
    out = model.predict(frame, params={"max_new_tokens": 4})
    assert list(out.columns) == ["completion", "answer"] and len(out) == 3
    assert all(isinstance(c, str) for c in out["completion"])


def test_reporter_logs_steps_and_resumes(
    server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _config(tmp_path)
    reporter = tracking.MlflowReporter(cfg, tags={"purpose": "test"})
    for step in range(3):
        reporter.log_metrics({"loss": 1.0 / (step + 1), "reward/accuracy": 0.1 * step, "note": None}, step)
    reporter.close()
    assert (tmp_path / "train" / "mlflow_run_id").read_text().strip() == reporter.run_id
    client = tracking.MlflowClient()
    history = client.get_metric_history(reporter.run_id, "reward/accuracy")
    assert [(m.step, round(m.value, 3)) for m in history] == [(0, 0.0), (1, 0.1), (2, 0.2)]
    run = client.get_run(reporter.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["purpose"] == "test"
    assert run.data.params["train.max_steps"] == "12"
    assert json.loads(run.data.params["train.report_to"]) == ["jsonl"]
    monkeypatch.setenv("MLFLOW_RUN_ID", reporter.run_id)  # a resumed job continues the same run
    resumed = tracking.MlflowReporter(cfg)
    resumed.log_metrics({"loss": 0.1}, step=3)
    resumed.close()
    assert resumed.run_id == reporter.run_id
    assert [m.step for m in client.get_metric_history(reporter.run_id, "loss")] == [0, 1, 2, 3]


def test_data_version(tmp_path: Path) -> None:
    dvc = tmp_path / "data.dvc"
    dvc.write_text("outs:\n- md5: 0123abcd.dir\n  size: 10\n  nfiles: 2\n  hash: md5\n  path: data\n")
    assert tracking.data_version(dvc) == {"data_md5": "0123abcd.dir", "git_rev": ""}  # tmp is no git repo
    assert tracking.data_version(tmp_path / "missing.dvc")["data_md5"] == ""
    repo = Path(__file__).resolve().parents[2]
    assert len(tracking.data_version(repo / "data.dvc")["git_rev"]) == 40


def test_tracking_uri_env_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = RegisterConfig(tracking_uri="sqlite:///x.db")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri(cfg) == "sqlite:///x.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert tracking.tracking_uri(cfg) == "http://127.0.0.1:1"
