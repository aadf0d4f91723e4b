"""Step throughput: DyME's trainer against plain `trl.GRPOTrainer` on the same work.

One process builds a random Idefics3 model of `--shape` (bench/common.py) and a synthetic chart set
(dyme_core.data.synth), then steps these trainers on the same device, alternating step by step:

  trl-default   trl.GRPOTrainer with its defaults: HF generate with the dynamic cache, gradient
                checkpointing, loss "dapo", every row forwarded and back-propagated.
  trl-same-gen  trl.GRPOTrainer given DyME's generation settings (static KV cache, compiled decode step,
                the same cache-length rounding; TRL hard-codes `disable_compile=True` in its
                GenerationConfig, so the bench flips it back; on GPU the same attention kernels, i.e. no
                cuDNN attention) and DyME's update settings (no gradient checkpointing, loss "grpo"). Its
                update runs eagerly (TRL's `torch_compile` would compile generation too; not used).
  dyme, grpo    dyme_core.trainer.DymeTrainer with method dyme / grpo (one instance, method switched per step),
                update eager by default; --compile-update on: train.compile_update, the regional compile of one
                decoder layer (its one-time compile is reported apart; the whole-model compile it replaced took
                about 200 s cold on an H200); --compile-cache-dir: torch's compile artifacts kept across runs.
  dyme-full     DyME as a user runs it: MEMORIZE groups memorise the online rule refiner's traces, the rule visual
                checker scores the thinking, and the format and thinking rewards are computed from the completions'
                text (DymeTrainer._score); only the accuracy stays the controlled one below, so the mode mix is
                that of the other trainers, and the total is recombined with train.reward_weights.
  dyme-switch   mode switching alone: MEMORIZE groups memorise the raw hint (train.use_refiner=false), no checker,
                constant format and thinking rewards. dyme-full / dyme-switch (`x_full_vs_switch`) is what the
                refiner, the checker and the text rewards add to a step (target <= 1.15).
  All DyME trainers are one DymeTrainer whose method, MEMORIZE target, checker and scoring are set before every
  step (`DYME_VARIANTS`), so no step inherits the settings of the one before.

Equal in all: the weights (loaded by dyme_core.models.load_model: bf16 weights on a GPU; TRL adds bf16
autocast, DyME needs none for bf16 weights; vision tower frozen), prompts and images, K, prompts per step,
exactly --new-tokens completion tokens (eos and the image/special tokens are suppressed in both), rows per
forward/backward (--micro-batch), one optimizer step per generation batch, and the rewards. The reward depends
only on (group position in the batch, completion index) so that a chosen fraction of groups is all-wrong
(DyME: MEMORIZE), all-right (SKIP) or mixed (EXPLORE, half the completions right) -- `--mix`: explore | skip75
| memorize75 | mixed.

Alternation without threads (CUDA-graph trees assert in Python threads before torch 2.12,
pytorch#123177): TRL's own `train()` loop is the outer loop, and a callback at every TRL `on_step_end`
runs one DyME step and one GRPO step before TRL continues. The two TRL configurations run one after the
other, each interleaved with DyME; a ratio compares a TRL configuration with the DyME steps of its own
phase. Warm-up steps (compilation included; reported apart as `first_step_s`) are not timed.

Timing (CUDA synchronised at every boundary): step = wall time of one optimizer step. DyME's phases are
its own metrics (time/generation_s, time/reward_s, time/update_s); TRL's come from a GRPOTrainer subclass
that times `_generate_single_turn` (generation), `_calculate_rewards` (reward) and `training_step` minus
`_prepare_inputs` plus the optimizer step (update). "other" = step - generation - reward - update: image
preprocessing, prompt building, decoding, data loading, logging. Peak memory = resident memory of that
trainer (its weights, optimizer state) + the peak allocated above the resident level during the step.

Decode: ms per decode step = generation seconds / new tokens (prefill and vision tower included: an upper
bound), beside the decode step's memory-bandwidth floor (decode_floor: weights + KV cache bytes / bandwidth).
The result files are rewritten after every timed round, so a run killed at its limit keeps what it measured.

MFU of DyME's update: 6 * trainable parameters * tokens fed through the update (prompt + completion of
every kept row, padding excluded) / update seconds / peak bf16 FLOP/s measured with an 8192^3 bf16 matmul
in the same run. It leaves out attention-score FLOPs, the frozen vision tower's forward (once per batch
image) and counts the LM head over prompt positions it skips (logits_to_keep): an estimate.

Run (CPU smoke):  python bench/throughput.py --device cpu --shape tiny --steps 1 --warmup 1 --new-tokens 16
Run (GPU plan):   bash bench/gpu_throughput.sh   (writes to $OUT)
Two GPUs (DyME):  torchrun --standalone --nproc_per_node=2 bench/throughput.py --trl off --trainers dyme \
                    --mix explore --label ddp2 --ddp-baseline OUT/throughput-ddp1.json --out OUT
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `bench` and `dyme_core`

from bench.common import SHAPES, build_model, count_params  # noqa: E402
from dyme_core.checker import VisualChecker  # noqa: E402
from dyme_core.config import Config, DataConfig, ModelConfig, SynthConfig, load_config  # noqa: E402
from dyme_core.data.loaders import Dataset, load_dataset  # noqa: E402
from dyme_core.data.schema import Sample  # noqa: E402
from dyme_core.data.synth import synthesize  # noqa: E402
from dyme_core.models import GPU_ATTENTION, attention_kernels, build_prompt, load_model, user_text  # noqa: E402
from dyme_core.refiner import rule_refine  # noqa: E402
from dyme_core.trainer import Batch, DymeTrainer, Row  # noqa: E402

# (all-wrong, all-right, mixed) fractions of the prompt groups of every batch
MIXES = {"explore": (0.0, 0.0, 1.0), "skip75": (0.0, 0.75, 0.25), "memorize75": (0.75, 0.0, 0.25),
         "mixed": (1 / 3, 1 / 3, 1 / 3)}
TRAINERS = ("trl-default", "trl-same-gen", "dyme", "grpo", "dyme-full", "dyme-switch")
DEFAULT_TRAINERS = ("trl-default", "trl-same-gen", "dyme", "grpo")  # the trainers of BENCHMARKS.md's tables
DYME_DECODES = ("hf-static", "captured", "captured-compiled", "eager")  # --dyme-decode
PHASES = ("generation_s", "reward_s", "update_s", "other_s")


# ------------------------------------------------------------------------------------------ rewards
class MixState:
    """The mix the next step is scored with (shared by the DyME and TRL reward functions)."""

    mix = "explore"


def group_kinds(mix: str, n_groups: int) -> list[str]:
    """Kind of each group position in a batch: 'wrong' | 'right' | 'mixed', fractions from MIXES[mix]."""
    f_wrong, f_right, _ = MIXES[mix]
    n_wrong = round(f_wrong * n_groups)
    n_right = min(n_groups - n_wrong, round(f_right * n_groups))
    return ["wrong"] * n_wrong + ["right"] * n_right + ["mixed"] * (n_groups - n_wrong - n_right)


def mix_accuracy(mix: str, n_groups: int, k: int) -> list[float]:
    """Accuracy of completion j of group g (group-major, n_groups * k): deterministic, text-independent."""
    out = []
    for kind in group_kinds(mix, n_groups):
        out += [0.0 if kind == "wrong" else 1.0 if kind == "right" else float(j % 2 == 0) for j in range(k)]
    return out


@dataclass(frozen=True)
class DymeVariant:
    """What one DyME trainer of the bench sets before each of its steps."""

    method: str  # train.method: dyme | grpo
    use_refiner: bool  # MEMORIZE target: the online rule refiner's trace (True) or the raw hint
    checker: str  # visual checker backend scoring the thinking: rule | none
    text_rewards: bool  # format and thinking computed from the completions' text (else constant 1 and 0)


DYME_VARIANTS = {
    "dyme": DymeVariant("dyme", use_refiner=True, checker="none", text_rewards=False),
    "grpo": DymeVariant("grpo", use_refiner=True, checker="none", text_rewards=False),
    "dyme-full": DymeVariant("dyme", use_refiner=True, checker="rule", text_rewards=True),
    "dyme-switch": DymeVariant("dyme", use_refiner=False, checker="none", text_rewards=False),
}


class BenchDymeTrainer(DymeTrainer):
    """DymeTrainer scored by the controlled mix, eos suppressed (every completion has max_new_tokens),
    counting the tokens its update forwards with grad (for MFU).

    The accuracy is always the controlled `mix_accuracy`. With `text_rewards` the other rewards are the trainer's
    own (`DymeTrainer._score`: format from the text, thinking from the visual checker) and the total is recombined
    by `DymeTrainer._total`; without, format is 1, thinking 0 and the total the accuracy."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.suppress = sorted(set(self.suppress) | {self.eos_id})
        self.update_tokens = 0
        self.text_rewards = False

    def _score(self, samples: list[Sample], texts: list[str]) -> dict[str, torch.Tensor]:
        k = self.t.num_generations
        acc = torch.tensor(mix_accuracy(MixState.mix, len(samples), k)).view(-1, k)
        if not self.text_rewards:
            return {"format": torch.ones_like(acc), "accuracy": acc, "thinking": torch.zeros_like(acc),
                    "total": acc.clone()}
        out = super()._score(samples, texts)
        out["accuracy"] = acc
        out["total"] = self._total(out)
        return out

    def _token_logps(self, model: torch.nn.Module, batch: Batch, rows: list[Row]) -> tuple[torch.Tensor, torch.Tensor]:
        if model.training and torch.is_grad_enabled():
            self.update_tokens += sum(len(batch.prompt_ids[r.prompt]) + len(r.completion) for r in rows)
        return super()._token_logps(model, batch, rows)


