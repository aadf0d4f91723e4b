"""Regional compilation of the update and the compile cache (dyme_core/regional.py), on this CPU with inductor.

`train.compile_update` compiles one decoder layer and reuses it for every layer: the update's log-probs and
gradients must be eager's (two families, models of several layers), generation must keep the plain layers,
and one compiled graph must serve all layers and lengths. `train.compile_cache_dir` must let a later process
start from torch's saved artifacts (cache hits, no fresh inductor compile) and must survive a broken file.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from dyme_core.config import InitModelConfig, load_config
from dyme_core.models import init_tiny_model
from dyme_core.regional import CompileCache, RegionalCompile, decoder_layers
from dyme_core.trainer import DymeTrainer, Row

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["idefics3", "qwen2_vl"])
def deep_model(request: pytest.FixtureRequest, tiny_setup: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny random model of one family with 3 decoder layers (the shared tiny model has 1)."""
    from dyme_core.refiner import rule_refine

    ds = tiny_setup["dataset"]
    texts = [t for s in ds.samples for t in (s.question, s.answer, s.hint or "", rule_refine(s)) if t]
    out = tmp_path_factory.mktemp(request.param) / "model"
    init_tiny_model(InitModelConfig(family=request.param, out_dir=str(out), vocab_size=300, hidden_size=32,
                                    num_layers=3, num_heads=2, vision_hidden_size=32, vision_layers=1,
                                    image_size=32, patch_size=8), texts)
    return {"family": request.param, "model": out, "data": tiny_setup["data"], "dataset": ds}


def _trainer(fm: dict, out: Path, *extra: str) -> DymeTrainer:
    cfg = load_config(None, [
        f"data.path={fm['data']}", f"model.name_or_path={fm['model']}", f"train.output_dir={out}",
        "train.refined=", "train.template_pool=", f"train.refine_cache_dir={out}/refine_cache",
        "train.batch_size=3", "train.num_generations=2", "train.max_new_tokens=10", "train.temperature=0.7",
        "train.progress_bar=false", "train.report_to=none", "train.max_steps=2", *extra,
    ])
    return DymeTrainer(cfg, fm["dataset"], device="cpu")


def _rows(trainer: DymeTrainer, batch) -> list[Row]:
    torch.manual_seed(0)
    completions = trainer._generate(batch)
    reference = trainer._encode_target("The largest bar is 12.\nAnswer: 12")
    return [Row(2, completions[4], 1.5, 0.7), Row(0, completions[1], -0.5, 0.7), Row(1, reference, 1.0, 1.0, True)]


def _logps_and_grads(trainer: DymeTrainer, batch, rows: list[Row]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    trainer.model.zero_grad(set_to_none=True)
    with trainer._update_mode():
        logps, mask = trainer._token_logps(trainer.model, batch, rows)
        (logps * mask).sum().backward()
    return (logps * mask).detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters()
                                     if p.grad is not None}


def test_regional_compile_matches_eager_and_compiles_one_layer(deep_model: dict, tmp_path: Path) -> None:
    """Compiled vs eager: log-probs within 1e-5, every gradient within 1e-4 relative; one graph for 3 layers
    and two row sets of different lengths; generation untouched (plain layers outside the update)."""
    torch._dynamo.reset()
    eager = _trainer(deep_model, tmp_path / "eager")
    compiled = _trainer(deep_model, tmp_path / "compiled", "train.compile_update=true")
    assert eager.update_model is None and isinstance(compiled.update_model, RegionalCompile)
    assert len(compiled.update_model.layers) == 3
    batch = eager._prepare(eager.samples[:3])
    rows = _rows(eager, batch)
    graphs0 = counters["stats"]["unique_graphs"]
    for chunk in (rows, rows[:2]):  # the second set has other lengths: the dynamic graph is reused
        ref_logps, ref_grads = _logps_and_grads(eager, batch, chunk)
        logps, grads = _logps_and_grads(compiled, batch, chunk)
        torch.testing.assert_close(logps, ref_logps, rtol=1e-5, atol=1e-5)
        assert grads.keys() == ref_grads.keys() and any("layers.2." in n for n in grads)
        for name, g in ref_grads.items():
            rel = float((grads[name] - g).norm() / g.norm().clamp(min=1e-12))
            assert rel < 1e-4, f"{name}: relative gradient error {rel:.2e}"
    assert counters["stats"]["unique_graphs"] - graphs0 == 1  # one compiled layer serves all three
    # outside the update the layers are the plain ones: generation samples eager's tokens
    assert not any("forward" in vars(layer) for layer in compiled.update_model.layers)
    for a, b in zip(_rows(eager, batch), _rows(compiled, batch), strict=True):
        assert torch.equal(a.completion, b.completion)


