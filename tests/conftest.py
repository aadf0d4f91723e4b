"""Fixtures shared by every test folder."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_model_overrides() -> list[str]:
    """`dyme init-model` overrides of the tiny random model the tests share (seconds to build and train)."""
    return ["init_model.vocab_size=300", "init_model.hidden_size=32", "init_model.num_layers=1",
            "init_model.num_heads=2", "init_model.vision_hidden_size=32", "init_model.vision_layers=1",
            "init_model.image_size=32", "init_model.patch_size=8"]