# ------------------------------------------------------------------------------------------ device helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mem_allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def mem_peak(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # CPU: process max RSS


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_peak_bf16(device: torch.device, n: int = 8192, iters: int = 30) -> float:
    """Achieved bf16 matmul FLOP/s of this card: an n x n x n matmul repeated."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync(device)
    flops = 2 * n**3 * iters / (time.perf_counter() - t0)
    del a, b
    free_memory(device)
    return flops


# ------------------------------------------------------------------------------------------ data and model
@dataclass
class Work:
    data_dir: Path
    model_dir: Path
    dataset: Dataset


def prepare_work(args: argparse.Namespace, device: torch.device, rank: int) -> Work:
    """Synthetic charts at the shape's image size and the random model; built once, reused by later runs."""
    shape = SHAPES[args.shape]
    work = Path(args.work)
    data_dir = work / f"data-{shape.image}px-{args.samples}-s{args.seed}"
    model_dir = work / f"model-{args.shape}-s{args.seed}"
    if rank == 0:
        if not (data_dir / ".done").is_file():
            synthesize(SynthConfig(out_dir=str(data_dir), seed=args.seed, n_train=args.samples, n_val=0, n_test=0,
                                   image_size=shape.image))
            (data_dir / ".done").write_text("ok")
        dataset = load_dataset(DataConfig(path=str(data_dir)))
        if not (model_dir / ".done").is_file():
            texts = [t for s in dataset.samples for t in (s.question, s.answer, s.hint or "", rule_refine(s))]
            build_model(args.shape, model_dir, texts, seed=args.seed, device=device,
                        dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
            (model_dir / ".done").write_text("ok")
    if dist.is_initialized():
        dist.barrier()
    return Work(data_dir, model_dir, load_dataset(DataConfig(path=str(data_dir))))


def dyme_config(args: argparse.Namespace, work: Work) -> Config:
    """The DyME trainers' configuration: the bench's work, sizes and --dyme-decode / --compile-update settings."""
    k, b, n = args.k, args.prompts, args.new_tokens
    return load_config(None, [
        f"data.path={work.data_dir}", f"model.name_or_path={work.model_dir}",
        f"train.output_dir={Path(args.work) / 'run-dyme'}", "train.refined=", "train.method=dyme",
        f"train.batch_size={b}", f"train.num_generations={k}", f"train.max_new_tokens={n}",
        f"train.max_target_tokens={n}", f"train.micro_batch_size={args.micro_batch or b * k}",
        f"train.static_cache={args.dyme_decode == 'hf-static'}", f"train.compile_update={args.compile_update == 'on'}",
        f"train.cuda_graph_decode={args.dyme_decode != 'eager'}",
        f"train.compile_decode={args.dyme_decode == 'captured-compiled'}",
        "train.max_steps=1000000", "train.report_to=none",
        "train.progress_bar=false", "train.checker=none", f"train.seed={args.seed}",
        # torch's compile artifacts kept across processes (dyme_core/regional.py); absent: torch's temp cache only
        *([f"train.compile_cache_dir={args.compile_cache_dir}"] if getattr(args, "compile_cache_dir", "") else []),
    ])


def dyme_trainer(args: argparse.Namespace, work: Work, device: torch.device) -> BenchDymeTrainer:
    return BenchDymeTrainer(dyme_config(args, work), work.dataset, device=device)


# ------------------------------------------------------------------------------------------ DyME steps
def dyme_variants(trainers: list[str]) -> list[str]:
    """The DyME trainers among `trainers`, in the order a round steps them."""
    return [t for t in DYME_VARIANTS if t in trainers]


class DymeRunner:
    """Steps one BenchDymeTrainer as any of DYME_VARIANTS and returns one record per step."""

    def __init__(self, args: argparse.Namespace, work: Work, device: torch.device):
        self.device = device
        before = mem_allocated(device)
        self.trainer = dyme_trainer(args, work, device)
        self.checkers = {name: VisualChecker(name) for name in ("rule", "none")}
        self.params = count_params(self.trainer.model)
        self.world = self.trainer.world
        self.warmup_s: list[float] = []
        # warm-up as 'dyme' whenever dyme or grpo is measured (as the earlier tables were); else each variant in turn
        variants = dyme_variants(args.trainers)
        warm = ["dyme"] if {"dyme", "grpo"} & set(variants) else variants
        for i in range(args.warmup):
            self.warmup_s.append(self.step(warm[i % len(warm)], args.mix[0])["step_s"])
        self.resident = mem_allocated(device) - before

    def step(self, trainer: str, mix: str) -> dict[str, Any]:
        tr = self.trainer
        v = DYME_VARIANTS[trainer]  # every setting a variant differs in, set before each step
        tr.t.method, tr.t.use_refiner, tr.text_rewards = v.method, v.use_refiner, v.text_rewards
        tr.checker = self.checkers[v.checker]
        MixState.mix = mix
        tr.update_tokens = 0
        sync(self.device)
        alloc0 = mem_allocated(self.device)
        reset_peak(self.device)
        t0 = time.perf_counter()
        m = tr.train_step()
        sync(self.device)
        step_s = time.perf_counter() - t0
        rec = {"trainer": trainer, "mix": mix, "step_s": step_s, "generation_s": m["time/generation_s"],
               "reward_s": m["time/reward_s"], "update_s": m["time/update_s"],
               "samples": tr.t.batch_size * tr.t.num_generations * self.world, "gen_tokens": m["tokens"],
               "update_tokens": tr.update_tokens, "rows_kept": m["rows/kept"], "rows_total": m["rows/total"],
               "completion_len": m["completion/mean_length"], "transient_bytes": mem_peak(self.device) - alloc0,
               "k": tr.t.num_generations, "prompts": tr.t.batch_size, "new_tokens": tr.t.max_new_tokens,
               "modes": {mode: m[f"mode/{mode}"] for mode in ("memorize", "explore", "skip")},
               "rewards": {key.removeprefix("reward/"): x for key, x in m.items() if key.startswith("reward/")}}
        rec["other_s"] = step_s - rec["generation_s"] - rec["reward_s"] - rec["update_s"]
        return rec


# ------------------------------------------------------------------------------------------ TRL side
def trl_trainer(kind: str, args: argparse.Namespace, work: Work, device: torch.device, suppress: list[int],
                max_cache_len: int, callback: TrainerCallback) -> Any:
    """A plain GRPOTrainer (phases timed by a thin subclass) on the same model, data and rewards."""
    import datasets
    from trl import GRPOConfig, GRPOTrainer

    class TimedGRPOTrainer(GRPOTrainer):
        """GRPOTrainer whose generation, reward and training-step calls are timed (CUDA synchronised)."""

        def __init__(self, *a: Any, **kw: Any):
            self.bench: dict[str, float] = {}
            super().__init__(*a, **kw)

        def _timed(self, name: str, fn: Any, *a: Any, **kw: Any) -> Any:
            # trl-same-gen gets DyME's attention kernels too (no cuDNN attention on GPU)
            sync(device)
            t0 = time.perf_counter()
            with attention_kernels(GPU_ATTENTION if same_kernels else None):
                out = fn(*a, **kw)
            sync(device)
            t1 = time.perf_counter()
            self.bench[name] = self.bench.get(name, 0.0) + t1 - t0
            self.bench["end_" + name] = t1
            return out

        def _generate_single_turn(self, *a: Any, **kw: Any) -> Any:
            completion_ids, logprobs = self._timed("generation_s", super()._generate_single_turn, *a, **kw)
            self.bench["gen_tokens"] = self.bench.get("gen_tokens", 0) + sum(len(c) for c in completion_ids)
            return completion_ids, logprobs

        def _calculate_rewards(self, *a: Any, **kw: Any) -> Any:
            return self._timed("reward_s", super()._calculate_rewards, *a, **kw)

        def _prepare_inputs(self, *a: Any, **kw: Any) -> Any:
            return self._timed("prepare_inputs_s", super()._prepare_inputs, *a, **kw)

        def training_step(self, *a: Any, **kw: Any) -> Any:
            return self._timed("training_step_s", super().training_step, *a, **kw)

    same_kernels = kind == "trl-same-gen" and device.type == "cuda"
    k, b, n = args.k, args.prompts, args.new_tokens
    micro = args.micro_batch or b * k
    if (b * k) % micro:
        raise ValueError(f"--micro-batch {micro} must divide prompts*k = {b * k}")

    def controlled_accuracy(completions: list, row: list[int], **kwargs: Any) -> list[float]:
        if len(row) % k or any(row[i] != row[i - i % k] for i in range(len(row))):
            raise RuntimeError("TRL did not lay out each prompt's K completions consecutively")
        return mix_accuracy(MixState.mix, len(row) // k, k)

    samples = work.dataset.split("train")
    rows = {
        "prompt": [[{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                     "text": user_text(s.question, "reason")}]}]
                   for s in samples],
        "image": [work.dataset.load_image(s) for s in samples],
        "row": list(range(len(samples))),
    }
    gen_kwargs: dict[str, Any] = {"suppress_tokens": suppress}
    extra: dict[str, Any] = {}
    if kind == "trl-same-gen":
        gen_kwargs["max_cache_len"] = max_cache_len
        # DyME samples with train.top_k (default 0: off, as TRL and the official code)
        extra = {"cache_implementation": "static" if args.static_cache == "on" else None, "top_k": 0,
                 "gradient_checkpointing": False, "loss_type": "grpo", "learning_rate": 8e-5, "weight_decay": 0.01}
    cfg = GRPOConfig(
        output_dir=str(Path(args.work) / f"run-{kind}"), max_steps=args.trl_steps, per_device_train_batch_size=micro,
        gradient_accumulation_steps=b * k // micro, num_generations=k, max_completion_length=n, temperature=1.0,
        generation_kwargs=gen_kwargs, bf16=device.type == "cuda", use_cpu=device.type == "cpu", report_to="none",
        save_strategy="no", disable_tqdm=True, seed=args.seed, **extra,
    )
    model = load_model(ModelConfig(name_or_path=str(work.model_dir)), device)
    trainer = TimedGRPOTrainer(model=model, reward_funcs=[controlled_accuracy], args=cfg,
                               train_dataset=datasets.Dataset.from_dict(rows),
                               processing_class=dyme_processor(work), callbacks=[callback])
    if kind == "trl-same-gen":
        trainer.generation_config.disable_compile = False  # HF's compiled decode with the static cache, as DyME
    return trainer


