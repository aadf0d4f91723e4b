"""MLflow adapter: run tracking, lineage, the model registry and the champion/challenger gate (DESIGN.md 5-6).

The only module of `dyme_core` that imports mlflow (besides serving.py, the registered model itself, which
it logs by path); everything else reaches MLflow through it, lazily.
It reads no environment: the CLI (or a KFP component's runtime) resolves the tracking URI, the run name
and the outside tags and passes them down in `cfg.register`.

- `MlflowReporter`: one run per training job. A resumed job passes the run id it wrote to
  `<train.output_dir>/mlflow_run_id` (`read_run_id`) and continues that run; a retried KFP task, whose
  new pod lost that file, continues the unfinished run tagged with its `kfp.run_id`. A process that
  ends without `close(status)` leaves its run FAILED (atexit), never RUNNING. Lineage: the dataset trained on
  (`mlflow.log_input`: name, digest and source from `<data.out_dir>/manifest.json`), the git commit
  (`mlflow.source.git.commit`), `register.tags` (DVC experiment name, KFP run id), the flattened config.
  Before training starts the server is checked with a bounded timeout: unreachable -> one-line
  `TrackingUnreachable`, or with `register.on_unreachable: buffer` the metrics go to
  `<train.output_dir>/mlflow_buffer.jsonl`, as they do when the server goes away mid-run; `sync` sends
  them later (`dyme sync`, and `dyme register` first of all).
- The model: MLflow "models from code", dyme_core/serving.py (the `DymeVLM` pyfunc over the saved HF
  directory) logged by path, the HF directory as its artifact and `dyme_core` as `code_paths`; nothing is
  pickled, and the requirements are serving's only (`SERVING_REQUIREMENTS`, pinned without local version
  suffixes), so it loads where only they are installed.
- `register_model`: logs evaluation metrics, plots, per-row predictions, the evaluation's dataset digest
  (tag `dyme.eval.data_digest`) and the model, registers a new version with alias `challenger`, then
  promotes it to `champion` if `challenger >= champion - register.gate_margin` on `register.gate_metric`.
  The metric is stored as the model-version tag `eval.<gate_metric>`, so the gate reads the registry only.
- `promote`, `compare`, `load_champion`: by-hand promotion, a side-by-side run table, serving.
- `compare_paired` (`dyme compare --paired A B`): B - A in accuracy on the rows both runs were evaluated on,
  with paired-bootstrap intervals (dyme_core/stats.py), overall and per question type; logged as a new run
  tagged `dyme.comparison`.

Test: `pytest tests/core/test_tracking.py` (starts a real `mlflow server` on 127.0.0.1).
"""

from __future__ import annotations

import atexit
import importlib.metadata
import json
import logging
import math
import re
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import pandas as pd
import requests
from filelock import FileLock
from mlflow import MlflowClient
from mlflow.data.meta_dataset import MetaDataset
from mlflow.data.sources import LocalArtifactDatasetSource
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types.schema import AnyType, ColSpec, DataType, ParamSchema, ParamSpec, Schema

from dyme_core import stats
from dyme_core.config import Config, EvaluateConfig, RegisterConfig

log = logging.getLogger(__name__)

MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
BATCH_PARAMS = 100  # MLflow's limit on params + tags per log_batch call
BATCH_METRICS = 1000  # ... and on metrics
CHAMPION = "champion"
CHALLENGER = "challenger"
RUN_ID_FILE = "mlflow_run_id"
BUFFER_FILE = "mlflow_buffer.jsonl"  # metrics (and the final status) not yet sent to the server
MANIFEST_FILE = "manifest.json"  # written by the ingest step into data.out_dir
GIT_COMMIT_TAG = "mlflow.source.git.commit"
KFP_RUN_TAG = "kfp.run_id"  # set by the pipeline's train and register components
EVAL_FILES = ("metrics.json", "predictions.jsonl")  # logged under eval/ with the plots
PREDICTIONS_ARTIFACT = "eval/predictions.jsonl"  # per row: id, qtype, correct (what `compare_paired` pairs)
EVAL_DIGEST_TAG = "dyme.eval.data_digest"  # the digest of the dataset the registered evaluation read
EVAL_SPLIT_TAG = "dyme.eval.split"
COMPARISON_TAG = "dyme.comparison"  # "true" on the runs `compare_paired` creates
PAIRED_RESAMPLES = 10_000
PAIRED_SEED = 0
SERVING_MODEL = Path(__file__).resolve().with_name("serving.py")  # the registered model's code (models from code)
# What loading and predicting with serving.py imports (a test checks it imports nothing else), by distribution
SERVING_REQUIREMENTS = ("mlflow", "torch", "transformers", "tokenizers", "safetensors", "pillow", "pandas", "numpy",
                        "pyyaml")
