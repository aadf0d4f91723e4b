"""Greedy answers of a saved image-text-to-text model: the one generate path that evaluation (`dyme evaluate`)
and the registered model (dyme_core/serving.py) share (DESIGN.md sections 6-7).

It imports only what serving needs (torch, transformers, the model-family adapters, the decode loop), never the
data loaders, the checker or the LLM client, so the registered model's requirements stay those of serving.
Tests: tests/core/test_generation.py (tokens against HF `generate`), tests/core/test_tracking.py (the served model).
"""

from __future__ import annotations

import torch
from PIL import Image
from transformers import PreTrainedModel, ProcessorMixin

from dyme_core import generation
from dyme_core.config import EvaluateConfig
from dyme_core.families import family_of
from dyme_core.models import GPU_ATTENTION, attention_kernels, suppressed_token_ids


@torch.no_grad()
def generate_answers(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    images: list[Image.Image],
    questions: list[str],
    max_new_tokens: int = EvaluateConfig.max_new_tokens,
    style: str = "reason",
    cuda_graph_decode: bool = True,
    prefixes: list[str] | None = None,
) -> list[str]:
    """Greedy completions, one per (image, question); the model family's adapter encodes the inputs.

    cuda_graph_decode: on a CUDA model, the decode step replays a CUDA graph (`generation.complete_static`).
    prefixes: a forced start of each answer, appended to its prompt (the completion continues it).
    """
    model.eval()
    family = family_of(model.config)
    batch = family.encode(processor, questions, images, style)
    tok = processor.tokenizer
    if prefixes is not None:
        batch.prompt_ids = [torch.cat([p, torch.tensor(tok(x, add_special_tokens=False)["input_ids"], dtype=p.dtype)])
                            for p, x in zip(batch.prompt_ids, prefixes, strict=True)]
    rows = list(range(len(questions)))
    # left-padded prompts (generation appends on the right) with the family's text and image inputs
    width = max(len(p) for p in batch.prompt_ids)
    ids = torch.full((len(rows), width), tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, p in enumerate(batch.prompt_ids):
        ids[i, width - len(p):] = p
        attn[i, width - len(p):] = 1
    ids, attn = ids.to(model.device), attn.to(model.device)
    text = family.text_inputs(batch, rows, [0] * len(rows), width, model.device)
    settings = {"max_new_tokens": max_new_tokens, "eos_token_id": tok.eos_token_id,
                "suppress_tokens": suppressed_token_ids(model, processor),
                "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                **family.vision_inputs(batch, rows, model.device, model.dtype)}
    with attention_kernels(GPU_ATTENTION if model.device.type == "cuda" else None):
        if family.prefill_once:  # the same greedy tokens as `generate`, without its per-step overhead
            out = generation.complete(model, ids, attn, text_inputs=text, cuda_graph=cuda_graph_decode, **settings)
        else:
            out = model.generate(input_ids=ids, attention_mask=attn, do_sample=False, **text,
                                 **settings)[:, ids.shape[1]:]
    return tok.batch_decode(out, skip_special_tokens=True)
