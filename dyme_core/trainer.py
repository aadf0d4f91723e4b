"""The trainer: DyME and its baselines (sft, grpo, two_stage) behind one switch (DESIGN.md sections 2, 7).

One optimizer step = `grad_accum_steps` generation batches. Per generation batch each process takes
`batch_size` prompts, preprocesses each image once, samples K completions per prompt, scores them
(format, accuracy, visual checker), picks a mode per prompt group (`algorithm.select_modes`) and
builds the update rows: K rollouts with GRPO advantages for EXPLORE groups, one refined reference
trace with advantage +1 for MEMORIZE groups, nothing for SKIP groups. Rows of weight 0 are dropped
before the forward pass; `algorithm.aggregate_loss` divides by the counts of the full batch, so the
gradient equals that of the official update over all B*K rows. `train.switch` picks the paper's other
switching strategies (threshold, anneal, budget: `_switch`, `_step_prompts`, pure functions in algorithm.py).

A step reads as four parts: rollout (`_generate`), scoring and rows (`_score` through the reward table the
trainer is given, default `rewards.REWARDS`; `_switch`; `_rl_rows` returns a `Plan`), update (`_backward`
returns each micro-batch's `LossParts`) and logging (`_step_record` assembles the step's figures in one
place, `_log` reports them). `loss` is what a user reads: the memorised references' token-mean NLL
(`loss/sft`) plus the rollouts' policy surrogate (`loss/policy`) plus beta * `kl`; `loss/objective` is the
value the optimizer minimises (its gradient is the method's; its value is -(memorised rows)/(B*K) on-policy).

Why not a `trl.GRPOTrainer` subclass (DESIGN.md section 7 asks to say so): a MEMORIZE group puts an
off-policy sequence of its own length in place of a rollout, and dropping zero-weight rows changes
the batch shape between scoring and the loss; in TRL 1.16 both live inside the private
`_generate_and_score_completions` / `_compute_loss` pair, whose padded tensors, sampler (which
repeats every prompt K times, so each image is preprocessed K times) and buffered batches we would
have to re-implement anyway. The loop below is small, uses the pure functions of `algorithm.py`, and
keeps exact resume and multi-process data parallelism simple to verify.

Multi-process: launch with `torchrun`; the CLI initialises the process group (gloo on CPU, NCCL on
GPU). Each process owns whole prompt groups, so modes and advantages are local; gradients are
all-reduced by hand (a process whose rows were all dropped still joins the reduction).
Resume is exact: data order and sampling are seeded by (seed, step, rank), and a checkpoint
(`checkpoint.py`: atomic, verified, no pickle) holds the model, optimizer, scheduler and RNG states.
A run is staged beside `output_dir` and published by a rename when it succeeds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import resource
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm
from transformers import PreTrainedModel, ProcessorMixin

from dyme_core import algorithm, checkpoint, generation
from dyme_core.checker import VisualChecker
from dyme_core.config import Config, dump_config
from dyme_core.data.loaders import Dataset
from dyme_core.data.schema import Sample
from dyme_core.families import PromptBatch, family_of
from dyme_core.llm import ChatClient
from dyme_core.models import (
    ANSWER_FLAG,
    GPU_ATTENTION,
    attention_kernels,
    load_model,
    load_processor,
    save_model,
    suppressed_token_ids,
)
from dyme_core.refiner import Refiner, TemplatePool
from dyme_core.regional import CompileCache, RegionalCompile
from dyme_core.rewards import REWARDS, RewardContext, RewardFn, parse_completion

log = logging.getLogger(__name__)


@dataclass
class Row:
    """One sequence of the update: a prompt's index in the batch, completion tokens, advantage."""

    prompt: int
    completion: torch.Tensor  # (T,) token ids, eos included when generated
    advantage: float
    temperature: float  # logits are scaled by it (1.0 for memorised references: plain NLL)
    old_logps: torch.Tensor | None = None  # (T,), filled when num_iterations > 1
    memorized: bool = False  # a reference trace (SFT row), not a rollout


@dataclass
class Batch:
    """One generation batch: its samples and their prompts as the model family encodes them."""

    samples: list[Sample]
    prompts: PromptBatch  # per-prompt ids and text extras, the processor's image outputs (families.py)

    @property
    def prompt_ids(self) -> list[torch.Tensor]:  # per prompt (P_i,), no padding
        return self.prompts.prompt_ids


@dataclass
class Plan:
    """What one generation batch puts into the update, and what making it measured."""

    rows: list[Row]
    norm: dict[str, int]  # the full batch's counts, as `algorithm.aggregate_loss` takes them
    metrics: dict[str, float] = field(default_factory=dict)  # rewards, modes, lengths, phase seconds
    failed: list[int] = field(default_factory=list)  # batch positions whose references the budget switch buffers


@dataclass
class LossParts:
    """One micro-batch's backward: its share of the optimised objective and the sums behind the logged losses."""

    objective: float
    sums: dict[str, float]  # sft_nll, sft_rows, policy, policy_rows (and kl, kl_rows when beta > 0)


# Figures that depend on the machine, its load or a warm refiner cache rather than on the seed. MLflow gets
# every figure; in the run dir they go to timings.jsonl and timing.json (left out of the output's hash by
# .dvcignore), never into metrics.jsonl, history.json or summary.json, so that the same seed writes the same
# DVC-tracked bytes and a fresh clone's `dvc repro` reproduces the committed dvc.lock (docs/DESIGN.md).
VOLATILE_PREFIXES = ("time/", "samples_per_s", "tokens_per_s", "memory/", "refiner/calls", "refiner/cache_hits")
TIMINGS_FILE = "timings.jsonl"  # per logged step: step + the volatile figures
TIMING_FILE = "timing.json"  # the run's wall time, throughput and peak memory (`dvc metrics show`)


def split_volatile(metrics: dict) -> tuple[dict, dict]:
    """(reproducible figures, volatile figures + step) of one step's metrics."""
    volatile = {k: v for k, v in metrics.items() if k.startswith(VOLATILE_PREFIXES)}
    return ({k: v for k, v in metrics.items() if k not in volatile},
            {"step": metrics["step"], **volatile} if "step" in metrics else volatile)


def timing_summary(history: list[dict]) -> dict[str, float]:
    """Wall time (summed step times), mean samples/s and peak memory of a run's steps."""
    steps = [h for h in history if "time/step_s" in h]
    if not steps:
        return {}
    return {"wall_time_s": round(sum(h["time/step_s"] for h in steps), 1),
            "samples_per_s": round(sum(h.get("samples_per_s", 0.0) for h in steps) / len(steps), 2),
            "peak_memory_mb": round(max(h.get("memory/peak_mb", 0.0) for h in steps), 1)}