_METRIC_KEY_BAD = re.compile(r"[^\w\-. :/]")
_REMOTE = ("http://", "https://")

MODEL_SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec(AnyType(), "image"), ColSpec(DataType.string, "question")]),
    outputs=Schema([ColSpec(DataType.string, "completion"), ColSpec(DataType.string, "answer")]),
    params=ParamSchema(
        [ParamSpec("max_new_tokens", DataType.long, EvaluateConfig.max_new_tokens),
         ParamSpec("style", DataType.string, "reason")]
    ),
)


class TrackingUnreachable(RuntimeError):
    """The tracking server did not answer within `register.connect_timeout`."""


def check_reachable(cfg: RegisterConfig) -> None:
    """Raise TrackingUnreachable (one line) unless a tracking server answers /health in time.

    Local stores (SQLite, files) are always reachable. The server's own retries are not used here: the
    point is to fail (or start buffering) within `connect_timeout`, before training starts.
    """
    uri = cfg.tracking_uri
    if not uri.startswith(_REMOTE):
        return
    try:
        response = requests.get(f"{uri.rstrip('/')}/health", timeout=cfg.connect_timeout)
        response.raise_for_status()
    except requests.Timeout:
        reason = f"no answer within {cfg.connect_timeout:g} s"
    except requests.RequestException as e:
        errno = re.search(r"\[Errno -?\d+\] [^'\")]+", str(e))
        reason = errno.group(0) if errno else type(e).__name__
    else:
        return
    raise TrackingUnreachable(
        f"MLflow tracking server {uri} is unreachable ({reason}); start it, fix register.tracking_uri, "
        "or set register.on_unreachable=buffer to log later with `dyme sync`")


def _client(cfg: RegisterConfig) -> MlflowClient:
    uri = cfg.tracking_uri
    mlflow.set_tracking_uri(uri)  # fluent calls (log_model, models:/ URIs) use the same store
    if not uri.startswith("sqlite:///"):
        return MlflowClient(tracking_uri=uri)
    # Opening a new SQLite store creates its schema; two processes doing it at once race ("duplicate
    # column name", "table ... already exists"). A file lock beside the database lets one create it
    # while the other waits; both stores (tracking, registry) are opened inside it.
    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(db) + ".lock", timeout=300):
        client = MlflowClient(tracking_uri=uri)
        client.search_registered_models(max_results=1)
    return client


