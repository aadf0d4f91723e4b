"""The pipeline's steps as library functions: what `dyme <step>` and the KFP components both call.

Each takes the one validated :class:`Config` (plus an LLM client where the step can use one) and
returns a small JSON-serialisable result. DESIGN.md section 5: the CLI and `components/` are thin
shells over these.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import Counter
from pathlib import Path

import numpy as np

from dyme_core.config import Config
from dyme_core.data.ingest import dataset_digest, open_dataset
from dyme_core.data.loaders import Dataset
from dyme_core.llm import ChatClient

log = logging.getLogger(__name__)


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
    """A tiny random model (`dyme init-model`), its tokenizer trained on the dataset's text (and refined traces)."""
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
    """Refined reference traces for `refine.splits`, written atomically to `refine.out`.

    `refine_stats.json` beside it has the fallback counters and the length of the memorised targets
    (trace + answer line: p50/p95/max, in tokens of `model.name_or_path`'s tokenizer when it loads
    locally, else in whitespace-separated words; `target_tokens_unit` says which); a warning is logged
    when `train.max_new_tokens` or `train.max_target_tokens` is below the p95.

    With `refine.facts_from: vlm`, rows with neither facts nor a hint first get visual facts from the image
    (dyme_core/facts.py, through `client`); the rule refiner writes their traces from those facts, and each
    such target row carries them (`visual_facts`) for training's checker. The `facts/*` counters go into
    refine_stats.json.
    """
    from dyme_core.facts import attach_facts, facts_from_images
    from dyme_core.refiner import Refiner, TemplatePool

    r = cfg.refine
    ds = open_dataset(cfg.data.out_dir, max_pixels=cfg.validate.max_pixels)
    samples = [s for s in ds.samples if s.split in r.splits]
    if not samples:
        counts = ", ".join(f"{split} ({n})" for split, n in sorted(Counter(s.split for s in ds.samples).items()))
        raise ValueError(f"refine.splits={list(r.splits)} select 0 samples; the dataset has: {counts or 'no samples'}")
    facts, facts_stats = {}, {}
    if r.facts_from == "vlm":
        if client is None:
            raise ValueError("refine.facts_from=vlm needs a vision endpoint: set refine.llm.base_url")
        facts, counted = facts_from_images(ds, samples, client, model=r.facts_model, cache_dir=r.cache_dir,
                                           max_workers=r.llm.max_workers)
        samples, facts_stats = attach_facts(samples, facts), counted.as_dict()
    refiner = Refiner(r.backend, cache_dir=r.cache_dir, client=client if r.backend == "llm" else None,
                      max_workers=r.llm.max_workers, max_trace_chars=r.max_trace_chars, observe=r.observe)
    pool = TemplatePool.load(r.template_pool)
    results = refiner.refine(samples, pool.current["text"])
    out = Path(r.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    with tmp.open("w") as f:
        for s, (trace, fell_back) in zip(samples, results, strict=True):
            row = {"id": s.id, "trace": trace, "template_version": pool.best,
                   "backend": "rule" if fell_back else r.backend}
            if s.id in facts:
                row["visual_facts"] = facts[s.id]
            f.write(json.dumps(row, sort_keys=True) + "\n")
    tmp.replace(out)
    pool.save(r.template_pool)
    if refiner.stats.fallbacks:
        log.warning("refine: %d of %d samples refined by the rule refiner instead of the LLM; %s",
                    refiner.stats.fallbacks, len(samples), refiner.fallback_log.summary())
    if refiner.stats.ungrounded:
        log.warning("refine: %d of %d samples have neither visual facts nor a hint; their traces only restate "
                    "the question and the answer", refiner.stats.ungrounded, len(samples))
    targets = [f"{trace}\nAnswer: {s.answer}" for s, (trace, _) in zip(samples, results, strict=True)]
    lengths = _target_lengths(cfg, targets)
    stats = {**refiner.stats.as_dict(), **facts_stats, "n": len(samples), "template_version": pool.best, **lengths}
    for key in ("max_new_tokens", "max_target_tokens"):
        if getattr(cfg.train, key) < lengths["target_tokens_p95"]:
            log.warning("refine: train.%s=%d is below the p95 length of the refined targets (%d %s)", key,
                        getattr(cfg.train, key), lengths["target_tokens_p95"], lengths["target_tokens_unit"])
    # the DVC metric: what the targets are; calls and cache hits depend on the local cache, so they are
    # returned (and printed) but not written, and a fresh clone's repro writes the same file
    kept = {k: v for k, v in stats.items() if k not in ("refiner/calls", "refiner/cache_hits")}
    out.with_name("refine_stats.json").write_text(json.dumps(kept, indent=2))
    return stats


def _target_lengths(cfg: Config, targets: list[str]) -> dict:
    """p50/p95/max length of `targets`: tokens of the model's tokenizer if it loads from local files, else words."""
    from huggingface_hub import try_to_load_from_cache

    unit, count = "whitespace words", lambda text: len(text.split())
    name = cfg.model.name_or_path
    try:
        # only a local folder or a hub id already in the cache: never a download
        local = Path(name).is_dir() or isinstance(try_to_load_from_cache(name, "tokenizer_config.json"), str)
        if local:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True,
                                                      trust_remote_code=cfg.model.trust_remote_code)
            unit, count = "tokens", lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])
    except (OSError, ValueError, KeyError, ImportError) as e:  # not a repo id, no tokenizer files
        log.info("refine: no local tokenizer for %s (%s)", name, str(e).splitlines()[0] if str(e) else type(e).__name__)
    if unit != "tokens":
        log.info("refine: target lengths are in whitespace words (%s has no local tokenizer)", name)
    lengths = np.array([count(t) for t in targets])
    return {"target_tokens_p50": int(np.percentile(lengths, 50)), "target_tokens_p95": int(np.percentile(lengths, 95)),
            "target_tokens_max": int(lengths.max()), "target_tokens_unit": unit}


