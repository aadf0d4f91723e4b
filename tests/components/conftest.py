"""Fixtures for the component tests: the repo's params.yaml and a tiny synthetic dataset per test."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # `components` may predate the editable install; the image installs it


@pytest.fixture
def params() -> str:
    return (ROOT / "params.yaml").read_text()


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    """4 rows (2 train, 1 val, 1 test) of the synthetic chart data, in the project format."""
    from dyme_core.config import SynthConfig
    from dyme_core.data.synth import synthesize

    return synthesize(SynthConfig(out_dir=str(tmp_path / "data"), n_train=2, n_val=1, n_test=1, image_size=64))
