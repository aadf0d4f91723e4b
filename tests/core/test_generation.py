"""`generation.complete` (one prefill per prompt, the KV cache repeated K times, the trainer's own decode loop)
samples what `model.generate(num_return_sequences=K)` samples for a fixed seed: the same tokens, and the same
logits at every step up to float rounding (not bit-identical: a prefill of B rows instead of B*K runs the BLAS
on other matrix shapes, whose blocking may round a sum differently in the last bit, about 1e-7 here). Checked
for the trainer's rollouts (sampled, logits processors on and off, rows that stop early) and evaluation's greedy
path, on tiny random models of Idefics3 (merged prompt embeddings) and LLaVA-OneVision (pixel inputs); Qwen2-VL
(multimodal RoPE) keeps HF `generate`, and its rollouts and evaluation are checked against it too."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_trainers import LogitsRecorder, family_trainer

from dyme_core import generation
from dyme_core.evaluate import generate_answers
from dyme_core.models import load_model, load_processor
from dyme_core.trainer import Batch, DymeTrainer

FAMILIES = ["idefics3", "llava_onevision", "qwen2_vl"]


@pytest.fixture(scope="module", params=FAMILIES)
def trainer(request: pytest.FixtureRequest, tiny_setup: dict, tmp_path_factory: pytest.TempPathFactory
            ) -> DymeTrainer:
    """A trainer over a tiny random model of one family (K=3, 10 new tokens)."""
    return family_trainer(request.param, tiny_setup, tmp_path_factory.mktemp(f"gen-{request.param}"))


def _batch(trainer: DymeTrainer) -> Batch:
    """Three prompts of different lengths (rows left-padded by different amounts)."""
    samples = sorted(trainer.samples, key=lambda s: len(s.question))
    batch = trainer._prepare([samples[0], samples[-1], samples[len(samples) // 2]])
    assert len({len(p) for p in batch.prompt_ids}) > 1
    return batch


def _inputs(trainer: DymeTrainer, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, dict, dict]:
    """The prompt ids, mask, text extras and image inputs (or merged embeddings) `_generate` passes."""
    idx = list(range(len(batch.samples)))
    ids, attn = trainer._left_pad(batch.prompt_ids)
    text = trainer.family.text_inputs(batch.prompts, idx, [0] * len(idx), ids.shape[1], trainer.device)
    embeds = trainer._merged_embeds(trainer.model, batch, idx, ids)
    vision = ({"inputs_embeds": embeds} if embeds is not None
              else trainer.family.vision_inputs(batch.prompts, idx, trainer.device, trainer.model.dtype))
    return ids, attn, text, vision


SAMPLING = [pytest.param({"temperature": 1.0, "top_p": 1.0, "top_k": 0}, id="plain"),
            pytest.param({"temperature": 0.7, "top_p": 0.9, "top_k": 20}, id="processors")]


@pytest.mark.parametrize("sampling", SAMPLING)
def test_rollouts_equal_generate(trainer: DymeTrainer, sampling: dict) -> None:
    if not trainer.family.prefill_once:
        pytest.skip(f"{trainer.family.name} samples through HF generate")
    batch = _batch(trainer)
    ids, attn, text, vision = _inputs(trainer, batch)
    k, n_new = trainer.t.num_generations, trainer.t.max_new_tokens
    common = {"max_new_tokens": n_new, "pad_token_id": trainer.pad_id, "suppress_tokens": trainer.suppress,
              "do_sample": True, **sampling}
    # the token sampled most often mid-sequence stands in for eos, so that rows stop early and are padded
    torch.manual_seed(0)
    probe = generation.complete(trainer.model, ids, attn, k=k, eos_token_id=trainer.eos_id, text_inputs=text,
                                **vision, **common)
    eos = int(torch.mode(probe[:, 1:-1].flatten()).values)
    trainer.model.eval()
    for seed in range(3):
        torch.manual_seed(seed)
        with LogitsRecorder(trainer.model) as ours:
            new = generation.complete(trainer.model, ids, attn, k=k, eos_token_id=eos, text_inputs=text,
                                      **vision, **common)
        torch.manual_seed(seed)
        with torch.no_grad(), LogitsRecorder(trainer.model) as hf:
            ref = trainer.model.generate(input_ids=ids, attention_mask=attn, num_return_sequences=k, eos_token_id=eos,
                                         **text, **vision, **common)[:, ids.shape[1]:]
        assert torch.equal(new, ref), f"seed {seed}: tokens differ from generate's"
        assert len(ours.calls) == len(hf.calls) == new.shape[1]
        # one prefill of B prompts, repeated K times, gives the logits generate's B*K-row prefill gives, up to
        # float rounding: the BLAS picks its blocking by matrix shape, so B rows and B*K rows may round their
        # sums differently in the last bit (about 1e-7 here); every later step inherits that through the cache
        assert ours.calls[0].shape[0] == len(batch.samples) and hf.calls[0].shape[0] == len(batch.samples) * k
        torch.testing.assert_close(ours.calls[0].repeat_interleave(k, dim=0), hf.calls[0], rtol=1e-4, atol=1e-5)
        for step, (a, b) in enumerate(zip(ours.calls[1:], hf.calls[1:], strict=True)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"seed {seed}, step {step + 1}")
    finished = (new == eos).cumsum(dim=1) > 0
    assert finished[:, -1].any(), "no row stopped early: the eos/padding path was not exercised"
    after = torch.cat([torch.zeros_like(finished[:, :1]), finished[:, :-1]], dim=1)
    assert (new[after] == trainer.pad_id).all(), "a finished row must be padded"


def test_trainer_rollouts_are_generates_trimmed_after_eos(trainer: DymeTrainer) -> None:
    batch = _batch(trainer)
    ids, attn, text, vision = _inputs(trainer, batch)
    torch.manual_seed(1)
    rollouts = trainer._generate(batch)
    torch.manual_seed(1)
    with torch.no_grad():
        ref = trainer.model.generate(
            input_ids=ids, attention_mask=attn, num_return_sequences=trainer.t.num_generations, do_sample=True,
            temperature=trainer.t.temperature, top_p=trainer.t.top_p, top_k=trainer.t.top_k,
            max_new_tokens=trainer.t.max_new_tokens, eos_token_id=trainer.eos_id, pad_token_id=trainer.pad_id,
            suppress_tokens=trainer.suppress, **text, **vision)[:, ids.shape[1]:]
    assert len(rollouts) == ref.shape[0] == len(batch.samples) * trainer.t.num_generations
    for got, row in zip(rollouts, ref, strict=True):
        stop = (row == trainer.eos_id).nonzero()
        want = row[: int(stop[0]) + 1] if len(stop) else row
        assert torch.equal(got, want)
    # the update embeds these ids with autograd on: they must be normal tensors, not inference-mode ones
    assert not any(r.is_inference() for r in rollouts)


def test_greedy_evaluation_equals_generate(trainer: DymeTrainer, tiny_setup: dict) -> None:
    model_cfg = trainer.cfg.model
    model, processor = load_model(model_cfg, "cpu"), load_processor(model_cfg)
    samples = sorted(trainer.samples, key=lambda s: len(s.question))[:3]
    images = [trainer.dataset.load_image(s) for s in samples]
    questions = [s.question for s in samples]
    with LogitsRecorder(model) as ours:
        texts = generate_answers(model, processor, images, questions, max_new_tokens=9)
    batch = trainer.family.encode(processor, questions, images, "reason")
    rows = list(range(len(samples)))
    tok = processor.tokenizer
    ids, attn = trainer._left_pad(batch.prompt_ids)
    with torch.no_grad(), LogitsRecorder(model) as hf:
        ref = model.generate(
            input_ids=ids, attention_mask=attn, do_sample=False, max_new_tokens=9, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id, suppress_tokens=trainer.suppress,
            **trainer.family.text_inputs(batch, rows, [0] * len(rows), ids.shape[1], model.device),
            **trainer.family.vision_inputs(batch, rows, model.device, model.dtype))
    assert texts == tok.batch_decode(ref[:, ids.shape[1]:], skip_special_tokens=True)
    assert len(ours.calls) == len(hf.calls)
    for a, b in zip(ours.calls, hf.calls, strict=True):  # float rounding apart (about 3e-8 here)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_static_cache_keeps_generate(trainer: DymeTrainer, tmp_path: Path) -> None:
    """train.static_cache (the GPU's compiled decode step) still samples through HF generate: same tokens."""
    batch = _batch(trainer)
    torch.manual_seed(2)
    default = trainer._generate(batch)
    trainer.t.static_cache = True
    try:
        torch.manual_seed(2)
        static = trainer._generate(batch)
    finally:
        trainer.t.static_cache = False
    assert all(torch.equal(a, b) for a, b in zip(default, static, strict=True))
