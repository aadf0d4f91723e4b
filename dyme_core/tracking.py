"""MLflow adapter: run tracking, the model registry and the champion/challenger gate (DESIGN.md 5-6).

The only module of `dyme_core` that imports mlflow; everything else reaches MLflow through it, lazily.

- `MlflowReporter`: one run per training job (resumed when `MLFLOW_RUN_ID` is set); the trainer calls
  it when `train.report_to` contains "mlflow". Params are the flattened config, tags the data version.
  It writes the run id to `<train.output_dir>/mlflow_run_id` so that registration logs into the same run.
- `DymeVLM`: a pyfunc wrapper around the saved HF directory (`mlflow.transformers` cannot log
  image-text-to-text models). Input columns `image` (path, PNG/JPEG bytes or base64) and `question`;
  output columns `completion` and `answer`. Serving it needs `dyme_core` installed (the project image).
- `register_model`: logs evaluation metrics, plots and the model, registers a new version with alias
  `challenger`, then promotes it to `champion` if `challenger >= champion - register.gate_margin` on
  `register.gate_metric`. The metric is stored as the model-version tag `eval.<gate_metric>`, so the gate
  reads the registry only.
- `promote`, `compare`, `load_champion`: by-hand promotion, a side-by-side run table, serving.

Test: `pytest tests/core/test_tracking.py` (starts a real `mlflow server` on 127.0.0.1).
"""

from __future__ import annotations

import base64
import binascii
import importlib.metadata
import io
import json
import logging
import math
import os
import re
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from dyme_core.config import Config, RegisterConfig

# mlflow reads this when it is imported; otherwise it tries a DNS lookup for telemetry
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
import mlflow.pyfunc  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.models import ModelSignature  # noqa: E402
from mlflow.types.schema import AnyType, ColSpec, DataType, ParamSchema, ParamSpec, Schema  # noqa: E402

log = logging.getLogger(__name__)

MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
BATCH_PARAMS = 100  # MLflow's limit on params + tags per log_batch call
BATCH_METRICS = 1000  # ... and on metrics
CHAMPION = "champion"
CHALLENGER = "challenger"
RUN_ID_FILE = "mlflow_run_id"
EVAL_FILES = ("metrics.json", "predictions.jsonl")  # logged under eval/ with the plots
PREDICT_BATCH_SIZE = 16  # rows per generate call when serving (evaluate.batch_size's default)
# Packages the pyfunc's environment needs, pinned to the versions installed when logging.
MODEL_REQUIREMENTS = ("mlflow", "torch", "transformers", "tokenizers", "safetensors", "pillow", "pandas")
_METRIC_KEY_BAD = re.compile(r"[^\w\-. :/]")

MODEL_SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec(AnyType(), "image"), ColSpec(DataType.string, "question")]),
    outputs=Schema([ColSpec(DataType.string, "completion"), ColSpec(DataType.string, "answer")]),
    params=ParamSchema(
        [ParamSpec("max_new_tokens", DataType.long, 64), ParamSpec("style", DataType.string, "reason")]
    ),
)


def tracking_uri(cfg: RegisterConfig) -> str:
    """`MLFLOW_TRACKING_URI` if set, else `register.tracking_uri`."""
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking_uri


def _client(cfg: RegisterConfig) -> MlflowClient:
    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)  # fluent calls (log_model, models:/ URIs) use the same store
    return MlflowClient(tracking_uri=uri)


def _experiment_id(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment else client.create_experiment(name)


def data_version(dvc_file: str | Path = "data.dvc") -> dict[str, str]:
    """{"data_md5": outs[0].md5 of the .dvc file, "git_rev": HEAD}; "" for what cannot be read."""
    path = Path(dvc_file)
    md5 = ""
    try:
        md5 = str(yaml.safe_load(path.read_text())["outs"][0]["md5"])
    except (OSError, yaml.YAMLError, KeyError, IndexError, TypeError):
        pass
    rev = ""
    cwd = path.parent if path.parent.is_dir() else Path.cwd()
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        )
        if done.returncode == 0:
            rev = done.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return {"data_md5": md5, "git_rev": rev}


