"""The paper's method table in miniature (DESIGN.md section 2 for the paper numbers).

The claim under test: on a small VLM, SFT on reasoning traces, GRPO and two-stage SFT->GRPO do not
improve (or lower) chart-QA accuracy, while DyME raises it. At a scale one GPU allows in minutes:

1. ``base``: a small Idefics3 (SmolVLM architecture, 6.4M parameters) trained from scratch with
   ``DymeTrainer`` (``method=sft``) on the synthetic chart task with bare answers only, no reasoning:
   by default under the reasoning prompt with the target ``Answer: <gt>`` (so the base answers, with the
   flag the accuracy reward parses, but never thinks: the paper's starting point; ``base_prompt=direct``
   trains on the direct prompt instead, see bench/README.md for why that start is degenerate). Saved in
   bf16 as the common starting point (``base.tar``) and evaluated on the held-out test split with the
   reasoning prompt (the reference every method is compared with) and the direct prompt.
2. ``runs-seed<N>``: from that base, with the reasoning prompt, the same data, steps, prompts per step,
   K, completion length and learning rate: ``sft`` (medium traces), ``grpo``, ``two_stage``, ``dyme``,
   ``dyme_no_checker`` (thinking reward 0) and ``dyme_no_refiner`` (memorises the raw hint); each
   evaluated with ``dyme_core.evaluate.evaluate`` on the test split.
3. ``aggregate``: mean and spread over seeds beside the paper's numbers (``results.json``,
   ``table.md``), reward curves and the advantage-collapse rate (``curves.png``), DyME's mode fractions
   over training (``modes.png``) and accuracy per question type (``by_type.png``).

Every piece writes its result files under ``--out`` and is skipped when they already exist there or in a
``--from`` folder (earlier GPU calls' files, carried back in), so an interrupted call resumes: a
``runs-seed<N>`` file is rewritten after every finished run and only the missing runs are trained.
``--deadline-s`` stops cleanly (exit 3) before a run that would not finish in the call's time.
Everything else (the synthetic data, refined targets, run folders) lives under ``--work`` and is
rebuilt deterministically when missing. Nothing here imports trl, datasets, mlflow, dvc, kfp or
great_expectations (checked at exit).

Run (GPU, one call per line; bench/README.md has the budget math)::

    bash bench/gpu_method_table.sh base runs-seed0
    bash bench/gpu_method_table.sh runs-seed0 runs-seed1 aggregate

CPU check of the whole flow at a tiny scale (about 2 minutes on 2 cores)::

    .venv/bin/python bench/method_table.py all --scale smoke --out bench/out/method_table_smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gc
import hashlib
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

# Paper numbers (ChartQA relaxed accuracy, %; DESIGN.md section 2). The method rows are SmolVLM-500M;
# the ablation rows are LLaVA-OV-0.5B, 3-domain average, whose full DyME scores 55.4.
PAPER = {
    "base": {"acc": 63.2, "model": "SmolVLM-500M, ChartQA"},
    "sft": {"acc": 57.7, "model": "SmolVLM-500M, ChartQA"},
    "grpo": {"acc": 53.8, "model": "SmolVLM-500M, ChartQA"},
    "two_stage": {"acc": 60.1, "model": "SmolVLM-500M, ChartQA"},
    "dyme": {"acc": 69.7, "model": "SmolVLM-500M, ChartQA"},
    "dyme_full_ablation": {"acc": 55.4, "model": "LLaVA-OV-0.5B, 3-domain avg"},
    "dyme_no_checker": {"acc": 52.8, "model": "LLaVA-OV-0.5B, 3-domain avg"},
    "dyme_no_refiner": {"acc": 51.6, "model": "LLaVA-OV-0.5B, 3-domain avg"},
}

# Method runs in the paper's table order: name -> the `train.*` overrides that make it (all else is
# shared, see run_overrides).
METHODS: dict[str, list[str]] = {
    "sft": ["train.method=sft", "train.sft_target=hint"],
    "grpo": ["train.method=grpo"],
    "two_stage": ["train.method=two_stage", "train.sft_target=hint"],
    "dyme": ["train.method=dyme"],
    "dyme_no_checker": ["train.method=dyme", "train.checker=none",
                        "train.reward_weights={format: 1.0, accuracy: 1.0, thinking: 0.0}"],
    "dyme_no_refiner": ["train.method=dyme", "train.use_refiner=false"],
}
# Training order: the cheapest runs last, so a call that runs out of time leaves them to the next one.
RUN_ORDER = ("dyme", "grpo", "dyme_no_checker", "dyme_no_refiner", "two_stage", "sft")
LABELS = {
    "base": "base (direct prompt)", "base_reason": "base (reasoning prompt)", "sft": "+SFT (medium traces)",
    "grpo": "+GRPO", "two_stage": "+two-stage SFT->GRPO", "dyme": "+DyME",
    "dyme_no_checker": "DyME w/o checker", "dyme_no_refiner": "DyME w/o refiner",
}
RL_METHODS = ("dyme", "dyme_no_checker", "dyme_no_refiner", "grpo", "two_stage")
COLORS = {"base_reason": "#7f7f7f", "base": "#c7c7c7", "sft": "#8c564b", "grpo": "#ff7f0e", "two_stage": "#2ca02c",
          "dyme": "#1f77b4", "dyme_no_checker": "#d62728", "dyme_no_refiner": "#9467bd"}
# Per-step metrics kept from each run's metrics.jsonl (the trainer logs more).
HISTORY_KEYS = (
    "step", "phase_sft", "loss", "loss/nll_memorized", "reward/format", "reward/accuracy", "reward/thinking",
    "reward/total", "mode/memorize", "mode/explore", "mode/skip", "frac_reward_zero_std",
    "completion/mean_length", "completion/clipped_ratio", "rows/kept", "rows/total", "grad_norm",
    "time/step_s", "time/generation_s", "time/reward_s", "time/update_s", "memory/peak_mb",
)
FORBIDDEN_MODULES = ("trl", "datasets", "mlflow", "great_expectations", "kfp", "dvc")
EXIT_INCOMPLETE = 3


@dataclass(frozen=True)
class Scale:
    """Everything that sizes the experiment; `--set name=value` overrides one field (recorded)."""

    # data: `shards` synthesize() calls run in parallel and are merged (per-shard seed = seed*1000+shard)
    shards: int
    train_per_shard: int
    val_per_shard: int
    test_per_shard: int
    image_size: int
    # the model (init_model.* overrides); bf16 weights must stay < 16 MiB to come back from a GPU call
    hidden_size: int
    num_layers: int
    num_heads: int
    vision_hidden_size: int
    vision_layers: int
    patch_size: int
    vocab_size: int
    # the base: SFT from scratch on bare answers, vision tower trained, cosine schedule. base_prompt
    # "reason": the reasoning prompt with the target "Answer: <gt>" (no thinking); "direct": the direct
    # prompt with the target "<gt>" (then no base output carries the answer flag the reward parses)
    base_prompt: str
    base_steps: int
    base_batch: int
    base_lr: float
    base_warmup: int
    base_eval_max_new_tokens: int
    # the method runs: identical for every method
    steps: int
    batch: int
    k: int
    max_new_tokens: int
    lr: float
    micro_batch: int
    eval_max_new_tokens: int
    eval_batch: int
    static_cache: bool  # speed only: HF's compiled static-cache decode step for the rollouts
    # planning only: expected seconds, for --deadline-s
    est_base_s: float
    est_run_s: float
    loss_type: str = "grpo"  # train.loss_type of every method run (the official GRPO normalisation by default)
    min_thinking_chars: int = 10  # train.min_thinking_chars: the format reward's shortest thinking


SCALES = {
    # CPU, this machine: the whole flow in about two minutes; numbers mean nothing
    "smoke": Scale(
        shards=2, train_per_shard=28, val_per_shard=0, test_per_shard=14, image_size=64,
        hidden_size=128, num_layers=2, num_heads=4, vision_hidden_size=64, vision_layers=2, patch_size=8,
        vocab_size=1024,
        base_prompt="reason", base_steps=30, base_batch=16, base_lr=1e-3, base_warmup=5, base_eval_max_new_tokens=8,
        steps=3, batch=4, k=4, max_new_tokens=24, lr=1e-3, micro_batch=16, eval_max_new_tokens=32,
        eval_batch=28, static_cache=False, est_base_s=60, est_run_s=20,
    ),
    # one H100/H200: base about 3 min, six runs per seed about 4 min (bench/README.md)
    "full": Scale(
        shards=16, train_per_shard=504, val_per_shard=14, test_per_shard=42, image_size=224,
        hidden_size=256, num_layers=6, num_heads=4, vision_hidden_size=192, vision_layers=4, patch_size=16,
        vocab_size=2048,
        base_prompt="reason", base_steps=1000, base_batch=64, base_lr=1e-3, base_warmup=50,
        base_eval_max_new_tokens=16,
        steps=32, batch=64, k=8, max_new_tokens=128, lr=1e-3, micro_batch=256, eval_max_new_tokens=160,
        eval_batch=672, static_cache=False, est_base_s=240, est_run_s=75,
    ),
}


# --------------------------------------------------------------------------------------------- utils
def log(msg: str) -> None:
    print(f"[method_table {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def write_json(path: Path, obj: Any) -> None:
    """Atomic: a call killed mid-write never leaves half a result file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, allow_nan=False))
    tmp.replace(path)


