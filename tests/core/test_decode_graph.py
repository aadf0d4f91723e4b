"""The static decode (`generation.complete_static`: KV cache at fixed addresses, rows in buckets, the step that a CUDA
graph captures) samples what `generation.complete` and `model.generate` sample: the same tokens for a fixed seed and
the same per-step log-probs up to float rounding. Run on the CPU the step is `decode_step` as is, the function the
GPU captures, so these tests check the captured path's logic; the last test captures it on a CUDA device.

Checked on tiny random Idefics3 (merged prompt embeddings) and LLaVA-OneVision (pixel inputs) models: greedy with a
padded bucket (3 rows in a bucket of 8), sampled without padding (rows == bucket), sampled with padding (the padding
rows draw their noise too, so the reference is `generate` over the bucket's rows), rows that stop at eos before
max_new_tokens with the finished-check only every few tokens. Qwen2-VL keeps HF `generate` (multimodal RoPE)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_trainers import LogitsRecorder, family_trainer
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AttentionInterface

from dyme_core import generation
from dyme_core.trainer import Batch, DymeTrainer


@pytest.fixture(scope="module", params=["idefics3", "llava_onevision"])
def trainer(request: pytest.FixtureRequest, tiny_setup: dict, tmp_path_factory: pytest.TempPathFactory
            ) -> DymeTrainer:
    """A trainer over a tiny random model of one family (K=3, 10 new tokens)."""
    tr = family_trainer(request.param, tiny_setup, tmp_path_factory.mktemp(f"decode-{request.param}"))
    tr.model.eval()
    return tr


def _batch(trainer: DymeTrainer) -> Batch:
    """Three prompts of different lengths (rows left-padded by different amounts)."""
    samples = sorted(trainer.samples, key=lambda s: len(s.question))
    return trainer._prepare([samples[0], samples[-1], samples[len(samples) // 2]])


def _inputs(trainer: DymeTrainer, batch: Batch, prompts: list[int]) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Left-padded ids and mask of the rows whose prompts are `prompts`, and their image inputs (or embeddings)."""
    ids, attn = trainer._left_pad([batch.prompt_ids[i] for i in prompts])
    ids, attn = ids.to(trainer.device), attn.to(trainer.device)
    embeds = trainer._merged_embeds(trainer.model, batch, prompts, ids)
    vision = ({"inputs_embeds": embeds} if embeds is not None
              else trainer.family.vision_inputs(batch.prompts, prompts, trainer.device, trainer.model.dtype))
    return ids, attn, vision


def _settings(trainer: DymeTrainer, eos: int, **sampling: object) -> dict:
    return {"max_new_tokens": trainer.t.max_new_tokens, "pad_token_id": trainer.pad_id, "eos_token_id": eos,
            "suppress_tokens": trainer.suppress, **sampling}


def _early_eos(trainer: DymeTrainer, ids: torch.Tensor, attn: torch.Tensor, vision: dict, k: int,
               **sampling: object) -> int:
    """A token sampled mid-sequence, standing in for eos so that some rows stop before max_new_tokens."""
    torch.manual_seed(0)
    probe = generation.complete(trainer.model, ids, attn, k=k, **_settings(trainer, trainer.eos_id, **sampling),
                                **vision)
    return int(torch.mode(probe[:, 1:-1].flatten()).values)


def _assert_same_steps(ours: list[torch.Tensor], ref: list[torch.Tensor], rows: int, n_steps: int) -> None:
    """Per-step log-probs of the real rows agree up to float rounding (the first call is the prefill)."""
    for step in range(n_steps):
        a, b = ours[step][:rows] if step else ours[0], ref[step][:rows] if step else ref[0]
        torch.testing.assert_close(torch.log_softmax(a, -1), torch.log_softmax(b, -1), rtol=1e-4, atol=1e-5,
                                   msg=f"step {step}")


def _padded_after_eos(new: torch.Tensor, eos: int, pad: int) -> bool:
    """Asserts that every row is padded after its eos; True when some row stopped before the last column."""
    finished = (new == eos).cumsum(dim=1) > 0
    after = torch.cat([torch.zeros_like(finished[:, :1]), finished[:, :-1]], dim=1)
    assert (new[after] == pad).all(), "a finished row must be padded"
    return bool(finished[:, :-1].any())


