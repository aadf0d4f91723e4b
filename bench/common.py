"""The bench toolkit: model shapes, the synthetic work, controlled rewards, device timing and result files.

Shared by every script of bench/ (throughput, decode_step, compile_time, family_step, cpu_generation,
method_table); each uses the library through its public entry points only: `DymeTrainer(cfg, dataset,
rewards=...)` and `train_step()`, ordinary config keys, `dyme_core.generation`, forward hooks on the model.

Shapes: `build_model(shape, out_dir, texts)` saves a random-initialised model of a published shape, a byte-level
BPE tokenizer trained on `texts` (topped up with seeded random words until it has the shape's vocabulary size, so
every id decodes to text) and its processor (one image per prompt, no splitting), in a directory that
`dyme_core.models.load_model` / `load_processor` reload. Layer counts and widths of the published configs; the
weights are random:
- `tiny`: the CPU default of DESIGN.md section 4 (hidden 128, 2 layers, 64 px images).
- `smolvlm-256m`: HuggingFaceTB/SmolVLM-256M-Instruct: SmolLM2-135M text model (hidden 576, 30 layers,
  9 heads, 3 KV heads, MLP 1536, vocab 49280, untied head) + SigLIP base patch-16/512 (hidden 768,
  12 layers, 12 heads, MLP 3072), pixel-shuffle factor 4 -> 64 image tokens per 512 px image.
- `smolvlm-500m`: SmolVLM-500M-Instruct: SmolLM2-360M text model (hidden 960, 32 layers, 15 heads,
  5 KV heads, MLP 2560) + the same vision tower.
- `tiny-llava-ov`: the tiny shape in the LLaVA-OneVision family, grouped-query (4 heads over 2 KV heads): CPU checks.
- `llava-ov-0.5b`: llava-onevision-qwen2-0.5b-ov: a `LlavaOnevisionForConditionalGeneration` (the project's
  LLaVA-OneVision family, `dyme_core.models.init_tiny_model`) with the Qwen2-0.5B text model (hidden 896,
  24 layers, 14 heads, 2 KV heads, MLP 4864, an embedding and untied head of 151,936 rows, the published
  vocabulary padded as Qwen2's is; the tokenizer covers its first ids) and a SigLIP-so400m-sized vision tower
  (hidden 1152, 26 layers, MLP 4304, 384 px, patch 14: 729 image tokens per tile; 36 heads of 32, where the
  published tower has 16 of 72), anyres with one 384 px tile beside the base image.

Controlled rewards (`ControlledRewards`): the library's reward table (`dyme_core.rewards.REWARDS`, one signature)
with an accuracy that depends only on (group position in the batch, completion index), so that a chosen share of
groups is all wrong (DyME: MEMORIZE), all right (SKIP) or mixed (EXPLORE) whatever the random model writes
(`MIXES`); the trainer takes it as `DymeTrainer(..., rewards=...)`, TRL its accuracy as a reward function. With
`train.reward_weights={accuracy: 1.0}` (`ACCURACY_ONLY`) only that accuracy is scored and it is the total.

Tests: tests/bench/.
"""

from __future__ import annotations

import gc
import json
import os
import random
import statistics
import string
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil, Idefics3Processor

from dyme_core.config import DataConfig, SynthConfig
from dyme_core.data.loaders import Dataset, load_dataset
from dyme_core.data.schema import Sample
from dyme_core.data.synth import synthesize
from dyme_core.families import SMOLVLM_TEMPLATE
from dyme_core.models import (
    ANSWER_FLAG,
    DIRECT_INSTRUCTION,
    REASON_INSTRUCTION,
    save_model,
    train_tokenizer,
)
from dyme_core.refiner import rule_refine
from dyme_core.rewards import REWARDS, RewardContext, RewardFn