def rounded(x: Any, digits: int = 5) -> Any:
    if isinstance(x, float):
        return float(f"{x:.{digits}g}") if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: rounded(v, digits) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [rounded(v, digits) for v in x]
    return x


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def environment() -> dict[str, Any]:
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name(0) if cuda else f"CPU ({os.cpu_count()} cores)",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }


class Context:
    """Where things live and how much time is left."""

    def __init__(self, args: argparse.Namespace, scale: Scale, scale_name: str, overrides: dict[str, Any]):
        self.out = Path(args.out)
        self.sources = [self.out, *(Path(p) for p in args.from_dirs)]
        self.work = Path(args.work or f"/tmp/dyme-method-table-{scale_name}")
        self.scale, self.scale_name, self.overrides = scale, scale_name, overrides
        self.methods: list[str] = args.methods  # [] = all
        self.deadline = time.monotonic() + args.deadline_s if args.deadline_s > 0 else math.inf
        self._dataset = None

    def find(self, name: str) -> Path | None:
        """An earlier piece's result file, in --out or a --from folder."""
        return next((d / name for d in self.sources if (d / name).is_file()), None)

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def scale_record(self) -> dict[str, Any]:
        return {"name": self.scale_name, "overrides": self.overrides, **dataclasses.asdict(self.scale)}

    # ----------------------------------------------------------------- data
    @property
    def data_dir(self) -> Path:
        return self.work / "data"

    def dataset(self):
        if self._dataset is None:
            from dyme_core.config import DataConfig
            from dyme_core.data.loaders import load_dataset

            ensure_data(self)
            self._dataset = load_dataset(DataConfig(path=str(self.data_dir)))
        return self._dataset


