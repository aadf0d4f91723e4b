"""dyme_core.tracking against a real `mlflow server` (SQLite backend, proxied artifacts) on 127.0.0.1:
per-step metrics and lineage (dataset input, git commit, run names, KFP tag), resume into the same run,
FAILED status, a server that is unreachable, killed mid-run and restarted (buffer + `sync`), the
first-time SQLite schema race, registration with the champion/challenger gate, promotion, the comparison
table, serving the champion, and loading it where this repository is not importable.

The CLI's side of it (tracking URI made absolute against DVC_ROOT, DVC_EXP_NAME as the run name) is
tested here too, and `dvc exp run --temp` registering into the user's store."""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # before mlflow is imported (the CLI does it too)

import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from dyme_core import tracking  # noqa: E402
from dyme_core.cli import absolute_tracking_uri, resolve_tracking  # noqa: E402
from dyme_core.config import Config, InitModelConfig, RegisterConfig  # noqa: E402
from dyme_core.models import init_tiny_model  # noqa: E402

pytestmark = [pytest.mark.server, pytest.mark.slow]

MODEL_NAME = "dyme-test"
ROOT = Path(__file__).resolve().parents[2]
DIGEST = "ab12cd34" * 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`mlflow server` on 127.0.0.1 with its store in `root`; start/kill/restart on the same port."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Server:
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
        log = open(self.root / "server.log", "a")  # noqa: SIM115  (the child keeps it)
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port",
             str(self.port), "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root}/mlflow.db",
             "--artifacts-destination", str(self.root / "artifacts")],
            env=env, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as response:
                    if response.status == 200:
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"mlflow server did not start:\n{(self.root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.3)

    def stop(self) -> None:
        """Kill the server and its workers (its own process group), as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
            self.proc.wait(timeout=30)
        self.proc = None


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    srv = Server(tmp_path_factory.mktemp("mlflow")).start()
    yield srv.url
    srv.stop()


def _config(tmp: Path, uri: str, **register: object) -> Config:
    cfg = Config()
    cfg.train.output_dir = str(tmp / "train")
    cfg.data.out_dir = str(tmp / "dataset")
    cfg.register = RegisterConfig(model_name=MODEL_NAME, experiment="dyme-test", tracking_uri=uri,
                                  connect_timeout=3.0, **register)
    return cfg


def _client(uri: str) -> tracking.MlflowClient:
    return tracking.MlflowClient(tracking_uri=uri)


def _manifest(data_dir: Path, source: str = "data/chartqa") -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "manifest.json").write_text(json.dumps({"digest": DIGEST, "source": source, "format": "hf"}))


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
    rows = [{"id": f"r{i}", "qtype": "bar", "completion": "x Answer: 1", "correct": float(i < round(8 * accuracy))}
            for i in range(8)]
    (evaluation / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    Image.new("RGB", (8, 8)).save(evaluation / "accuracy_per_type.png")
    return train, evaluation


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def registered(server: str, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Three registrations of one dataset (8 test rows): v1 (0.50, into the training run), v2 (0.30, worse),
    v3 (0.60, better); each result also holds what MLflow logged while registering (`mlflow_log`)."""
    results = []
    for accuracy, method, seed in [(0.5, "dyme", 1), (0.3, "grpo", 2), (0.6, "dyme", 3)]:
        root = tmp_path_factory.mktemp(f"reg{seed}")
        train, evaluation = _train_and_eval_dirs(root, tiny_model, accuracy)
        cfg = _config(root, server, gate_margin=0.05)
        cfg.train.method, cfg.train.seed = method, seed
        _manifest(Path(cfg.data.out_dir))
        if seed == 1:  # the trainer's reporter wrote mlflow_run_id: registration reuses that run
            reporter = tracking.MlflowReporter(cfg, run_name="train-v1")
            reporter.log_metrics({"reward/accuracy": 0.4}, step=0)
            reporter.close()
        records = _Records()
        logging.getLogger("mlflow").addHandler(records)
        try:
            results.append({**tracking.register_model(cfg, train, evaluation), "mlflow_log": records.messages})
        finally:
            logging.getLogger("mlflow").removeHandler(records)
    return results


def _aliases(uri: str, version: int) -> list[str]:
    return sorted(_client(uri).get_model_version(MODEL_NAME, str(version)).aliases)


# --- registry ------------------------------------------------------------------------------------