def train(cfg: Config, client: ChatClient | None = None, stop: threading.Event | None = None) -> dict[str, float]:
    from dyme_core.facts import attach_facts, load_facts
    from dyme_core.lock import hold_run_folders
    from dyme_core.trainer import load_refined
    from dyme_core.trainer import train as run_training

    check_validated(cfg)  # before anything is written, the lock file included
    # one run per run folder and checkpoint folder, held to the end (a second run stops at once: lock.py)
    with hold_run_folders({"train.output_dir": cfg.train.output_dir, "train.checkpoint_dir": cfg.train.checkpoint_dir}):
        dataset = open_dataset(cfg.data.out_dir, max_pixels=cfg.validate.max_pixels)
        # facts the refine step read from the image (refine.facts_from=vlm) ground the checker's reward too
        dataset.samples = attach_facts(dataset.samples, load_facts(cfg.train.refined))
        return run_training(cfg, dataset, load_refined(cfg.train.refined), llm_client=client, stop=stop)


def evaluate(cfg: Config) -> dict[str, float]:
    """Evaluate; also plots the training curves when the model's run dir has metrics.jsonl."""
    from dyme_core.evaluate import evaluate as run_evaluation
    from dyme_core.evaluate import plot_training

    metrics = run_evaluation(cfg, open_dataset(cfg.data.out_dir, max_pixels=cfg.validate.max_pixels))
    history = Path(cfg.evaluate.model_path).parent / "metrics.jsonl"
    if history.is_file():
        plot_training(history, Path(cfg.evaluate.out_dir))
    (Path(cfg.evaluate.out_dir) / HEADLINE).write_text(json.dumps(headline(metrics, history), indent=2))
    return metrics


HEADLINE = "headline.json"  # the figures `dvc metrics show` and `dvc exp show` list (dvc.yaml, evaluate)
# headline name -> key: of the evaluation's metrics.json, then of the training run's metrics.jsonl
EVAL_HEADLINE = {"accuracy": "relaxed_accuracy", "format": "format_rate", "grounding": "grounding_score",
                 "think_chars": "mean_thinking_length"}
TRAIN_HEADLINE = {"reward": "reward/total", "memorize": "mode/memorize", "explore": "mode/explore",
                  "skip": "mode/skip"}
HEADLINE_LAST_STEPS = 10


def headline(metrics: dict[str, float], history: Path) -> dict[str, float]:
    """The few figures a reader compares across experiments, short-named so that `dvc metrics show` and
    `dvc exp show` fit a terminal: the evaluation's relaxed accuracy, format rate, grounding and mean
    thinking length (characters); the training run's total reward and mode shares averaged over its last
    10 logged steps (one step of a small batch is noise; only when `history`, the run's metrics.jsonl,
    exists). All are fixed by the seed. Per-type accuracy stays in metrics.json (and MLflow), per-step
    figures in MLflow and the run dir, the wall time in its timing.json."""
    out = {name: round(float(metrics[key]), 1 if name == "think_chars" else 4)
           for name, key in EVAL_HEADLINE.items() if key in metrics}
    rows = [json.loads(line) for line in history.read_text().splitlines() if line.strip()] if history.is_file() else []
    if rows:
        last = rows[-HEADLINE_LAST_STEPS:]
        out.update({name: round(sum(r[key] for r in last) / len(last), 4)
                    for name, key in TRAIN_HEADLINE.items() if all(key in r for r in last)})
    return out


def register(cfg: Config) -> dict:
    """Log the run and model to MLflow, register a version, gate it against the champion."""
    from dyme_core.tracking import register_model

    result = register_model(cfg, Path(cfg.train.output_dir), Path(cfg.evaluate.out_dir))
    out = Path(cfg.register.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return result