def dyme_processor(work: Work) -> Any:
    from dyme_core.models import load_processor

    return load_processor(ModelConfig(name_or_path=str(work.model_dir)))


class Interleave(TrainerCallback):
    """TRL's loop drives; at each TRL step end: time it, then run the DyME steps of that round."""

    def __init__(self, kind: str, args: argparse.Namespace, device: torch.device, dyme: DymeRunner | None,
                 deadline: float, records: list[dict], flush: Any = None):
        self.kind, self.args, self.device, self.dyme = kind, args, device, dyme
        self.deadline, self.records = deadline, records
        self.flush = flush  # rewrites the result files: a run killed at its limit keeps every measured step
        self.schedule = [args.mix[0]] * args.warmup + [m for m in args.mix for _ in range(args.steps)]
        self.trainer: Any = None
        self.i = 0
        self.warmup_s: list[float] = []
        self.resident = 0
        self.truncated = False
        self.round_s = 0.0

    def _resume(self) -> None:
        self.trainer.bench.clear()
        if self.i < len(self.schedule):
            MixState.mix = self.schedule[self.i]
        sync(self.device)
        self.alloc0 = mem_allocated(self.device)
        reset_peak(self.device)
        self.t0 = time.perf_counter()

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._resume()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        sync(self.device)
        t_end = time.perf_counter()
        bench = self.trainer.bench
        step_s = t_end - self.t0
        mix = self.schedule[self.i]
        if self.i < self.args.warmup:
            self.warmup_s.append(step_s)
            if self.i == self.args.warmup - 1:
                self.resident = mem_allocated(self.device) - self.resident_base
        else:
            update = bench.get("training_step_s", 0.0) - bench.get("prepare_inputs_s", 0.0)
            update += t_end - bench.get("end_training_step_s", t_end)  # clip + optimizer step + zero_grad
            k, b = self.args.k, self.args.prompts
            rec = {"trainer": self.kind, "mix": mix, "step_s": step_s, "generation_s": bench.get("generation_s", 0.0),
                   "reward_s": bench.get("reward_s", 0.0), "update_s": update, "samples": b * k,
                   "gen_tokens": float(bench.get("gen_tokens", 0.0)), "rows_kept": b * k, "rows_total": b * k,
                   "transient_bytes": mem_peak(self.device) - self.alloc0, "phase": self.kind,
                   "k": k, "prompts": b, "new_tokens": self.args.new_tokens}
            rec["other_s"] = step_s - rec["generation_s"] - rec["reward_s"] - rec["update_s"]
            self.records.append(rec)
            t_round = time.perf_counter()
            if self.dyme is not None:
                for trainer in dyme_variants(self.args.trainers):
                    r = self.dyme.step(trainer, mix)
                    r["phase"] = self.kind
                    self.records.append(r)
            self.round_s = step_s + time.perf_counter() - t_round
            if self.flush is not None:  # outside the timed windows: _resume() restarts the clock below
                self.flush()
        self.i += 1
        if self.i >= len(self.schedule):
            control.should_training_stop = True
        elif time.perf_counter() + 1.5 * max(self.round_s, step_s) > self.deadline:
            self.truncated = True
            control.should_training_stop = True
        self._resume()