def test_gate_promotes_only_when_not_worse(server: str, registered: list[dict]) -> None:
    first, worse, better = registered
    assert (first["version"], first["promoted"], first["champion_version"]) == (1, True, None)
    # 0.30 < 0.50 - 0.05: registered as challenger, champion stays v1
    assert (worse["version"], worse["promoted"]) == (2, False)
    assert (worse["champion_version"], worse["champion_metric"]) == (1, 0.5)
    assert (better["version"], better["promoted"], better["champion_version"]) == (3, True, 1)
    assert _aliases(server, 1) == [] and _aliases(server, 2) == [] and _aliases(server, 3) == ["challenger", "champion"]
    client = _client(server)
    # v1 went into the reporter's training run; v2 got its own run with config and training curve
    assert client.get_run(first["run_id"]).info.run_name == "train-v1"
    run2 = client.get_run(worse["run_id"])
    assert run2.data.params["train.method"] == "grpo"
    assert run2.data.metrics["eval/relaxed_accuracy"] == pytest.approx(0.3)
    assert [m.step for m in client.get_metric_history(worse["run_id"], "reward/accuracy")] == [0, 1, 2]
    artifacts = {a.path for a in client.list_artifacts(worse["run_id"], "eval")}
    assert artifacts == {"eval/metrics.json", "eval/predictions.jsonl", "eval/accuracy_per_type.png"}


