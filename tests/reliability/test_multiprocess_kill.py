"""kill -9 of one process of a two-process `torchrun` run (gloo, CPU), then resume (issue 22, item 6).

Each scenario starts `torchrun --nproc_per_node=2 -m dyme_core.cli train` with a checkpoint after every step
and `train.resume_from=auto`, kills one rank with SIGKILL, lets torchrun end the other, and starts the same
command again, which resumes from the newest intact checkpoint and runs to the end. The final weights must
equal an uninterrupted torchrun run's, bit for bit, and the metrics must list each step once.

- rank 1 mid-step: once step 1 is logged, rank 0 is frozen with SIGSTOP outside a checkpoint write and
  rank 1 is killed, then rank 0 let go: it fails at its next collective;
- rank 0 mid-checkpoint: rank 0 (the only writer) is frozen with SIGSTOP at random moments until one lands
  while its temporary checkpoint folder exists, then killed there: a half-written checkpoint is left behind;
- rank 1 mid-checkpoint: the same freeze of rank 0 inside a checkpoint, then rank 1 (waiting at the barrier)
  is killed and rank 0 let go: it finishes the checkpoint and fails at the barrier.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from dyme_core.checkpoint import staging_dir

MAX_STEPS = 6
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _command(overrides, out: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "dyme_core.cli", "train",
            *overrides(out, f"train.max_steps={MAX_STEPS}", "train.batch_size=1", "train.save_steps=1",
                       "train.resume_from=auto")]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model" / "model.safetensors")


def _ranks(torchrun: subprocess.Popen, timeout: float = 240) -> dict[int, psutil.Process]:
    """rank -> worker process of a torchrun, once both workers have started."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = {}
        for child in psutil.Process(torchrun.pid).children(recursive=True):
            try:
                rank = child.environ().get("RANK")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if rank is not None and "dyme_core.cli" in " ".join(child.cmdline()):
                found[int(rank)] = child
        if len(found) == 2:
            return found
        time.sleep(0.1)
    raise AssertionError("torchrun workers did not start")


def _logged(stage: Path) -> int:
    metrics = stage / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.is_file() else 0


def _freeze_inside_a_checkpoint(rank0: psutil.Process, stage: Path, rng: random.Random) -> bool:
    """SIGSTOP rank 0 at random moments until it is stopped while its checkpoint's temporary folder exists
    (True; it stays stopped), or it has finished (False)."""
    while rank0.is_running() and rank0.status() != psutil.STATUS_ZOMBIE:
        rank0.suspend()
        if stage.is_dir() and any(p.name.endswith(f".tmp-{rank0.pid}") for p in stage.iterdir()):
            return True
        rank0.resume()
        time.sleep(rng.uniform(0.0005, 0.004))
    return False


def _kill(scenario: str, overrides, out: Path, rng: random.Random) -> dict:
    stage = staging_dir(out)
    proc = subprocess.Popen(_command(overrides, out), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    ranks = _ranks(proc)
    deadline = time.monotonic() + 240
    # mid-step: once step 1 is done; mid-checkpoint: once step 2 is logged, so the write caught is checkpoint-2 or
    # later and checkpoint-1 is there to resume from
    while _logged(stage) < (1 if scenario == "rank 1 mid-step" else 2):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before step 1 was logged"
        time.sleep(0.02)
    where = {"scenario": scenario, "logged_before_kill": _logged(stage)}
    if scenario == "rank 1 mid-step":
        while True:  # rank 0 frozen where it is, in a step (not inside a checkpoint write), then rank 1 killed
            time.sleep(rng.uniform(0.0, 0.05))
            ranks[0].suspend()
            if not any(".tmp-" in p.name for p in stage.iterdir()):
                break
            ranks[0].resume()
        where["logged_before_kill"] = _logged(stage)
        ranks[1].kill()
        ranks[0].resume()
    else:
        assert _freeze_inside_a_checkpoint(ranks[0], stage, rng), "no checkpoint write was caught"
        where["checkpoint_in_progress"] = sorted(p.name for p in stage.iterdir() if ".tmp-" in p.name)
        if scenario == "rank 0 mid-checkpoint":
            ranks[0].kill()
        else:
            ranks[1].kill()
            ranks[0].resume()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0, "torchrun should fail when a worker is killed"
    assert where["logged_before_kill"] < MAX_STEPS and not out.exists()  # killed before the run could finish
    where["half_written_left"] = sorted(p.name for p in stage.iterdir() if ".tmp-" in p.name)
    where["checkpoints_left"] = sorted(p.name for p in stage.iterdir() if p.name.startswith("checkpoint-"))
    return where


@pytest.fixture(scope="module")
def straight(tiny: dict, overrides, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("mp-straight") / "run"
    done = subprocess.run(_command(overrides, out), env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return _weights(out)


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["rank 1 mid-step", "rank 0 mid-checkpoint", "rank 1 mid-checkpoint"])
def test_kill_one_rank_then_resume_exactly(tiny: dict, overrides, straight, tmp_path: Path, scenario: str) -> None:
    out = tmp_path / "run"
    where = _kill(scenario, overrides, out, random.Random(scenario))
    done = subprocess.run(_command(overrides, out), env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    resumed = [line for line in done.stderr.splitlines() if "resumed from" in line]
    print(f"\n{json.dumps(where)}; resume: {resumed[0].split('resumed from')[1].strip() if resumed else 'from 0'}")
    assert steps == list(range(1, MAX_STEPS + 1))
    weights = _weights(out)
    assert weights.keys() == straight.keys() and all(torch.equal(weights[k], straight[k]) for k in weights)