def test_decoder_layers_are_the_text_models(deep_model: dict, tmp_path: Path) -> None:
    trainer = _trainer(deep_model, tmp_path)
    layers = decoder_layers(trainer.model)
    assert len(layers) == 3 and all(type(m).__name__.endswith("DecoderLayer") for m in layers)
    with pytest.raises(ValueError, match="no decoder layers"):
        decoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def _fresh_process_counters(trainer_factory) -> tuple[DymeTrainer, dict]:
    """A trainer's first step as in a new process: no in-memory compile state and torch's default on-disk
    cache empty, so compiled code can only come from train.compile_cache_dir."""
    from torch._inductor.utils import fresh_cache

    torch._dynamo.reset()
    counters.clear()
    with fresh_cache():
        trainer = trainer_factory()
        trainer.train_step()
    return trainer, {k: dict(counters[k]) for k in ("aot_autograd", "inductor")}


def test_compile_cache_lets_a_new_process_skip_the_compile(tiny_setup: dict, tmp_path: Path) -> None:
    """Run 1 compiles into compile_cache_dir; run 2 (same directory: a rerun, or a pod on the same volume) and
    run 3 (a new directory holding only the portable artifact file) get the layer's compiled forward and
    backward from it: cache hits, no inductor compile."""
    import shutil

    cache = tmp_path / "compile-cache"

    def factory(directory: Path, run: str):
        return lambda: _trainer({**tiny_setup}, tmp_path / run, "train.compile_update=true",
                                f"train.compile_cache_dir={directory}")

    _, cold = _fresh_process_counters(factory(cache, "run1"))
    assert cold["inductor"].get("fxgraph_cache_miss", 0) >= 2  # forward and backward compiled
    files = list(cache.glob("torch-*-cpu.bin"))
    assert len(files) == 1 and files[0].stat().st_size > 0 and (cache / "inductor").is_dir()
    second, same_dir = _fresh_process_counters(factory(cache, "run2"))
    copied = tmp_path / "copied"
    copied.mkdir()
    shutil.copy(files[0], copied / files[0].name)  # the file alone, as a new pod would fetch it
    _, file_only = _fresh_process_counters(factory(copied, "run3"))
    for hits in (same_dir, file_only):
        assert hits["aot_autograd"].get("autograd_cache_hit", 0) >= 1
        assert hits["inductor"].get("fxgraph_cache_hit", 0) >= 2 and hits["inductor"].get("fxgraph_cache_miss", 0) == 0
    assert not second.compile_cache.save()  # nothing new was compiled: the file is not rewritten


def test_a_broken_cache_file_falls_back_to_a_cold_compile_with_a_warning(tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "before"))  # load() repoints it; restored after
    cache = CompileCache(tmp_path, "cpu")
    cache.path.write_bytes(b"not torch artifacts")
    with caplog.at_level(logging.WARNING, logger="dyme_core.regional"):
        assert cache.load() == 0
    assert "could not be loaded" in caplog.text and "compiling cold" in caplog.text
    caplog.clear()
    cache.path.chmod(0o666)  # anyone may write it: torch would unpickle what a stranger put there
    with caplog.at_level(logging.WARNING, logger="dyme_core.regional"):
        assert cache.load() == 0
    assert "writable by anyone" in caplog.text


def test_a_cache_dir_that_is_a_file_or_open_to_anyone_is_a_clear_error(tiny_setup: dict, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="compile_cache_dir .* is not a directory"):
        _trainer({**tiny_setup}, tmp_path / "run", f"train.compile_cache_dir={tmp_path / 'file'}")
    (tmp_path / "open").mkdir(mode=0o777)
    (tmp_path / "open").chmod(0o777)
    with pytest.raises(ValueError, match="may be written by anyone"):
        _trainer({**tiny_setup}, tmp_path / "run", f"train.compile_cache_dir={tmp_path / 'open'}")