def run_trl_phase(kind: str, args: argparse.Namespace, work: Work, device: torch.device, dyme: DymeRunner | None,
                  deadline: float, records: list[dict], meta: dict, flush: Any = None) -> None:
    suppress = dyme.trainer.suppress if dyme is not None else _suppress_list(args, work, device)
    max_cache_len = meta["max_cache_len"]
    cb = Interleave(kind, args, device, dyme, deadline, records)
    free_memory(device)
    cb.resident_base = mem_allocated(device)
    trainer = trl_trainer(kind, args, work, device, suppress, max_cache_len, cb)
    cb.trainer = trainer
    if flush is not None:
        n_params = count_params(trainer.model)

        def flush_phase(c: Interleave = cb) -> None:  # the phase so far, marked unfinished, then the files
            meta["trainers"][kind] = {"warmup_s": c.warmup_s, "resident_bytes": c.resident, "truncated": True,
                                      "in_progress": True, "params": n_params}
            flush()

        cb.flush = flush_phase
    t0 = time.perf_counter()
    trainer.train()
    meta["trainers"][kind] = {"warmup_s": cb.warmup_s, "resident_bytes": cb.resident, "truncated": cb.truncated,
                              "wall_s": time.perf_counter() - t0, "params": count_params(trainer.model)}
    del trainer, cb
    free_memory(device)


def _suppress_list(args: argparse.Namespace, work: Work, device: torch.device) -> list[int]:
    from dyme_core.models import suppressed_token_ids

    proc = dyme_processor(work)
    model = load_model(ModelConfig(name_or_path=str(work.model_dir)), "cpu")
    return sorted(set(suppressed_token_ids(model, proc)) | {proc.tokenizer.eos_token_id})


def max_prompt_len(work: Work, args: argparse.Namespace) -> int:
    """Longest prompt (image tokens included) of the dataset, for the static cache length of trl-same-gen."""
    from dyme_core.models import load_processor

    proc = load_processor(ModelConfig(name_or_path=str(work.model_dir)))
    samples = work.dataset.split("train")
    longest = 0
    for lo in range(0, len(samples), 16):
        chunk = samples[lo: lo + 16]
        enc = proc(text=[build_prompt(proc, s.question, "reason") for s in chunk],
                   images=[[work.dataset.load_image(s)] for s in chunk], return_tensors="pt", padding=True)
        longest = max(longest, int(enc["attention_mask"].sum(1).max()))
    return longest


