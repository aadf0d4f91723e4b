"""One run per folder (dyme_core/lock.py): a second `dyme train` on a run folder or checkpoint folder that
another process holds stops at once with one line naming the holder, and writes nothing; a lock left by
a process killed with SIGKILL is taken over; under torchrun every rank stops when rank 0 is refused."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from dyme_core import cli
from dyme_core.checkpoint import staging_dir
from dyme_core.lock import FolderLocked, hold_run_folders, lock_path

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
HOLD = """
import sys, time
from dyme_core.lock import hold_run_folders
with hold_run_folders({"train.output_dir": sys.argv[1], "train.checkpoint_dir": sys.argv[2]}):
    print("held", flush=True)
    time.sleep(600)
"""


def _holder(out: Path, ckpt: Path | str = "") -> subprocess.Popen:
    """Another process holding `out` (and `ckpt`) until it is killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out), str(ckpt)], env=ENV, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _train(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    rc = cli.main(["train", *argv])
    return rc, capsys.readouterr().err


def test_a_second_run_on_a_held_folder_stops_at_once_naming_the_holder(
        tiny: dict, overrides, tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "run"
    holder = _holder(out)
    try:
        start = time.monotonic()
        rc, err = _train(overrides(out), capsys)
        assert time.monotonic() - start < 10  # no model loaded, no step taken
        assert rc == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert err.startswith(f"dyme train: error: train.output_dir {out} is in use by another run")
        assert f"host {socket.gethostname()}, pid {holder.pid}" in err
        assert not out.exists() and not staging_dir(out).exists()  # nothing written
        assert json.loads(lock_path(out).read_text())["pid"] == holder.pid  # the holder's record is intact
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the holder died without releasing: its lock file stays, the kernel dropped the lock; the next run takes it
    assert lock_path(out).is_file()
    with caplog.at_level(logging.INFO, logger="dyme_core.lock"):
        rc, err = _train(overrides(out, "train.max_steps=1"), capsys)
    assert rc == 0, err
    assert any(f"pid {holder.pid}" in r.getMessage() and "took over" in r.getMessage() for r in caplog.records)
    assert (out / "metrics.jsonl").is_file() and lock_path(out).read_text() == ""  # released: no holder on record


def test_a_held_checkpoint_dir_is_refused_too(tiny: dict, overrides, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    ckpt = tmp_path / "ckpt"
    holder = _holder(tmp_path / "other-run", ckpt)
    try:
        rc, err = _train(overrides(tmp_path / "run", f"train.checkpoint_dir={ckpt}"), capsys)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert rc == 1 and len(err.strip().splitlines()) == 1
    assert f"train.checkpoint_dir {ckpt} is in use by another run" in err and f"pid {holder.pid}" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_two_dyme_train_on_one_output_dir(tiny: dict, overrides, tmp_path: Path) -> None:
    """The reported failure: two real `dyme train` processes on one output_dir. The second is refused while
    the first trains, and the first's metrics list each of its steps once."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "dyme_core.cli", "train", *overrides(out, "train.max_steps=1000")]
    first = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = staging_dir(out) / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while first.poll() is None and not (metrics.is_file() and metrics.read_text().strip()):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    second = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=240)
    first.send_signal(signal.SIGTERM)  # what a pod deletion does: it stops after its current step
    _, first_err = first.communicate(timeout=240)
    assert first.returncode == 130, first_err[-2000:]
    assert second.returncode == 1
    lines = [line for line in second.stderr.splitlines() if line.startswith("dyme train:")]
    assert len(lines) == 1 and "is in use by another run" in lines[0] and f"pid {first.pid}" in lines[0]
    assert "Traceback" not in second.stderr
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert len(steps) >= 2 and steps == list(range(1, len(steps) + 1))


def _rank(rank: int, store: str, out: str, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        with hold_run_folders({"train.output_dir": out}):
            results[rank] = "ran"
    except FolderLocked as e:
        results[rank] = str(e)
    finally:
        dist.destroy_process_group()


def test_under_torchrun_every_rank_stops_when_rank_0_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "run"
    holder = _holder(out)
    try:
        with mp.Manager() as manager:
            results = manager.dict()
            mp.spawn(_rank, args=(str(tmp_path / "store"), str(out), results), nprocs=2)
            results = dict(results)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert f"pid {holder.pid}" in results[0]
    assert results[1].startswith("rank 0 could not lock train.output_dir")
    # once free, rank 0 takes it and both ranks run
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank, args=(str(tmp_path / "store2"), str(out), results), nprocs=2)
        assert dict(results) == {0: "ran", 1: "ran"}
