"""Shared fixtures for tests/core (append new fixtures below; keep imports light)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fake_llm import FakeLLM


@pytest.fixture
def fake_llm() -> Iterator[FakeLLM]:
    """A running fake OpenAI-compatible server (see fake_llm.py); stopped after the test."""
    with FakeLLM() as fake:
        yield fake


@pytest.fixture(scope="session")
def tiny_setup(tmp_path_factory: pytest.TempPathFactory, tiny_model_overrides: list[str]) -> dict:
    """A small synthetic dataset and a tiny random Idefics3 built from it, shared by the session."""
    from dyme_core import steps
    from dyme_core.config import DataConfig, SynthConfig, load_config
    from dyme_core.data.loaders import load_dataset
    from dyme_core.data.synth import synthesize

    root = tmp_path_factory.mktemp("tiny")
    data_dir = synthesize(SynthConfig(out_dir=str(root / "data"), n_train=8, n_val=2, n_test=4, image_size=64))
    ds = load_dataset(DataConfig(path=str(data_dir)))
    model_dir = steps.init_model(load_config(None, [*tiny_model_overrides, f"init_model.out_dir={root / 'model'}"]), ds)
    return {"root": root, "data": data_dir, "model": model_dir, "dataset": ds}