def flatten_config(cfg: Config) -> dict[str, str]:
    """The config as MLflow params: dotted keys, lists as JSON, values cut to MLflow's limit."""
    flat: dict[str, str] = {}

    def walk(node: dict[str, Any], prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict) and value:
                walk(value, f"{prefix}{key}.")
            else:
                text = value if isinstance(value, str) else json.dumps(value)
                flat[f"{prefix}{key}"] = text[:MAX_PARAM_CHARS]

    walk(cfg.to_dict(), "")
    return flat


def _metric_entities(metrics: dict[str, Any], step: int) -> list[Metric]:
    """Numeric values only (None, strings and NaN are skipped); keys limited to MLflow's characters."""
    now = int(time.time() * 1000)
    out = []
    for key, value in metrics.items():
        if isinstance(value, bool):
            value = float(value)
        if not isinstance(value, int | float) or math.isnan(value):
            continue
        out.append(Metric(_METRIC_KEY_BAD.sub("_", key), float(value), now, int(step)))
    return out


def _log_batches(
    client: MlflowClient, run_id: str, metrics: list[Metric] = (), params: list[Param] = (),
    tags: list[RunTag] = (),
) -> None:
    for i in range(0, len(metrics), BATCH_METRICS):
        client.log_batch(run_id, metrics=metrics[i : i + BATCH_METRICS])
    for i in range(0, len(params), BATCH_PARAMS):
        client.log_batch(run_id, params=params[i : i + BATCH_PARAMS])
    for i in range(0, len(tags), BATCH_PARAMS):
        client.log_batch(run_id, tags=tags[i : i + BATCH_PARAMS])


def _log_config(client: MlflowClient, run_id: str, cfg: Config) -> None:
    """Log config params the run does not have yet (params are immutable; a resumed run keeps its own)."""
    existing = client.get_run(run_id).data.params
    flat = flatten_config(cfg)
    params = [Param(k, v) for k, v in flat.items() if k not in existing]
    changed = [k for k, v in flat.items() if k in existing and existing[k] != v]
    if changed:
        log.warning("run %s keeps its logged values of %s", run_id, ", ".join(changed))
    _log_batches(client, run_id, params=params)


class MlflowReporter:
    """Per-step metric sink for the trainer: one MLflow run, resumed if `MLFLOW_RUN_ID` is set."""

    def __init__(self, cfg: Config, run_name: str | None = None, tags: dict[str, str] | None = None) -> None:
        self._client = _client(cfg.register)
        all_tags = {**data_version(), **(tags or {})}
        resume = os.environ.get("MLFLOW_RUN_ID")
        if resume:
            self._run_id = self._client.get_run(resume).info.run_id
            self._client.update_run(self._run_id, status="RUNNING")
        else:
            experiment_id = _experiment_id(self._client, cfg.register.experiment)
            name = run_name or f"train-{cfg.train.method}-s{cfg.train.seed}"
            self._run_id = self._client.create_run(experiment_id, run_name=name).info.run_id
        _log_batches(self._client, self._run_id, tags=[RunTag(k, str(v)) for k, v in all_tags.items()])
        _log_config(self._client, self._run_id, cfg)
        out = Path(cfg.train.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / RUN_ID_FILE).write_text(self._run_id + "\n")
        log.info("mlflow run %s at %s", self._run_id, tracking_uri(cfg.register))

    @property
    def run_id(self) -> str:
        return self._run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        _log_batches(self._client, self._run_id, metrics=_metric_entities(metrics, step))

    def log_artifacts(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file or a directory's contents."""
        path = Path(path)
        if path.is_dir():
            self._client.log_artifacts(self._run_id, str(path), artifact_path)
        else:
            self._client.log_artifact(self._run_id, str(path), artifact_path)

    def close(self, status: str = "FINISHED") -> None:
        self._client.set_terminated(self._run_id, status=status)


def _open_image(value: Any) -> Any:
    """A PIL RGB image from a file path, raw image bytes or a base64 string."""
    from PIL import Image

    if isinstance(value, bytes | bytearray):
        data = bytes(value)
    elif isinstance(value, str) and len(value) < 4096 and Path(value).is_file():
        data = Path(value).read_bytes()
    elif isinstance(value, str):
        try:
            data = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"image is neither an existing file nor base64: {value[:80]!r}") from None
    else:
        raise ValueError(f"image must be a path, bytes or a base64 string, got {type(value).__name__}")
    return Image.open(io.BytesIO(data)).convert("RGB")