def test_greedy_padded_bucket_equals_complete_and_generate(trainer: DymeTrainer) -> None:
    batch = _batch(trainer)
    ids, attn, vision = _inputs(trainer, batch, [0, 1, 2])
    eos = _early_eos(trainer, ids, attn, vision, k=1)
    settings = _settings(trainer, eos)
    assert generation.bucket_size(3) == 8  # 5 padding rows, computed and dropped
    with LogitsRecorder(trainer.model) as static_rec:
        static = generation.complete_static(trainer.model, ids, attn, check_every=4, **settings, **vision)
    with LogitsRecorder(trainer.model) as eager_rec:
        eager = generation.complete(trainer.model, ids, attn, **settings, **vision)
    with torch.no_grad():
        ref = trainer.model.generate(input_ids=ids, attention_mask=attn, do_sample=False, **settings,
                                     **vision)[:, ids.shape[1]:]
    assert torch.equal(static, eager) and torch.equal(static, ref)
    # a larger cache (one graph for several lengths): the extra slots stay masked
    larger = generation.cache_capacity(ids.shape[1], trainer.t.max_new_tokens) + generation.CAPACITY_STEP
    assert torch.equal(generation.complete_static(trainer.model, ids, attn, capacity=larger, **settings, **vision),
                       static)
    assert static.shape[1] < trainer.t.max_new_tokens, "every row should have stopped at eos before the limit"
    _padded_after_eos(static, eos, trainer.pad_id)
    assert static_rec.calls[1].shape[0] == 8  # the decode forwards run the whole bucket
    _assert_same_steps(static_rec.calls, eager_rec.calls, 3, static.shape[1])


SAMPLING = [pytest.param({"temperature": 1.0, "top_p": 1.0, "top_k": 0}, id="plain"),
            pytest.param({"temperature": 0.7, "top_p": 0.9, "top_k": 20}, id="processors")]


@pytest.mark.parametrize("sampling", SAMPLING)
def test_sampled_full_bucket_equals_complete_and_generate(trainer: DymeTrainer, sampling: dict) -> None:
    batch = _batch(trainer)
    ids, attn, vision = _inputs(trainer, batch, [0, 1, 2])
    k = trainer.t.num_generations
    eos = _early_eos(trainer, ids, attn, vision, k=k, do_sample=True, **sampling)
    settings = _settings(trainer, eos, do_sample=True, **sampling)
    stopped = False
    for seed in range(3):
        torch.manual_seed(seed)
        with LogitsRecorder(trainer.model) as static_rec:
            static = generation.complete_static(trainer.model, ids, attn, k=k, bucket=3 * k, check_every=3,
                                                **settings, **vision)
        torch.manual_seed(seed)
        eager = generation.complete(trainer.model, ids, attn, k=k, **settings, **vision)
        torch.manual_seed(seed)
        with torch.no_grad(), LogitsRecorder(trainer.model) as hf_rec:
            ref = trainer.model.generate(input_ids=ids, attention_mask=attn, num_return_sequences=k, **settings,
                                         **vision)[:, ids.shape[1]:]
        assert torch.equal(static, eager), f"seed {seed}: tokens differ from complete's"
        assert torch.equal(static, ref), f"seed {seed}: tokens differ from generate's"
        # the prefill runs B prompts here and B*K rows in generate: compare it repeated
        hf_rec.calls[0] = hf_rec.calls[0][::k]
        _assert_same_steps(static_rec.calls, hf_rec.calls, 3 * k, static.shape[1])
        stopped |= _padded_after_eos(static, eos, trainer.pad_id)
    assert stopped, "no row stopped early: the eos path was not exercised"


