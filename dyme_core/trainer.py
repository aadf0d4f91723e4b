"""The trainer: DyME and its baselines (sft, grpo, two_stage) behind one switch (DESIGN.md sections 2, 7).

One optimizer step = `grad_accum_steps` generation batches. Per generation batch each process takes
`batch_size` prompts, preprocesses each image once, samples K completions per prompt, scores them
(format, accuracy, visual checker), picks a mode per prompt group (`algorithm.select_modes`) and
builds the update rows: K rollouts with GRPO advantages for EXPLORE groups, one refined reference
trace with advantage +1 for MEMORIZE groups, nothing for SKIP groups. Rows of weight 0 are dropped
before the forward pass; `algorithm.aggregate_loss` divides by the counts of the full batch, so the
gradient equals that of the official update over all B*K rows.

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
Resume is exact: data order and sampling are seeded by (seed, step, rank), and a checkpoint holds the
model and optimizer states.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm
from transformers import Idefics3ForConditionalGeneration, PreTrainedModel, ProcessorMixin

from dyme_core import algorithm
from dyme_core.checker import VisualChecker
from dyme_core.config import Config, dump_config
from dyme_core.data.loaders import Dataset
from dyme_core.data.schema import Sample
from dyme_core.llm import ChatClient
from dyme_core.models import (
    ANSWER_FLAG,
    GPU_ATTENTION,
    attention_kernels,
    build_prompt,
    load_model,
    load_processor,
    save_model,
    suppressed_token_ids,
)
from dyme_core.refiner import Refiner, TemplatePool
from dyme_core.rewards import accuracy_reward, direct_accuracy, format_reward, parse_completion

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
    samples: list[Sample]
    prompt_ids: list[torch.Tensor]  # per prompt (P_i,), no padding
    pixel_values: torch.Tensor  # (B, N_img, C, H, W)
    pixel_attention_mask: torch.Tensor | None


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
    ):
        self.cfg = cfg
        self.t = cfg.train
        self.rank, self.world = rank_and_world()
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
                               max_workers=self.t.llm.max_workers)
        # the refine step's pool: the template the offline targets were written with
        self.templates = TemplatePool.load(self.t.template_pool) if self.t.template_pool else TemplatePool()
        self.offline_template_version = self.templates.best
        self.step = 0
        self.history: list[dict] = []
        self.reporters: list[Callable[[dict, int], None]] = []
        self._mlflow = None
        self.eos_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id
        self.suppress = suppressed_token_ids(self.model, self.processor)
        self.attention_backends = GPU_ATTENTION if self.device.type == "cuda" else None  # see models.py
        # The update's forward through torch.compile (dynamic shapes: rows and lengths change every step).
        # The compiled wrapper shares the model's parameters; generate() keeps using the plain model.
        self.update_model = torch.compile(self.model, dynamic=True) if self.t.compile_update else None
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
        prompts = [build_prompt(self.processor, s.question, self.t.prompt_style) for s in samples]
        enc = self.processor(text=prompts, images=[[im] for im in images], return_tensors="pt", padding=True)
        ids, mask = enc["input_ids"], enc["attention_mask"].bool()
        prompt_ids = [ids[i][mask[i]] for i in range(len(samples))]
        return Batch(samples, prompt_ids, enc["pixel_values"], enc.get("pixel_attention_mask"))

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
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][: self.t.max_target_tokens]
        return torch.tensor([*ids, self.eos_id], dtype=torch.long)

    # ---------------------------------------------------------------- generation and scoring
    @torch.no_grad()
    def _generate(self, batch: Batch) -> list[torch.Tensor]:
        """K completions per prompt, sample-major: (B*K) tensors trimmed after the first eos.

        Idefics3 with a frozen vision encoder: the prompt embeddings (images merged in) are built once per
        prompt and expanded K times by `generate`, so the vision tower runs B times, not B*K times.
        With `train.static_cache` the cache length is rounded up to a multiple of 128 so that the
        compiled decode step is reused across batches whose prompt lengths differ.
        """
        self.model.eval()
        k = self.t.num_generations
        step_b = self.t.generation_batch_size or len(batch.samples)
        completions: list[torch.Tensor] = []
        for lo in range(0, len(batch.samples), step_b):
            idx = list(range(lo, min(lo + step_b, len(batch.samples))))
            ids, attn = self._left_pad([batch.prompt_ids[i] for i in idx])
            ids = ids.to(self.device)
            kwargs = {}
            if self.t.static_cache:
                kwargs["cache_implementation"] = "static"
                kwargs["max_cache_len"] = -(-(ids.shape[1] + self.t.max_new_tokens) // 128) * 128
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast), self._attention():
                embeds = self._merged_embeds(self.model, batch, idx, ids)
                if embeds is not None:
                    kwargs["inputs_embeds"] = embeds
                else:
                    kwargs["pixel_values"] = batch.pixel_values[idx].to(self.device, self.model.dtype)
                    if batch.pixel_attention_mask is not None:
                        kwargs["pixel_attention_mask"] = batch.pixel_attention_mask[idx].to(self.device)
                out = self.model.generate(
                    input_ids=ids, attention_mask=attn.to(self.device), **kwargs,
                    do_sample=True, temperature=self.t.temperature, top_p=self.t.top_p, top_k=self.t.top_k,
                    max_new_tokens=self.t.max_new_tokens, num_return_sequences=k,
                    eos_token_id=self.eos_id, pad_token_id=self.pad_id, suppress_tokens=self.suppress,
                )
            for seq in out[:, ids.shape[1]:].cpu():
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

    def _score(self, samples: list[Sample], texts: list[str]) -> dict[str, torch.Tensor]:
        """Reward components per completion, each (B, K)."""
        k = self.t.num_generations
        owners = [samples[i // k] for i in range(len(texts))]
        acc_fn = direct_accuracy if self.t.prompt_style == "direct" else accuracy_reward
        if self.t.prompt_style == "direct":
            fmt = [1.0] * len(texts)  # no thinking is asked for
        else:
            fmt = [format_reward(t, self.t.min_thinking_chars) for t in texts]
        acc = [acc_fn(t, s.references()) for t, s in zip(texts, owners, strict=True)]
        items = []
        for t, s in zip(texts, owners, strict=True):
            p = parse_completion(t)
            items.append((p.thinking, s.visual_facts, s.question, p.answer))
        think = self.checker.score_many(items) if self.t.prompt_style == "reason" else [0.0] * len(texts)
        w_f, w_a, w_t = self.t.reward_weights
        parts = {"format": fmt, "accuracy": acc, "thinking": think}
        out = {name: torch.tensor(v, dtype=torch.float32).view(-1, k) for name, v in parts.items()}
        out["total"] = w_f * out["format"] + w_a * out["accuracy"] + w_t * out["thinking"]
        return out

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
        forward = self.update_model if model is self.model and self.update_model is not None else model
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            embeds = self._merged_embeds(model, batch, idx, ids)
            if embeds is not None:  # vision encoder once per prompt, not once per row
                out = forward(inputs_embeds=embeds, attention_mask=attn, logits_to_keep=t_max + 1, use_cache=False)
            else:
                kwargs = {"pixel_values": batch.pixel_values[idx].to(self.device, model.dtype)}
                if batch.pixel_attention_mask is not None:
                    kwargs["pixel_attention_mask"] = batch.pixel_attention_mask[idx].to(self.device)
                out = forward(input_ids=ids, attention_mask=attn, logits_to_keep=t_max + 1, use_cache=False, **kwargs)
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
        """Input embeddings of `ids` (one row per entry of `prompts`) with the image features merged in.

        Only for Idefics3 models whose vision encoder is frozen; None otherwise (the caller then passes
        pixel_values). A frozen encoder gives the same output for every row of a prompt and every
        forward of the batch, so it runs once per batch image, without grad, and is cached; the
        trainable connector still runs with grad on every call. Same computation as
        Idefics3Model.get_image_features + inputs_merger (all-zero padding images are dropped), built
        from `inputs_embeds`, which every transformers 5.x release accepts.
        """
        base = model
        if not isinstance(base, PreTrainedModel):  # a peft wrapper
            from peft import PeftModel

            if not isinstance(model, PeftModel):
                return None
            base = model.get_base_model()
        if not isinstance(base, Idefics3ForConditionalGeneration):
            return None
        inner = base.model
        if any(p.requires_grad for p in inner.vision_model.parameters()):
            return None
        cached_batch, cache = self._vision_cache
        if cached_batch is not batch:
            cache = {}
            self._vision_cache = (batch, cache)
        # train mode differs from eval only through dropout: one forward serves generation and update
        # unless the vision tower has active dropout
        vision = inner.vision_model
        stochastic = vision.training and (getattr(vision.config, "attention_dropout", 0.0) > 0 or any(
            isinstance(mod, torch.nn.Dropout) and mod.p > 0 for mod in vision.modules()))
        key = (id(vision), stochastic)
        if key not in cache:
            b, n = batch.pixel_values.shape[:2]
            pixels = batch.pixel_values.to(self.device, inner.dtype).flatten(0, 1)  # (B*N, C, H, W)
            real = (pixels == 0.0).sum(dim=(-1, -2, -3)) != pixels.shape[1:].numel()  # (B*N,)
            counts = real.view(b, n).sum(dim=1).cpu()  # real images per prompt
            pixels = pixels[real].contiguous()
            if batch.pixel_attention_mask is None:
                pmask = torch.ones((pixels.shape[0], *pixels.shape[2:]), dtype=torch.bool, device=self.device)
            else:
                pmask = batch.pixel_attention_mask.to(self.device).flatten(0, 1)[real].contiguous()
            ps = base.config.vision_config.patch_size
            patch_mask = pmask.unfold(1, ps, ps).unfold(2, ps, ps).sum(dim=(-1, -2)) > 0  # (n_img, H/ps, W/ps)
            with torch.no_grad():
                states = inner.vision_model(pixel_values=pixels, patch_attention_mask=patch_mask)[0]
            cache[key] = (states, counts)  # states: (n_img, patches, D_vision)
        states, counts = cache[key]
        starts = (counts.cumsum(0) - counts).tolist()
        sel = [i for p in prompts for i in range(starts[p], starts[p] + int(counts[p]))]  # row-major images
        feats = inner.connector(states[torch.tensor(sel, device=self.device)])  # (n_sel, S, D), per image
        embeds = model.get_input_embeddings()(ids)  # (N, L, D)
        image_mask = (ids == base.config.image_token_id).unsqueeze(-1)
        if int(image_mask.sum()) * embeds.shape[-1] != feats.numel():
            raise ValueError(f"image tokens ({int(image_mask.sum())}) do not match image features {tuple(feats.shape)}")
        return embeds.masked_scatter(image_mask, feats.to(inner.dtype).to(embeds.dtype))

    def _attention(self) -> contextlib.AbstractContextManager:
        return attention_kernels(self.attention_backends)

    @contextlib.contextmanager
    def _update_mode(self):
        """The model in train mode, with the update's attention kernels."""
        self.model.train()
        with self._attention():
            yield

    def _backward(self, batch: Batch, rows: list[Row], norm: dict, m: dict) -> float:
        """Forward/backward the kept rows in micro-batches; returns this batch's loss share.

        Also sums the token-mean NLL of memorised rows into m (the SFT loss, to watch memorisation).
        """
        total = 0.0
        for lo in range(0, len(rows), self.t.micro_batch_size):
            chunk = rows[lo: lo + self.t.micro_batch_size]
            logps, mask = self._token_logps(self.model, batch, chunk)
            old = torch.stack([torch.nn.functional.pad(r.old_logps, (logps.shape[1] - len(r.old_logps), 0))
                               for r in chunk]).to(self.device) if chunk[0].old_logps is not None else logps.detach()
            ref = None
            if self.ref_model is not None:
                with torch.no_grad():
                    ref, _ = self._token_logps(self.ref_model, batch, chunk)
            adv = torch.tensor([r.advantage for r in chunk], device=self.device)
            per_token = algorithm.policy_loss(logps, old, adv, self.t.clip_eps, ref, self.t.beta)
            loss = algorithm.aggregate_loss(per_token, mask, self.t.loss_type, **norm) / self.t.grad_accum_steps
            loss.backward()
            total += float(loss.detach())
            with torch.no_grad():
                mem = torch.tensor([r.memorized for r in chunk], device=self.device)
                if mem.any():
                    nll = -(logps * mask).sum(1) / mask.sum(1).clamp(min=1)
                    m["nll_memorized"] += float(nll[mem].sum())
                    m["n_memorized"] += int(mem.sum())
        return total

    def _sync_grads(self) -> None:
        if self.world == 1:
            return
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(self.world)

    # ---------------------------------------------------------------- one generation batch
    def _rl_rows(self, batch: Batch, m: dict) -> tuple[list[Row], dict]:
        t0 = time.perf_counter()
        completions = self._generate(batch)
        m["time/generation_s"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True)
        rewards = self._score(batch.samples, texts)
        correct = rewards["accuracy"] > 0.5  # (B, K)
        modes = algorithm.select_modes(correct)  # (B,)
        if self.t.method == "dyme":
            adv = algorithm.dyme_advantages(rewards["total"], modes, self.t.adv_eps, self.t.scale_rewards)
        else:  # grpo: no memorisation; groups with equal rewards get 0 by construction
            adv = algorithm.group_advantages(rewards["total"], self.t.adv_eps, self.t.scale_rewards)
        k = self.t.num_generations
        rows: list[Row] = []
        memorize = [b for b in range(len(batch.samples))
                    if self.t.method == "dyme" and modes[b] == algorithm.MEMORIZE]
        targets = self._target_texts([batch.samples[b] for b in memorize],
                                     "refined" if self.t.use_refiner else "hint")
        target_of = dict(zip(memorize, targets, strict=True))
        for b in range(len(batch.samples)):
            if b in target_of:
                rows.append(Row(b, self._encode_target(target_of[b]), 1.0, 1.0, memorized=True))
                continue
            for j in range(k):
                if adv[b, j] != 0:  # zero-weight rows never reach the forward pass
                    rows.append(Row(b, completions[b * k + j], float(adv[b, j]), self.t.temperature))
        if self.t.template_evolution:
            self._evolve_template(texts, rewards, modes)
        m["time/reward_s"] += time.perf_counter() - t0
        lengths = torch.tensor([len(c) for c in completions], dtype=torch.float32)
        clipped = torch.tensor([len(c) >= self.t.max_new_tokens and c[-1] != self.eos_id for c in completions])
        for name in ("format", "accuracy", "thinking", "total"):
            m[f"reward/{name}"] += float(rewards[name].mean())
        for key, value in algorithm.mode_fractions(modes).items():
            m[key] += value
        m["frac_reward_zero_std"] += float((rewards["total"].std(dim=1) == 0).float().mean())
        m["completion/mean_length"] += float(lengths.mean())
        m["completion/clipped_ratio"] += float(clipped.float().mean())
        all_tokens = int(lengths.sum())
        m["tokens"] += all_tokens
        # memorised rows replace a rollout: count their tokens in place of that group's rollouts
        norm = {"total_rows": len(batch.samples) * k, "total_tokens": all_tokens,
                "max_completion_len": self.t.max_new_tokens, "kept_rows": len(rows)}
        return rows, norm

    def _evolve_template(self, texts: list[str], rewards: dict, modes: torch.Tensor) -> None:
        k = self.t.num_generations
        for b in (modes == algorithm.EXPLORE).nonzero().flatten().tolist():
            scores = rewards["thinking"][b] * rewards["accuracy"][b]
            j = int(scores.argmax())
            if scores[j] > 0:
                self.templates.propose(parse_completion(texts[b * k + j]).thinking, float(scores[j]))

    def _sft_rows(self, batch: Batch) -> tuple[list[Row], dict]:
        targets = self._target_texts(batch.samples, self.t.sft_target)
        rows = [Row(b, self._encode_target(t), 1.0, 1.0, memorized=True) for b, t in enumerate(targets)]
        n_tok = int(sum(len(r.completion) for r in rows))
        return rows, {"total_rows": len(rows), "total_tokens": n_tok,
                      "max_completion_len": self.t.max_target_tokens, "kept_rows": len(rows)}

    # ---------------------------------------------------------------- loop
    def train_step(self) -> dict[str, float]:
        step = self.step
        phase = self.phase(step)
        t_start = time.perf_counter()
        keys = ["reward/format", "reward/accuracy", "reward/thinking", "reward/total", "mode/memorize",
                "mode/explore", "mode/skip", "frac_reward_zero_std", "completion/mean_length",
                "completion/clipped_ratio", "tokens", "time/generation_s", "time/reward_s", "time/update_s",
                "loss", "rows/kept", "rows/total", "nll_memorized", "n_memorized"]
        m = dict.fromkeys(keys, 0.0)
        self.optimizer.zero_grad(set_to_none=True)
        for accum in range(self.t.grad_accum_steps):
            # seeded per (seed, step, accum, rank): resume replays exactly the same samples and draws
            torch.manual_seed(((self.t.seed * 100_003 + step) * 101 + accum) * 1009 + self.rank)
            batch = self._prepare([self.samples[i] for i in self._batch_indices(step, accum)])
            rows, norm = self._sft_rows(batch) if phase == "sft" else self._rl_rows(batch, m)
            m["rows/kept"] += len(rows)
            m["rows/total"] += norm["total_rows"]
            t0 = time.perf_counter()
            for it in range(self.t.num_iterations):
                with self._update_mode():
                    if self.t.num_iterations > 1 and it == 0 and rows:
                        with torch.no_grad():  # old policy log-probs for the PPO ratio
                            for lo in range(0, len(rows), self.t.micro_batch_size):
                                chunk = rows[lo: lo + self.t.micro_batch_size]
                                logps, mask = self._token_logps(self.model, batch, chunk)
                                for r, lp, mk in zip(chunk, logps, mask, strict=True):
                                    r.old_logps = lp[mk].detach().cpu()
                    if rows:
                        m["loss"] += self._backward(batch, rows, norm, m)
                if it < self.t.num_iterations - 1:
                    self._optimizer_step()
                    self.optimizer.zero_grad(set_to_none=True)
            m["time/update_s"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        grad_norm = self._optimizer_step()
        m["time/update_s"] += time.perf_counter() - t0
        a = self.t.grad_accum_steps
        for key in keys:
            if key.startswith(("reward/", "mode/", "frac_", "completion/")):
                m[key] /= a
        m = self._reduce(m)
        m["loss/nll_memorized"] = m.pop("nll_memorized") / max(m.pop("n_memorized"), 1.0)
        elapsed = time.perf_counter() - t_start
        n_samples = self.t.batch_size * a * self.world * (1 if phase == "sft" else self.t.num_generations)
        m.update({
            "step": step + 1,
            "phase_sft": float(phase == "sft"),
            "learning_rate": self.scheduler.get_last_lr()[0],
            "grad_norm": grad_norm,
            "samples_per_s": n_samples / elapsed,
            "tokens_per_s": m["tokens"] / elapsed,
            "time/step_s": elapsed,
            "memory/peak_mb": peak_memory_mb(self.device),
            **self.refiner.stats.as_dict(),
            "checker/llm_calls": float(self.checker.stats.llm_calls),
            "checker/fallbacks": float(self.checker.stats.fallbacks),
            "template/version": float(self.templates.best),
        })
        self.step += 1
        return m

    def _optimizer_step(self) -> float:
        self._sync_grads()
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.tensor(0.0)
        if self.t.max_grad_norm > 0 and grads:
            torch.nn.utils.clip_grads_with_norm_(self.params, self.t.max_grad_norm, norm)
        self.optimizer.step()
        self.scheduler.step()
        return float(norm)

    def _reduce(self, m: dict[str, float]) -> dict[str, float]:
        """Mean of per-process metrics (sums for counts of rows and tokens)."""
        if self.world == 1:
            return m
        keys = sorted(m)
        t = torch.tensor([m[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        summed = ("rows/kept", "rows/total", "tokens", "nll_memorized", "n_memorized")
        return {k: float(v) if k in summed else float(v) / self.world for k, v in zip(keys, t.tolist(), strict=True)}

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        ckpt = self.checkpoint_root / f"checkpoint-{self.step}"
        if self.rank == 0:
            ckpt.mkdir(parents=True, exist_ok=True)
            torch.save(self.model.state_dict(), ckpt / "model_state.pt")
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                        "step": self.step, "history": self.history}, ckpt / "trainer_state.pt")
            self.templates.save(ckpt / "templates.json")
        if self.world > 1:
            dist.barrier()
        return ckpt

    def load_checkpoint(self, ckpt: Path) -> None:
        state = torch.load(ckpt / "trainer_state.pt", weights_only=False, map_location="cpu")
        self.model.load_state_dict(torch.load(ckpt / "model_state.pt", weights_only=True, map_location=self.device))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        self.history = state["history"]
        self.templates = TemplatePool.load(ckpt / "templates.json")
        log.info("resumed from %s at step %d", ckpt, self.step)

    def latest_checkpoint(self) -> Path | None:
        ckpts = sorted(self.checkpoint_root.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        return ckpts[-1] if ckpts else None

    # ---------------------------------------------------------------- main
    def train(self) -> dict[str, float]:
        """Run to `max_steps`; returns the last logged metrics. Writes model/, metrics.jsonl, config.yaml."""
        main = self.rank == 0
        if self.t.resume_from:
            ckpt = self.latest_checkpoint() if self.t.resume_from == "auto" else Path(self.t.resume_from)
            if ckpt is not None:
                if not (ckpt / "trainer_state.pt").is_file():
                    raise FileNotFoundError(f"train.resume_from: no checkpoint at {ckpt}")
                self.load_checkpoint(ckpt)
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            dump_config(self.cfg, self.out / "config.yaml")
            self._open_sinks()
        bar = tqdm(total=self.t.max_steps, initial=self.step, disable=not (main and self.t.progress_bar),
                   desc=f"train[{self.t.method}]", dynamic_ncols=True)
        last: dict[str, float] = {}
        while self.step < self.t.max_steps:
            last = self.train_step()
            self.history.append(last)
            if main and (self.step % self.t.logging_steps == 0 or self.step == self.t.max_steps):
                self._log(last)
            bar.update(1)
            bar.set_postfix(acc=f"{last['reward/accuracy']:.2f}", mem=f"{last['mode/memorize']:.2f}",
                            nll=f"{last['loss/nll_memorized']:.3f}")
            if self.t.save_steps and self.step % self.t.save_steps == 0 and self.step < self.t.max_steps:
                self.save_checkpoint()
        bar.close()
        if main:
            save_model(self.model, self.processor, self.out / "model")
            self.templates.save(self.out / "templates.json")
            (self.out / "summary.json").write_text(json.dumps(last, indent=2))
            # a JSON list: what `dvc plots` reads (it does not read JSON Lines)
            (self.out / "history.json").write_text(json.dumps(self.history))
            self._close_sinks()
        if self.world > 1:
            dist.barrier()
        return last

    def _open_sinks(self) -> None:
        sinks = set(self.t.report_to) - {"none"}
        if "jsonl" in sinks:
            path = self.out / "metrics.jsonl"
            # a resumed run keeps the history up to its checkpoint and nothing after it
            path.write_text("".join(json.dumps(h) + "\n" for h in self.history))
            self.reporters.append(lambda metrics, step: _append_jsonl(path, metrics))
        if "mlflow" in sinks:
            from dyme_core.tracking import MlflowReporter  # the one module that imports mlflow

            self._mlflow = MlflowReporter(self.cfg, run_name=f"{self.t.method}-seed{self.t.seed}")
            (self.out / "mlflow_run_id").write_text(self._mlflow.run_id)
            self.reporters.append(self._mlflow.log_metrics)

    def _log(self, metrics: dict[str, float]) -> None:
        for report in self.reporters:
            report(metrics, int(metrics["step"]))
        log.info("step %d: loss %.4f nll(mem) %.3f acc %.3f modes m/e/s %.2f/%.2f/%.2f", metrics["step"],
                 metrics["loss"], metrics["loss/nll_memorized"],
                 metrics["reward/accuracy"], metrics["mode/memorize"], metrics["mode/explore"],
                 metrics["mode/skip"])

    def _close_sinks(self) -> None:
        if self._mlflow is not None:
            self._mlflow.close()


def _append_jsonl(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def train(cfg: Config, dataset: Dataset, refined: dict[str, str] | None = None,
          llm_client: ChatClient | None = None) -> dict[str, float]:
    """Library entry point of `dyme train`."""
    return DymeTrainer(cfg, dataset, refined, llm_client).train()


def load_refined(path: str | Path) -> dict[str, str]:
    """id -> refined trace, from the refine step's JSONL ('' or a missing file: none)."""
    p = Path(path) if path else None
    if p is None or not p.is_file():
        return {}
    with p.open() as f:
        return {row["id"]: row["trace"] for row in map(json.loads, f) if row.get("trace")}


