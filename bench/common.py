"""Shared model shapes for the benchmarks: random Idefics3 (SmolVLM architecture) models of given sizes.

`build_model(shape, out_dir, texts)` saves a random-initialised `Idefics3ForConditionalGeneration`, a
byte-level BPE tokenizer trained on `texts` (topped up with seeded random words until it has the
shape's vocabulary size, so every id decodes to text) and an Idefics3 processor (one image per prompt,
no splitting), in a directory that `dyme_core.models.load_model` / `load_processor` reload.

Shapes (layer counts and widths of the published configs; the weights are random):
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

Used by bench/throughput.py and bench/method_table.py; keep this module small and its API stable.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil, Idefics3Processor

from dyme_core.families import SMOLVLM_TEMPLATE
from dyme_core.models import (
    ANSWER_FLAG,
    DIRECT_INSTRUCTION,
    REASON_INSTRUCTION,
    save_model,
    train_tokenizer,
)


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
