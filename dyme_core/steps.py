"""The pipeline's steps as library functions: what `dyme <step>` and the KFP components both call.

Each takes the one validated :class:`Config` (plus an LLM client where the step can use one) and
returns a small JSON-serialisable result. DESIGN.md section 5: the CLI and `components/` are thin
shells over these.
"""

from __future__ import annotations

import json
from pathlib import Path

from dyme_core.config import Config
from dyme_core.data.ingest import dataset_digest, open_dataset
from dyme_core.data.loaders import Dataset
from dyme_core.llm import ChatClient


class ValidationFailed(RuntimeError):
    """The dataset failed validation; training must not start on it."""


def synth(cfg: Config) -> Path:
    """The synthetic generator alone, into `synth.out_dir` (the pipeline ingests it with data.path=synthetic)."""
    from dyme_core.data.synth import synthesize

    return synthesize(cfg.synth)


def ingest(cfg: Config) -> dict:
    """Materialise `data.path` (any source) into `data.out_dir`; the report is also `data.report`."""
    from dyme_core.data.ingest import ingest as run_ingest

    return run_ingest(cfg)


def init_model(cfg: Config, dataset: Dataset | None = None) -> Path:
    """The tiny default model, its tokenizer trained on the dataset's text (and refined traces)."""
    from dyme_core.models import init_tiny_model
    from dyme_core.refiner import rule_refine

    ds = dataset or open_dataset(cfg.data.out_dir, max_pixels=cfg.validate.max_pixels)
    texts = []
    for s in ds.samples:
        texts += [s.question, s.answer, s.hint or "", rule_refine(s)]
        texts += [t for t in s.meta.get("traces", {}).values() if isinstance(t, str)]
    return init_tiny_model(cfg.init_model, [t for t in texts if t])


def validate(cfg: Config) -> dict:
    """Great-expectations checks of the materialised dataset (`data.out_dir`); writes `validate.report`,
    which carries the dataset's content digest (`data_digest`)."""
    from dyme_core.validation import validate_path

    path = Path(cfg.data.out_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"dataset not found: {path} (run `dyme ingest` to materialise data.path there)")
    return validate_path(path, cfg.validate)


def check_validated(cfg: Config) -> None:
    """Refuse to train without a passing validation report made for the data in `data.out_dir`."""
    report = Path(cfg.validate.report)
    if not report.is_file():
        raise ValidationFailed(f"no validation report at {report}; run `dyme validate` first")
    try:
        content = json.loads(report.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValidationFailed(f"validation report {report} is not readable ({e}); rerun `dyme validate`") from None
    if not isinstance(content, dict) or content.get("success") is not True:
        raise ValidationFailed(f"the dataset failed validation ({report}); fix it and rerun `dyme validate`")
    digest = dataset_digest(cfg.data.out_dir)
    if content.get("data_digest") != digest:
        raise ValidationFailed(f"validation report {report} was made for other data (digest "
                               f"{str(content.get('data_digest'))[:12]}, {cfg.data.out_dir} has {digest[:12]}); "
                               "rerun `dyme validate`")


def refine(cfg: Config, client: ChatClient | None = None) -> dict:
    """Refined reference traces for `refine.splits`, written atomically to `refine.out`."""
    from dyme_core.refiner import Refiner, TemplatePool

    r = cfg.refine
    ds = open_dataset(cfg.data.out_dir, max_pixels=cfg.validate.max_pixels)
    refiner = Refiner(r.backend, cache_dir=r.cache_dir, client=client, max_workers=r.llm.max_workers)
    pool = TemplatePool.load(r.template_pool)
    samples = [s for s in ds.samples if s.split in r.splits]
    results = refiner.refine(samples, pool.current["text"])
    out = Path(r.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    with tmp.open("w") as f:
        for s, (trace, fell_back) in zip(samples, results, strict=True):
            row = {"id": s.id, "trace": trace, "template_version": pool.best,
                   "backend": "rule" if fell_back else r.backend}
            f.write(json.dumps(row, sort_keys=True) + "\n")
    tmp.replace(out)
    pool.save(r.template_pool)
    stats = {**refiner.stats.as_dict(), "n": len(samples), "template_version": pool.best}
    out.with_name("refine_stats.json").write_text(json.dumps(stats, indent=2))
    return stats


def train(cfg: Config, client: ChatClient | None = None) -> dict[str, float]:
    from dyme_core.trainer import load_refined
    from dyme_core.trainer import train as run_training

    check_validated(cfg)
    dataset = open_dataset(cfg.data.out_dir, max_pixels=cfg.validate.max_pixels)
    return run_training(cfg, dataset, load_refined(cfg.train.refined), llm_client=client)


def evaluate(cfg: Config) -> dict[str, float]:
    """Evaluate; also plots the training curves when the model's run dir has metrics.jsonl."""
    from dyme_core.evaluate import evaluate as run_evaluation
    from dyme_core.evaluate import plot_training

    metrics = run_evaluation(cfg, open_dataset(cfg.data.out_dir, max_pixels=cfg.validate.max_pixels))
    history = Path(cfg.evaluate.model_path).parent / "metrics.jsonl"
    if history.is_file():
        plot_training(history, Path(cfg.evaluate.out_dir))
    return metrics


def register(cfg: Config) -> dict:
    """Log the run and model to MLflow, register a version, gate it against the champion."""
    from dyme_core.tracking import register_model

    result = register_model(cfg, Path(cfg.train.output_dir), Path(cfg.evaluate.out_dir))
    out = Path(cfg.register.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return result
