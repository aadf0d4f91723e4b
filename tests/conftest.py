"""Fixtures shared by every test folder.

The suite runs torch on one thread, in this process and in every `dyme` subprocess it starts (they inherit
the variable): results compared across the two, such as a resumed run's weights against an uninterrupted
one's, are then computed with the same float rounding, and the 2-core machine is not oversubscribed. It is
set before anything imports torch, which reads it once.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_overrides() -> list[str]:
    """`dyme init-model` overrides of the tiny random model the tests share (seconds to build and train)."""
    return ["init_model.vocab_size=300", "init_model.hidden_size=32", "init_model.num_layers=1",
            "init_model.num_heads=2", "init_model.vision_hidden_size=32", "init_model.vision_layers=1",
            "init_model.image_size=32", "init_model.patch_size=8"]
