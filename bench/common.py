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