def test_sampled_padded_bucket_draws_like_generate_over_the_bucket(trainer: DymeTrainer) -> None:
    """9 rows in a bucket of 16: the padding rows (copies of the last row, finished from the start) draw their
    noise like live rows, so the real rows get what `generate` samples for those 16 rows, not what it samples for 9
    (on the CPU the draws are taken in element order)."""
    batch = _batch(trainer)
    k = trainer.t.num_generations
    ids, attn, vision = _inputs(trainer, batch, [0, 1, 2])
    sampling = {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 20}
    eos = _early_eos(trainer, ids, attn, vision, k=k, **sampling)
    settings = _settings(trainer, eos, **sampling)
    bucket = generation.bucket_size(3 * k)
    assert bucket == 16
    rows_prompts = [min(r, 3 * k - 1) // k for r in range(bucket)]
    ids_b, attn_b, vision_b = _inputs(trainer, batch, rows_prompts)
    stopped = False
    for seed in range(3):
        torch.manual_seed(seed)
        static = generation.complete_static(trainer.model, ids, attn, k=k, **settings, **vision)
        torch.manual_seed(seed)
        with torch.no_grad():
            ref = trainer.model.generate(input_ids=ids_b, attention_mask=attn_b, **settings,
                                         **vision_b)[:, ids_b.shape[1]:]
        assert static.shape[0] == 3 * k, "padding rows must be dropped"
        n = static.shape[1]
        assert torch.equal(static, ref[: 3 * k, :n]), f"seed {seed}"
        # generate ran on while its (live) padding rows were unfinished; the real rows were finished by then
        assert (ref[: 3 * k, n:] == trainer.pad_id).all()
        stopped |= _padded_after_eos(static, eos, trainer.pad_id)
    assert stopped, "no row stopped early: the eos path was not exercised"


class OpLog(TorchDispatchMode):
    """The aten ops run under it, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


# ops that make the host wait for the device: `.item()` / `bool(t)` (_local_scalar_dense), data-dependent shapes
SYNCING_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "equal", "is_nonzero",
               "multinomial"}


def test_decode_step_has_no_host_sync(trainer: DymeTrainer, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a CUDA graph cannot capture is an op that reads a device value on the host; none runs in the step
    (the model's forward included), sampled with every processor on."""
    logs: list[OpLog] = []
    step = generation.decode_step

    def logged_step(*args: object, **kwargs: object) -> None:
        with OpLog() as log:
            step(*args, **kwargs)
        logs.append(log)

    monkeypatch.setattr(generation, "decode_step", logged_step)
    batch = _batch(trainer)
    ids, attn, vision = _inputs(trainer, batch, [0, 1, 2])
    settings = _settings(trainer, trainer.eos_id, do_sample=True, temperature=0.7, top_p=0.9, top_k=20)
    generation.complete_static(trainer.model, ids, attn, k=3, **settings, **vision)
    assert logs, "the static decode did not run decode_step"
    for i, log in enumerate(logs):
        syncing = SYNCING_OPS & set(log.ops)
        assert not syncing, f"step {i} runs {sorted(syncing)}"
    assert {"exponential_", "index_copy_"} <= set(logs[0].ops)  # the device-side draw and the slot write


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"bucket": 2}, "bucket of 2 rows cannot hold 3"),  # a bucket smaller than the batch
    ({"check_every": 0}, "check_every must be >= 1"),
    ({"capacity": 8}, "KV cache of 8 positions cannot hold"),  # smaller than prompt + new tokens
    ({"capture": True}, "captured decode needs a CUDA model"),  # CUDA graphs on a CPU model
])
def test_bad_static_decode_settings_are_clear_errors(trainer: DymeTrainer, kwargs: dict, message: str) -> None:
    batch = _batch(trainer)
    ids, attn, vision = _inputs(trainer, batch, [0, 1, 2])
    with pytest.raises(ValueError, match=message):
        generation.complete_static(trainer.model, ids, attn, **_settings(trainer, trainer.eos_id), **kwargs,
                                   **vision)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="captures a CUDA graph")
def test_captured_decode_equals_the_eager_step_on_cuda(trainer: DymeTrainer) -> None:
    """On a CUDA device: the graph replays what the same step computes eagerly (same draws from the same seed),
    is captured once per bucket and reused, and `complete(cuda_graph=True)` takes it."""
    model = trainer.model.to("cuda")
    try:
        trainer.device = torch.device("cuda")
        batch = _batch(trainer)
        ids, attn, vision = _inputs(trainer, batch, [0, 1, 2])
        k = trainer.t.num_generations
        for sampling in ({"do_sample": False}, {"do_sample": True, "temperature": 0.7, "top_k": 20}):
            settings = _settings(trainer, trainer.eos_id, **sampling)
            for seed in range(2):
                torch.manual_seed(seed)
                eager = generation.complete_static(model, ids, attn, k=k, **settings, **vision)
                torch.manual_seed(seed)
                captured = generation.complete(model, ids, attn, k=k, cuda_graph=True, **settings, **vision)
                assert torch.equal(captured, eager), f"{sampling}, seed {seed}"
        graphs = generation.captured_decodes(model)
        assert len(graphs) == 2, "one graph per sampling setting, reused across calls"
        assert all(g["replays"] >= 2 for g in graphs)
    finally:
        trainer.model.to("cpu")
        trainer.device = torch.device("cpu")


