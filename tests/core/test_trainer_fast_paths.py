"""The trainer's fast paths change speed, not results (CPU, fp32, the tiny Idefics3 model).

`DymeTrainer._merged_embeds` runs the frozen vision encoder once per batch image and hands `generate` /
the update forward merged `inputs_embeds`; the plain path passes `pixel_values`, so the encoder runs
once per row. Both must sample the same completions from the same seed and give the same token
log-probs and gradients. The static-cache path (cache length rounded up) must sample the same tokens.
"""

from pathlib import Path

import pytest
import torch

from dyme_core.config import load_config
from dyme_core.trainer import DymeTrainer, Row

pytestmark = pytest.mark.slow


def _trainer(tiny_setup: dict, out: Path, *extra: str) -> DymeTrainer:
    cfg = load_config(None, [
        f"data.path={tiny_setup['data']}", f"model.name_or_path={tiny_setup['model']}",
        f"train.output_dir={out}", "train.refined=", "train.batch_size=3", "train.num_generations=4",
        "train.max_new_tokens=12", "train.progress_bar=false", "train.temperature=0.7", *extra,
    ])
    return DymeTrainer(cfg, tiny_setup["dataset"], device="cpu")


def _plain(trainer: DymeTrainer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trainer, "_merged_embeds", lambda *args: None)


def _generate(trainer: DymeTrainer, batch, seed: int = 0) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    return trainer._generate(batch)


@pytest.mark.parametrize("static_cache", [False, True])
def test_generation_fast_path_samples_the_same_completions(tiny_setup: dict, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           static_cache: bool) -> None:
    trainer = _trainer(tiny_setup, tmp_path, f"train.static_cache={static_cache}")
    batch = trainer._prepare(trainer.samples[:3])
    images_seen: list[int] = []
    hook = trainer.model.model.vision_model.register_forward_hook(
        lambda module, args, kwargs, out: images_seen.append(kwargs["pixel_values"].shape[0]), with_kwargs=True)
    fast = _generate(trainer, batch)
    hook.remove()
    assert images_seen == [3]  # once per prompt image, not once per completion (3 x K=4)
    _plain(trainer, monkeypatch)
    trainer.t.static_cache = False
    plain = _generate(trainer, batch)
    assert len(fast) == len(plain) == 12
    for a, b in zip(fast, plain, strict=True):
        assert torch.equal(a, b)


def test_update_fast_path_gives_the_same_logps_and_gradients(tiny_setup: dict, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = _trainer(tiny_setup, tmp_path)
    batch = trainer._prepare(trainer.samples[:3])
    images_seen: list[int] = []
    hook = trainer.model.model.vision_model.register_forward_hook(
        lambda module, args, kwargs, out: images_seen.append(kwargs["pixel_values"].shape[0]), with_kwargs=True)
    completions = _generate(trainer, batch)
    reference = trainer._encode_target("The largest bar is 12.\nAnswer: 12")
    # rollouts of prompts 2 and 0 (repeated prompts, sampling temperature) and a memorised reference row
    rows = [Row(2, completions[8], 1.5, 0.7), Row(0, completions[1], -0.5, 0.7), Row(2, completions[9], 0.3, 0.7),
            Row(1, reference, 1.0, 1.0, memorized=True)]

    def logps_and_grads() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        trainer.model.zero_grad(set_to_none=True)
        trainer.model.train()
        logps, mask = trainer._token_logps(trainer.model, batch, rows)
        (logps * mask).sum().backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        return logps.detach(), grads

    fast_logps, fast_grads = logps_and_grads()
    logps_and_grads()  # a second micro-batch of the same batch reuses the cached encoder output
    hook.remove()
    # one encoder forward per batch image serves generation (eval) and every update micro-batch
    # (train): the encoder has no dropout, so train mode gives the same output
    assert images_seen == [3]
    _plain(trainer, monkeypatch)
    plain_logps, plain_grads = logps_and_grads()
    torch.testing.assert_close(fast_logps, plain_logps, rtol=1e-5, atol=1e-5)
    assert fast_grads.keys() == plain_grads.keys()
    assert any("connector" in n for n in fast_grads)  # the trainable connector still gets its gradient
    assert not any("vision_model" in n for n in fast_grads)
    for name in fast_grads:
        torch.testing.assert_close(fast_grads[name], plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_no_fast_path_when_the_vision_encoder_trains(tiny_setup: dict, tmp_path: Path) -> None:
    """An unfrozen encoder needs its own gradient per row: the plain path is used."""
    trainer = _trainer(tiny_setup, tmp_path, "model.freeze_vision=false")
    batch = trainer._prepare(trainer.samples[:2])
    ids = torch.stack([batch.prompt_ids[0], batch.prompt_ids[0]])
    assert trainer._merged_embeds(trainer.model, batch, [0, 0], ids) is None


def test_compiled_update_gives_the_same_logps_gradients_and_saved_model(tiny_setup: dict, tmp_path: Path) -> None:
    """train.compile_update: the update's forward/backward through torch.compile (inductor on this CPU)
    gives eager's log-probs and gradients, generation keeps the plain model, and the saved model has
    the plain parameter names (the compiled wrapper shares the parameters, it is not saved)."""
    eager = _trainer(tiny_setup, tmp_path / "eager")
    compiled = _trainer(tiny_setup, tmp_path / "compiled", "train.compile_update=true", "train.max_steps=1")
    assert eager.update_model is None and compiled.update_model is not None
    batch = eager._prepare(eager.samples[:3])
    completions = _generate(eager, batch)
    for a, b in zip(completions, _generate(compiled, batch), strict=True):
        assert torch.equal(a, b)  # same weights, same seed: generation does not go through the compiled wrapper
    reference = eager._encode_target("The largest bar is 12.\nAnswer: 12")
    rows = [Row(2, completions[8], 1.5, 0.7), Row(0, completions[1], -0.5, 0.7), Row(1, reference, 1.0, 1.0, True)]

    def logps_and_grads(trainer: DymeTrainer) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        trainer.model.zero_grad(set_to_none=True)
        with trainer._update_mode():
            logps, mask = trainer._token_logps(trainer.model, batch, rows)
            (logps * mask).sum().backward()
        return logps.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}

    eager_logps, eager_grads = logps_and_grads(eager)
    compiled_logps, compiled_grads = logps_and_grads(compiled)
    torch.testing.assert_close(compiled_logps, eager_logps, rtol=1e-4, atol=1e-4)
    assert compiled_grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)
    compiled.train()
    saved = tmp_path / "compiled" / "model" / "model.safetensors"
    from safetensors import safe_open

    with safe_open(str(saved), "pt") as f:
        names = set(f.keys())
    assert not any("_orig_mod" in n for n in names)
    assert names == set(eager.model.state_dict())