class Incomplete(RuntimeError):
    """Not enough time left in this call; rerun the same piece to resume."""


# ---------------------------------------------------------------------------------------------- data
def _synth_shard(out_dir: str, seed: int, n_train: int, n_val: int, n_test: int, image_size: int) -> str:
    from dyme_core.config import SynthConfig
    from dyme_core.data.synth import synthesize

    return str(synthesize(SynthConfig(out_dir=out_dir, seed=seed, n_train=n_train, n_val=n_val, n_test=n_test,
                                      image_size=image_size, trace_quality="medium")))


def ensure_data(ctx: Context, seed: int = 0) -> None:
    """The synthetic chart set: `shards` synthesize() calls in parallel, merged with unique ids.

    Deterministic (per-shard seeds; the shard count, not the core count, fixes the data). The hint is
    the medium-quality trace (the SFT target); all three qualities stay in meta["traces"].
    """
    from dyme_core.data.loaders import load_dataset  # noqa: F401  (fail early if the stack is broken)
    from dyme_core.data.schema import Sample, read_jsonl, write_jsonl

    s = ctx.scale
    spec = {"seed": seed, "shards": s.shards, "train": s.train_per_shard, "val": s.val_per_shard,
            "test": s.test_per_shard, "image_size": s.image_size, "trace_quality": "medium"}
    marker = ctx.data_dir / "synth_spec.json"
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return
    t0 = time.perf_counter()
    shutil.rmtree(ctx.data_dir, ignore_errors=True)
    shard_root = ctx.work / "shards"
    shutil.rmtree(shard_root, ignore_errors=True)
    jobs = [(str(shard_root / f"{j:02d}"), seed * 1000 + j, s.train_per_shard, s.val_per_shard,
             s.test_per_shard, s.image_size) for j in range(s.shards)]
    workers = max(1, min(s.shards, os.cpu_count() or 1))
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        list(pool.map(_synth_shard, *zip(*jobs, strict=True)))
    images = ctx.data_dir / "images"
    images.mkdir(parents=True)
    merged = []
    for j, job in enumerate(jobs):
        root = Path(job[0])
        for row in read_jsonl(root / "samples.jsonl"):
            sample = Sample.from_dict(row)
            new_id = f"synth-{sample.split}-{j:02d}-{sample.id.rsplit('-', 1)[1]}"
            os.replace(root / sample.image, images / f"{new_id}.png")
            merged.append(dataclasses.replace(sample, id=new_id, image=f"images/{new_id}.png"))
    order = {"train": 0, "val": 1, "test": 2}
    merged.sort(key=lambda x: (order[x.split], x.id))
    write_jsonl(merged, ctx.data_dir / "samples.jsonl")
    shutil.rmtree(shard_root)
    marker.write_text(json.dumps(spec))
    counts = {k: sum(x.split == k for x in merged) for k in order}
    log(f"synthesized {counts} at {s.image_size}px in {time.perf_counter() - t0:.1f}s ({workers} processes)")


def ensure_refined(ctx: Context) -> Path:
    """Offline refined targets (rule refiner) for the training split: what DyME memorises."""
    from dyme_core import steps
    from dyme_core.config import load_config

    out = ctx.work / "refined" / "targets.jsonl"
    if not out.is_file():
        ctx.dataset()
        cfg = load_config(None, [f"data.path={ctx.data_dir}", f"refine.out={out}",
                                 f"refine.template_pool={out.parent / 'templates.json'}",
                                 f"refine.cache_dir={ctx.work / 'refine_cache'}"])
        stats = steps.refine(cfg)
        log(f"refined {stats['n']} training targets")
    return out


# ---------------------------------------------------------------------------------------------- base
def common_overrides(ctx: Context) -> list[str]:
    return [f"data.path={ctx.data_dir}", "model.dtype=float32", "train.bf16=auto", "train.report_to=[jsonl]",
            "train.progress_bar=false", "train.save_steps=0", "train.weight_decay=0.01",
            "train.max_grad_norm=1.0", "evaluate.split=test"]


def evaluate_model(ctx: Context, model_dir: Path, out_dir: Path, style: str, max_new_tokens: int) -> dict:
    from dyme_core.config import load_config
    from dyme_core.evaluate import evaluate

    cfg = load_config(None, [*common_overrides(ctx), f"evaluate.model_path={model_dir}",
                             f"evaluate.out_dir={out_dir}", f"evaluate.prompt_style={style}",
                             f"evaluate.max_new_tokens={max_new_tokens}",
                             f"evaluate.batch_size={ctx.scale.eval_batch}"])
    t0 = time.perf_counter()
    metrics = evaluate(cfg, ctx.dataset())
    preds = [json.loads(line) for line in (out_dir / "predictions.jsonl").read_text().splitlines()[:4]]
    examples = [{k: p[k] for k in ("qtype", "question", "reference", "completion", "correct")} for p in preds]
    return {"metrics": rounded(metrics), "examples": examples, "eval_s": round(time.perf_counter() - t0, 2)}