@pytest.mark.slow
def test_compiled_step_keeps_the_greedy_tokens(trainer: DymeTrainer) -> None:
    """The step's forward through torch.compile (what `compile_step` captures on the GPU) decodes the same greedy
    tokens as the eager loop (no graph break or recompile is needed for that; dynamo traces the static cache)."""
    if trainer.family.name != "idefics3":
        pytest.skip("one family is enough for the compiled forward (a cold compile costs seconds)")
    batch = _batch(trainer)
    ids, attn, vision = _inputs(trainer, batch, [0, 1, 2])
    settings = _settings(trainer, trainer.eos_id)
    eager = generation.complete(trainer.model, ids, attn, k=2, **settings, **vision)
    compiled = generation.complete_static(trainer.model, ids, attn, k=2, compile_step=True, **settings, **vision)
    assert torch.equal(compiled, eager)


@pytest.mark.parametrize("groups", [1, 3])
def test_grouped_attention_equals_attention_over_repeated_heads(groups: int) -> None:
    """`grouped_sdpa_attention` on a one-token query under a per-row mask gives what attention over the KV heads
    repeated per query head gives (`repeat_kv`, transformers' compiled path), query head h reading KV head
    h // groups; other queries go to transformers' sdpa unchanged."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = groups, True
    gen = torch.Generator().manual_seed(0)
    rows, kv_heads, slots, dim = 4, 2, 10, 8
    k, v = (torch.randn(rows, kv_heads, slots, dim, generator=gen) for _ in range(2))
    mask = torch.rand(rows, 1, 1, slots, generator=gen) > 0.4
    mask[..., 0] = True  # every row attends to some slot
    for q_len in (1, 5):
        q = torch.randn(rows, kv_heads * groups, q_len, dim, generator=gen)
        m = mask.expand(rows, 1, q_len, slots)
        out, _ = generation.grouped_sdpa_attention(module, q, k, v, m, scaling=0.5)
        ref = torch.nn.functional.scaled_dot_product_attention(
            q, repeat_kv(k, groups), repeat_kv(v, groups), attn_mask=m, scale=0.5).transpose(1, 2)
        assert out.shape == (rows, q_len, kv_heads * groups, dim)
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(out, sdpa_attention_forward(module, q, k, v, m, scaling=0.5)[0])


@pytest.mark.slow
def test_compiled_step_groups_query_heads_and_keeps_tokens(tiny_setup: dict, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """On a grouped-query model (4 query heads over 2 KV heads, as SmolVLM and LLaVA-OneVision have), the compiled
    step traces its attention through `grouped_sdpa_attention`'s grouped branch (no KV copy per query head),
    decodes the same greedy tokens and sampled draws as the eager loop with the same per-step log-probs (up to
    float rounding), and leaves the model on sdpa after."""
    trainer = family_trainer("idefics3", tiny_setup, tmp_path, num_heads=4, num_kv_heads=2)
    model = trainer.model.eval()
    assert model.config.get_text_config().num_key_value_heads == 2
    grouped_calls = []
    original = generation.grouped_sdpa_attention

    def recording(module, query, key, value, attention_mask, **kwargs):  # noqa: ANN001, ANN202
        if query.shape[2] == 1:
            grouped_calls.append((query.shape[1], key.shape[1]))
        return original(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, generation.GROUPED_SDPA, recording)
    batch = _batch(trainer)
    ids, attn, vision = _inputs(trainer, batch, [0, 1, 2])
    for sampling in ({"do_sample": False}, {"do_sample": True}):
        settings = _settings(trainer, trainer.eos_id, **sampling)
        torch.manual_seed(0)
        with LogitsRecorder(model) as eager_rec:
            eager = generation.complete(model, ids, attn, k=2, **settings, **vision)
        torch.manual_seed(0)
        with LogitsRecorder(model) as compiled_rec:
            compiled = generation.complete_static(model, ids, attn, k=2, bucket=6, compile_step=True, **settings,
                                                  **vision)
        assert torch.equal(compiled, eager), sampling
        _assert_same_steps(compiled_rec.calls, eager_rec.calls, 6, compiled.shape[1])
    assert grouped_calls and set(grouped_calls) == {(4, 2)}, "the compiled step attends per KV head"
    assert model.config.get_text_config()._attn_implementation == "sdpa"
