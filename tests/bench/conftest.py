"""Fixtures of the benchmark tests: the bench toolkit's synthetic charts and random model, at the tiny shape."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for `bench`

from bench.common import Work, prepare_work  # noqa: E402


@pytest.fixture(scope="session")
def bench_work(tmp_path_factory: pytest.TempPathFactory) -> Work:
    """8 synthetic charts and the random `tiny` model, in a --work cache that the scripts under test reuse."""
    root = tmp_path_factory.mktemp("bench-work")
    return prepare_work("tiny", root, samples=8, seed=0, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """torch on one thread, as the benchmarks run on the CPU (a shared 2-core box thrashes with more); restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
