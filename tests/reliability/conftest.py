"""Shared fixtures for tests/reliability: a tiny ingested and validated dataset, a tiny random model
built from it, and the overrides of a `dyme train` run of a few seconds on the CPU."""

from __future__ import annotations

from collections.abc import Callable

import pytest


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory, tiny_model_overrides: list[str]) -> dict:
    """The pipeline's first steps on a small synthetic set: ingest, validate, init-model."""
    from dyme_core import steps
    from dyme_core.config import load_config
    from dyme_core.data.ingest import open_dataset

    root = tmp_path_factory.mktemp("tiny")
    data = [f"data.out_dir={root / 'data'}", f"validate.report={root / 'validation.json'}"]
    cfg = load_config(None, ["data.path=synthetic", f"data.report={root / 'ingest.json'}",
                             f"synth.out_dir={root / 'synth'}", "synth.n_train=8", "synth.n_val=2", "synth.n_test=4",
                             "synth.image_size=64", *data])
    steps.ingest(cfg)
    assert steps.validate(cfg)["success"]
    ds = open_dataset(root / "data")
    model_dir = steps.init_model(load_config(None, [*tiny_model_overrides, f"init_model.out_dir={root / 'model'}"]), ds)
    return {"root": root, "data_overrides": data, "model": model_dir, "dataset": ds}


@pytest.fixture(scope="session")
def overrides(tiny: dict) -> Callable[..., list[str]]:
    """overrides(out, *extra): `dyme train` key=value overrides for a run of a few seconds on the CPU."""
    return lambda out, *extra: [
        *tiny["data_overrides"], f"model.name_or_path={tiny['model']}",
        f"train.output_dir={out}", "train.refined=", "train.template_pool=",
        f"train.refine_cache_dir={out.parent / 'refine_cache'}", "train.max_steps=4", "train.batch_size=2",
        "train.num_generations=2", "train.max_new_tokens=8", "train.progress_bar=false",
        "train.learning_rate=1e-3", "train.report_to=[jsonl]", *extra,
    ]