def read_history(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [rounded({k: r[k] for k in HISTORY_KEYS if k in r}, 4) for r in rows]


def piece_base(ctx: Context) -> None:
    """Train the common starting point from scratch on direct answers; write base.tar + base.json."""
    if ctx.find("base.json") and ctx.find("base.tar"):
        log("base: done already (base.json, base.tar), skipped")
        return
    if ctx.time_left() < ctx.scale.est_base_s:
        raise Incomplete(f"base needs about {ctx.scale.est_base_s:.0f}s, {ctx.time_left():.0f}s left")
    import torch
    from transformers import AutoModelForImageTextToText

    from dyme_core import steps
    from dyme_core.config import ModelConfig, load_config
    from dyme_core.data.loaders import Dataset
    from dyme_core.models import load_processor, save_model
    from dyme_core.trainer import DymeTrainer

    s = ctx.scale
    ds = ctx.dataset()
    t0 = time.perf_counter()
    init_dir, run_dir, base_dir = ctx.work / "init", ctx.work / "base-run", ctx.work / "base"
    for d in (init_dir, run_dir, base_dir):
        shutil.rmtree(d, ignore_errors=True)
    cfg = load_config(None, [
        *common_overrides(ctx), f"init_model.out_dir={init_dir}", "init_model.seed=0",
        f"init_model.vocab_size={s.vocab_size}", f"init_model.hidden_size={s.hidden_size}",
        f"init_model.num_layers={s.num_layers}", f"init_model.num_heads={s.num_heads}",
        f"init_model.vision_hidden_size={s.vision_hidden_size}", f"init_model.vision_layers={s.vision_layers}",
        f"init_model.image_size={s.image_size}", f"init_model.patch_size={s.patch_size}",
        f"model.name_or_path={init_dir}", "model.freeze_vision=false",
        "train.method=sft", f"train.prompt_style={s.base_prompt}", "train.sft_target=hint",
        f"train.output_dir={run_dir}", "train.refined=", "train.template_pool=", "train.refine_cache_dir=",
        "train.seed=0", f"train.max_steps={s.base_steps}", f"train.batch_size={s.base_batch}",
        f"train.micro_batch_size={s.base_batch}", f"train.learning_rate={s.base_lr}",
        f"train.warmup_steps={s.base_warmup}", "train.lr_scheduler=cosine",
        f"train.logging_steps={max(1, s.base_steps // 100)}",
    ])
    # the tokenizer is trained on the training split's text only: nothing of the test split leaks in
    steps.init_model(cfg, Dataset(ds.root, ds.split("train")))
    # bare answers, no reasoning: without a hint the SFT target under the reasoning prompt is "Answer: <gt>"
    answers_only = Dataset(ds.root, [dataclasses.replace(x, hint=None) for x in ds.samples])
    trainer = DymeTrainer(cfg, answers_only)
    n_params = sum(p.numel() for p in trainer.model.parameters())
    log(f"base: {n_params / 1e6:.2f}M params, {s.base_steps} steps x {s.base_batch} prompts, bare answers under "
        f"the {s.base_prompt} prompt, device {trainer.device}, bf16 autocast {trainer.autocast}")
    t_train = time.perf_counter()
    last = trainer.train()
    train_s = time.perf_counter() - t_train
    del trainer
    _free_memory()
    # bf16 weights: the common starting point every run (in this call or a later one) loads and upcasts
    model = AutoModelForImageTextToText.from_pretrained(run_dir / "model", dtype=torch.bfloat16)
    save_model(model, load_processor(ModelConfig(name_or_path=str(run_dir / "model"))), base_dir)
    del model
    direct = evaluate_model(ctx, base_dir, ctx.work / "eval" / "base-direct", "direct", s.base_eval_max_new_tokens)
    reason = evaluate_model(ctx, base_dir, ctx.work / "eval" / "base-reason", "reason", s.eval_max_new_tokens)
    ctx.out.mkdir(parents=True, exist_ok=True)
    tar_path = ctx.out / "base.tar"
    with tarfile.open(tar_path.with_suffix(".tmp"), "w") as tar:
        tar.add(base_dir, arcname="base")
    tar_path.with_suffix(".tmp").replace(tar_path)
    size_mib = tar_path.stat().st_size / 2**20
    if size_mib >= 16:
        log(f"WARNING: base.tar is {size_mib:.1f} MiB, over the 16 MiB a GPU call brings back")
    history = read_history(run_dir)
    result = {
        "env": environment(), "scale": ctx.scale_record(), "n_params": n_params,
        "safetensors_sha256": sha256(base_dir / "model.safetensors"), "tar_mib": round(size_mib, 2),
        "train_s": round(train_s, 1), "total_s": round(time.perf_counter() - t0, 1),
        "train_last": rounded({k: last[k] for k in ("loss", "time/step_s", "samples_per_s") if k in last}),
        "loss_curve": [[h["step"], h["loss"]] for h in history],
        "eval_direct": direct, "eval_reason": reason,
    }
    write_json(ctx.out / "base.json", result)
    log(f"base: trained in {train_s:.0f}s ({train_s / s.base_steps:.3f}s/step); test relaxed accuracy "
        f"direct prompt {direct['metrics']['relaxed_accuracy']:.3f}, reasoning prompt "
        f"{reason['metrics']['relaxed_accuracy']:.3f} (format {reason['metrics']['format_rate']:.3f}); "
        f"base.tar {size_mib:.1f} MiB")


def ensure_base(ctx: Context) -> Path:
    """The base model folder in the work dir, unpacked from base.tar when a fresh machine lacks it."""
    base_dir = ctx.work / "base"
    tar_path, info_path = ctx.find("base.tar"), ctx.find("base.json")
    if tar_path is None or info_path is None:
        raise FileNotFoundError("no base.tar/base.json in --out or --from: run the `base` piece first")
    want = json.loads(info_path.read_text())["safetensors_sha256"]
    if (base_dir / "model.safetensors").is_file() and sha256(base_dir / "model.safetensors") == want:
        return base_dir
    shutil.rmtree(base_dir, ignore_errors=True)
    with tarfile.open(tar_path) as tar:
        tar.extractall(ctx.work, filter="data")
    if sha256(base_dir / "model.safetensors") != want:
        raise RuntimeError(f"{tar_path} does not hold the model base.json describes")
    return base_dir


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ---------------------------------------------------------------------------------------------- runs
def run_overrides(ctx: Context, method: str, seed: int, base_dir: Path, refined: Path, run_dir: Path) -> list[str]:
    s = ctx.scale
    return [
        *common_overrides(ctx), f"model.name_or_path={base_dir}", "model.freeze_vision=true",
        "train.prompt_style=reason", f"train.output_dir={run_dir}", f"train.refined={refined}",
        f"train.template_pool={refined.parent / 'templates.json'}",
        f"train.refine_cache_dir={run_dir / 'refine_cache'}",
        f"train.seed={seed}", f"train.max_steps={s.steps}", f"train.batch_size={s.batch}",
        f"train.num_generations={s.k}", f"train.micro_batch_size={s.micro_batch}",
        f"train.learning_rate={s.lr}", "train.lr_scheduler=constant", "train.warmup_steps=0",
        f"train.max_new_tokens={s.max_new_tokens}", "train.temperature=1.0", "train.beta=0.0",
        f"train.loss_type={s.loss_type}", f"train.min_thinking_chars={s.min_thinking_chars}",
        "train.sft_fraction=0.5", f"train.static_cache={str(s.static_cache).lower()}",
        *METHODS[method],
    ]


def piece_runs(ctx: Context, seed: int) -> None:
    """All methods for one seed; the result file is rewritten after each finished run."""
    name = f"runs-seed{seed}.json"
    found = ctx.find(name)
    done = json.loads(found.read_text()) if found else {"seed": seed, "runs": {}}
    todo = [m for m in RUN_ORDER if m not in done["runs"] and (not ctx.methods or m in ctx.methods)]
    if not todo:
        log(f"runs-seed{seed}: done already ({name}), skipped")
        return
    from dyme_core.config import load_config
    from dyme_core.trainer import DymeTrainer, load_refined

    base_dir = ensure_base(ctx)
    refined_path = ensure_refined(ctx)
    refined = load_refined(refined_path)
    ds = ctx.dataset()
    env = environment()
    if done.get("scale", ctx.scale_record()) != ctx.scale_record():
        log(f"WARNING: {name} was started at another scale; finishing it at the current one")
    done.update(scale=ctx.scale_record(), base_sha256=sha256(base_dir / "model.safetensors"))
    ctx.out.mkdir(parents=True, exist_ok=True)
    longest = ctx.scale.est_run_s
    for method in todo:
        need = longest / 3 if method == "sft" else longest  # sft samples no rollouts
        if ctx.time_left() < need:
            write_json(ctx.out / name, done)
            raise Incomplete(f"runs-seed{seed}: {len(todo) - todo.index(method)} run(s) left, the next about "
                             f"{need:.0f}s, {ctx.time_left():.0f}s left")
        run_dir = ctx.work / "runs" / f"seed{seed}" / method
        shutil.rmtree(run_dir, ignore_errors=True)
        cfg = load_config(None, run_overrides(ctx, method, seed, base_dir, refined_path, run_dir))
        t0 = time.perf_counter()
        trainer = DymeTrainer(cfg, ds, refined)
        trainer.train()
        train_s = time.perf_counter() - t0
        del trainer
        _free_memory()
        ev = evaluate_model(ctx, run_dir / "model", run_dir / "eval", "reason", ctx.scale.eval_max_new_tokens)
        history = read_history(run_dir)
        done["runs"][method] = {"train_s": round(train_s, 1), "overrides": METHODS[method], "history": history,
                                "device": env["device"], "date_utc": env["date_utc"], "torch": env["torch"],
                                "transformers": env["transformers"], **ev}
        write_json(ctx.out / name, done)
        longest = max(longest, time.perf_counter() - t0)
        m = ev["metrics"]
        log(f"seed {seed} {method:16s} acc {m['relaxed_accuracy']:.3f} format {m['format_rate']:.3f} "
            f"grounding {m['grounding_score']:.3f} | train {train_s:.0f}s "
            f"({train_s / ctx.scale.steps:.2f}s/step) eval {ev['eval_s']:.0f}s")


# ----------------------------------------------------------------------------------------- aggregate
def _stats(values: list[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "values": values, "n": len(values)}


def _pm(st: dict | None, scale: float = 100.0, digits: int = 1) -> str:
    if st is None:
        return "n/a"
    if st["n"] == 1:
        return f"{st['mean'] * scale:.{digits}f}"
    return f"{st['mean'] * scale:.{digits}f} ± {st['sd'] * scale:.{digits}f}"


def _mean_curve(histories: list[list[dict]], key: str, rl_only: bool = True) -> list[float | None]:
    """Mean over seeds per step; None where the step did not sample (an SFT step) or the key is absent."""
    n = max((len(h) for h in histories), default=0)
    out: list[float | None] = []
    for i in range(n):
        vals = [h[i][key] for h in histories
                if i < len(h) and key in h[i] and not (rl_only and h[i].get("phase_sft", 0) >= 0.5)]
        out.append(statistics.fmean(vals) if vals else None)
    return out


def piece_aggregate(ctx: Context) -> None:
    """results.json, table.md, curves.png, modes.png, by_type.png from base.json and runs-seed*.json."""
    base_path = ctx.find("base.json")
    if base_path is None:
        raise FileNotFoundError("aggregate needs base.json (run the `base` piece)")
    base = json.loads(base_path.read_text())
    seeds: dict[int, dict] = {}
    for d in reversed(ctx.sources):  # --out wins over --from
        for p in sorted(d.glob("runs-seed*.json")):
            data = json.loads(p.read_text())
            seeds[int(data["seed"])] = data
    if not seeds:
        raise FileNotFoundError("aggregate needs at least one runs-seed<N>.json")
    metric_keys = sorted({k for data in seeds.values() for r in data["runs"].values() for k in r["metrics"]})
    methods: dict[str, Any] = {}
    for method in METHODS:
        runs = {s: data["runs"][method] for s, data in sorted(seeds.items()) if method in data["runs"]}
        if not runs:
            continue
        evals = {k: _stats([r["metrics"][k] for r in runs.values() if k in r["metrics"]])
                 for k in metric_keys if any(k in r["metrics"] for r in runs.values())}
        hists = [r["history"] for r in runs.values()]
        rl_steps = [h for hist in hists for h in hist if h.get("phase_sft", 0) < 0.5]
        train = {"train_s": _stats([r["train_s"] for r in runs.values()]),
                 "step_s": _stats([statistics.fmean(h["time/step_s"] for h in hist) for hist in hists])}
        if rl_steps:
            for key in ("frac_reward_zero_std", "mode/memorize", "mode/explore", "mode/skip", "reward/accuracy",
                        "completion/mean_length", "completion/clipped_ratio"):
                train[key] = statistics.fmean(h[key] for h in rl_steps if key in h)
            train["generation_s_per_rl_step"] = statistics.fmean(h["time/generation_s"] for h in rl_steps)
        curves = {k: _mean_curve(hists, k) for k in ("reward/accuracy", "reward/total", "reward/format",
                                                     "reward/thinking", "frac_reward_zero_std", "mode/memorize",
                                                     "mode/explore", "mode/skip", "completion/mean_length")}
        curves["loss/nll_memorized"] = _mean_curve(hists, "loss/nll_memorized", rl_only=False)
        methods[method] = {"seeds": sorted(runs), "eval": evals, "train": train, "curves": curves,
                           "examples": next(iter(runs.values()))["examples"][:2]}
    base_direct, base_reason = base["eval_direct"]["metrics"], base["eval_reason"]["metrics"]
    scale = seeds[min(seeds)]["scale"]
    warnings = [f"seed {s} ran at another scale than seed {min(seeds)}" for s, d in seeds.items()
                if d["scale"] != scale]
    data_fields = ("shards", "train_per_shard", "val_per_shard", "test_per_shard", "image_size", "hidden_size",
                   "num_layers", "vision_hidden_size", "vision_layers", "patch_size", "vocab_size")
    warnings += [f"base and runs differ in {f}" for f in data_fields if base["scale"][f] != scale[f]]
    devices = sorted({f"{r['device']} (torch {r['torch']}, transformers {r['transformers']}, {r['date_utc']} UTC)"
                      for d in seeds.values() for r in d["runs"].values()})
    results = rounded({
        "scale": scale, "base_scale": base["scale"], "env_base": base["env"], "run_devices": devices,
        "warnings": warnings, "paper": PAPER,
        "base": {"n_params": base["n_params"], "train_s": base["train_s"], "eval_direct": base_direct,
                 "eval_reason": base_reason, "loss_curve": base["loss_curve"],
                 "examples_direct": base["eval_direct"]["examples"][:2],
                 "examples_reason": base["eval_reason"]["examples"][:2]},
        "methods": methods,
        "lr_policy": f"one learning rate for every method ({scale['lr']:g}), no per-method tuning",
    }, 4)
    for w in warnings:
        log(f"WARNING: {w}")
    ctx.out.mkdir(parents=True, exist_ok=True)
    write_json(ctx.out / "results.json", results)
    (ctx.out / "table.md").write_text(render_table(results))
    plot_curves(methods, ctx.out / "curves.png")
    plot_modes(methods, ctx.out / "modes.png")
    plot_by_type(base_reason, methods, ctx.out / "by_type.png")
    log(f"aggregate: {len(methods)} methods over seeds {sorted(seeds)} -> results.json, table.md, "
        "curves.png, modes.png, by_type.png")
    print(render_table(results).split("\n\n## ")[0], flush=True)


def render_table(results: dict) -> str:
    sc, base, methods = results["scale"], results["base"], results["methods"]
    bd, br = base["eval_direct"], base["eval_reason"]
    one = {"n": 1, "mean": 0.0, "sd": 0.0}
    seeds = sorted({s for m in methods.values() for s in m["seeds"]})
    lines = [
        "# Method table in miniature (bench/method_table.py)", "",
        f"Scale `{sc['name']}`{' with ' + json.dumps(sc['overrides']) if sc['overrides'] else ''}: a "
        f"{base['n_params'] / 1e6:.1f}M-parameter Idefics3 trained from scratch on "
        f"{sc['shards'] * sc['train_per_shard']} synthetic charts ({sc['image_size']}px) with bare answers (no "
        f"reasoning) under the {results['base_scale'].get('base_prompt', 'direct')} prompt, then "
        f"{sc['steps']} steps x {sc['batch']} prompts x K={sc['k']}, {sc['max_new_tokens']} new tokens, "
        f"LR {sc['lr']:g} (the same for every method), seeds {seeds}. Test split: "
        f"{int(bd['n'])} held-out questions. Base: {results['env_base']['device']}, "
        f"{results['env_base']['date_utc']} UTC.", "",
        "Relaxed accuracy, format rate and grounding in %, mean ± sd over seeds; every method is evaluated "
        "with the reasoning prompt, so Δ is against the base under that prompt. Paper: ChartQA relaxed "
        "accuracy; method rows SmolVLM-500M, ablation rows LLaVA-OV-0.5B 3-domain average (full DyME 55.4).", "",
        "| method | relaxed acc | Δ vs base | format | grounding | paper | paper Δ |",
        "|---|---|---|---|---|---|---|",
    ]
    paper_delta_ref = {"sft": "base", "grpo": "base", "two_stage": "base", "dyme": "base",
                       "dyme_no_checker": "dyme_full_ablation", "dyme_no_refiner": "dyme_full_ablation"}
    for key, m in (("base_reason", br), ("base", bd)):
        paper = f"{PAPER['base']['acc']:.1f}" if key == "base_reason" else ""
        lines.append(f"| {LABELS[key]} | {m['relaxed_accuracy'] * 100:.1f} | | {m['format_rate'] * 100:.1f} | "
                     f"{m['grounding_score'] * 100:.1f} | {paper} | |")
    for method, m in methods.items():
        ev = m["eval"]
        acc = ev["relaxed_accuracy"]
        delta = {**one, "mean": acc["mean"] - br["relaxed_accuracy"], "sd": acc["sd"], "n": acc["n"]}
        p, ref = PAPER[method]["acc"], PAPER[paper_delta_ref[method]]["acc"]
        lines.append(f"| {LABELS[method]} | {_pm(acc)} | {_pm(delta)} | {_pm(ev.get('format_rate'))} | "
                     f"{_pm(ev.get('grounding_score'))} | {p:.1f} | {p - ref:+.1f} |")
    lines += ["", "## Training diagnostics", "",
              "Means over the RL steps of all seeds (two-stage: its GRPO half). zero-std = frac_reward_zero_std, "
              "the share of groups whose K rewards are all equal (advantage 0: GRPO learns nothing from them); "
              "modes follow DyME's rule from the accuracy of the K rollouts (for grpo/two_stage they are what "
              "DyME would have chosen).", "",
              "| method | train acc | zero-std | memorize | explore | skip | completion tokens | s/step | train s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for method, m in methods.items():
        t = m["train"]
        if "frac_reward_zero_std" in t:
            cols = [f"{t['reward/accuracy'] * 100:.1f}", f"{t['frac_reward_zero_std'] * 100:.0f}%",
                    f"{t['mode/memorize'] * 100:.0f}%", f"{t['mode/explore'] * 100:.0f}%",
                    f"{t['mode/skip'] * 100:.0f}%", f"{t['completion/mean_length']:.0f}"]
        else:
            cols = ["(no rollouts)"] + [""] * 5
        lines.append(f"| {LABELS[method]} | {' | '.join(cols)} | {t['step_s']['mean']:.2f} | "
                     f"{t['train_s']['mean']:.0f} |")
    qtypes = sorted(k.split("/", 1)[1] for k in bd if k.startswith("accuracy/"))
    lines += ["", "## Accuracy by question type (%)", "",
              "| method | " + " | ".join(qtypes) + " |", "|---" * (len(qtypes) + 1) + "|"]
    for key, m in (("base_reason", br), ("base", bd)):
        lines.append(f"| {LABELS[key]} | " + " | ".join(f"{m[f'accuracy/{q}'] * 100:.0f}" for q in qtypes) + " |")
    for method, m in methods.items():
        lines.append(f"| {LABELS[method]} | " + " | ".join(_pm(m["eval"].get(f"accuracy/{q}"), digits=0)
                                                          for q in qtypes) + " |")
    env = results["env_base"]
    lines += ["", f"Base trained on {env['device']} (torch {env['torch']}, transformers {env['transformers']}, "
              f"{env['date_utc']} UTC) by `{env['command']}`; runs on: {'; '.join(results['run_devices'])}.",
              *(f"WARNING: {w}" for w in results["warnings"]), ""]
    return "\n".join(lines)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(methods: dict, path: Path) -> None:
    plt = _plt()
    panels = [("reward/accuracy", "accuracy reward"), ("reward/total", "total reward"),
              ("reward/format", "format reward"), ("reward/thinking", "thinking (checker) reward"),
              ("frac_reward_zero_std", "advantage collapse (frac_reward_zero_std)"),
              ("loss/nll_memorized", "NLL of memorised targets")]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for ax, (key, title) in zip(axes.flat, panels, strict=True):
        for method, m in methods.items():
            ys = m["curves"].get(key, [])
            pts = [(i + 1, y) for i, y in enumerate(ys) if y is not None and (key != "loss/nll_memorized" or y > 0)]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker=".", label=LABELS[method], color=COLORS[method])
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
    handles = {h.get_label(): h for ax in axes.flat for h in ax.get_lines()}
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncols=len(handles), fontsize=8)
    fig.suptitle("Training curves, mean over seeds (SFT steps have no rollouts)")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=90, metadata={"Software": None})
    plt.close(fig)