class DymeVLM(mlflow.pyfunc.PythonModel):
    """Pyfunc over a saved HF image-text-to-text directory (artifact `model_dir`): greedy answers."""

    def load_context(self, context: Any) -> None:
        import torch

        from dyme_core.config import ModelConfig
        from dyme_core.models import load_model, load_processor

        cfg = ModelConfig(name_or_path=context.artifacts["model_dir"])
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.processor = load_processor(cfg)
        self.model = load_model(cfg, device).eval()

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        from dyme_core.evaluate import generate_answers
        from dyme_core.rewards import parse_completion

        params = params or {}
        images = [_open_image(v) for v in model_input["image"]]
        questions = [str(q) for q in model_input["question"]]
        completions: list[str] = []
        for lo in range(0, len(questions), PREDICT_BATCH_SIZE):
            completions += generate_answers(
                self.model,
                self.processor,
                images[lo : lo + PREDICT_BATCH_SIZE],
                questions[lo : lo + PREDICT_BATCH_SIZE],
                max_new_tokens=int(params.get("max_new_tokens", 64)),
                style=str(params.get("style", "reason")),
            )
        answers = [parse_completion(c).answer for c in completions]
        return pd.DataFrame({"completion": completions, "answer": answers})


def _model_requirements() -> list[str]:
    return [f"{name}=={importlib.metadata.version(name)}" for name in MODEL_REQUIREMENTS]


def _log_pyfunc(model_name: str, model_dir: Path) -> Any:
    """Log the HF directory inside a DymeVLM pyfunc and register it as a new version of `model_name`."""
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=DymeVLM(),
        artifacts={"model_dir": str(model_dir)},
        pip_requirements=_model_requirements(),
        code_paths=None,
        signature=MODEL_SIGNATURE,
        registered_model_name=model_name,
    )


def _training_metrics(path: Path) -> list[Metric]:
    """Per-step metrics of the trainer's metrics.jsonl (one {"step": ..., key: value} object a line)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            out += _metric_entities({k: v for k, v in row.items() if k != "step"}, row["step"])
    return out


def _gate_tag(cfg: RegisterConfig) -> str:
    return f"eval.{cfg.gate_metric}"


def _training_run_id(client: MlflowClient, train_dir: Path) -> str | None:
    """The run the trainer's reporter wrote to `<train_dir>/mlflow_run_id`, if this server has it."""
    path = train_dir / RUN_ID_FILE
    if not path.is_file():
        return None
    run_id = path.read_text().strip()
    try:
        return client.get_run(run_id).info.run_id
    except MlflowException:
        log.warning("training run %s (from %s) is not on this tracking server; using a new run", run_id, path)
        return None


