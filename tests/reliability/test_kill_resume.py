"""Runs survive kill -9 (issue 10, items 1 and 2).

`dyme train` runs as a subprocess on the CPU tiny model with a checkpoint after every step and is
killed with SIGKILL again and again: after a random delay (anywhere: start-up, a step, a checkpoint,
the final save, the publish) or the moment a checkpoint's temporary folder appears (mid-checkpoint).
Every restart uses `train.resume_from=auto`; after every third kill the next restart runs to the
end. Checked: no restart fails, every run that finishes ends
with weights equal to an uninterrupted run's, its metrics list each step once, and a finished run's
published outputs stay byte-identical while later runs in the same output_dir are killed or fail.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dyme_core.checkpoint import begin_run, staging_dir
from dyme_core.config import load_config
from dyme_core.trainer import DymeTrainer

KILLS = 12
KILLS_PER_RUN = 3  # then the next restart runs to the end and is compared
MAX_STEPS = 6
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _snapshot(run: Path) -> dict[str, str]:
    """sha256 of every file under a run dir, by relative path."""
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file()}


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model" / "model.safetensors")


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _logged_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_kill_9_anywhere_then_resume_ends_with_the_same_weights(tiny: dict, overrides, tmp_path: Path) -> None:
    def command(out: Path) -> list[str]:
        return [sys.executable, "-m", "dyme_core.cli", "train",
                *overrides(out, f"train.max_steps={MAX_STEPS}", "train.save_steps=1", "train.resume_from=auto")]

    ref = tmp_path / "ref"
    t0 = time.monotonic()
    done = subprocess.run(command(ref), env=ENV, capture_output=True, text=True, timeout=300)
    ref_seconds = time.monotonic() - t0  # scales the random kill delays only; nothing asserts on time
    assert done.returncode == 0, done.stderr[-2000:]
    expected = _weights(ref)

    out = tmp_path / "run"
    stage = staging_dir(out)
    rng = random.Random(20261129)
    counts = {"kills": 0, "mid_checkpoint": 0, "mid_publish": 0, "finished": 0, "finished_equal": 0,
              "finished_after_kill": 0}
    published: dict[str, str] | None = None
    killed_since_finish = 0
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    attempt = 0
    while counts["kills"] < KILLS or killed_since_finish:
        attempt += 1
        err = (log_dir / f"{attempt}.stderr").open("w")
        proc = subprocess.Popen(command(out), env=ENV, stdout=subprocess.DEVNULL, stderr=err)
        if counts["kills"] < KILLS and killed_since_finish < KILLS_PER_RUN:
            if attempt % 3 == 0:  # the moment a checkpoint's temporary folder appears
                deadline = time.monotonic() + 3 * ref_seconds
                while proc.poll() is None and time.monotonic() < deadline:
                    if stage.is_dir() and any(p.name.endswith(f".tmp-{proc.pid}") for p in stage.iterdir()):
                        break
                    time.sleep(0.0002)
            else:  # anywhere in the process's life
                try:
                    proc.wait(timeout=rng.uniform(0.2, 1.1) * ref_seconds)
                except subprocess.TimeoutExpired:
                    pass
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
        rc = proc.wait(timeout=300)
        err.close()
        published_now = False
        if rc == -signal.SIGKILL:
            counts["kills"] += 1
            killed_since_finish += 1
            leftovers = [p.name for p in stage.iterdir()] if stage.is_dir() else []
            if any(name.endswith((f".tmp-{proc.pid}", f".trash-{proc.pid}")) for name in leftovers):
                counts["mid_checkpoint"] += 1
            if (out.parent / f".{out.name}.previous").exists():
                counts["mid_publish"] += 1
            published_now = out.exists() and not stage.exists() and _snapshot(out) != published
        else:
            assert rc == 0, f"attempt {attempt} failed:\n{(log_dir / f'{attempt}.stderr').read_text()[-3000:]}"
        if rc == 0 or published_now:  # finished (a kill can land after the publish, while the process exits)
            counts["finished"] += 1
            counts["finished_after_kill"] += killed_since_finish - published_now > 0  # it resumed a killed run
            killed_since_finish = 0
            counts["finished_equal"] += _equal(_weights(out), expected)
            assert _logged_steps(out) == list(range(1, MAX_STEPS + 1))
            published = _snapshot(out)
        if published is not None and out.exists():  # a killed later run never touches the finished one
            assert _snapshot(out) == published, f"attempt {attempt} changed the published run"
    print(f"\nkill -9 loop: {json.dumps(counts)} over {attempt} attempts; uninterrupted run {ref_seconds:.1f} s")
    assert counts["kills"] >= KILLS
    assert counts["mid_checkpoint"] >= 1
    assert counts["finished_equal"] == counts["finished"] and counts["finished_after_kill"] >= KILLS // KILLS_PER_RUN


class _CrashAt(DymeTrainer):
    """A trainer that fails at a given step (a bad batch, an OOM, a lost node...)."""

    crash_step = 2

    def train_step(self):
        if self.step == self.crash_step:
            raise RuntimeError("simulated failure")
        return super().train_step()


def test_a_failed_train_leaves_the_finished_run_byte_identical(tiny: dict, overrides, tmp_path: Path) -> None:
    out = tmp_path / "run"
    DymeTrainer(load_config(None, overrides(out, "train.max_steps=2")), tiny["dataset"]).train()
    before = _snapshot(out)
    assert {"config.yaml", "metrics.jsonl", "model/model.safetensors", "summary.json"} <= set(before)
    # a second run into the same output_dir, with other settings, that fails half-way
    second = load_config(None, overrides(out, "train.max_steps=4", "train.learning_rate=5e-4", "train.save_steps=1"))
    with pytest.raises(RuntimeError, match="simulated failure"):
        _CrashAt(second, tiny["dataset"]).train()
    assert _snapshot(out) == before
    # its partial work waits in the staging folder; resuming it publishes config, metrics and model together
    assert (staging_dir(out) / "checkpoint-2").is_dir()
    DymeTrainer(load_config(None, overrides(out, "train.max_steps=4", "train.learning_rate=5e-4",
                                            "train.save_steps=1", "train.resume_from=auto")), tiny["dataset"]).train()
    assert not staging_dir(out).exists()
    assert load_config(out / "config.yaml").train.max_steps == 4
    assert _logged_steps(out) == [1, 2, 3, 4]
    assert _snapshot(out)["model/model.safetensors"] != before["model/model.safetensors"]


@pytest.mark.parametrize("killed_after", ["first rename", "second rename"])
def test_a_publish_cut_by_a_kill_is_rolled_back_or_completed(tmp_path: Path, killed_after: str) -> None:
    """Publishing is two renames (old run aside, new run in place); a kill between or after them is
    repaired by the next run's start: the finished run is back, or the new one stays, never neither."""
    out = tmp_path / "run"
    previous = tmp_path / ".run.previous"
    previous.mkdir()
    (previous / "summary.json").write_text("old")
    if killed_after == "second rename":
        out.mkdir()
        (out / "summary.json").write_text("new")
    stage = begin_run(out, resume=True)
    assert (out / "summary.json").read_text() == ("old" if killed_after == "first rename" else "new")
    assert not previous.exists() and stage == staging_dir(out) and stage.is_dir()