@dataclass(frozen=True)
class Shape:
    hidden: int  # text model width
    layers: int
    heads: int
    kv_heads: int
    intermediate: int  # text MLP width
    vocab: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_intermediate: int
    patch: int  # vision patch size (px)
    image: int  # image side the vision tower sees (px)
    scale_factor: int  # connector pixel shuffle
    family: str = "idefics3"  # dyme_core.families name

    @property
    def image_seq_len(self) -> int:
        """Image tokens per image: (image / patch)^2 / scale_factor^2."""
        return (self.image // self.patch) ** 2 // self.scale_factor**2


SHAPES: dict[str, Shape] = {
    "tiny": Shape(hidden=128, layers=2, heads=4, kv_heads=4, intermediate=256, vocab=1024, vision_hidden=64,
                  vision_layers=2, vision_heads=2, vision_intermediate=128, patch=8, image=64, scale_factor=2),
    "smolvlm-256m": Shape(hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536, vocab=49280,
                          vision_hidden=768, vision_layers=12, vision_heads=12, vision_intermediate=3072,
                          patch=16, image=512, scale_factor=4),
    "smolvlm-500m": Shape(hidden=960, layers=32, heads=15, kv_heads=5, intermediate=2560, vocab=49280,
                          vision_hidden=768, vision_layers=12, vision_heads=12, vision_intermediate=3072,
                          patch=16, image=512, scale_factor=4),
    "tiny-llava-ov": Shape(hidden=128, layers=2, heads=4, kv_heads=2, intermediate=256, vocab=1024, vision_hidden=64,
                           vision_layers=2, vision_heads=2, vision_intermediate=128, patch=8, image=64, scale_factor=1,
                           family="llava_onevision"),
    "llava-ov-0.5b": Shape(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936,
                           vision_hidden=1152, vision_layers=26, vision_heads=36, vision_intermediate=4304,
                           patch=14, image=384, scale_factor=1, family="llava_onevision"),
}


def _filler_words(n: int, seed: int) -> list[str]:
    """Seeded random lower-case words: enough distinct text for a BPE vocabulary of tens of thousands."""
    rng = random.Random(seed)
    words = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 10))) for _ in range(n)]
    return [" ".join(words[i: i + 20]) for i in range(0, n, 20)]