# ------------------------------------------------------------------------------------------ summaries
def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def decode_floor(model: torch.nn.Module, rows: int, prompt_len: int, new_tokens: int, max_cache_len: int,
                 bandwidth: float) -> dict[str, Any]:
    """Memory-bandwidth floor of one decode step: the bytes it must read / the card's bandwidth.

    A decode step reads every weight of the text decoder and the LM head once (the vision tower and connector do
    not run; of the input embedding only `rows` rows are read) and the KV cache of every row. The floor takes the
    cache at the mean length over the decode steps (the left-padded prompt + new_tokens / 2); `floor_static_ms`
    takes the whole static cache (max_cache_len), which attention over a static cache reads with a mask.
    """
    skip = ("vision", "visual", "connector", "multi_modal_projector")
    emb_in, emb_out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                       if not any(k in n for k in skip) and p is not emb_in)
    if emb_out is emb_in:  # tied head: named_parameters lists it once, as the input embedding skipped above
        weight_bytes += emb_out.numel() * emb_out.element_size()
    weight_bytes += rows * emb_in.shape[1] * emb_in.element_size()
    tc = getattr(model.config, "text_config", model.config)
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    kv_heads = getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads
    kv_per_pos = 2 * tc.num_hidden_layers * kv_heads * head_dim * emb_in.element_size() * rows  # K and V, all rows
    mean_len = prompt_len + new_tokens / 2
    return {"bandwidth_tb_s": bandwidth / 1e12, "rows": rows, "weight_bytes": weight_bytes,
            "kv_bytes_per_position": kv_per_pos, "mean_cache_len": mean_len, "max_cache_len": max_cache_len,
            "kv_bytes_mean": kv_per_pos * mean_len, "kv_bytes_static": kv_per_pos * max_cache_len,
            "floor_ms": (weight_bytes + kv_per_pos * mean_len) / bandwidth * 1e3,
            "floor_static_ms": (weight_bytes + kv_per_pos * max_cache_len) / bandwidth * 1e3}


def summarize(records: list[dict], args: argparse.Namespace, meta: dict, peak_flops: float | None) -> list[dict]:
    """One row per (mix, trainer): medians over timed steps, rates, memory, ratios, MFU."""
    rows = []
    residents = {k: v["resident_bytes"] for k, v in meta["trainers"].items()}
    for mix in args.mix:
        for name in args.trainers:
            recs = [r for r in records if r["mix"] == mix and r["trainer"] == name]
            if not recs:
                continue
            step = median([r["step_s"] for r in recs])
            row = {"mix": mix, "trainer": name, "n_steps": len(recs), "step_s": step,
                   **{p: median([r[p] for r in recs]) for p in PHASES},
                   "samples_per_s": median([r["samples"] / r["step_s"] for r in recs]),
                   "gen_tokens_per_s": median([r["gen_tokens"] / r["step_s"] for r in recs]),
                   "rows_kept": median([r["rows_kept"] for r in recs]),
                   # generation seconds / new tokens: prefill and the vision tower included, so an upper bound
                   "decode_ms": median([r["generation_s"] / r["new_tokens"] * 1e3 for r in recs]),
                   "peak_gb": (residents.get(name, residents.get("dyme", 0))
                               + max(r["transient_bytes"] for r in recs)) / 1e9}
            if name in DYME_VARIANTS:
                tokens = median([r["update_tokens"] for r in recs])
                n_train = meta["trainers"]["dyme"]["params"]["trainable"]
                row["update_tokens"] = tokens
                if peak_flops:
                    row["update_mfu"] = 6 * n_train * tokens / row["update_s"] / peak_flops
                for trl in ("trl-default", "trl-same-gen"):
                    base = [r for r in records if r["mix"] == mix and r["trainer"] == trl]
                    mine = [r for r in recs if r.get("phase") == trl] or recs
                    if base:
                        row[f"x_step_vs_{trl}"] = median([r["step_s"] for r in base]) / median(
                            [r["step_s"] for r in mine])
                        row[f"x_update_vs_{trl}"] = median([r["update_s"] for r in base]) / median(
                            [r["update_s"] for r in mine])
            if name == "dyme-full":  # what the refiner, the checker and the text rewards add to a step
                switch = [r["step_s"] for r in records if r["mix"] == mix and r["trainer"] == "dyme-switch"]
                if switch:
                    row["x_full_vs_switch"] = step / median(switch)
            rows.append(row)
    return rows


def targets(rows: list[dict], floor: dict | None = None) -> list[str]:
    """The speed targets of the performance issue, checked on the measured rows."""
    out = []
    for r in rows:
        if r["trainer"] != "dyme":
            continue
        if "x_step_vs_trl-default" in r:
            out.append(f"{r['mix']}: dyme step {r['x_step_vs_trl-default']:.2f}x trl-default (target >= 10): "
                       f"{'PASS' if r['x_step_vs_trl-default'] >= 10 else 'FAIL'}")
        if "x_step_vs_trl-same-gen" in r:
            out.append(f"{r['mix']}: dyme step {r['x_step_vs_trl-same-gen']:.2f}x trl-same-gen (target >= 5): "
                       f"{'PASS' if r['x_step_vs_trl-same-gen'] >= 5 else 'FAIL'}")
    for r in rows:
        if "x_full_vs_switch" in r:
            x = r["x_full_vs_switch"]
            out.append(f"{r['mix']}: dyme-full step {x:.3f}x dyme-switch's (target <= 1.15): "
                       f"{'PASS' if x <= 1.15 else 'FAIL'}")
    explore = {r["trainer"]: r for r in rows if r["mix"] == "explore"}
    for r in rows:
        if r["mix"] == "skip75" and r["trainer"] in ("dyme", "grpo"):
            if "x_update_vs_trl-same-gen" in r:
                x = r["x_update_vs_trl-same-gen"]
                out.append(f"skip75: {r['trainer']} update {x:.2f}x trl-same-gen's (target >= 3): "
                           f"{'PASS' if x >= 3 else 'FAIL'}")
            if r["trainer"] in explore:
                x = explore[r["trainer"]]["update_s"] / r["update_s"]
                out.append(f"skip75: {r['trainer']} update {x:.2f}x its own explore update (75% rows dropped)")
    if "dyme" in explore:
        ms = explore["dyme"]["decode_ms"]
        line = f"explore: dyme {ms:.2f} ms a decode step (generation s / new tokens; target <= 2): " \
               f"{'PASS' if ms <= 2 else 'FAIL'}"
        if floor:
            line += f"; bandwidth floor {floor['floor_ms']:.3f} ms at {floor['bandwidth_tb_s']:.1f} TB/s " \
                    f"({ms / floor['floor_ms']:.0f}x the floor)"
        out.append(line)
    return out