def register_model(cfg: Config, train_dir: str | Path, eval_dir: str | Path) -> dict[str, Any]:
    """Log evaluation + model into the training run (or a new one), register it, run the gate.

    Returns {"run_id", "model_name", "version", "promoted", "challenger_metric", "champion_metric",
    "champion_version"}; champion_* describe the champion before the gate (None if there was none).
    """
    reg = cfg.register
    train_dir, eval_dir = Path(train_dir), Path(eval_dir)
    model_dir = train_dir / "model"
    if not model_dir.is_dir():
        raise FileNotFoundError(f"no saved model at {model_dir}")
    eval_metrics = json.loads((eval_dir / "metrics.json").read_text())
    if reg.gate_metric not in eval_metrics:
        raise ValueError(f"register.gate_metric {reg.gate_metric!r} is not in {eval_dir / 'metrics.json'}")
    challenger_metric = float(eval_metrics[reg.gate_metric])

    client = _client(reg)
    run_id = _training_run_id(client, train_dir)
    new_run = run_id is None
    if run_id is None:
        experiment_id = _experiment_id(client, reg.experiment)
        name = f"register-{cfg.train.method}-s{cfg.train.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
        run_id = client.create_run(experiment_id, run_name=name, tags=data_version()).info.run_id

    with mlflow.start_run(run_id=run_id):
        if new_run:
            _log_config(client, run_id, cfg)
            _log_batches(client, run_id, metrics=_training_metrics(train_dir / "metrics.jsonl"))
        eval_entities = _metric_entities({f"eval/{k}": v for k, v in eval_metrics.items()}, 0)
        _log_batches(client, run_id, metrics=eval_entities)
        for path in [*sorted(eval_dir.glob("*.png")), *(eval_dir / n for n in EVAL_FILES)]:
            if path.is_file():
                client.log_artifact(run_id, str(path), "eval")
        with warnings.catch_warnings():  # no input example on purpose: it would load the model
            warnings.filterwarnings("ignore", message=".*input example was not provided")
            info = _log_pyfunc(reg.model_name, model_dir)
    version = str(info.registered_model_version)
    client.set_model_version_tag(reg.model_name, version, _gate_tag(reg), str(challenger_metric))
    client.set_registered_model_alias(reg.model_name, CHALLENGER, version)

    champion_version, champion_metric = None, None
    try:
        champion = client.get_model_version_by_alias(reg.model_name, CHAMPION)
        champion_version = str(champion.version)
        if _gate_tag(reg) in champion.tags:
            champion_metric = float(champion.tags[_gate_tag(reg)])
    except MlflowException:
        pass  # no champion yet
    if champion_version is None:
        promoted = True
    elif champion_metric is None:
        # a champion set by hand without the metric tag: keep it, a person decides
        log.warning("champion v%s has no %s tag; v%s not promoted", champion_version, _gate_tag(reg), version)
        promoted = False
    else:
        promoted = challenger_metric >= champion_metric - reg.gate_margin
    if promoted:
        client.set_registered_model_alias(reg.model_name, CHAMPION, version)
    log.info(
        "%s v%s: %s=%.4f vs champion %s (%s) -> %s", reg.model_name, version, reg.gate_metric,
        challenger_metric, champion_version, champion_metric, "promoted" if promoted else "kept champion",
    )
    return {
        "run_id": run_id,
        "model_name": reg.model_name,
        "version": int(version),
        "promoted": promoted,
        "challenger_metric": challenger_metric,
        "champion_metric": champion_metric,
        "champion_version": None if champion_version is None else int(champion_version),
    }


def promote(cfg: RegisterConfig, version: int | str, alias: str = CHAMPION) -> None:
    """Point `alias` at an existing version of `register.model_name`."""
    client = _client(cfg)
    try:
        client.get_model_version(cfg.model_name, str(version))
    except MlflowException:
        known = sorted(int(v.version) for v in client.search_model_versions(f"name = '{cfg.model_name}'"))
        raise ValueError(
            f"model {cfg.model_name!r} has no version {version} (versions: {known or 'none'})"
        ) from None
    client.set_registered_model_alias(cfg.model_name, alias, str(version))


def _cell(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def compare(
    cfg: RegisterConfig,
    run_ids: list[str] | None = None,
    metrics: list[str] | None = None,
    max_runs: int = 10,
) -> str:
    """Side-by-side text table, one column per run (the latest `max_runs` of the experiment by default).

    Rows: run name, method, seed, then `metrics` (default: every `eval/` metric found, then the final
    training `reward/accuracy`).
    """
    client = _client(cfg)
    if run_ids is None:
        experiment = client.get_experiment_by_name(cfg.experiment)
        if experiment is None:
            return f"no experiment {cfg.experiment!r} at {tracking_uri(cfg)}"
        runs = list(client.search_runs(
            [experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=max_runs))
    else:
        runs = [client.get_run(r) for r in run_ids]
    if not runs:
        return f"no runs in experiment {cfg.experiment!r}"
    if metrics is None:
        evals = sorted({k for run in runs for k in run.data.metrics if k.startswith("eval/")})
        metrics = [*evals, "reward/accuracy"]
    rows = [
        ["run", *[run.info.run_name for run in runs]],
        ["run_id", *[run.info.run_id[:8] for run in runs]],
        ["method", *[run.data.params.get("train.method") for run in runs]],
        ["seed", *[run.data.params.get("train.seed") for run in runs]],
        *[[m, *[run.data.metrics.get(m) for run in runs]] for m in metrics],
    ]
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def load_champion(cfg: RegisterConfig) -> mlflow.pyfunc.PyFuncModel:
    """The pyfunc at `models:/<register.model_name>@champion`."""
    _client(cfg)
    return mlflow.pyfunc.load_model(f"models:/{cfg.model_name}@{CHAMPION}")