@pytest.mark.slow
def test_two_processes_resume_exactly(tiny: dict, overrides, tmp_path: Path) -> None:
    """torchrun with 2 processes (gloo): rank 0 writes the checkpoints, both ranks resume from one."""
    def torchrun(out: Path, *extra: str) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "dyme_core.cli", "train", *overrides(out, "train.max_steps=3", "train.batch_size=1", *extra)]
        done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]

    torchrun(tmp_path / "straight", "train.save_steps=1")
    assert sorted(p.name for p in (tmp_path / "straight").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    torchrun(tmp_path / "resumed", f"train.resume_from={tmp_path / 'straight' / 'checkpoint-1'}")
    assert _equal(_weights(tmp_path / "resumed"), _weights(tmp_path / "straight"))
    assert _logged_steps(tmp_path / "resumed") == [1, 2, 3]


def _run_status(uri: str) -> list[str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return [r.info.status for r in client.search_runs(experiments)]


def test_a_failed_train_ends_its_mlflow_run_failed(tiny: dict, overrides, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    cfg = load_config(None, overrides(tmp_path / "run", "train.report_to=[jsonl,mlflow]",
                                      f"register.tracking_uri={uri}"))
    with pytest.raises(RuntimeError, match="simulated failure"):
        _CrashAt(cfg, tiny["dataset"]).train()
    assert _run_status(uri) == ["FAILED"]


@pytest.mark.slow
def test_sigterm_stops_train_in_one_line_and_ends_its_mlflow_run_killed(tiny: dict, overrides,
                                                                        tmp_path: Path) -> None:
    """What a pod deletion does: SIGTERM. The run ends KILLED, the exit is 130, stderr says one line."""
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "dyme_core.cli", "train",
           *overrides(out, "train.max_steps=1000", "train.report_to=[jsonl,mlflow]", f"register.tracking_uri={uri}")]
    proc = subprocess.Popen(cmd, env={**ENV, "MLFLOW_TRACKING_URI": uri}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    metrics = staging_dir(out) / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:  # wait for step 1 to be logged
        if metrics.is_file() and metrics.read_text().strip():
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    last = [line for line in stderr.splitlines() if line.startswith("dyme train:")]
    assert last == ["dyme train: interrupted"] and "Traceback" not in stderr
    assert _run_status(uri) == ["KILLED"]
    assert not out.exists()  # nothing published: the staged run waits for resume_from=auto
