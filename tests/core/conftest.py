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
def tiny_setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A small synthetic dataset and a tiny random Idefics3 built from it, shared by the session."""
    from dyme_core.config import DataConfig, InitModelConfig, SynthConfig
    from dyme_core.data.loaders import load_dataset
    from dyme_core.data.synth import synthesize
    from dyme_core.models import init_tiny_model
    from dyme_core.refiner import rule_refine

    root = tmp_path_factory.mktemp("tiny")
    data_dir = synthesize(SynthConfig(out_dir=str(root / "data"), n_train=8, n_val=2, n_test=4, image_size=64))
    ds = load_dataset(DataConfig(path=str(data_dir)))
    texts = [t for s in ds.samples for t in (s.question, s.answer, s.hint or "", rule_refine(s))]
    model_dir = init_tiny_model(
        InitModelConfig(out_dir=str(root / "model"), vocab_size=300, hidden_size=32, num_layers=1,
                        num_heads=2, vision_hidden_size=32, vision_layers=1, image_size=32, patch_size=8),
        texts,
    )
    return {"root": root, "data": data_dir, "model": model_dir, "dataset": ds}