def build_model(shape: str | Shape, out_dir: str | Path, texts: list[str], seed: int = 0,
                device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Path:
    """Build, save and return the directory of a random Idefics3 model of `shape` with its processor.

    `texts`: the dataset's text (questions, answers, traces) the tokenizer is trained on. The weights are
    initialised on `device` (fast on a GPU) and saved in `dtype`.
    """
    s = SHAPES[shape] if isinstance(shape, str) else shape
    if s.family != "idefics3":
        return _build_family_model(s, out_dir, texts, seed, device, dtype)
    torch.manual_seed(seed)
    corpus = sorted(set(texts)) + [REASON_INSTRUCTION, DIRECT_INSTRUCTION, ANSWER_FLAG, "User:", "Assistant:"]
    if s.vocab > 4096:  # the dataset's text alone cannot fill a large vocabulary
        corpus += _filler_words(60_000, seed)
    tokenizer = train_tokenizer(corpus, s.vocab)
    image_processor = Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": s.image},
                                                max_image_size={"longest_edge": s.image})
    processor = Idefics3Processor(image_processor, tokenizer, image_seq_len=s.image_seq_len,
                                  chat_template=SMOLVLM_TEMPLATE)
    text_config = {
        "model_type": "llama", "vocab_size": len(tokenizer), "hidden_size": s.hidden,
        "intermediate_size": s.intermediate, "num_hidden_layers": s.layers, "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads, "max_position_embeddings": 8192, "tie_word_embeddings": False,
        "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    vision_config = {
        "hidden_size": s.vision_hidden, "intermediate_size": s.vision_intermediate,
        "num_hidden_layers": s.vision_layers, "num_attention_heads": s.vision_heads,
        "image_size": s.image, "patch_size": s.patch,
    }
    config = Idefics3Config(text_config=text_config, vision_config=vision_config, scale_factor=s.scale_factor,
                            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                            pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    with torch.device(device):
        model = Idefics3ForConditionalGeneration(config)
    model.to(dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    out = save_model(model, processor, out_dir)
    del model
    return out


def count_params(model: torch.nn.Module) -> dict[str, int]:
    """Parameter counts: total, trainable, and the vision tower's."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    vision = sum(p.numel() for n, p in model.named_parameters() if "vision_model" in n)
    return {"total": total, "trainable": trainable, "vision": vision}


def _build_family_model(s: Shape, out_dir: str | Path, texts: list[str], seed: int, device: str | torch.device,
                        dtype: torch.dtype) -> Path:
    """A shape of another family through the project's own builder (`init_tiny_model`), at the shape's sizes; the
    model's embedding has the shape's vocabulary even where the tokenizer trained here has fewer tokens."""
    from dyme_core.config import InitModelConfig
    from dyme_core.models import init_tiny_model

    if s.vision_heads != max(1, s.vision_hidden // 32):
        raise ValueError(f"{s.family} shapes take vision heads of 32 (the family builder's), not {s.vision_heads}")
    cfg = InitModelConfig(family=s.family, out_dir=str(out_dir), seed=seed, vocab_size=s.vocab, hidden_size=s.hidden,
                          num_layers=s.layers, num_heads=s.heads, num_kv_heads=s.kv_heads,
                          intermediate_size=s.intermediate, vision_hidden_size=s.vision_hidden,
                          vision_layers=s.vision_layers, vision_intermediate_size=s.vision_intermediate,
                          image_size=s.image, patch_size=s.patch, scale_factor=s.scale_factor)
    return init_tiny_model(cfg, sorted(set(texts)) + _filler_words(60_000, seed), device=device, dtype=dtype,
                           vocab_rows=s.vocab)


# ------------------------------------------------------------------------------------------ the synthetic work
@dataclass
class Work:
    data_dir: Path
    model_dir: Path
    dataset: Dataset


def prepare_work(shape: str, work: str | Path, samples: int, seed: int, device: torch.device,
                 rank: int = 0) -> Work:
    """Synthetic charts at the shape's image size and the random model of `shape`, under `work`; built once and
    reused by later runs (a `.done` file marks each). With torch.distributed, rank 0 builds and the others wait."""
    s = SHAPES[shape]
    data_dir = Path(work) / f"data-{s.image}px-{samples}-s{seed}"
    model_dir = Path(work) / f"model-{shape}-s{seed}"
    if rank == 0:
        if not (data_dir / ".done").is_file():
            synthesize(SynthConfig(out_dir=str(data_dir), seed=seed, n_train=samples, n_val=0, n_test=0,
                                   image_size=s.image))
            (data_dir / ".done").write_text("ok")
        dataset = load_dataset(DataConfig(path=str(data_dir)))
        if not (model_dir / ".done").is_file():
            texts = [t for x in dataset.samples for t in (x.question, x.answer, x.hint or "", rule_refine(x))]
            build_model(shape, model_dir, texts, seed=seed, device=device,
                        dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
            (model_dir / ".done").write_text("ok")
    if dist.is_initialized():
        dist.barrier()
    return Work(data_dir, model_dir, load_dataset(DataConfig(path=str(data_dir))))


# ------------------------------------------------------------------------------------------ controlled rewards
# (all-wrong, all-right, mixed) fractions of the prompt groups of every batch
MIXES = {"explore": (0.0, 0.0, 1.0), "skip75": (0.0, 0.75, 0.25), "memorize75": (0.75, 0.0, 0.25),
         "mixed": (1 / 3, 1 / 3, 1 / 3)}


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


ACCURACY_ONLY = "train.reward_weights={accuracy: 1.0}"  # the config override: score the controlled accuracy alone


class ControlledRewards:
    """A reward table for `DymeTrainer(..., rewards=ControlledRewards(...).table())`: the library's format and
    thinking rewards (from the completions' text and the trainer's visual checker) and `accuracy` from the mix,
    `mix_accuracy(self.mix, ...)`, so the modes are the mix's whatever the text. Set `mix` before a step."""

    def __init__(self, mix: str = "explore"):
        self.mix = mix

    def accuracy(self, completions: list[str], samples: list[Sample], ctx: RewardContext) -> list[float]:
        k = ctx.num_generations
        if len(completions) % k:
            raise ValueError(f"{len(completions)} completions are not whole groups of K={k}")
        return mix_accuracy(self.mix, len(completions) // k, k)

    def table(self) -> dict[str, RewardFn]:
        return {**REWARDS, "accuracy": self.accuracy}


# ------------------------------------------------------------------------------------------ device and timing
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


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


class UpdateTokens:
    """Tokens the model forwards with gradients (the update: prompt + completion of every row, padding excluded),
    counted by a forward pre-hook on the model; generation runs without gradients and is not counted."""

    def __init__(self, model: torch.nn.Module):
        self.count = 0
        self.handle = model.register_forward_pre_hook(self._pre, with_kwargs=True)

    def _pre(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        if module.training and torch.is_grad_enabled() and mask is not None:
            self.count += int(mask.sum())

    def remove(self) -> None:
        self.handle.remove()


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


# ------------------------------------------------------------------------------------------ result files
def write_json(path: Path, obj: Any) -> None:
    """Atomic: a call killed mid-write never leaves half a result file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, allow_nan=False))
    tmp.replace(path)


def append_jsonl(path: Path, obj: Any) -> None:
    """One line per record, flushed at once: a call killed later keeps every line written before."""
    with path.open("a") as f:
        f.write(json.dumps(obj, sort_keys=True, allow_nan=False) + "\n")
        f.flush()
        os.fsync(f.fileno())