def _experiment_id(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment:
        return experiment.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:  # created by a concurrent process in between
        return client.get_experiment_by_name(name).experiment_id


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    """The ingest manifest of a materialised dataset ({} when there is none)."""
    path = Path(data_dir) / MANIFEST_FILE
    if not path.is_file():
        return {}
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a readable JSON manifest: {e}") from None
    return manifest if isinstance(manifest, dict) else {}


def dataset_name(manifest: dict[str, Any], data_dir: str | Path) -> str:
    """A short name for the dataset: the last part of its source (a hub id's name, a folder's name)."""
    source = str(manifest.get("source") or data_dir).rstrip("/")
    return re.split(r"[/\\:]", source)[-1] or "dataset"


def default_run_name(cfg: Config) -> str:
    """`register.run_name`, else `<method>-<dataset>-<digest[:7]>`, so runs on other data read apart."""
    if cfg.register.run_name:
        return cfg.register.run_name
    manifest = read_manifest(cfg.data.out_dir)
    digest = str(manifest.get("digest", ""))[:7]
    return "-".join(p for p in (cfg.train.method, dataset_name(manifest, cfg.data.out_dir), digest) if p)


def dataset_input(data_dir: str | Path, context: str = "train") -> DatasetInput | None:
    """The materialised dataset as an MLflow dataset input (name, digest, source), None without manifest."""
    manifest = read_manifest(data_dir)
    if not manifest:
        return None
    source = str(manifest.get("source", data_dir))
    dataset = MetaDataset(LocalArtifactDatasetSource(str(Path(data_dir).resolve())),
                          name=dataset_name(manifest, data_dir), digest=str(manifest.get("digest", ""))[:36] or None)
    entity = dataset._to_mlflow_entity()
    tags = [InputTag("mlflow.data.context", context), InputTag("dyme.data.source", source)]
    return DatasetInput(entity, tags=tags)


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


def _metric_entities(metrics: dict[str, Any], step: int, timestamp_ms: int | None = None) -> list[Metric]:
    """Numeric values only (None, strings and NaN are skipped); keys limited to MLflow's characters."""
    now = timestamp_ms or int(time.time() * 1000)
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


def _run_tags(cfg: Config) -> dict[str, str]:
    tags = {k: str(v) for k, v in cfg.register.tags.items() if v not in (None, "")}
    if cfg.register.git_commit:
        tags[GIT_COMMIT_TAG] = cfg.register.git_commit
    return tags


def _unfinished_pipeline_run(client: MlflowClient, experiment_id: str, cfg: Config) -> str | None:
    """The newest unfinished run tagged with this pipeline run's id (`register.tags["kfp.run_id"]`):
    what a retried train task continues, since its new pod has lost the failed attempt's run dir."""
    pipeline_run = cfg.register.tags.get(KFP_RUN_TAG)
    if not pipeline_run:
        return None
    found = client.search_runs([experiment_id], filter_string=f"tags.`{KFP_RUN_TAG}` = '{pipeline_run}'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    return found[0].info.run_id if found and found[0].info.status != "FINISHED" else None


def _open_run(client: MlflowClient, cfg: Config, run_name: str, resume_run_id: str | None,
              extra_tags: dict[str, str], continue_pipeline_run: bool = False) -> str:
    """Resume `resume_run_id` (when this server has it), or with `continue_pipeline_run` the unfinished
    run of the same KFP run, or create a run; log tags, config and dataset."""
    run_id = None
    if resume_run_id:
        try:
            run_id = client.get_run(resume_run_id).info.run_id
        except MlflowException:
            log.warning("run %s is not on %s; starting a new run", resume_run_id, cfg.register.tracking_uri)
    experiment_id = _experiment_id(client, cfg.register.experiment)
    if run_id is None and continue_pipeline_run:
        run_id = _unfinished_pipeline_run(client, experiment_id, cfg)
    if run_id is None:
        run_id = client.create_run(experiment_id, run_name=run_name).info.run_id
    else:
        client.update_run(run_id, status="RUNNING")
    tags = {**_run_tags(cfg), **extra_tags}
    _log_batches(client, run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    _log_config(client, run_id, cfg)
    dataset = dataset_input(cfg.data.out_dir)
    if dataset is not None:
        client.log_inputs(run_id, datasets=[dataset])
    return run_id


def read_run_id(run_dir: str | Path) -> str | None:
    """The MLflow run id a training run wrote to `<run_dir>/mlflow_run_id` (None if none)."""
    path = Path(run_dir) / RUN_ID_FILE
    text = path.read_text().strip() if path.is_file() else ""
    return text or None


class MlflowReporter:
    """Per-step metric sink for the trainer: one MLflow run, continued when `resume_run_id` is given.

    `MlflowReporter(cfg, run_name=None, resume_run_id=None, tags=None)`; `log_metrics(metrics, step)`;
    `close(status)` with FINISHED, FAILED or KILLED. Tracking never costs the run: when the server
    cannot be reached (at the start with `register.on_unreachable: buffer`, or at any point later) the
    metrics and the final status go to `<train.output_dir>/mlflow_buffer.jsonl`, with a warning, and
    `sync` sends them once the server is back.
    """

    def __init__(self, cfg: Config, run_name: str | None = None, resume_run_id: str | None = None,
                 tags: dict[str, str] | None = None) -> None:
        self._cfg = cfg
        self._out = Path(cfg.train.output_dir)
        self._out.mkdir(parents=True, exist_ok=True)
        self._buffer = self._out / BUFFER_FILE
        self._run_name = run_name or default_run_name(cfg)
        self._tags = dict(tags or {})
        self._client: MlflowClient | None = None
        self._run_id: str | None = resume_run_id
        if self._buffer.is_file():  # an earlier attempt could not reach the server: keep buffering in order
            log.warning("%s holds unsent metrics; buffering until `dyme sync`", self._buffer)
            self._write_buffer({"run_name": self._run_name, "resume_run_id": resume_run_id, "tags": self._tags})
            atexit.register(self._end_unclosed)
            return
        try:
            check_reachable(cfg.register)
            self._client = _client(cfg.register)
            self._run_id = _open_run(self._client, cfg, self._run_name, resume_run_id, self._tags,
                                     continue_pipeline_run=True)
        except (TrackingUnreachable, MlflowException, requests.RequestException) as e:
            if cfg.register.on_unreachable != "buffer":
                raise TrackingUnreachable(str(e).splitlines()[0]) from None
            self._start_buffering(e)
            atexit.register(self._end_unclosed)
            return
        (self._out / RUN_ID_FILE).write_text(self._run_id + "\n")
        # a process that ends without close() (an exception, sys.exit in between) leaves the run FAILED,
        # not RUNNING for ever; the trainer's own close(status) comes first when it gets the chance
        atexit.register(self._end_unclosed)
        log.info("mlflow run %s (%s) at %s", self._run_id, self._run_name, cfg.register.tracking_uri)

    @property
    def run_id(self) -> str | None:
        """The MLflow run id; None while buffering a run the server has not seen yet."""
        return self._run_id

    @property
    def buffering(self) -> bool:
        return self._client is None

    def _write_buffer(self, row: dict[str, Any]) -> None:
        with self._buffer.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def _start_buffering(self, error: Exception) -> None:
        log.warning("MLflow unreachable (%s): metrics go to %s; send them with `dyme sync`",
                    str(error).splitlines()[0][:200], self._buffer)
        self._client = None
        self._write_buffer({"run_name": self._run_name, "resume_run_id": self._run_id, "tags": self._tags})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self._client is not None:
            try:
                _log_batches(self._client, self._run_id, metrics=_metric_entities(metrics, step))
                return
            except (MlflowException, requests.RequestException) as e:
                self._start_buffering(e)
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        self._write_buffer({"step": int(step), "time": int(time.time() * 1000), "metrics": clean})

    def log_artifacts(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file or a directory's contents (skipped, with a warning, while buffering)."""
        if self._client is None:
            log.warning("MLflow unreachable: artifact %s not uploaded", path)
            return
        path = Path(path)
        if path.is_dir():
            self._client.log_artifacts(self._run_id, str(path), artifact_path)
        else:
            self._client.log_artifact(self._run_id, str(path), artifact_path)

    def _end_unclosed(self) -> None:
        log.warning("training ended without closing MLflow run %s: marking it FAILED", self._run_id or "(buffered)")
        self.close("FAILED")

    def close(self, status: str = "FINISHED") -> None:
        """End the run with FINISHED, FAILED or KILLED (buffered when the server is away)."""
        atexit.unregister(self._end_unclosed)
        if self._client is not None:
            try:
                self._client.set_terminated(self._run_id, status=status)
                return
            except (MlflowException, requests.RequestException) as e:
                self._start_buffering(e)
        self._write_buffer({"status": status})


def sync(cfg: Config, run_dir: str | Path) -> dict[str, Any]:
    """Send what a reporter buffered in `<run_dir>/mlflow_buffer.jsonl` to the tracking server.

    Continues the run named in the buffer or in `<run_dir>/mlflow_run_id` when the server has it,
    else creates one (tags, config, dataset); logs the metrics with their steps and times; sets the
    final status; then removes the buffer. Returns {"run_id", "metrics", "status"} ({} if nothing to send).
    """
    run_dir = Path(run_dir)
    buffer = run_dir / BUFFER_FILE
    if not buffer.is_file():
        return {}
    check_reachable(cfg.register)
    rows = [json.loads(line) for line in buffer.read_text().splitlines() if line.strip()]
    header = next((r for r in rows if "run_name" in r), {})
    client = _client(cfg.register)
    resume = header.get("resume_run_id") or read_run_id(run_dir)
    run_id = _open_run(client, cfg, header.get("run_name") or default_run_name(cfg), resume, header.get("tags", {}),
                       continue_pipeline_run=True)
    metrics = [m for r in rows if "metrics" in r for m in _metric_entities(r["metrics"], r["step"], r["time"])]
    _log_batches(client, run_id, metrics=metrics)
    status = next((r["status"] for r in reversed(rows) if "status" in r), None)
    if status:
        client.set_terminated(run_id, status=status)
    (run_dir / RUN_ID_FILE).write_text(run_id + "\n")
    buffer.unlink()
    log.info("sent %d buffered metric values to run %s", len(metrics), run_id)
    return {"run_id": run_id, "metrics": len(metrics), "status": status}


def _model_requirements() -> list[str]:
    """`name==version` of each distribution serving needs (`SERVING_REQUIREMENTS`), without local suffixes
    (`+cpu`): an index serves `torch==2.13.0`, not the local build's `2.13.0+cpu`."""
    return sorted(f"{importlib.metadata.metadata(d)['Name']}=={importlib.metadata.version(d).split('+')[0]}"
                  for d in SERVING_REQUIREMENTS)


def _log_pyfunc(model_name: str, model_dir: Path) -> Any:
    """Log the HF directory as a models-from-code pyfunc (dyme_core/serving.py) and register it as a new
    version of `model_name`.

    `dyme_core` travels with the model (`code_paths`): loading puts it on sys.path, so the model needs its
    serving requirements only, not this repository, nor the project's own dependencies (a wheel of the project
    would bring kfp, dvc and the training stack along).
    """
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=str(SERVING_MODEL),
        artifacts={"model_dir": str(model_dir)},
        pip_requirements=_model_requirements(),
        code_paths=[str(SERVING_MODEL.parent)],
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
    """The run the trainer's reporter wrote to `<train_dir>/mlflow_run_id`, if this server has it and its
    last logged figures are those of `<train_dir>/summary.json`. (The id file is left out of DVC's hash by
    .dvcignore, so after `dvc checkout` or `dvc exp apply` of another training it can name a different run.)"""
    run_id = read_run_id(train_dir)
    if run_id is None:
        return None
    try:
        run = client.get_run(run_id)
    except MlflowException:
        log.warning("training run %s (from %s) is not on this tracking server; using a new run", run_id, train_dir)
        return None
    summary = train_dir / "summary.json"
    final = json.loads(summary.read_text()) if summary.is_file() else {}
    logged = run.data.metrics
    if any(k in logged and isinstance(v, float) and math.isfinite(v) and not math.isclose(logged[k], v)
           for k, v in final.items()):
        log.warning("%s names run %s, which trained another model (a checkout of an older run?); using a new run",
                    train_dir / RUN_ID_FILE, run_id)
        return None
    return run.info.run_id


def register_model(cfg: Config, train_dir: str | Path, eval_dir: str | Path) -> dict[str, Any]:
    """Send buffered training metrics, log evaluation + model into the training run (or a new one),
    register it, run the gate.

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

    check_reachable(reg)
    sync(cfg, train_dir)  # a training run that could not reach the server catches up first
    client = _client(reg)
    run_id = _training_run_id(client, train_dir)
    new_run = run_id is None
    if run_id is None:
        name = f"register-{default_run_name(cfg)}-{time.strftime('%Y%m%d-%H%M%S')}"
        run_id = _open_run(client, cfg, name, None, {})

    with mlflow.start_run(run_id=run_id):
        if new_run:
            _log_batches(client, run_id, metrics=_training_metrics(train_dir / "metrics.jsonl"))
        eval_entities = _metric_entities({f"eval/{k}": v for k, v in eval_metrics.items()}, 0)
        digest = str(read_manifest(cfg.data.out_dir).get("digest", ""))
        eval_tags = {EVAL_SPLIT_TAG: cfg.evaluate.split, **({EVAL_DIGEST_TAG: digest} if digest else {})}
        _log_batches(client, run_id, metrics=eval_entities, tags=[RunTag(k, v) for k, v in eval_tags.items()])
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
    check_reachable(cfg)
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

    Rows: run name, method, seed, dataset digest, then `metrics` (default: every `eval/` metric found,
    then the final training `reward/accuracy`). The runs `compare_paired` logs are left out of the default.
    """
    check_reachable(cfg)
    client = _client(cfg)
    if run_ids is None:
        experiment = client.get_experiment_by_name(cfg.experiment)
        if experiment is None:
            return f"no experiment {cfg.experiment!r} at {cfg.tracking_uri}"
        found = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])
        runs = [run for run in found if run.data.tags.get(COMPARISON_TAG) != "true"][:max_runs]
    else:
        runs = [client.get_run(r) for r in run_ids]
    if not runs:
        return f"no runs in experiment {cfg.experiment!r}"
    if metrics is None:
        evals = sorted({k for run in runs for k in run.data.metrics if k.startswith("eval/")})
        metrics = [*evals, "reward/accuracy"]

    def data_digest(run: Any) -> str | None:
        inputs = run.inputs.dataset_inputs if run.inputs else []
        return inputs[0].dataset.digest[:8] if inputs else None

    rows = [
        ["run", *[run.info.run_name for run in runs]],
        ["run_id", *[run.info.run_id[:8] for run in runs]],
        ["method", *[run.data.params.get("train.method") for run in runs]],
        ["seed", *[run.data.params.get("train.seed") for run in runs]],
        ["data", *[data_digest(run) for run in runs]],
        *[[m, *[run.data.metrics.get(m) for run in runs]] for m in metrics],
    ]
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


class ComparisonRefused(ValueError):
    """Two runs that cannot be compared row by row (one line: which run, and why)."""


def _find_run(client: MlflowClient, experiment: str, ref: str) -> Any:
    """The run whose id is `ref`, else the one run named `ref` in `experiment` (comparison runs left out)."""
    try:
        return client.get_run(ref)
    except MlflowException:
        pass
    found = []
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        quote = "'" if "'" not in ref else '"'
        found = [run for run in client.search_runs([exp.experiment_id], f"attributes.run_name = {quote}{ref}{quote}")
                 if run.data.tags.get(COMPARISON_TAG) != "true"]
    if not found:
        raise ComparisonRefused(f"no run with id or name {ref!r} in experiment {experiment!r}")
    if len(found) > 1:
        ids = ", ".join(run.info.run_id for run in found[:5])
        raise ComparisonRefused(f"run name {ref!r} names {len(found)} runs in experiment {experiment!r} ({ids}); "
                                "pass a run id")
    return found[0]


def _label(run: Any) -> str:
    return f"{run.info.run_name} ({run.info.run_id[:8]})"


def _eval_digest(run: Any) -> str | None:
    """The digest of the dataset the run's evaluation read: the tag `register_model` sets, else the run's
    dataset input (the same materialised dataset: every step reads data.out_dir), cut to MLflow's 36 chars."""
    digest = run.data.tags.get(EVAL_DIGEST_TAG)
    if not digest and run.inputs and run.inputs.dataset_inputs:
        digest = run.inputs.dataset_inputs[0].dataset.digest
    return digest[:36] if digest else None


def _predictions(client: MlflowClient, run: Any, tmp: Path) -> dict[str, tuple[float, str]]:
    """id -> (correct, qtype) from the run's eval/predictions.jsonl."""
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    if PREDICTIONS_ARTIFACT not in logged:
        raise ComparisonRefused(f"run {_label(run)} has no {PREDICTIONS_ARTIFACT} (register it with `dyme register` "
                                "after `dyme evaluate`)")
    (tmp / run.info.run_id).mkdir()
    path = Path(client.download_artifacts(run.info.run_id, PREDICTIONS_ARTIFACT, str(tmp / run.info.run_id)))
    rows: dict[str, tuple[float, str]] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            key, correct, qtype = str(row["id"]), float(row["correct"]), str(row.get("qtype") or "all")
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ComparisonRefused(f"run {_label(run)}: {PREDICTIONS_ARTIFACT} line {number} has no usable "
                                    f"id and correct ({type(e).__name__}: {e})") from None
        if not 0 <= correct <= 1:
            raise ComparisonRefused(f"run {_label(run)}: {PREDICTIONS_ARTIFACT} line {number}: correct={correct} "
                                    "is not in [0, 1]")
        if key in rows:
            raise ComparisonRefused(f"run {_label(run)}: {PREDICTIONS_ARTIFACT} holds row id {key!r} twice")
        rows[key] = (correct, qtype)
    if not rows:
        raise ComparisonRefused(f"run {_label(run)}: {PREDICTIONS_ARTIFACT} is empty")
    return rows


def _paired_rows(client: MlflowClient, a: Any, b: Any, tmp: Path) -> tuple[list[str], dict, dict, str]:
    """The row ids both runs were evaluated on, each run's id -> (correct, qtype), and the dataset digest;
    `ComparisonRefused` unless both hold predictions of the same rows of the same dataset."""
    if a.info.run_id == b.info.run_id:
        raise ComparisonRefused(f"both arguments name run {_label(a)}")
    digests = [_eval_digest(run) for run in (a, b)]
    for run, digest in zip((a, b), digests, strict=True):
        if digest is None:
            raise ComparisonRefused(f"run {_label(run)} records no dataset digest for its evaluation")
    if digests[0] != digests[1]:
        raise ComparisonRefused(f"the runs were evaluated on different data: {_label(a)} on dataset "
                                f"{digests[0][:12]}, {_label(b)} on {digests[1][:12]}")
    pred_a, pred_b = _predictions(client, a, tmp), _predictions(client, b, tmp)
    if pred_a.keys() != pred_b.keys():
        only_a, only_b = sorted(pred_a.keys() - pred_b.keys()), sorted(pred_b.keys() - pred_a.keys())
        raise ComparisonRefused(
            f"the runs were evaluated on different rows: {len(only_a)} row ids only in {_label(a)}, "
            f"{len(only_b)} only in {_label(b)} (e.g. {(only_a or only_b)[0]!r})")
    return sorted(pred_a), pred_a, pred_b, digests[0]


def compare_paired(cfg: RegisterConfig, run_a: str, run_b: str, n_boot: int = PAIRED_RESAMPLES,
                   seed: int = PAIRED_SEED) -> dict[str, Any]:
    """B - A in accuracy on the rows both runs were evaluated on, overall and per question type, with
    paired-bootstrap 95% percentile intervals (dyme_core/stats.py); logged as a new run.

    run_a, run_b: run ids, or run names in `cfg.experiment`. Refused (`ComparisonRefused`, one line) when a
    run has no per-row predictions, no dataset digest, or was evaluated on other data or other rows.
    The new run, in run B's experiment, is tagged `dyme.comparison=true` (and `dyme.compare.run_a/_b`), holds
    the table as its description, `paired/*` metrics and artifacts comparison/paired.{json,csv,png}; the
    compared runs are left as they are. Returns {"text", "run_id", "rows"}.
    """
    check_reachable(cfg)
    client = _client(cfg)
    a, b = (_find_run(client, cfg.experiment, ref) for ref in (run_a, run_b))
    with tempfile.TemporaryDirectory() as tmp:
        ids, pred_a, pred_b, digest = _paired_rows(client, a, b, Path(tmp))
        # stats' `a - b` with its a = run B and its b = run A: B - A
        rows = stats.group_differences([pred_b[i][0] for i in ids], [pred_a[i][0] for i in ids],
                                       [pred_a[i][1] for i in ids], n_boot=n_boot, seed=seed)
        record = [{"qtype": r.group, "n": r.n, "acc_a": r.mean_b, "acc_b": r.mean_a, "diff": r.diff.point,
                   "lo": r.diff.lo, "hi": r.diff.hi, "excludes_zero": r.diff.excludes_zero, "a_only": r.b_higher,
                   "b_only": r.a_higher} for r in rows]
        small = [r.group for r in rows if r.n < stats.SMALL_GROUP]
        lines = [
            f"Paired comparison on {len(ids)} test rows (dataset {digest[:12]}): B - A in accuracy",
            f"  A  {_label(a)}",
            f"  B  {_label(b)}",
            "",
            stats.difference_table(rows, a="B", b="A", group="question type"),
            "",
            f"95% paired-bootstrap percentile intervals: {n_boot:,} resamples of the test rows (seed {seed}),",
            "each question type resampled within itself; * the interval excludes 0; "
            "'B only': rows B gets right and A does not.",
            *([f"Under {stats.SMALL_GROUP} rows ({', '.join(small)}) a percentile interval is too narrow: "
               "read it as a rough guide."] if small else []),
        ]

        out = Path(tmp) / "comparison"
        out.mkdir()
        summary = {"difference": "B - A", "run_a": {"run_id": a.info.run_id, "run_name": a.info.run_name},
                   "run_b": {"run_id": b.info.run_id, "run_name": b.info.run_name}, "data_digest": digest,
                   "n_rows": len(ids), "interval": "paired bootstrap, percentile", "confidence": 0.95,
                   "resamples": n_boot, "seed": seed, "rows": record}
        (out / "paired.json").write_text(json.dumps(summary, indent=2))
        pd.DataFrame(record).to_csv(out / "paired.csv", index=False)
        stats.plot_differences(rows, out / "paired.png",
                               f"B - A: {b.info.run_name} - {a.info.run_name} ({len(ids)} paired rows)")
        name = f"compare-{a.info.run_name}-vs-{b.info.run_name}"[:250]
        run_id = client.create_run(b.info.experiment_id, run_name=name).info.run_id
        tags = {COMPARISON_TAG: "true", "dyme.compare.run_a": a.info.run_id, "dyme.compare.run_b": b.info.run_id,
                "mlflow.note.content": "```\n" + "\n".join(lines) + "\n```"}
        params = {"run_a": a.info.run_id, "run_b": b.info.run_id, "resamples": str(n_boot), "seed": str(seed),
                  "data_digest": digest}
        metrics = {}
        for r in record:
            key = "paired" if r["qtype"] == "all" else f"paired/{r['qtype']}"
            metrics.update({f"{key}/diff": r["diff"], f"{key}/diff_lo": r["lo"], f"{key}/diff_hi": r["hi"]})
        _log_batches(client, run_id, metrics=_metric_entities(metrics, 0),
                     params=[Param(k, v) for k, v in params.items()], tags=[RunTag(k, v) for k, v in tags.items()])
        client.log_artifacts(run_id, str(out), "comparison")
        client.set_terminated(run_id)
    experiment = client.get_experiment(b.info.experiment_id).name
    lines.append(f"Logged as run {run_id} ({name}) in experiment {experiment!r}.")
    return {"text": "\n".join(lines), "run_id": run_id, "rows": record}


def load_champion(cfg: RegisterConfig) -> mlflow.pyfunc.PyFuncModel:
    """The pyfunc at `models:/<register.model_name>@champion`."""
    _client(cfg)
    return mlflow.pyfunc.load_model(f"models:/{cfg.model_name}@{CHAMPION}")