def plot_modes(methods: dict, path: Path) -> None:
    plt = _plt()
    shown = [m for m in RL_METHODS if m in methods]
    fig, axes = plt.subplots(1, max(1, len(shown)), figsize=(3.3 * max(1, len(shown)), 3.2), squeeze=False)
    for ax, method in zip(axes[0], shown, strict=False):
        c = methods[method]["curves"]
        steps = [i + 1 for i, y in enumerate(c["mode/memorize"]) if y is not None]
        stack = [[c[f"mode/{k}"][s - 1] for s in steps] for k in ("memorize", "explore", "skip")]
        if steps:
            ax.stackplot(steps, *stack, labels=["memorize (c=0)", "explore", "skip (c=K)"],
                         colors=["#dd8452", "#4c72b0", "#55a868"])
        ax.set_ylim(0, 1)
        ax.set_title(LABELS[method], fontsize=9)
        ax.set_xlabel("step")
    axes[0][0].set_ylabel("fraction of prompt groups")
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=90, metadata={"Software": None})
    plt.close(fig)


def plot_by_type(base_reason: dict, methods: dict, path: Path) -> None:
    plt = _plt()
    qtypes = sorted(k.split("/", 1)[1] for k in base_reason if k.startswith("accuracy/"))
    series = [("base_reason", [base_reason[f"accuracy/{q}"] for q in qtypes])]
    for method, m in methods.items():
        series.append((method, [m["eval"][f"accuracy/{q}"]["mean"] if f"accuracy/{q}" in m["eval"] else 0.0
                                for q in qtypes]))
    fig, ax = plt.subplots(figsize=(11, 3.8))
    width = 0.8 / len(series)
    for i, (name, ys) in enumerate(series):
        ax.bar([x + (i - (len(series) - 1) / 2) * width for x in range(len(qtypes))], ys, width, label=LABELS[name],
               color=COLORS[name])
    ax.set_xticks(range(len(qtypes)), qtypes, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("relaxed accuracy (test)")
    ax.legend(fontsize=7, ncols=4)
    fig.tight_layout()
    fig.savefig(path, dpi=90, metadata={"Software": None})
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- main
def parse_set(items: list[str]) -> dict[str, Any]:
    """`FIELD=VALUE` overrides of Scale fields, typed like the field."""
    types = {f.name: str(f.type) for f in dataclasses.fields(Scale)}
    parse = {"int": int, "float": float, "str": str, "bool": lambda v: {"true": True, "false": False}[v.lower()]}
    out: dict[str, Any] = {}
    for item in items:
        key, _, raw = item.partition("=")
        if key not in types or not raw:
            raise SystemExit(f"--set {item!r}: expected FIELD=VALUE, FIELD one of {', '.join(types)}")
        try:
            out[key] = parse[types[key]](raw)
        except (KeyError, ValueError):
            raise SystemExit(f"--set {item!r}: not a {types[key]}") from None
    if out.get("base_prompt", "reason") not in ("reason", "direct"):
        raise SystemExit("--set base_prompt: reason | direct")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pieces", nargs="+", help="base | runs-seed<N> | aggregate | all (base, seeds 0 and 1, "
                                                  "aggregate), run in the order given.")
    parser.add_argument("--scale", default="full", choices=sorted(SCALES), help="Experiment size.")
    parser.add_argument("--set", dest="sets", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="Override a Scale field (e.g. steps=24 lr=1e-4); recorded in the results.")
    parser.add_argument("--methods", type=lambda v: [m for m in v.split(",") if m], default=[],
                        help=f"Comma list of the methods to train (default all: {','.join(RUN_ORDER)}).")
    parser.add_argument("--out", required=True, help="Result files (<= 8 per GPU call come back).")
    parser.add_argument("--from", dest="from_dirs", nargs="*", default=[],
                        help="Folders holding earlier pieces' result files (read only).")
    parser.add_argument("--work", default="", help="Scratch: data, runs (default /tmp/dyme-method-table-<scale>).")
    parser.add_argument("--deadline-s", type=float, default=0.0,
                        help="Seconds this call may use; stop cleanly (exit 3) before a step that would overrun.")
    args = parser.parse_args(argv)
    if unknown := sorted(set(args.methods) - set(METHODS)):
        parser.error(f"unknown methods {unknown}; choose from {', '.join(RUN_ORDER)}")
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    overrides = parse_set(args.sets)
    scale = dataclasses.replace(SCALES[args.scale], **overrides)
    ctx = Context(args, scale, args.scale, overrides)
    pieces = [p for piece in args.pieces
              for p in (["base", "runs-seed0", "runs-seed1", "aggregate"] if piece == "all" else [piece])]
    for p in pieces:
        if p not in ("base", "aggregate") and not (p.startswith("runs-seed") and p[9:].isdigit()):
            parser.error(f"unknown piece {p!r}")
    if any(p != "aggregate" for p in pieces):
        import torch
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        torch.backends.cuda.matmul.allow_tf32 = True
        log(f"scale {args.scale} {overrides or ''}; work {ctx.work}; out {ctx.out}; {environment()['device']}")
    t0 = time.perf_counter()
    try:
        for p in pieces:
            t_piece = time.perf_counter()
            if p == "base":
                piece_base(ctx)
            elif p == "aggregate":
                piece_aggregate(ctx)
            else:
                piece_runs(ctx, int(p[9:]))
            log(f"piece {p}: {time.perf_counter() - t_piece:.0f}s")
    except Incomplete as e:
        log(f"INCOMPLETE: {e}; rerun the same command (with this call's files carried) to resume")
        return EXIT_INCOMPLETE
    finally:
        imported = sorted(m for m in FORBIDDEN_MODULES if m in sys.modules)
        log(f"total {time.perf_counter() - t0:.0f}s; modules outside the GPU stack imported: {imported or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
