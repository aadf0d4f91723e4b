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
  dyme, grpo    dyme_core.trainer.DymeTrainer with method dyme / grpo (one trainer each, built as a user builds
                it: ordinary config, the bench's reward table passed as `rewards=`), update eager by default;
                --compile-update on: train.compile_update, the regional compile of one decoder layer (its
                one-time compile is reported apart; the whole-model compile it replaced took about 200 s cold on
                an H200); --compile-cache-dir: torch's compile artifacts kept across runs.
  dyme-full     DyME as a user runs it: MEMORIZE groups memorise the online rule refiner's traces, the rule visual
                checker scores the thinking, and the format and thinking rewards are the library's own
                (dyme_core.rewards.REWARDS, from the completions' text); only the accuracy stays the controlled one
                below, so the mode mix is that of the other trainers; the trainer weighs them with
                train.reward_weights. The other DyME trainers score the controlled accuracy alone
                (train.reward_weights={accuracy: 1.0}): their total is the accuracy.
  dyme-switch   mode switching alone: MEMORIZE groups memorise the raw hint (train.use_refiner=false), no checker,
                constant format and thinking rewards. dyme-full / dyme-switch (`x_full_vs_switch`) is what the
                refiner, the checker and the text rewards add to a step (target <= 1.15).
  Each DyME trainer is its own DymeTrainer, configured once by `DYME_VARIANTS` (train.method, train.use_refiner,
  train.checker and the reward table), so no step inherits the settings of another trainer's step.

Equal in all: the weights (loaded by dyme_core.models.load_model: bf16 weights on a GPU; TRL adds bf16
autocast, DyME needs none for bf16 weights; vision tower frozen), prompts and images, K, prompts per step,
exactly --new-tokens completion tokens (eos and the image/special tokens are suppressed in both; DyME through
`train.ignore_eos`), rows per
forward/backward (--micro-batch), one optimizer step per generation batch, and the rewards. The reward depends
only on (group position in the batch, completion index) so that a chosen fraction of groups is all-wrong
(DyME: MEMORIZE), all-right (SKIP) or mixed (EXPLORE, half the completions right) -- `--mix`: explore | skip75
| memorize75 | mixed (bench/common.py: `ControlledRewards`, `MIXES`).

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
every kept row, padding excluded; counted by a forward hook, bench/common.py `UpdateTokens`) / update seconds /
peak bf16 FLOP/s measured with an 8192^3 bf16 matmul in the same run. It leaves out attention-score FLOPs, the
frozen vision tower's forward (once per batch image) and counts the LM head over prompt positions it skips
(logits_to_keep): an estimate.

Run (CPU smoke):  python bench/throughput.py --device cpu --shape tiny --steps 1 --warmup 1 --new-tokens 16
Run (GPU plan):   bash bench/gpu_throughput.sh   (writes to $OUT)
Two GPUs (DyME):  torchrun --standalone --nproc_per_node=2 bench/throughput.py --trl off --trainers dyme \
                    --mix explore --label ddp2 --ddp-baseline OUT/throughput-ddp1.json --out OUT
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `bench` and `dyme_core`

from bench.common import (  # noqa: E402
    ACCURACY_ONLY,
    MIXES,
    SHAPES,
    ControlledRewards,
    UpdateTokens,
    Work,
    count_params,
    decode_floor,
    free_memory,
    measure_peak_bf16,
    median,
    mem_allocated,
    mem_peak,
    mix_accuracy,
    prepare_work,
    reset_peak,
    sync,
)
from dyme_core.config import Config, ModelConfig, load_config  # noqa: E402
from dyme_core.models import GPU_ATTENTION, attention_kernels, build_prompt, load_model, user_text  # noqa: E402
from dyme_core.trainer import DymeTrainer  # noqa: E402

TRAINERS = ("trl-default", "trl-same-gen", "dyme", "grpo", "dyme-full", "dyme-switch")
DEFAULT_TRAINERS = ("trl-default", "trl-same-gen", "dyme", "grpo")  # the trainers of BENCHMARKS.md's tables
DYME_DECODES = ("hf-static", "captured", "captured-compiled", "eager")  # --dyme-decode
PHASES = ("generation_s", "reward_s", "update_s", "other_s")


# ------------------------------------------------------------------------------------------ DyME's trainers
class MixState:
    """The mix TRL's next step is scored with (DyME's trainers hold theirs in their ControlledRewards)."""

    mix = "explore"


@dataclass(frozen=True)
class DymeVariant:
    """What one DyME trainer of the bench is: ordinary config keys and whether format and thinking are scored."""

    method: str  # train.method: dyme | grpo
    use_refiner: bool  # train.use_refiner: MEMORIZE memorises the online rule refiner's trace (True) or the raw hint
    checker: str  # train.checker, the visual checker scoring the thinking: rule | none
    text_rewards: bool  # format and thinking scored from the completions' text (else the accuracy alone)

    def overrides(self) -> list[str]:
        return [f"train.method={self.method}", f"train.use_refiner={str(self.use_refiner).lower()}",
                f"train.checker={self.checker}", *([] if self.text_rewards else [ACCURACY_ONLY])]


DYME_VARIANTS = {
    "dyme": DymeVariant("dyme", use_refiner=True, checker="none", text_rewards=False),
    "grpo": DymeVariant("grpo", use_refiner=True, checker="none", text_rewards=False),
    "dyme-full": DymeVariant("dyme", use_refiner=True, checker="rule", text_rewards=True),
    "dyme-switch": DymeVariant("dyme", use_refiner=False, checker="none", text_rewards=False),
}


def dyme_config(args: argparse.Namespace, work: Work, variant: str = "dyme", k: int = 0, prompts: int = 0,
                new_tokens: int = 0) -> Config:
    """A DyME trainer's configuration: the bench's work, sizes (the arguments', unless given), the variant's keys,
    --dyme-decode / --compile-update, and every rollout --new-tokens long (train.ignore_eos)."""
    k, b, n = k or args.k, prompts or args.prompts, new_tokens or args.new_tokens
    return load_config(None, [
        f"data.path={work.data_dir}", f"model.name_or_path={work.model_dir}",
        f"train.output_dir={Path(args.work) / 'run-dyme'}", "train.refined=",
        f"train.batch_size={b}", f"train.num_generations={k}", f"train.max_new_tokens={n}",
        f"train.max_target_tokens={n}", f"train.micro_batch_size={args.micro_batch or b * k}",
        f"train.static_cache={args.dyme_decode == 'hf-static'}", f"train.compile_update={args.compile_update == 'on'}",
        f"train.cuda_graph_decode={args.dyme_decode != 'eager'}",
        f"train.compile_decode={args.dyme_decode == 'captured-compiled'}", "train.ignore_eos=true",
        "train.max_steps=1000000", "train.report_to=none", "train.progress_bar=false", f"train.seed={args.seed}",
        *DYME_VARIANTS[variant].overrides(),
        # torch's compile artifacts kept across processes (dyme_core/regional.py); absent: torch's temp cache only
        *([f"train.compile_cache_dir={args.compile_cache_dir}"] if getattr(args, "compile_cache_dir", "") else []),
    ])


def dyme_trainer(args: argparse.Namespace, work: Work, device: torch.device, variant: str = "dyme",
                 **sizes: int) -> tuple[DymeTrainer, ControlledRewards]:
    """A DymeTrainer of `variant` scored by the controlled rewards (mix explore until set), and those rewards."""
    rewards = ControlledRewards()
    return DymeTrainer(dyme_config(args, work, variant, **sizes), work.dataset, device=device,
                       rewards=rewards.table()), rewards


# ------------------------------------------------------------------------------------------ DyME steps
def dyme_variants(trainers: list[str]) -> list[str]:
    """The DyME trainers among `trainers`, in the order a round steps them."""
    return [t for t in DYME_VARIANTS if t in trainers]


class DymeRunner:
    """One DymeTrainer per DyME variant of `args.trainers`, each warmed up on building; `step` returns one record."""

    def __init__(self, args: argparse.Namespace, work: Work, device: torch.device):
        self.device = device
        self.trainers: dict[str, DymeTrainer] = {}
        self.rewards: dict[str, ControlledRewards] = {}
        self.tokens: dict[str, UpdateTokens] = {}
        self.warmup_s: dict[str, list[float]] = {}
        self.resident: dict[str, int] = {}
        for variant in dyme_variants(args.trainers):
            before = mem_allocated(device)
            self.trainers[variant], self.rewards[variant] = dyme_trainer(args, work, device, variant)
            self.tokens[variant] = UpdateTokens(self.trainers[variant].model)
            self.warmup_s[variant] = [self.step(variant, args.mix[0])["step_s"] for _ in range(args.warmup)]
            self.resident[variant] = mem_allocated(device) - before
        self.first = next(iter(self.trainers.values()))  # for what all variants share: the model's shape, eos
        self.params = count_params(self.first.model)
        self.world = self.first.world

    def meta(self) -> dict[str, dict]:
        """meta["trainers"] entries: each variant's warm-up seconds, resident bytes and parameter counts."""
        return {v: {"warmup_s": self.warmup_s[v], "resident_bytes": self.resident[v], "params": self.params}
                for v in self.trainers}

    def step(self, trainer: str, mix: str) -> dict[str, Any]:
        tr, tokens = self.trainers[trainer], self.tokens[trainer]
        self.rewards[trainer].mix = mix
        tokens.count = 0
        sync(self.device)
        alloc0 = mem_allocated(self.device)
        reset_peak(self.device)
        t0 = time.perf_counter()
        m = tr.train_step()
        sync(self.device)
        step_s = time.perf_counter() - t0
        t = tr.cfg.train
        rec = {"trainer": trainer, "mix": mix, "step_s": step_s, "generation_s": m["time/generation_s"],
               "reward_s": m["time/reward_s"], "update_s": m["time/update_s"],
               "samples": t.batch_size * t.num_generations * tr.world, "gen_tokens": m["tokens"],
               "update_tokens": tokens.count, "rows_kept": m["rows/kept"], "rows_total": m["rows/total"],
               "completion_len": m["completion/mean_length"], "transient_bytes": mem_peak(self.device) - alloc0,
               "k": t.num_generations, "prompts": t.batch_size, "new_tokens": t.max_new_tokens,
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
    suppress = dyme.first.suppress if dyme is not None else _suppress_list(args, work, device)
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
                   "peak_gb": (residents.get(name, 0) + max(r["transient_bytes"] for r in recs)) / 1e9}
            if name in DYME_VARIANTS:
                tokens = median([r["update_tokens"] for r in recs])
                n_train = meta["trainers"][name]["params"]["trainable"]
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
def run_sweep(args: argparse.Namespace, work: Work, device: torch.device, deadline: float, out_dir: Path,
              meta: dict) -> list[dict]:
    """DyME step time as K, prompts per step and completion length grow (method dyme, mix explore): one trainer per
    point, built with that point's config.

    The table is rewritten after every point, so a run killed at its time limit keeps what it measured.
    """
    base = {"k": args.k, "prompts": args.prompts, "new_tokens": args.new_tokens}
    points = [{**base}]
    points += [{**base, "k": k} for k in args.sweep_k if k != args.k]
    points += [{**base, "new_tokens": n} for n in args.sweep_new_tokens if n != args.new_tokens]
    points += [{**base, "prompts": p} for p in args.sweep_prompts if p != args.prompts]
    out = []
    last = 0.0
    for p in points:
        if time.perf_counter() + 2 * last + 5 > deadline:
            out.append({**p, "skipped": "time budget"})
            continue
        t0 = time.perf_counter()
        free_memory(device)
        before = mem_allocated(device)
        sizes = {"k": p["k"], "prompts": p["prompts"], "new_tokens": p["new_tokens"]}
        point = DymeRunner(argparse.Namespace(**{**vars(args), **sizes, "trainers": ["dyme"], "mix": ["explore"],
                                                 "warmup": args.sweep_warmup}), work, device)
        recs = [point.step("dyme", "explore") for _ in range(args.sweep_steps)]
        row = {**p, "warmup_s": point.warmup_s["dyme"], "step_s": median([r["step_s"] for r in recs]),
               **{ph: median([r[ph] for r in recs]) for ph in PHASES},
               "samples_per_s": median([r["samples"] / r["step_s"] for r in recs]),
               "peak_gb": (mem_allocated(device) - before + max(r["transient_bytes"] for r in recs)) / 1e9}
        del point
        out.append(row)
        sweep_outputs(out, out_dir, args.label, meta, plot=False)
        last = time.perf_counter() - t0
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
    work = prepare_work(args.shape, args.work, args.samples, args.seed, device, rank)
    meta["max_prompt_len"] = max_prompt_len(work, args)
    meta["max_cache_len"] = -(-(meta["max_prompt_len"] + args.new_tokens) // 128) * 128
    records: list[dict] = []
    dyme = None
    if dyme_variants(args.trainers):
        dyme = DymeRunner(args, work, device)
        meta["trainers"].update(dyme.meta())
    ref_model = dyme.first.model if dyme else load_model(ModelConfig(name_or_path=str(work.model_dir)), "cpu")
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
        points = run_sweep(args, work, device, deadline, out, meta)
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