def fmt(v: Any, nd: int = 3) -> str:
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.{nd}f}"
    return str(v)


def markdown(rows: list[dict], meta: dict) -> str:
    cols = [("mix", "mix"), ("trainer", "trainer"), ("step_s", "step s"), ("samples_per_s", "samples/s"),
            ("gen_tokens_per_s", "gen tok/s"), ("generation_s", "gen s"), ("reward_s", "reward s"),
            ("update_s", "update s"), ("other_s", "other s"), ("decode_ms", "ms/decode step"),
            ("rows_kept", "rows fwd/bwd"), ("peak_gb", "peak GB"),
            ("x_step_vs_trl-default", "x step vs trl-default"), ("x_step_vs_trl-same-gen", "x step vs trl-same-gen"),
            ("x_update_vs_trl-same-gen", "x update vs trl-same-gen"), ("x_full_vs_switch", "x full vs switch"),
            ("update_mfu", "update MFU")]
    lines = [f"Throughput, {meta['shape']} ({meta['params_m']:.1f}M params, {meta['trainable_m']:.1f}M trainable), "
             f"K={meta['k']}, {meta['prompts']} prompts, {meta['new_tokens']} new tokens, {meta['device_name']}, "
             f"{meta['date']}. Medians of timed steps. DyME's rollout decode: {meta.get('dyme_decode', 'hf-static')}.",
             "",
             "| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    digits = {"update_mfu": 3, "rows_kept": 0}
    for r in rows:
        lines.append("| " + " | ".join(fmt(float(r.get(k, float("nan"))) if k not in ("mix", "trainer") else r[k],
                                           digits.get(k, 2)) for k, _ in cols) + " |")
    if meta["device_name"].startswith("CPU"):
        lines.append("\nOn CPU, peak GB is the process's maximum RSS (all trainers together).")
    warm = {k: [round(x, 2) for x in v["warmup_s"]] for k, v in meta["trainers"].items()}
    lines += ["", f"Warm-up step seconds (first includes compilation): {json.dumps(warm)}"]
    first_mix = {r["trainer"]: r["step_s"] for r in rows if r["mix"] == meta["mixes"][0]}
    compile_s = {k: round(v["warmup_s"][0] - first_mix[k], 1) for k, v in meta["trainers"].items()
                 if v["warmup_s"] and k in first_mix}
    if compile_s:
        lines.append(f"One-time cost (first step - median step, {meta['mixes'][0]}): {json.dumps(compile_s)} s")
    f = meta.get("decode_floor")
    if f:
        lines.append(f"Decode step floor ({f['rows']} rows): weights {f['weight_bytes'] / 1e6:.0f} MB + KV cache "
                     f"{f['kv_bytes_mean'] / 1e6:.0f} MB at the mean length {f['mean_cache_len']:.0f} = "
                     f"{f['floor_ms']:.3f} ms at {f['bandwidth_tb_s']:.1f} TB/s ({f['floor_static_ms']:.3f} ms "
                     f"reading the whole static cache of {f['max_cache_len']}). ms/decode step = generation s / "
                     "new tokens (prefill and vision tower included).")
    if meta.get("peak_bf16_tflops"):
        lines.append(f"Measured bf16 matmul peak: {meta['peak_bf16_tflops']:.0f} TFLOP/s")
    lines += ["", *[f"- {t}" for t in meta.get("targets", [])]]
    for key, d in meta.get("ddp", {}).items():
        if isinstance(d, dict):
            w = meta["ddp"]["world_size"]
            lines.append(f"- {w} processes, {key}: {d['samples_per_s_1']:.1f} -> {d[f'samples_per_s_{w}']:.1f} "
                         f"samples/s (per-process batch unchanged), scaling efficiency {d['efficiency']:.2f}")
    lines += ["", f"Command: `{meta['command']}`"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ sweep
def run_sweep(args: argparse.Namespace, dyme: DymeRunner, deadline: float, out_dir: Path, meta: dict) -> list[dict]:
    """DyME step time as K, prompts per step and completion length grow (method dyme, mix explore).

    The table is rewritten after every point, so a run killed at its time limit keeps what it measured.
    """
    base = {"k": args.k, "prompts": args.prompts, "new_tokens": args.new_tokens}
    points = [{**base}]
    points += [{**base, "k": k} for k in args.sweep_k if k != args.k]
    points += [{**base, "new_tokens": n} for n in args.sweep_new_tokens if n != args.new_tokens]
    points += [{**base, "prompts": p} for p in args.sweep_prompts if p != args.prompts]
    t = dyme.trainer.t
    out = []
    last = 0.0
    for p in points:
        if time.perf_counter() + 2 * last + 5 > deadline:
            out.append({**p, "skipped": "time budget"})
            continue
        t0 = time.perf_counter()
        t.num_generations, t.batch_size, t.max_new_tokens = p["k"], p["prompts"], p["new_tokens"]
        t.max_target_tokens = p["new_tokens"]
        t.micro_batch_size = args.micro_batch or p["k"] * p["prompts"]
        warm = [dyme.step("dyme", "explore")["step_s"] for _ in range(args.sweep_warmup)]
        recs = [dyme.step("dyme", "explore") for _ in range(args.sweep_steps)]
        row = {**p, "warmup_s": warm, "step_s": median([r["step_s"] for r in recs]),
               **{ph: median([r[ph] for r in recs]) for ph in PHASES},
               "samples_per_s": median([r["samples"] / r["step_s"] for r in recs]),
               "peak_gb": (dyme.resident + max(r["transient_bytes"] for r in recs)) / 1e9}
        out.append(row)
        sweep_outputs(out, out_dir, args.label, meta, plot=False)
        last = time.perf_counter() - t0
    t.num_generations, t.batch_size, t.max_new_tokens = base["k"], base["prompts"], base["new_tokens"]
    t.max_target_tokens, t.micro_batch_size = base["new_tokens"], args.micro_batch or base["k"] * base["prompts"]
    return out


def sweep_outputs(points: list[dict], out: Path, label: str, meta: dict, plot: bool = True) -> None:
    done = [p for p in points if "step_s" in p]
    cols = ["k", "prompts", "new_tokens", "step_s", "generation_s", "reward_s", "update_s", "other_s",
            "samples_per_s", "peak_gb"]
    lines = [f"DyME step-time sweep ({meta['shape']}, method dyme, mix explore, {meta['device_name']}, "
             f"{meta['date']}); medians of timed steps.", "", "| " + " | ".join(cols) + " | warm-up s |",
             "|" + "---|" * (len(cols) + 1)]
    for p in done:
        lines.append("| " + " | ".join(fmt(p[c], 2) for c in cols) + f" | {[round(x, 1) for x in p['warmup_s']]} |")
    skipped = [p for p in points if "skipped" in p]
    if skipped:
        lines.append(f"\nSkipped (time budget): {[{k: p[k] for k in ('k', 'prompts', 'new_tokens')} for p in skipped]}")
    (out / f"sweep-{label}.md").write_text("\n".join(lines) + "\n")
    (out / f"sweep-{label}.json").write_text(json.dumps({"meta": meta, "points": points}, indent=2))
    if not plot:
        return
    print("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, title in zip(axes, ("k", "prompts", "new_tokens"),
                              ("K (completions per prompt)", "prompts per step", "new tokens"), strict=True):
        others = [c for c in ("k", "prompts", "new_tokens") if c != key]
        base = {c: meta[c] for c in others}
        pts = sorted((p for p in done if all(p[c] == base[c] for c in others)), key=lambda p: p[key])
        if not pts:
            continue
        xs = [p[key] for p in pts]
        bottom = [0.0] * len(pts)
        for ph in PHASES:
            ys = [p[ph] for p in pts]
            ax.bar([str(x) for x in xs], ys, bottom=bottom, label=ph.removesuffix("_s"))
            bottom = [a + b for a, b in zip(bottom, ys, strict=True)]
        ax.set_xlabel(title)
        ax.set_ylabel("seconds per step")
        ax.set_title(f"{', '.join(f'{c}={base[c]}' for c in others)}", fontsize=9)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"DyME step time, {meta['shape']}, {meta['device_name']}")
    fig.tight_layout()
    fig.savefig(out / f"sweep-{label}.png", dpi=110)


# ------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"),
                    help="Device to run on (cuda: bf16).")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads (0: 1 on cpu, where a shared 2-core box thrashes with more; "
                         "torch's default on cuda).")
    ap.add_argument("--shape", default="tiny", choices=sorted(SHAPES), help="Model shape (bench/common.py).")
    ap.add_argument("--k", type=int, default=8, help="Completions per prompt (K).")
    ap.add_argument("--prompts", type=int, default=8, help="Prompts per step per process.")
    ap.add_argument("--new-tokens", type=int, default=128, help="Exactly this many tokens per completion.")
    ap.add_argument("--micro-batch", type=int, default=0, help="Rows per forward/backward (0: prompts*k, one pass).")
    ap.add_argument("--steps", type=int, default=3, help="Timed steps per (trainer, mix).")
    ap.add_argument("--warmup", type=int, default=2, help="Untimed warm-up steps per trainer (compilation included).")
    ap.add_argument("--mix", default="explore,skip75,memorize75",
                    help=f"Comma list of reward mixes: {', '.join(MIXES)}.")
    ap.add_argument("--trainers", default=",".join(DEFAULT_TRAINERS),
                    help="Comma list from: " + ", ".join(TRAINERS) + " (default: the first four).")
    ap.add_argument("--trl", default="on", choices=("on", "off"), help="off: DyME only (no trl needed).")
    ap.add_argument("--static-cache", default="auto", choices=("auto", "on", "off"),
                    help="Static KV cache for dyme/grpo and trl-same-gen (auto: on for cuda).")
    ap.add_argument("--dyme-decode", default="auto", choices=("auto", *DYME_DECODES),
                    help="DyME trainers' rollout decode: hf-static (HF generate with the static cache and its "
                         "compiled step, what trl-same-gen runs: train.static_cache), captured (the project's "
                         "default on a GPU: train.cuda_graph_decode), captured-compiled (and train.compile_decode), "
                         "eager (generation.complete, the CPU's); auto: hf-static with --static-cache on, else "
                         "captured (eager on the CPU).")
    ap.add_argument("--compile-update", default="off", choices=("auto", "on", "off"),
                    help="dyme/grpo: train.compile_update (the update forward/backward through one compiled "
                         "decoder layer; auto: on for cuda). Off by default, as the tables of BENCHMARKS.md were "
                         "measured; bench/gpu_perf.sh measures it from cold.")
    ap.add_argument("--compile-cache-dir", default="",
                    help="dyme/grpo: train.compile_cache_dir (torch's compile artifacts loaded at start and saved "
                         "after a step that compiled; '' = torch's temp cache only).")
    ap.add_argument("--bandwidth-tbs", type=float, default=4.8,
                    help="Memory bandwidth (TB/s) for the decode-step floor (default: the H200's 4.8 TB/s spec).")
    ap.add_argument("--samples", type=int, default=64, help="Synthetic training samples (prompts cycle).")
    ap.add_argument("--seed", type=int, default=0, help="Seed for data, weights and sampling.")
    ap.add_argument("--sweep", action="store_true", help="Also sweep K, prompts and new tokens (DyME, explore).")
    ap.add_argument("--sweep-k", type=ints, default=[2, 4, 8, 16], help="K values of the sweep.")
    ap.add_argument("--sweep-prompts", type=ints, default=[4, 8, 16], help="Prompts-per-step values of the sweep.")
    ap.add_argument("--sweep-new-tokens", type=ints, default=[64, 128, 256], help="Completion lengths of the sweep.")
    ap.add_argument("--sweep-steps", type=int, default=2, help="Timed steps per sweep point.")
    ap.add_argument("--sweep-warmup", type=int, default=1, help="Untimed steps per sweep point (recompiles).")
    ap.add_argument("--budget-s", type=float, default=0, help="Wall-clock budget; later work is skipped (0: none).")
    ap.add_argument("--peak", default="auto", choices=("auto", "on", "off"), help="Measure bf16 matmul peak (cuda).")
    ap.add_argument("--ddp-baseline", default="", help="throughput-*.json of a 1-GPU run, for scaling efficiency.")
    ap.add_argument("--label", default="", help="Name of the result files (default: the shape).")
    ap.add_argument("--out", default="bench/out/throughput", help="Where results (JSON, Markdown, PNG) go.")
    ap.add_argument("--work", default="/tmp/dyme-bench-work", help="Cache of models, data and trainer outputs.")
    args = ap.parse_args(argv)
    args.mix = [m for m in args.mix.split(",") if m]
    args.trainers = [t for t in args.trainers.split(",") if t]
    for m in args.mix:
        if m not in MIXES:
            ap.error(f"unknown mix {m!r}")
    for t in args.trainers:
        if t not in TRAINERS:
            ap.error(f"unknown trainer {t!r}")
    if args.trl == "off":
        args.trainers = [t for t in args.trainers if not t.startswith("trl")]
    if args.warmup < 1:
        ap.error("--warmup must be >= 1 (the first step compiles and allocates)")
    if args.static_cache == "auto":
        args.static_cache = "on" if args.device == "cuda" else "off"
    if args.compile_update == "auto":
        args.compile_update = "on" if args.device == "cuda" else "off"
    if args.dyme_decode == "auto":
        args.dyme_decode = "hf-static" if args.static_cache == "on" else "captured"
    args.label = args.label or args.shape
    args.trl_steps = args.warmup + args.steps * len(args.mix)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    deadline = start + args.budget_s if args.budget_s > 0 else float("inf")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if args.device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    if device.type == "cuda":  # several compiled models and sweep shapes in one process: never fall back to eager
        torch._dynamo.config.cache_size_limit = 64
    if world > 1:
        # CPU tensors (the trainer's metric reduction) go through gloo, CUDA tensors through NCCL
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo",
                                timeout=dt.timedelta(minutes=9))
        args.trainers = [t for t in args.trainers if not t.startswith("trl")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import transformers

    meta: dict[str, Any] = {
        "shape": args.shape, "k": args.k, "prompts": args.prompts, "new_tokens": args.new_tokens,
        "micro_batch": args.micro_batch or args.k * args.prompts, "mixes": args.mix, "steps": args.steps,
        "warmup": args.warmup, "static_cache": args.static_cache, "dyme_decode": args.dyme_decode,
        "compile_update": args.compile_update,
        "compile_cache_dir": args.compile_cache_dir,
        "world_size": world,
        "threads": torch.get_num_threads(),
        "date": dt.date.today().isoformat(), "host": platform.node(), "torch": torch.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"CPU ({os.cpu_count()} cores)", "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "trainers": {},
    }
    if "trl-default" in args.trainers or "trl-same-gen" in args.trainers:
        import trl

        meta["trl"] = trl.__version__
    peak = None
    if device.type == "cuda" and args.peak != "off" and rank == 0:
        peak = measure_peak_bf16(device)
        meta["peak_bf16_tflops"] = peak / 1e12
    work = prepare_work(args, device, rank)
    meta["max_prompt_len"] = max_prompt_len(work, args)
    meta["max_cache_len"] = -(-(meta["max_prompt_len"] + args.new_tokens) // 128) * 128
    records: list[dict] = []
    dyme = None
    if dyme_variants(args.trainers):
        dyme = DymeRunner(args, work, device)
        meta["trainers"]["dyme"] = {"warmup_s": dyme.warmup_s, "resident_bytes": dyme.resident, "params": dyme.params}
    ref_model = dyme.trainer.model if dyme else load_model(ModelConfig(name_or_path=str(work.model_dir)), "cpu")
    params = dyme.params if dyme else count_params(ref_model)
    meta["decode_floor"] = decode_floor(ref_model, args.k * args.prompts, meta["max_prompt_len"], args.new_tokens,
                                        meta["max_cache_len"], args.bandwidth_tbs * 1e12)
    meta["params_m"], meta["trainable_m"] = params["total"] / 1e6, params["trainable"] / 1e6
    label = args.label

    def write() -> list[dict]:
        rows = summarize(records, args, meta, peak)
        meta["targets"] = targets(rows, meta.get("decode_floor"))
        if rank == 0:
            (out / f"throughput-{label}.json").write_text(json.dumps({"meta": meta, "rows": rows,
                                                                     "records": records}, indent=2))
            (out / f"throughput-{label}.md").write_text(markdown(rows, meta))
        return rows

    write()  # DyME's warm-up (compile times) is on disk before TRL starts
    trl_kinds = [t for t in ("trl-default", "trl-same-gen") if t in args.trainers]
    for kind in trl_kinds:
        if time.perf_counter() + (75 if kind == "trl-same-gen" else 40) > deadline:  # set-up, warm-up, a few rounds
            meta["trainers"][kind] = {"warmup_s": [], "resident_bytes": 0, "skipped": "time budget"}
            continue
        run_trl_phase(kind, args, work, device, dyme, deadline, records, meta, write)
        write()
    if not trl_kinds and dyme is not None:  # DyME alone (also the multi-GPU run)
        for mix in args.mix:
            for _ in range(args.steps):
                if out_of_time(time.perf_counter() + 5 > deadline):
                    break
                for trainer in dyme_variants(args.trainers):
                    records.append(dyme.step(trainer, mix))
                write()  # after every round: a run killed at its limit keeps what it measured
    rows = write()
    if world > 1 or args.ddp_baseline:
        ddp = ddp_summary(rows, args, world)
        meta["ddp"] = ddp
        rows = write()
    if rank == 0:
        print(markdown(rows, meta))
        if "ddp" in meta:
            print(json.dumps(meta["ddp"], indent=2))
    if args.sweep and dyme is not None and rank == 0 and world == 1:
        points = run_sweep(args, dyme, deadline, out, meta)
        sweep_outputs(points, out, label, meta)
    if rank == 0:
        print(f"total wall time {time.perf_counter() - start:.1f} s; results in {out}")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


def out_of_time(late: bool) -> bool:
    """True when any process is out of time: every process must take the same number of steps."""
    if not dist.is_initialized():
        return late
    flag = torch.tensor([float(late)])  # a CPU tensor: gloo
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def ddp_summary(rows: list[dict], args: argparse.Namespace, world: int) -> dict:
    """Samples/s on `world` GPUs against the 1-GPU run's (same per-GPU batch): scaling efficiency."""
    mine = {(r["mix"], r["trainer"]): r for r in rows}
    out: dict[str, Any] = {"world_size": world}
    if args.ddp_baseline and Path(args.ddp_baseline).is_file():
        base = {(r["mix"], r["trainer"]): r for r in json.loads(Path(args.ddp_baseline).read_text())["rows"]}
        for key, r in mine.items():
            if key in base:
                b = base[key]["samples_per_s"]
                out[f"{key[0]}/{key[1]}"] = {"samples_per_s_1": b, f"samples_per_s_{world}": r["samples_per_s"],
                                             "step_s_1": base[key]["step_s"], f"step_s_{world}": r["step_s"],
                                             "efficiency": r["samples_per_s"] / (world * b)}
    return out


if __name__ == "__main__":
    raise SystemExit(main())