# config sections a checkpoint records; resume_from=auto refuses a checkpoint whose settings differ
# except in these keys, which do not change what a step computes (max_steps may grow to train longer)
RESUME_SECTIONS = ("data", "model", "train")
RESUME_FREE_KEYS = {f"train.{k}" for k in ("max_steps", "save_steps", "logging_steps", "keep_checkpoints",
                                           "resume_from", "output_dir", "checkpoint_dir", "progress_bar",
                                           "report_to", "refine_cache_dir", "llm", "compile_cache_dir")}


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class DymeTrainer:
    def __init__(
        self,
        cfg: Config,
        dataset: Dataset,
        refined: dict[str, str] | None = None,
        llm_client: ChatClient | None = None,
        device: torch.device | str | None = None,
        stop: threading.Event | None = None,
        rewards: Mapping[str, RewardFn] | None = None,
    ):
        """rewards: the reward table, name -> ``fn(completions, samples, ctx) -> list[float]`` (the signature of
        `dyme_core.rewards.REWARDS`, which is the default); `train.reward_weights` weighs it by name."""
        self.cfg = cfg
        self.rewards: dict[str, RewardFn] = dict(REWARDS if rewards is None else rewards)
        self.stop = stop  # set (e.g. on SIGTERM by the CLI): stop after the current step, the run ends KILLED
        self.t = cfg.train
        self.rank, self.world = rank_and_world()
        missing = sorted(set(self._reward_names()) - set(self.rewards))
        if missing:
            raise ValueError(f"the reward table has no {missing} (it has {sorted(self.rewards)}); train.reward_weights "
                             f"and train.switch={self.t.switch} need them")
        if device is None:
            device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.samples = dataset.split("train")
        if not self.samples:
            raise ValueError(f"dataset {dataset.root} has no 'train' samples")
        self.dataset = dataset
        self.refined = refined or {}
        self.out = Path(self.t.output_dir)
        self.checkpoint_root = Path(self.t.checkpoint_dir or self.t.output_dir)
        self.processor: ProcessorMixin = load_processor(cfg.model)
        self.tokenizer = self.processor.tokenizer
        torch.manual_seed(self.t.seed)  # LoRA init
        self.model: PreTrainedModel = load_model(cfg.model, self.device)
        self.family = family_of(self.model.config)  # the one seam between the trainer and the model family
        self.bf16 = self.t.bf16 == "true" or (self.t.bf16 == "auto" and self.device.type == "cuda")
        # bf16 autocast where some weights are wider than bf16 (e.g. model.dtype=float32); bf16 weights
        # need no autocast, which would only add casts around every op
        self.autocast = self.bf16 and any(p.is_floating_point() and p.dtype != torch.bfloat16
                                          for p in self.model.parameters())
        self.ref_model = None
        if self.t.beta > 0:
            self.ref_model = load_model(cfg.model, self.device).eval().requires_grad_(False)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for n, p in self.model.named_parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for n, p in self.model.named_parameters() if p.requires_grad and p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.t.learning_rate, fused=self.device.type == "cuda",  # one kernel for all tensors on GPU
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_lambda)
        self.checker = VisualChecker(self.t.checker, client=llm_client, max_workers=self.t.llm.max_workers)
        self.refiner = Refiner("llm" if llm_client is not None else "rule",
                               cache_dir=self.t.refine_cache_dir or None, client=llm_client,
                               max_workers=self.t.llm.max_workers, observe=cfg.refine.observe)
        # the refine step's pool: the template the offline targets were written with
        self.templates = TemplatePool.load(self.t.template_pool) if self.t.template_pool else TemplatePool()
        self.offline_template_version = self.templates.best
        self.step = 0
        self.buffer: list[int] = []  # switch=budget: failed prompts (indices into self.samples), the same on every rank
        self.history: list[dict] = []
        self.reporters: list[Callable[[dict, int], None]] = []
        self._mlflow = None
        self.eos_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id
        self.suppress = suppressed_token_ids(self.model, self.processor)
        if self.t.ignore_eos:  # every rollout runs to max_new_tokens
            self.suppress = sorted({*self.suppress, self.eos_id})
        self.attention_backends = GPU_ATTENTION if self.device.type == "cuda" else None  # see models.py
        # torch's compile artifacts from an earlier process (train.compile_cache_dir): loaded before anything
        # compiles, so the update's layer compile and HF's static-cache decode step are cache hits
        self.compile_cache = CompileCache(self.t.compile_cache_dir, self.device.type) if self.t.compile_cache_dir \
            else None
        if self.compile_cache is not None:
            self.compile_cache.load()
        # The update's forward/backward through one compiled decoder layer reused by every layer (regional
        # compilation, dyme_core/regional.py; dynamic rows and lengths); generate() keeps the plain layers.
        self.update_model = RegionalCompile(self.model) if self.t.compile_update else None
        # Frozen vision-encoder outputs of the current batch: (batch, {(id, dropout on): (states, counts)}).
        self._vision_cache: tuple[Batch | None, dict[tuple[int, bool], tuple[torch.Tensor, torch.Tensor]]] = (
            None, {})

    # ---------------------------------------------------------------- schedule and data order
    def _lr_lambda(self, step: int) -> float:
        if self.t.warmup_steps and step < self.t.warmup_steps:
            return (step + 1) / self.t.warmup_steps
        progress = (step - self.t.warmup_steps) / max(1, self.t.max_steps - self.t.warmup_steps)
        if self.t.lr_scheduler == "linear":
            return max(0.0, 1 - progress)
        if self.t.lr_scheduler == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    def _batch_indices(self, step: int, accum: int) -> list[int]:
        """Prompts for (step, accum) on this rank: a seeded permutation per epoch, resumable."""
        n, b = len(self.samples), self.t.batch_size
        start = ((step * self.t.grad_accum_steps + accum) * self.world + self.rank) * b
        out = []
        for pos in range(start, start + b):
            epoch, i = divmod(pos, n)
            g = torch.Generator().manual_seed(self.t.seed * 1_000_003 + epoch)
            out.append(int(torch.randperm(n, generator=g)[i]))
        return out

    def phase(self, step: int) -> str:
        if self.t.method == "sft":
            return "sft"
        if self.t.method == "two_stage" and step < round(self.t.sft_fraction * self.t.max_steps):
            return "sft"
        return "rl"

    # ---------------------------------------------------------------- inputs
    def _prepare(self, samples: list[Sample]) -> Batch:
        images: list[Image.Image] = [self.dataset.load_image(s) for s in samples]
        prompts = self.family.encode(self.processor, [s.question for s in samples], images, self.t.prompt_style)
        return Batch(samples, prompts)

    def _target_texts(self, samples: list[Sample], source: str) -> list[str]:
        """Memorised references: refined or raw trace + answer flag (DESIGN.md section 2).

        Offline refined traces are used while the template is the one they were written with;
        otherwise only these samples are refined online, concurrently and through the cache.
        """
        if self.t.prompt_style == "direct":
            return [s.answer for s in samples]
        if source == "refined":
            stale = self.templates.best != self.offline_template_version
            todo = [s for s in samples if stale or s.id not in self.refined]
            fresh = dict(zip([s.id for s in todo],
                             [t for t, _ in self.refiner.refine(todo, self.templates.current["text"])], strict=True))
            traces = [fresh.get(s.id) or self.refined[s.id] for s in samples]
        else:
            traces = [s.hint or "" for s in samples]
        return [f"{t}\n{ANSWER_FLAG} {s.answer}" if t else f"{ANSWER_FLAG} {s.answer}"
                for t, s in zip(traces, samples, strict=True)]

    def _encode_target(self, text: str) -> torch.Tensor:
        """Token ids of a memorised reference, then eos; at most `max_target_tokens` before the eos.

        A reference that is too long loses the end of its thinking, never its final answer line: the
        "Answer: ..." line is what the accuracy reward reads, and cutting it would teach the model to stop
        without answering.
        """
        budget = self.t.max_target_tokens
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > budget:
            cut = text.rfind(f"\n{ANSWER_FLAG}")
            head, tail = (text[:cut], text[cut:]) if cut >= 0 else (text, "")
            tail_ids = self.tokenizer(tail, add_special_tokens=False)["input_ids"][:budget] if tail else []
            head_ids = self.tokenizer(head, add_special_tokens=False)["input_ids"][: budget - len(tail_ids)]
            ids = head_ids + tail_ids
        return torch.tensor([*ids, self.eos_id], dtype=torch.long)

    # ---------------------------------------------------------------- generation and scoring
    @torch.no_grad()
    def _generate(self, batch: Batch) -> list[torch.Tensor]:
        """K completions per prompt, sample-major: (B*K) tensors trimmed after the first eos.

        The family adapter gives the image inputs. Idefics3 with a frozen vision encoder: the prompt
        embeddings (images merged in) are built once per prompt from the batch's vision cache.
        By default `generation.complete` prefills each prompt once and repeats its KV cache K times (the
        vision tower and the prompt's forward run B times, not B*K times), then samples the same tokens as
        `generate(num_return_sequences=K)` without its per-step overhead (families with `prefill_once`); on
        a CUDA model with `train.cuda_graph_decode` its decode step is a replayed CUDA graph
        (`generation.complete_static`).
        With `train.static_cache`, HF `generate` runs with a static cache (compiled decode step on GPU); the
        cache length is rounded up to a multiple of 128 so that the compiled step is reused across batches
        whose prompt lengths differ.
        """
        self.model.eval()
        k = self.t.num_generations
        step_b = self.t.generation_batch_size or len(batch.samples)
        completions: list[torch.Tensor] = []
        for lo in range(0, len(batch.samples), step_b):
            idx = list(range(lo, min(lo + step_b, len(batch.samples))))
            ids, attn = self._left_pad([batch.prompt_ids[i] for i in idx])
            ids = ids.to(self.device)
            kwargs = self.family.text_inputs(batch.prompts, idx, [0] * len(idx), ids.shape[1], self.device)
            if self.t.static_cache:
                kwargs["cache_implementation"] = "static"
                kwargs["max_cache_len"] = -(-(ids.shape[1] + self.t.max_new_tokens) // 128) * 128
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast), self._attention():
                embeds = self._merged_embeds(self.model, batch, idx, ids)
                if embeds is not None:
                    kwargs["inputs_embeds"] = embeds
                else:
                    kwargs.update(self.family.vision_inputs(batch.prompts, idx, self.device, self.model.dtype))
                sampling = {"do_sample": True, "temperature": self.t.temperature, "top_p": self.t.top_p,
                            "top_k": self.t.top_k, "max_new_tokens": self.t.max_new_tokens,
                            "eos_token_id": self.eos_id, "pad_token_id": self.pad_id,
                            "suppress_tokens": self.suppress}
                if self.t.static_cache or not self.family.prefill_once:
                    out = self.model.generate(input_ids=ids, attention_mask=attn.to(self.device), **kwargs,
                                              **sampling, num_return_sequences=k)[:, ids.shape[1]:]
                else:
                    text = {name: kwargs.pop(name) for name in self.family.text_keys if name in kwargs}
                    out = generation.complete(self.model, ids, attn.to(self.device), k=k, text_inputs=text,
                                              cuda_graph=self.t.cuda_graph_decode,
                                              compile_step=self.t.compile_decode, **kwargs, **sampling)
            for seq in out.cpu():
                eos = (seq == self.eos_id).nonzero()
                completions.append(seq[: int(eos[0]) + 1] if len(eos) else seq)
        return completions

    def _left_pad(self, seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        n = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), n), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(seqs), n), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, n - len(s):] = s
            attn[i, n - len(s):] = 1
        return ids, attn

    def _reward_names(self) -> list[str]:
        """Rewards computed each RL batch: the weighted ones, plus accuracy (it picks the mode) and the
        checker's score when template evolution ranks traces by it."""
        names = list(self.t.reward_weights)
        extra = ["accuracy"] + (["thinking"] if self.t.template_evolution else [])
        if self.t.switch == "threshold":  # it judges "correct" on the mean of the three
            extra += ["format", "thinking"]
        return list(dict.fromkeys([*names, *extra]))

    def _score(self, samples: list[Sample], texts: list[str]) -> dict[str, torch.Tensor]:
        """Each reward of the table (DESIGN.md section 2) per completion, each (B, K), and their weighted total."""
        k = self.t.num_generations
        owners = [samples[i // k] for i in range(len(texts))]
        ctx = RewardContext(self.t.prompt_style, self.t.min_thinking_chars, self.checker, k)
        out = {name: torch.tensor(self.rewards[name](texts, owners, ctx), dtype=torch.float32).view(-1, k)
               for name in self._reward_names()}
        out["total"] = self._total(out)
        return out

    def _total(self, rewards: dict[str, torch.Tensor]) -> torch.Tensor:
        """The reward the advantages are computed from, (B, K): sum(train.reward_weights[name] * rewards[name])."""
        return sum((float(w) * rewards[name] for name, w in self.t.reward_weights.items()),
                   torch.zeros_like(rewards["accuracy"]))

    # ---------------------------------------------------------------- update
    def _token_logps(self, model: PreTrainedModel, batch: Batch, rows: list[Row]) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs of each row's completion tokens: ((N, T), mask (N, T)), T = longest completion."""
        seqs = [torch.cat([batch.prompt_ids[r.prompt], r.completion]) for r in rows]
        ids, attn = self._left_pad(seqs)
        t_max = max(len(r.completion) for r in rows)
        mask = torch.zeros((len(rows), t_max), dtype=torch.bool)
        for i, r in enumerate(rows):
            mask[i, t_max - len(r.completion):] = True
        idx = [r.prompt for r in rows]
        ids, attn = ids.to(self.device), attn.to(self.device)
        regional = self.update_model.active() if model is self.model and self.update_model is not None \
            else contextlib.nullcontext()
        kwargs = self.family.text_inputs(batch.prompts, idx, [len(r.completion) for r in rows], ids.shape[1],
                                         self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast), regional:
            embeds = self._merged_embeds(model, batch, idx, ids)
            if embeds is not None:  # vision encoder once per prompt, not once per row
                out = model(inputs_embeds=embeds, attention_mask=attn, logits_to_keep=t_max + 1, use_cache=False,
                            **kwargs)
            else:
                kwargs.update(self.family.vision_inputs(batch.prompts, idx, self.device, model.dtype))
                out = model(input_ids=ids, attention_mask=attn, logits_to_keep=t_max + 1, use_cache=False, **kwargs)
        logits = out.logits[:, :-1].float()  # (N, T, V): position j predicts token j+1
        temps = [r.temperature for r in rows]
        if any(t != 1.0 for t in temps):
            logits = logits / torch.tensor(temps, device=self.device).view(-1, 1, 1)
        targets = ids[:, -t_max:]
        # log_softmax gathered at the targets, without materialising the (N, T, V) log-probs
        token_logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
        return token_logps, mask.to(self.device)

    def _merged_embeds(self, model: PreTrainedModel, batch: Batch, prompts: list[int],
                       ids: torch.Tensor) -> torch.Tensor | None:
        """Input embeddings of `ids` (one row per entry of `prompts`) with the image features merged in,
        from the family's frozen-vision cache (`Family.merged_embeds`: Idefics3 only); None otherwise (the
        caller then passes the family's `vision_inputs`).

        A frozen encoder gives the same output for every row of a prompt and every forward of the batch,
        so its output is cached per batch here and shared by generation and every update micro-batch.
        """
        base = model
        if not isinstance(base, PreTrainedModel):  # a peft wrapper
            from peft import PeftModel

            if not isinstance(model, PeftModel):
                return None
            base = model.get_base_model()
        cached_batch, cache = self._vision_cache
        if cached_batch is not batch:
            cache = {}
            self._vision_cache = (batch, cache)
        return self.family.merged_embeds(model, base, batch.prompts, prompts, ids, cache, self.device)

    def _attention(self) -> contextlib.AbstractContextManager:
        return attention_kernels(self.attention_backends)

    @contextlib.contextmanager
    def _update_mode(self):
        """The model in train mode, with the update's attention kernels."""
        self.model.train()
        with self._attention():
            yield

    def _backward(self, batch: Batch, rows: list[Row], norm: dict, beta: float) -> list[LossParts]:
        """Forward/backward the kept rows in micro-batches; returns, per micro-batch, its share of the
        objective and the sums behind `loss/sft`, `loss/policy` and `kl` (`_loss_parts`).

        `beta` is the KL coefficient of this step: train.beta in the RL phase, 0 in SFT (the SFT baseline,
        two_stage's SFT stage and the budget switch's SFT step are plain NLL, as in the paper).
        """
        parts = []
        for lo in range(0, len(rows), self.t.micro_batch_size):
            chunk = rows[lo: lo + self.t.micro_batch_size]
            logps, mask = self._token_logps(self.model, batch, chunk)
            old = torch.stack([torch.nn.functional.pad(r.old_logps, (logps.shape[1] - len(r.old_logps), 0))
                               for r in chunk]).to(self.device) if chunk[0].old_logps is not None else logps.detach()
            ref = None
            if beta > 0:
                with torch.no_grad():
                    ref, _ = self._token_logps(self.ref_model, batch, chunk)
            adv = torch.tensor([r.advantage for r in chunk], device=self.device)
            per_token = algorithm.policy_loss(logps, old, adv, self.t.clip_eps, ref, beta)
            loss = algorithm.aggregate_loss(per_token, mask, self.t.loss_type, **norm) / self.t.grad_accum_steps
            loss.backward()
            with torch.no_grad():
                parts.append(LossParts(float(loss.detach()), self._loss_parts(chunk, logps.detach(), old, adv, ref,
                                                                             mask)))
        return parts

    def _loss_parts(self, chunk: list[Row], logps: torch.Tensor, old: torch.Tensor, adv: torch.Tensor,
                    ref: torch.Tensor | None, mask: torch.Tensor) -> dict[str, float]:
        """Sums behind the logged loss figures (docs/DESIGN.md, "What the logged losses mean"), each a
        per-row token mean: the memorised rows' NLL (`loss/sft`), the clipped surrogate of rollouts
        with a non-zero advantage (`loss/policy`) and, when beta > 0, the k3 KL of every row (`kl`)."""
        w = mask.to(logps.dtype)
        count = w.sum(dim=1).clamp(min=1.0)  # (N,)
        memorized = torch.tensor([r.memorized for r in chunk], device=logps.device)
        nll = -(logps * w).sum(dim=1) / count  # (N,)
        surrogate = (algorithm.policy_loss(logps, old, adv, self.t.clip_eps) * w).sum(dim=1) / count
        policy = ~memorized & (adv != 0)
        parts = {"sft_nll": nll[memorized].sum(), "sft_rows": memorized.sum(),
                 "policy": surrogate[policy].sum(), "policy_rows": policy.sum()}
        if ref is not None:
            parts["kl"] = ((algorithm.kl_k3(logps, ref) * w).sum(dim=1) / count).sum()
            parts["kl_rows"] = torch.tensor(len(chunk), device=logps.device)
        values = torch.stack([v.to(torch.float64) for v in parts.values()]).tolist()  # one host sync
        return dict(zip(parts, values, strict=True))

    def _sync_grads(self) -> None:
        """Average the gradients over processes, bucketed (`_all_reduce_mean`); a process whose rows were
        all dropped joins with zeros."""
        if self.world == 1:
            return
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self._all_reduce_mean([p.grad for p in self.params], self.world)

    @staticmethod
    def _all_reduce_mean(tensors: list[torch.Tensor], world: int, bucket_bytes: int = 25 * 2**20) -> None:
        """In place: each tensor becomes its mean over the `world` processes.

        Tensors are packed, in order and per (device, dtype), into flat buckets of about `bucket_bytes`
        (DDP's default 25 MB), one all-reduce per bucket instead of one per tensor: a few large
        collectives use the link's bandwidth where hundreds of small ones pay its latency each.
        Every process passes the same tensors in the same order, so the buckets match.
        """
        buckets: list[list[torch.Tensor]] = []
        filling: dict[tuple[torch.device, torch.dtype], tuple[list[torch.Tensor], int]] = {}
        for t in tensors:
            key = (t.device, t.dtype)
            bucket, size = filling.get(key, ([], 0))
            nbytes = t.numel() * t.element_size()
            if bucket and size + nbytes > bucket_bytes:
                buckets.append(bucket)
                bucket, size = [], 0
            bucket.append(t)
            filling[key] = (bucket, size + nbytes)
        buckets.extend(bucket for bucket, _ in filling.values())
        for bucket in buckets:
            flat = torch.cat([t.reshape(-1) for t in bucket])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat.div_(world)
            for t, part in zip(bucket, flat.split([t.numel() for t in bucket]), strict=True):
                t.copy_(part.view_as(t))

    # ---------------------------------------------------------------- one generation batch: rollout, scoring, rows
    def _rl_rows(self, batch: Batch) -> Plan:
        """Generate, score, pick modes under `train.switch` and build the update rows of one generation batch.

        A memorised group's reference trace takes the place of its rollout `algorithm.REPLACED`; the
        normalisers in `Plan.norm` are those of all B*K rows of the official update
        (`algorithm.kept_rollouts` says which rollouts enter it).
        """
        t0 = time.perf_counter()
        completions = self._generate(batch)
        generation_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True)
        rewards = self._score(batch.samples, texts)
        modes, adv, memorize, ref_adv = self._switch(rewards)
        k, n_prompts = self.t.num_generations, len(batch.samples)
        mem_idx = memorize.nonzero().flatten().tolist()
        texts_of = self._target_texts([batch.samples[b] for b in mem_idx], self._memorize_source())
        target_of = {b: self._encode_target(t) for b, t in zip(mem_idx, texts_of, strict=True)}
        keep = algorithm.kept_rollouts(adv, memorize, self.t.beta)  # (B, K)
        keep_targets = ref_adv != 0 or self.t.beta > 0  # anneal past its horizon: the reference carries nothing
        rows: list[Row] = []
        for b in range(n_prompts):
            if b in target_of and keep_targets:
                rows.append(Row(b, target_of[b], ref_adv, 1.0, memorized=True))
            rows.extend(Row(b, completions[b * k + j], float(adv[b, j]), self.t.temperature)
                        for j in range(k) if keep[b, j])
        if self.t.template_evolution:
            self._evolve_template(texts, rewards, modes)
        reward_s = time.perf_counter() - t0
        lengths = torch.tensor([len(c) for c in completions], dtype=torch.long).view(n_prompts, k)  # (B, K)
        clipped = torch.tensor([len(c) >= self.t.max_new_tokens and c[-1] != self.eos_id for c in completions])
        metrics = {
            "time/generation_s": generation_s, "time/reward_s": reward_s,
            **{f"reward/{name}": float(value.mean()) for name, value in rewards.items()},
            **algorithm.mode_fractions(modes),
            "frac_reward_zero_std": float((rewards["total"].std(dim=1) == 0).float().mean()),
            "completion/mean_length": float(lengths.float().mean()),
            "completion/clipped_ratio": float(clipped.float().mean()),
            "tokens": int(lengths.sum()),
        }
        target_lengths = torch.tensor([len(target_of[b]) if b in target_of else 0 for b in range(n_prompts)])
        norm = {"total_rows": n_prompts * k,
                "total_tokens": algorithm.batch_token_count(lengths, memorize, target_lengths),
                "max_completion_len": self.t.max_new_tokens, "kept_rows": len(rows)}
        failed = (modes == algorithm.MEMORIZE).nonzero().flatten().tolist() if self.t.switch == "budget" else []
        return Plan(rows, norm, metrics, failed)

    def _switch(self, rewards: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """The switching strategy (DESIGN.md section 2, `train.switch`) applied to one batch's rewards.

        Returns modes (B,) (logged as mode/*; `anneal` and `grpo` log the binary rule's modes), the rollouts'
        advantages (B, K), memorize (B,) bool (the groups whose reference trace takes rollout REPLACED's place
        in this update) and the advantage of those reference rows.
        """
        t = self.t
        if t.switch == "threshold":
            correct = algorithm.soft_correct(rewards["accuracy"], rewards["format"], rewards["thinking"],
                                             t.switch_threshold)
        else:
            correct = rewards["accuracy"] > 0.5  # (B, K)
        modes = algorithm.select_modes(correct)  # (B,)
        nobody = torch.zeros_like(modes, dtype=torch.bool)
        if t.method != "dyme":  # grpo: no memorisation; groups with equal rewards get 0 by construction
            return modes, algorithm.group_advantages(rewards["total"], t.adv_eps, t.scale_rewards), nobody, 1.0
        if t.switch == "anneal":
            weight = self._anneal_weight()
            adv = algorithm.anneal_advantages(rewards["total"], weight, t.adv_eps, t.scale_rewards)
            return modes, adv, torch.ones_like(nobody), weight
        adv = algorithm.dyme_advantages(rewards["total"], modes, t.adv_eps, t.scale_rewards)
        if t.switch == "budget":  # failed groups' references wait in the buffer (`Plan.failed`)
            return modes, adv, nobody, 1.0
        return modes, adv, modes == algorithm.MEMORIZE, 1.0

    def _anneal_weight(self) -> float:
        return algorithm.anneal_weight(self.step, self.t.switch_anneal_steps or self.t.max_steps)

    def _memorize_source(self) -> str:
        return "refined" if self.t.use_refiner else "hint"

    def _evolve_template(self, texts: list[str], rewards: dict, modes: torch.Tensor) -> None:
        k = self.t.num_generations
        for b in (modes == algorithm.EXPLORE).nonzero().flatten().tolist():
            scores = rewards["thinking"][b] * rewards["accuracy"][b]
            j = int(scores.argmax())
            if scores[j] > 0:
                self.templates.propose(parse_completion(texts[b * k + j]).thinking, float(scores[j]))

    def _sft_rows(self, batch: Batch, source: str) -> Plan:
        """One reference trace per prompt, advantage +1 (token-mean NLL); `source`: refined | hint."""
        targets = self._target_texts(batch.samples, source)
        rows = [Row(b, self._encode_target(t), 1.0, 1.0, memorized=True) for b, t in enumerate(targets)]
        n_tok = int(sum(len(r.completion) for r in rows))
        return Plan(rows, {"total_rows": len(rows), "total_tokens": n_tok,
                           "max_completion_len": self.t.max_target_tokens, "kept_rows": len(rows)})

    def _step_prompts(self, step: int) -> tuple[str, str, list[list[int]]]:
        """(phase, SFT target source, prompts of each of the step's grad_accum_steps batches on this rank).

        Under switch=budget a full buffer makes this step pure SFT on the oldest `algorithm.budget_prompts`
        buffered prompts (each rank takes every world-th); they leave the buffer.
        """
        a = self.t.grad_accum_steps
        capacity = algorithm.budget_prompts(self.t.switch_budget, self.t.batch_size, a, self.world)
        if self.t.switch == "budget" and algorithm.budget_full(len(self.buffer), capacity):
            mine, self.buffer = self.buffer[:capacity][self.rank::self.world], self.buffer[capacity:]
            per = len(mine) // a
            return "sft", self._memorize_source(), [mine[i * per:(i + 1) * per] for i in range(a)]
        return self.phase(step), self.t.sft_target, [self._batch_indices(step, accum) for accum in range(a)]

    def _gather_indices(self, indices: list[int]) -> list[int]:
        """Every rank's `indices` (at most batch_size each), in rank order, on every rank."""
        if self.world == 1:
            return indices
        mine = torch.full((self.t.batch_size,), -1, dtype=torch.long, device=self.device)
        mine[: len(indices)] = torch.tensor(indices, dtype=torch.long)
        every = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(every, mine)
        return [int(i) for t in every for i in t.tolist() if i >= 0]

    # ---------------------------------------------------------------- one train step: the batches, the update
    def train_step(self) -> dict[str, float]:
        """One step: `grad_accum_steps` generation batches, `num_iterations` optimizer steps.

        Iteration 0 accumulates the gradient of every batch right after it is generated, then steps.
        Each further iteration (num_iterations > 1, TRL's semantics: the generation is reused)
        accumulates over the same batches again, with the PPO ratio to the log-probs of the policy that
        generated them, then steps. The LR schedule advances once per train step, so `max_steps`,
        `warmup_steps` and the schedule count train steps whatever num_iterations is. `grad_norm` is a
        mean over the step's optimizer steps; `learning_rate` is the rate they used.
        """
        step = self.step
        phase, source, prompts = self._step_prompts(step)
        beta = self.t.beta if phase == "rl" else 0.0
        t_start = time.perf_counter()
        iterations = self.t.num_iterations
        lr = self.scheduler.get_last_lr()[0]  # the rate this step's updates use
        self.optimizer.zero_grad(set_to_none=True)
        plans: list[Plan] = []
        losses: list[LossParts] = []
        reused: list[tuple[Batch, Plan]] = []  # what iterations after the first replay
        update_s = 0.0
        for accum, indices in enumerate(prompts):
            # seeded per (seed, step, accum, rank): resume replays exactly the same samples and draws
            torch.manual_seed(((self.t.seed * 100_003 + step) * 101 + accum) * 1009 + self.rank)
            batch = self._prepare([self.samples[i] for i in indices])
            plan = self._sft_rows(batch, source) if phase == "sft" else self._rl_rows(batch)
            if self.t.switch == "budget" and phase == "rl":
                self.buffer.extend(self._gather_indices([indices[b] for b in plan.failed]))
            plans.append(plan)
            t0 = time.perf_counter()
            if plan.rows:
                with self._update_mode():
                    if iterations > 1:
                        self._store_old_logps(batch, plan.rows)
                    losses += self._backward(batch, plan.rows, plan.norm, beta)
            if iterations > 1:
                reused.append((batch, plan))
            update_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        grad_norms = [self._optimizer_step()]
        for _ in range(1, iterations):
            self.optimizer.zero_grad(set_to_none=True)
            for batch, plan in reused:
                if plan.rows:
                    with self._update_mode():
                        losses += self._backward(batch, plan.rows, plan.norm, beta)
            grad_norms.append(self._optimizer_step())
        self.scheduler.step()
        update_s += time.perf_counter() - t0
        n_samples = sum(len(i) for i in prompts) * self.world * (1 if phase == "sft" else self.t.num_generations)
        record = self._step_record(phase, beta, plans, losses, update_s)
        elapsed = time.perf_counter() - t_start
        record.update({
            "step": step + 1,
            "phase_sft": float(phase == "sft"),
            "learning_rate": lr,
            "grad_norm": sum(grad_norms) / len(grad_norms),
            "samples_per_s": n_samples / elapsed,
            "tokens_per_s": record["tokens"] / elapsed,
            "time/step_s": elapsed,
            "memory/peak_mb": peak_memory_mb(self.device),
            **self.refiner.stats.as_dict(),
            "checker/llm_calls": float(self.checker.stats.llm_calls),
            "checker/fallbacks": float(self.checker.stats.fallbacks),
            "template/version": float(self.templates.best),
        })
        if self.t.switch == "anneal":
            record["switch/reference_advantage"] = self._anneal_weight()
        if self.t.switch == "budget":
            record["switch/buffered"] = float(len(self.buffer))
        if self.compile_cache is not None and self.rank == 0:
            self.compile_cache.save()  # only when this step compiled something new; outside the timed step
        self.step += 1
        return record

    def _step_record(self, phase: str, beta: float, plans: list[Plan], losses: list[LossParts],
                     update_s: float) -> dict[str, float]:
        """The step's figures, all processes reduced: per-batch measurements (rewards, modes, lengths: means over
        the grad_accum_steps batches; tokens and phase seconds: sums), rows, and the losses (`_loss_figures`)."""
        a = self.t.grad_accum_steps

        def summed(key: str) -> float:
            return sum((p.metrics.get(key, 0.0) for p in plans), 0.0)

        mean_keys = [*(f"mode/{name}" for name in algorithm.MODE_NAMES.values()), "frac_reward_zero_std",
                     "completion/mean_length", "completion/clipped_ratio"]
        sum_keys = ["sft_nll", "sft_rows", "policy", "policy_rows", *(["kl", "kl_rows"] if self.t.beta > 0 else [])]
        m = {
            **{key: summed(key) / a for key in mean_keys},
            "tokens": summed("tokens"), "time/generation_s": summed("time/generation_s"),
            "time/reward_s": summed("time/reward_s"), "time/update_s": update_s,
            "loss": 0.0,  # filled from the loss figures below
            "loss/objective": sum((part.objective for part in losses), 0.0) / self.t.num_iterations,
            "rows/kept": sum((len(p.rows) for p in plans), 0.0),
            "rows/total": sum((p.norm["total_rows"] for p in plans), 0.0),
            **{f"reward/{name}": summed(f"reward/{name}") / a for name in [*self._reward_names(), "total"]},
            **{f"_{key}": sum((part.sums.get(key, 0.0) for part in losses), 0.0) for key in sum_keys},
        }
        m = self._reduce(m)
        figures = self._loss_figures(m)
        m["loss"] = figures.get("loss/sft", 0.0) + figures.get("loss/policy", 0.0) + beta * figures.get("kl", 0.0)
        m.update(figures)
        return m

    @torch.no_grad()
    def _store_old_logps(self, batch: Batch, rows: list[Row]) -> None:
        """Log-probs of the generating policy, the denominator of the PPO ratio when a batch is reused."""
        for lo in range(0, len(rows), self.t.micro_batch_size):
            chunk = rows[lo: lo + self.t.micro_batch_size]
            logps, mask = self._token_logps(self.model, batch, chunk)
            for r, lp, mk in zip(chunk, logps, mask, strict=True):
                r.old_logps = lp[mk].detach().cpu()

    @staticmethod
    def _loss_figures(m: dict[str, float]) -> dict[str, float]:
        """Pops the summed loss parts (`_`-prefixed) from m and returns the logged figures (docs/DESIGN.md,
        "What the logged losses mean"): `loss/sft` the memorised targets' token-mean NLL, `loss/policy` the
        clipped surrogate of rollouts with a non-zero advantage, `kl` (beta > 0), each a mean over its rows and
        absent when a step had no such rows; `loss/nll_memorized` is `loss/sft`, or 0, under its older name."""
        out = {}
        for name, total, count in (("loss/sft", "_sft_nll", "_sft_rows"), ("loss/policy", "_policy", "_policy_rows"),
                                   ("kl", "_kl", "_kl_rows")):
            s, n = m.pop(total, 0.0), m.pop(count, 0.0)
            if n > 0:
                out[name] = s / n
        out["loss/nll_memorized"] = out.get("loss/sft", 0.0)
        return out

    def _optimizer_step(self) -> float:
        """Average gradients over processes, clip, step the optimizer; returns the gradient norm before clipping.
        The LR scheduler is advanced by `train_step`, once per train step."""
        self._sync_grads()
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.tensor(0.0)
        if self.t.max_grad_norm > 0 and grads:
            torch.nn.utils.clip_grads_with_norm_(self.params, self.t.max_grad_norm, norm)
        self.optimizer.step()
        return float(norm)

    def _reduce(self, m: dict[str, float]) -> dict[str, float]:
        """Mean of per-process metrics; sums for counts of rows and tokens and for the loss parts."""
        if self.world == 1:
            return m
        keys = sorted(m)
        t = torch.tensor([m[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        summed = ("rows/kept", "rows/total", "tokens")
        return {k: float(v) if k in summed or k.startswith("_") else float(v) / self.world
                for k, v in zip(keys, t.tolist(), strict=True)}

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        """checkpoint-<step> under the checkpoint root: atomic, verified, no pickle (checkpoint.py).

        Only rank 0 writes; every process waits for it. The RNG states are rank 0's: each step reseeds
        per (seed, step, accum, rank), so no rank's stream depends on them.
        """
        ckpt = self.checkpoint_root / f"checkpoint-{self.step}"
        if self.rank == 0:
            state = {"step": self.step, "history": self.history, "optimizer": self.optimizer.state_dict(),
                     "scheduler": self.scheduler.state_dict(), "rng": checkpoint.rng_state(),
                     "config": {k: v for k, v in self.cfg.to_dict().items() if k in RESUME_SECTIONS},
                     # cumulative counters in the metrics: a resumed run continues them
                     "refiner_stats": self.refiner.stats.as_dict(),
                     "switch_buffer": self.buffer,  # switch=budget: the failed prompts waiting for the SFT step
                     "checker_stats": {"calls": self.checker.stats.llm_calls,
                                       "fallbacks": self.checker.stats.fallbacks}}
            checkpoint.write_checkpoint(self.checkpoint_root, self.step, self.model, state,
                                        {"templates.json": self.templates.save}, keep=self.t.keep_checkpoints)
        if self.world > 1:
            dist.barrier()
        return ckpt

    def load_checkpoint(self, ckpt: Path, same_config: bool = False) -> None:
        """Restore model, optimizer, scheduler, RNG, step, history and templates; nothing is unpickled.

        A checkpoint written under other data, model or training settings (beyond RESUME_FREE_KEYS) is
        refused when `same_config` (resume_from=auto: a shared checkpoint_dir may hold another run's
        checkpoints) and resumed with a warning otherwise (an explicit path is the user's choice).
        """
        state = checkpoint.read_checkpoint(ckpt, self.model)
        current = {k: v for k, v in self.cfg.to_dict().items() if k in RESUME_SECTIONS}
        changes = checkpoint.config_changes(state["config"], current, RESUME_FREE_KEYS)
        if changes and same_config:
            raise checkpoint.CheckpointError(
                f"{ckpt} was written by a run with other settings ({'; '.join(changes[:3])}); resume it with "
                "train.resume_from=<path>, or start fresh with another train.checkpoint_dir")
        if changes:
            log.warning("resuming %s under other settings: %s", ckpt, "; ".join(changes))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        checkpoint.set_rng_state(state["rng"])
        self.step = state["step"]
        self.history = state["history"]
        self.buffer = [int(i) for i in state.get("switch_buffer", [])]
        self.refiner.stats.add(**{k.removeprefix("refiner/"): v for k, v in state["refiner_stats"].items()})
        self.checker.stats.add(**state["checker_stats"])
        self.templates = TemplatePool.load(ckpt / "templates.json")
        log.info("resumed from %s at step %d", ckpt, self.step)

    def latest_checkpoint(self) -> Path | None:
        """The newest intact checkpoint; broken newer ones are skipped with a warning naming the file."""
        return checkpoint.choose_checkpoint(self.checkpoint_root, self.model)

    # ---------------------------------------------------------------- main
    def train(self) -> dict[str, float]:
        """Run to `max_steps`; returns the last logged metrics.

        Everything (config.yaml, metrics.jsonl, model/, summary, history, and the checkpoints unless
        `checkpoint_dir` is set) is written to a staging folder beside `output_dir` and published by a
        rename when the run succeeds: a failed or killed run leaves a finished run's outputs untouched.
        """
        main = self.rank == 0
        # validated again before anything is written: the CLI fills keys from the environment after the
        # first check (MLflow's tracking URI), and a credential must reach neither config.yaml nor MLflow
        replace(self.cfg)
        self.stage = checkpoint.staging_dir(self.out)
        if main:
            checkpoint.begin_run(self.out, resume=bool(self.t.resume_from))
        if self.world > 1:
            dist.barrier()
        if not self.t.checkpoint_dir:
            self.checkpoint_root = self.stage  # an interrupted run's checkpoints wait there for resume
        if main and self.device.type == "cpu":
            log.info("training on the CPU with %d torch thread(s) (OMP_NUM_THREADS=N sets another count)",
                     torch.get_num_threads())
        if self.t.resume_from == "auto":
            ckpt = self.latest_checkpoint()
            if ckpt is not None:
                self.load_checkpoint(ckpt, same_config=True)
        elif self.t.resume_from:
            try:
                self.load_checkpoint(Path(self.t.resume_from))
            except checkpoint.CheckpointError as e:
                raise checkpoint.CheckpointError(f"train.resume_from: {e}") from None
        if main:
            # register.* is where this run is tracked (resolved from the environment: store path, git
            # commit, experiment name): provenance that MLflow keeps, not a setting of the run
            dump_config(self.cfg, self.stage / "config.yaml", omit=("register",))
            self._open_sinks()
        bar = tqdm(total=self.t.max_steps, initial=self.step, disable=not (main and self.t.progress_bar),
                   desc=f"train[{self.t.method}]", dynamic_ncols=True)
        last: dict[str, float] = {}
        try:
            with logging_redirect_tqdm():  # log lines print above the bar, not through it
                while self.step < self.t.max_steps:
                    last = self.train_step()
                    self.history.append(last)
                    if main and (self.step % self.t.logging_steps == 0 or self.step == self.t.max_steps):
                        self._log(last)
                    bar.update(1)
                    bar.set_postfix(loss=f"{last['loss']:.3f}", acc=f"{last['reward/accuracy']:.2f}",
                                    mem=f"{last['mode/memorize']:.2f}")
                    if self.t.save_steps and self.step % self.t.save_steps == 0 and self.step < self.t.max_steps:
                        self.save_checkpoint()
                    if self._stop_requested() and self.step < self.t.max_steps:
                        raise TrainingStopped(f"stopped at step {self.step}")
        except KeyboardInterrupt:  # Ctrl-C, or a requested stop (the CLI sets `stop` on SIGTERM)
            self._close_sinks("KILLED")
            raise
        except BaseException:
            self._close_sinks("FAILED")
            raise
        finally:
            bar.close()
        if main:
            save_model(self.model, self.processor, self.stage / "model")
            self.templates.save(self.stage / "templates.json")
            (self.stage / "summary.json").write_text(json.dumps(split_volatile(last)[0], indent=2))
            (self.stage / TIMING_FILE).write_text(json.dumps(timing_summary(self.history), indent=2))
            # a JSON list: what `dvc plots` reads (it does not read JSON Lines); DVC looks up a plotted field
            # in the first row, so a figure that some steps or the whole run lack (loss/policy, loss/sft: the
            # `loss` plot of dvc.yaml) is null there
            rows = [split_volatile(row)[0] for row in self.history]
            keys = list(dict.fromkeys([*(k for row in rows for k in row), "loss/sft", "loss/policy"]))
            (self.stage / "history.json").write_text(json.dumps([{k: row.get(k) for k in keys} for row in rows]))
            self._close_sinks()
            checkpoint.publish_run(self.stage, self.out)
        if self.world > 1:
            dist.barrier()
        return last

    def _stop_requested(self) -> bool:
        """`stop` is set on this process or, under torchrun, on any: every rank stops after the same step."""
        flag = self.stop is not None and self.stop.is_set()
        if self.world == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def _open_sinks(self) -> None:
        sinks = set(self.t.report_to) - {"none"}
        if "jsonl" in sinks:
            path, timings = self.stage / "metrics.jsonl", self.stage / TIMINGS_FILE
            # a resumed run keeps the logged history up to its checkpoint and nothing after it
            logged = [split_volatile(h) for h in self.history
                      if h["step"] % self.t.logging_steps == 0 or h["step"] == self.t.max_steps]
            path.write_text("".join(json.dumps(kept) + "\n" for kept, _ in logged))
            timings.write_text("".join(json.dumps(volatile) + "\n" for _, volatile in logged))

            def append_jsonl(metrics: dict, step: int) -> None:
                kept, volatile = split_volatile(metrics)
                _append_jsonl(path, kept)
                _append_jsonl(timings, volatile)

            self.reporters.append(append_jsonl)
        if "mlflow" in sinks:
            from dyme_core.tracking import MlflowReporter, read_run_id  # the one module that imports mlflow

            # the reporter keeps its run id (and any buffered metrics) in the run dir: the staged one,
            # published with the rest; a resumed training continues its MLflow run
            staged = replace(self.cfg, train=replace(self.t, output_dir=str(self.stage)))
            self._mlflow = MlflowReporter(staged, resume_run_id=read_run_id(self.stage) if self.step else None)
            self.reporters.append(self._mlflow.log_metrics)

    def _log(self, metrics: dict[str, float]) -> None:
        for report in self.reporters:
            report(metrics, int(metrics["step"]))
        log.info("step %d: loss %.4f (sft %.3f, policy %.3f) acc %.3f modes m/e/s %.2f/%.2f/%.2f", metrics["step"],
                 metrics["loss"], metrics.get("loss/sft", 0.0), metrics.get("loss/policy", 0.0),
                 metrics["reward/accuracy"], metrics["mode/memorize"], metrics["mode/explore"],
                 metrics["mode/skip"])

    def _close_sinks(self, status: str = "FINISHED") -> None:
        """End the MLflow run with `status` (FINISHED | FAILED | KILLED), once."""
        if self._mlflow is not None:
            mlflow_run, self._mlflow = self._mlflow, None
            mlflow_run.close(status)


def _append_jsonl(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


class TrainingStopped(KeyboardInterrupt):
    """Training stopped between steps on request (`stop`): handled as an interrupt, the run ends KILLED."""


def train(cfg: Config, dataset: Dataset, refined: dict[str, str] | None = None,
          llm_client: ChatClient | None = None, stop: threading.Event | None = None) -> dict[str, float]:
    """Library entry point of `dyme train`."""
    return DymeTrainer(cfg, dataset, refined, llm_client, stop=stop).train()


def load_refined(path: str | Path) -> dict[str, str]:
    """id -> refined trace, from the refine step's JSONL ('' or a missing file: none)."""
    p = Path(path) if path else None
    if p is None or not p.is_file():
        return {}
    with p.open() as f:
        return {row["id"]: row["trace"] for row in map(json.loads, f) if row.get("trace")}


