"""Shared fixtures for tests/reliability: a tiny dataset and model, and a small `dyme train` config."""

from __future__ import annotations

from collections.abc import Callable

import pytest


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A small synthetic dataset (project format) and a tiny random Idefics3 built from it."""
    from dyme_core.config import InitModelConfig, SynthConfig
    from dyme_core.data.ingest import open_dataset
    from dyme_core.data.synth import synthesize
    from dyme_core.models import init_tiny_model
    from dyme_core.refiner import rule_refine

    root = tmp_path_factory.mktemp("tiny")
    data_dir = synthesize(SynthConfig(out_dir=str(root / "data"), n_train=8, n_val=2, n_test=4, image_size=64))
    ds = open_dataset(data_dir)
    texts = [t for s in ds.samples for t in (s.question, s.answer, s.hint or "", rule_refine(s))]
    model_dir = init_tiny_model(
        InitModelConfig(out_dir=str(root / "model"), vocab_size=300, hidden_size=32, num_layers=1,
                        num_heads=2, vision_hidden_size=32, vision_layers=1, image_size=32, patch_size=8),
        texts,
    )
    return {"root": root, "data": data_dir, "model": model_dir, "dataset": ds}


@pytest.fixture(scope="session")
def overrides(tiny: dict) -> Callable[..., list[str]]:
    """overrides(out, *extra): `dyme train` key=value overrides for a run of a few seconds on the CPU."""
    return lambda out, *extra: [
        f"data.path={tiny['data']}", f"data.out_dir={tiny['data']}", f"model.name_or_path={tiny['model']}",
        f"validate.report={out.parent / 'no-report.json'}",
        f"train.output_dir={out}", "train.refined=", "train.template_pool=",
        f"train.refine_cache_dir={out.parent / 'refine_cache'}", "train.max_steps=4", "train.batch_size=2",
        "train.num_generations=2", "train.max_new_tokens=8", "train.progress_bar=false",
        "train.learning_rate=1e-3", "train.report_to=[jsonl]", *extra,
    ]