def test_registered_model_is_code_with_serving_requirements(server: str, registered: list[dict]) -> None:
    """Models from code: serving.py and dyme_core travel as code, the python model is not pickled (and MLflow
    does not warn that it is), and the requirements are serving's only, without local suffixes (`+cpu`)."""
    local = Path(tracking.mlflow.artifacts.download_artifacts(
        f"models:/{MODEL_NAME}/3", tracking_uri=server))
    assert (local / "serving.py").is_file() and (local / "code" / "dyme_core" / "serving.py").is_file()
    assert not list(local.rglob("*.pkl")), list(local.rglob("*.pkl"))  # no python_model.pkl
    flavor = tracking.mlflow.models.Model.load(local / "MLmodel").flavors["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model" and "python_model" not in flavor
    assert not [m for r in registered for m in r["mlflow_log"] if "cloudpickle" in m.lower()]
    requirements = (local / "requirements.txt").read_text().split()
    names = {r.split("==")[0].lower() for r in requirements}
    assert {"torch", "transformers", "pillow", "pandas", "mlflow"} <= names
    assert not names & {"matplotlib", "peft", "httpx", "pyarrow", "datasets", "kfp", "dvc", "trl"}, names
    assert not [r for r in requirements if "+" in r], requirements


def test_promote_by_hand_and_unknown_version(server: str, registered: list[dict], tmp_path: Path) -> None:
    cfg = _config(tmp_path, server).register
    tracking.promote(cfg, 1)
    assert "champion" in _aliases(server, 1) and "champion" not in _aliases(server, 3)
    with pytest.raises(ValueError, match=r"no version 99 \(versions: \[1, 2, 3\]\)"):
        tracking.promote(cfg, 99)
    tracking.promote(cfg, 3)


def test_registered_runs_compare_paired(server: str, registered: list[dict], tmp_path: Path) -> None:
    """What `dyme register` logs is enough to pair two runs: the evaluation's digest and per-row predictions."""
    client = _client(server)
    first, _, better = registered
    assert client.get_run(first["run_id"]).data.tags[tracking.EVAL_DIGEST_TAG] == DIGEST
    assert client.get_run(better["run_id"]).data.tags[tracking.EVAL_SPLIT_TAG] == "test"
    result = tracking.compare_paired(_config(tmp_path, server).register, first["run_id"], better["run_id"])
    overall = result["rows"][0]
    assert (overall["qtype"], overall["n"], overall["diff"], overall["b_only"]) == ("all", 8, 1 / 8, 1)
    assert {a.path for a in client.list_artifacts(result["run_id"], "comparison")} == {
        "comparison/paired.json", "comparison/paired.csv", "comparison/paired.png"}


def test_compare_table(server: str, registered: list[dict], tmp_path: Path) -> None:
    table = tracking.compare(_config(tmp_path, server).register)
    names = [_client(server).get_run(r["run_id"]).info.run_name for r in registered]
    assert all(name in table for name in names)
    assert "eval/relaxed_accuracy" in table and "0.3000" in table and "0.6000" in table
    assert "grpo" in table


def test_champion_serves_completions(server: str, registered: list[dict], png: Path, tmp_path: Path) -> None:
    tracking.mlflow.set_tracking_uri(server)
    model = tracking.mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion")
    b64 = base64.b64encode(png.read_bytes()).decode()
    frame = pd.DataFrame({"image": [str(png), b64], "question": ["What is A?", "Which is largest?"]})
    out = model.predict(frame, params={"max_new_tokens": 4})
    assert list(out.columns) == ["completion", "answer"] and len(out) == 2
    assert all(isinstance(c, str) for c in out["completion"])
    # the same answers as evaluation's generate path gives the saved directory
    from dyme_core.config import ModelConfig
    from dyme_core.evaluate import generate_answers
    from dyme_core.models import load_model, load_processor

    local = Path(tracking.mlflow.artifacts.download_artifacts(f"models:/{MODEL_NAME}@champion")) / "artifacts" / "model"
    image = Image.open(png).convert("RGB")
    expected = generate_answers(load_model(ModelConfig(name_or_path=str(local))).eval(),
                                load_processor(ModelConfig(name_or_path=str(local))), [image, image],
                                list(frame["question"]), max_new_tokens=4)
    assert list(out["completion"]) == expected
    served = tracking.load_champion(_config(tmp_path, server).register)  # the library's way to the same model
    assert served.metadata.run_id == model.metadata.run_id


def _requirement_closure(requirements: list[str]) -> list[Path]:
    """Every file path (top-level packages, modules and .dist-info) of the distributions in
    `requirements` and everything they require, as installed in this interpreter."""
    import importlib.metadata as md
    import re

    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo = [Requirement(r).name for r in requirements]
    paths: set[Path] = set()
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue  # an optional dependency that is not installed here
        base = Path(dist.locate_file(""))
        for f in dist.files or []:
            top = Path(f.parts[0])
            if top.suffix == ".pth" or f.parts[0] in ("..", "__pycache__") or top.name.startswith("__editable__"):
                continue
            paths.add(base / top)
        for req in dist.requires or []:
            parsed = Requirement(req)
            if parsed.marker is None or parsed.marker.evaluate({"extra": ""}):
                todo.append(parsed.name)
    return sorted(p for p in paths if p.exists())


def test_champion_loads_where_only_its_requirements_are_installed(
    server: str, registered: list[dict], png: Path, tmp_path: Path
) -> None:
    """A fresh venv (no system or project site-packages) whose site-packages holds links to exactly the
    distributions of the model's requirements.txt and their dependencies, as installed here: no `dyme`
    distribution, no editable finder, and the working directory outside this repository. The model
    must import `dyme_core` from its own code/ folder and predict."""
    local = Path(tracking.mlflow.artifacts.download_artifacts(f"models:/{MODEL_NAME}/3", tracking_uri=server))
    requirements = [r for r in (local / "requirements.txt").read_text().split() if r and not r.startswith("-")]
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    target = venv / "lib" / version / "site-packages"
    for path in _requirement_closure(requirements):
        (target / path.name).symlink_to(path)
    assert not (target / "dyme_core").exists() and not list(target.glob("dyme-*.dist-info"))
    script = textwrap.dedent(f"""
        import importlib.metadata, importlib.util, json, os, sys
        os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
        assert importlib.util.find_spec("dyme_core") is None, "dyme_core importable before loading"
        import mlflow, mlflow.pyfunc, pandas as pd
        before = {{m.split(".")[0] for m in sys.modules}}
        model = mlflow.pyfunc.load_model({str(local)!r})
        import dyme_core
        print("DYME_CORE_FROM", os.path.dirname(dyme_core.__file__))
        out = model.predict(pd.DataFrame({{"image": [{str(png)!r}], "question": ["What is A?"]}}),
                            params={{"max_new_tokens": 4}})
        print("COLUMNS", list(out.columns), len(out))
        dists = importlib.metadata.packages_distributions()
        new = {{m.split(".")[0] for m in sys.modules}} - before - set(sys.stdlib_module_names)
        print("NEW_DISTRIBUTIONS", json.dumps(sorted({{d for m in new for d in dists.get(m, [])}})))
        print("DYME_MODULES", json.dumps(sorted(m for m in sys.modules if m.startswith("dyme_core"))))
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    done = subprocess.run([str(venv / "bin" / "python"), "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    where = done.stdout.split("DYME_CORE_FROM ")[1].split()[0]
    assert Path(where).resolve().is_relative_to(local.resolve()), where  # the model's code/, not the repo
    assert "COLUMNS ['completion', 'answer'] 1" in done.stdout
    # loading and predicting imports nothing beyond what mlflow had imported and the serving requirements
    # (with their dependencies) bring: not the data loaders (pyarrow), the LLM client (httpx), peft, matplotlib
    def key(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    serving = [r for r in requirements if not r.startswith("mlflow==")]
    allowed = {key(p.name.split("-")[0]) for p in _requirement_closure(serving) if p.name.endswith(".dist-info")}
    new = json.loads(done.stdout.split("NEW_DISTRIBUTIONS ")[1].splitlines()[0])
    assert "torch" in new and not {"pyarrow", "httpx", "peft", "matplotlib"} & {key(d) for d in new}
    assert not [d for d in new if key(d) not in allowed], new
    modules = json.loads(done.stdout.split("DYME_MODULES ")[1].splitlines()[0])
    assert not {"dyme_core.evaluate", "dyme_core.checker", "dyme_core.llm", "dyme_core.data.loaders"} & set(modules)


# --- training runs: lineage, resume, status --------------------------------------------------------


def test_reporter_logs_lineage_and_resumes_the_same_run(server: str, tmp_path: Path) -> None:
    cfg = _config(tmp_path, server, git_commit="0123456789abcdef0123456789abcdef01234567",
                  tags={"kfp.run_id": "run-7"})
    _manifest(Path(cfg.data.out_dir))
    reporter = tracking.MlflowReporter(cfg, tags={"purpose": "test"})
    for step in range(3):
        reporter.log_metrics({"loss/sft": 1.0 / (step + 1), "reward/accuracy": 0.1 * step, "note": None}, step)
    reporter.close()
    assert tracking.read_run_id(cfg.train.output_dir) == reporter.run_id
    client = _client(server)
    run = client.get_run(reporter.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == f"dyme-chartqa-{DIGEST[:7]}"  # method, data, short digest
    assert run.data.tags["mlflow.source.git.commit"] == cfg.register.git_commit
    assert (run.data.tags["kfp.run_id"], run.data.tags["purpose"]) == ("run-7", "test")
    [dataset] = run.inputs.dataset_inputs
    assert (dataset.dataset.name, dataset.dataset.digest) == ("chartqa", DIGEST[:36])
    assert {t.key: t.value for t in dataset.tags}["dyme.data.source"] == "data/chartqa"
    history = client.get_metric_history(reporter.run_id, "reward/accuracy")
    assert [(m.step, round(m.value, 3)) for m in history] == [(0, 0.0), (1, 0.1), (2, 0.2)]

    resumed = tracking.MlflowReporter(cfg, resume_run_id=tracking.read_run_id(cfg.train.output_dir))
    resumed.log_metrics({"loss/sft": 0.1}, step=3)
    resumed.close("FAILED")  # what the trainer passes when training raised
    assert resumed.run_id == reporter.run_id
    assert [m.step for m in client.get_metric_history(reporter.run_id, "loss/sft")] == [0, 1, 2, 3]
    assert client.get_run(reporter.run_id).info.status == "FAILED"


def test_a_retried_pipeline_task_continues_the_run_of_its_kfp_run(server: str, tmp_path: Path) -> None:
    # a retried KFP task is a new pod: its run dir (and mlflow_run_id) is gone, the kfp.run_id tag is not
    first = tracking.MlflowReporter(_config(tmp_path / "a", server, tags={"kfp.run_id": "kfp-42"}))
    first.log_metrics({"loss/sft": 2.0}, 0)
    first.close("FAILED")
    retry = tracking.MlflowReporter(_config(tmp_path / "b", server, tags={"kfp.run_id": "kfp-42"}))
    retry.log_metrics({"loss/sft": 1.0}, 1)
    retry.close()
    assert retry.run_id == first.run_id
    client = _client(server)
    assert [m.step for m in client.get_metric_history(first.run_id, "loss/sft")] == [0, 1]
    assert client.get_run(first.run_id).info.status == "FINISHED"
    # a finished pipeline run is never reopened: another run of the same KFP run id gets its own
    again = tracking.MlflowReporter(_config(tmp_path / "c", server, tags={"kfp.run_id": "kfp-42"}))
    again.close()
    assert again.run_id != first.run_id


def test_a_crashed_training_process_leaves_its_run_failed(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/crash.db"
    code = textwrap.dedent(f"""
        from dyme_core import tracking
        from dyme_core.config import Config
        cfg = Config()
        cfg.train.output_dir = {str(tmp_path / "train")!r}
        cfg.register.tracking_uri = {uri!r}
        reporter = tracking.MlflowReporter(cfg)
        reporter.log_metrics({{"loss/sft": 1.0}}, 0)
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    """)
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 1 and "illegal memory access" in done.stderr
    run = _client(uri).get_run(tracking.read_run_id(tmp_path / "train"))
    assert run.info.status == "FAILED"


def test_unreachable_server_fails_fast_in_one_line(tmp_path: Path) -> None:
    cfg = _config(tmp_path, f"http://127.0.0.1:{_free_port()}")
    with pytest.raises(tracking.TrackingUnreachable) as err:
        tracking.MlflowReporter(cfg)
    message = str(err.value)
    assert "\n" not in message and "is unreachable (" in message and "register.on_unreachable=buffer" in message
    assert not (Path(cfg.train.output_dir) / tracking.RUN_ID_FILE).exists()


def test_training_stops_before_step_one_when_the_server_is_unreachable(tiny_setup: dict, tmp_path: Path) -> None:
    from dyme_core.config import load_config
    from dyme_core.trainer import DymeTrainer

    cfg = load_config(None, [
        f"data.path={tiny_setup['data']}", f"model.name_or_path={tiny_setup['model']}",
        f"train.output_dir={tmp_path}", "train.refined=", "train.template_pool=", "train.max_steps=2",
        "train.batch_size=2", "train.num_generations=2", "train.max_new_tokens=8", "train.progress_bar=false",
        "train.report_to=[jsonl,mlflow]", f"register.tracking_uri=http://127.0.0.1:{_free_port()}",
        "register.connect_timeout=2",
    ])
    with pytest.raises(tracking.TrackingUnreachable, match="is unreachable"):
        DymeTrainer(cfg, tiny_setup["dataset"]).train()
    history = tmp_path / "metrics.jsonl"
    assert not history.exists() or history.read_text() == ""  # no step ran
    assert not (tmp_path / "model").exists()


def test_buffered_run_is_sent_by_sync(server: str, tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{_free_port()}"
    cfg = _config(tmp_path, dead, on_unreachable="buffer")
    _manifest(Path(cfg.data.out_dir))
    reporter = tracking.MlflowReporter(cfg)
    assert reporter.buffering and reporter.run_id is None
    for step in range(3):
        reporter.log_metrics({"reward/total": step / 2}, step)
    reporter.close()
    with pytest.raises(tracking.TrackingUnreachable):  # still away: nothing lost, one-line error
        tracking.sync(_config(tmp_path, dead), cfg.train.output_dir)
    sent = tracking.sync(_config(tmp_path, server), cfg.train.output_dir)
    assert sent["metrics"] == 3 and sent["status"] == "FINISHED"
    run = _client(server).get_run(sent["run_id"])
    assert run.info.status == "FINISHED" and run.inputs.dataset_inputs[0].dataset.digest == DIGEST[:36]
    assert [m.value for m in _client(server).get_metric_history(sent["run_id"], "reward/total")] == [0, 0.5, 1]
    assert not (Path(cfg.train.output_dir) / tracking.BUFFER_FILE).exists()
    assert tracking.read_run_id(cfg.train.output_dir) == sent["run_id"]


def test_server_killed_mid_run_then_restarted(tmp_path: Path) -> None:
    srv = Server(tmp_path).start()
    try:
        cfg = _config(tmp_path, srv.url)
        reporter = tracking.MlflowReporter(cfg)
        reporter.log_metrics({"reward/total": 0.0}, 0)
        srv.stop()  # killed mid-run: training must go on
        for step in (1, 2):
            reporter.log_metrics({"reward/total": float(step)}, step)
        reporter.close()
        assert reporter.buffering
        srv.start()  # same port and store
        sent = tracking.sync(cfg, cfg.train.output_dir)
        assert sent["run_id"] == reporter.run_id  # the same run continues
        client = _client(srv.url)
        assert [m.step for m in client.get_metric_history(reporter.run_id, "reward/total")] == [0, 1, 2]
        assert client.get_run(reporter.run_id).info.status == "FINISHED"
    finally:
        srv.stop()


def test_two_first_time_registrations_do_not_race_on_the_sqlite_schema(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/fresh.db"
    code = (f"from dyme_core import tracking; from dyme_core.config import RegisterConfig; "
            f"c = tracking._client(RegisterConfig(tracking_uri={uri!r})); "
            f"print(tracking._experiment_id(c, 'dyme'))")
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-1500:] for _, err in outs]
    assert outs[0][0].strip() == outs[1][0].strip()  # one experiment, both see it


# --- the CLI's resolution of the outside world ------------------------------------------------------


def test_tracking_uri_is_resolved_by_the_cli(tmp_path: Path) -> None:
    assert absolute_tracking_uri("sqlite:///mlruns.db", "/repo") == "sqlite:////repo/mlruns.db"
    assert absolute_tracking_uri("sqlite:////abs/m.db", "/repo") == "sqlite:////abs/m.db"
    assert absolute_tracking_uri("http://mlflow:5000", "/repo") == "http://mlflow:5000"
    assert absolute_tracking_uri("mlruns", "/repo") == "/repo/mlruns"
    cfg = Config()
    # under `dvc exp run --temp` the step runs in a copy, and DVC_ROOT names the user's repository
    resolve_tracking(cfg, {"DVC_ROOT": "/home/u/proj", "DVC_EXP_NAME": "zesty-lamb"}, cwd=str(tmp_path))
    assert cfg.register.tracking_uri == "sqlite:////home/u/proj/mlruns.db"
    assert cfg.register.run_name == "zesty-lamb"
    cfg = Config()
    resolve_tracking(cfg, {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"}, cwd=str(ROOT))
    assert cfg.register.tracking_uri == "http://127.0.0.1:5000"
    assert len(cfg.register.git_commit) == 40  # this checkout's HEAD


def test_dvc_exp_run_temp_registers_into_the_users_store(tiny_model: Path, tmp_path: Path) -> None:
    """A one-stage DVC project whose stage is `dyme register`; `dvc exp run --temp` runs it in a
    throw-away copy under .dvc/tmp/exps, and the model must land in <project>/mlruns.db."""
    project = tmp_path / "proj"
    project.mkdir()
    _train_and_eval_dirs(project, tiny_model, 0.5)
    (project / "params.yaml").write_text(textwrap.dedent("""
        train: {output_dir: train}
        evaluate: {out_dir: eval}
        register: {model_name: dyme-exp, experiment: exp, tracking_uri: "sqlite:///mlruns.db", out: register.json}
    """))
    dyme = Path(sys.executable).with_name("dyme")
    (project / "dvc.yaml").write_text(textwrap.dedent(f"""
        stages:
          register:
            cmd: {dyme} register --config params.yaml
            deps: [train, eval]
            params: [register]
            outs: [{{register.json: {{cache: false}}}}]
    """))
    (project / ".gitignore").write_text("mlruns.db*\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING", "DVC_"))}
    env.update(MLFLOW_DISABLE_TELEMETRY="true", DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")

    def run(*cmd: str) -> None:
        done = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{cmd}: {done.stdout[-1500:]}\n{done.stderr[-3000:]}"

    dvc = str(Path(sys.executable).with_name("dvc"))
    run("git", "init", "-q")
    run(dvc, "init", "-q")
    run("git", "add", "-A")
    run("git", "commit", "-qm", "init")
    run(dvc, "exp", "run", "--temp", "-n", "first-try")
    client = _client(f"sqlite:///{project}/mlruns.db")
    [version] = client.search_model_versions("name = 'dyme-exp'")
    run_ = client.get_run(version.run_id)
    assert run_.info.run_name.startswith("register-first-try-")  # DVC_EXP_NAME names the run
    assert run_.data.params["register.run_name"] == "first-try"  # DVC_EXP_NAME reached the run
    assert not list((project / ".dvc" / "tmp").rglob("mlruns.db"))


@pytest.mark.parametrize("same_run", [True, False])
def test_registration_skips_a_run_id_that_names_another_training(tmp_path: Path, same_run: bool) -> None:
    """mlflow_run_id is out of DVC's hash (.dvcignore): after `dvc checkout` of an older run dir it still
    names the newest training. Registration uses it only when that run's last figures are the run dir's
    summary.json; otherwise the evaluation would land in the run of another model."""
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = _client(uri)
    run_id = client.create_run(client.create_experiment("stale")).info.run_id
    client.log_metric(run_id, "loss/sft", 0.75, step=150)
    client.log_metric(run_id, "reward/total", 0.5, step=150)
    train = tmp_path / "train"
    train.mkdir()
    (train / tracking.RUN_ID_FILE).write_text(run_id + "\n")
    summary = {"step": 150, "loss/sft": 0.75 if same_run else 1.25, "reward/total": 0.5}
    (train / "summary.json").write_text(json.dumps(summary))
    assert tracking._training_run_id(client, train) == (run_id if same_run else None)
