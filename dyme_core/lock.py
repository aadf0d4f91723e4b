"""One training run per folder: an advisory lock on `train.output_dir` and `train.checkpoint_dir`
(DESIGN.md section 7, checkpoints and run directories).

Two `dyme train` on one run folder (a retried Kubeflow pod beside its predecessor, two terminals) would
interleave their checkpoints and publish metrics that mix both runs. :func:`hold_run_folders` takes an
exclusive ``flock`` (through the `filelock` package, non-blocking) on ``.<name>.lock`` beside each folder
for the whole run: beside, because a run folder is replaced by a rename when the run is published, and a
lock file inside it would move with it. The lock file holds the holder's host, pid and start time (JSON),
so the second run stops at once with one line naming the holder.

Stale locks: the kernel drops a ``flock`` when its process dies (kill -9 included), so the file a
killed run leaves behind locks nothing; the next run takes the lock, logs whose it was, and writes
its own holder. A normal release empties the file (the file itself stays: removing it would let a
waiter lock an unlinked file).

Other hosts: on NFS (the ReadWriteMany volumes of a cluster) Linux turns ``flock`` into a byte-range
lock that the NFS server arbitrates, so two pods on different nodes exclude each other; when the
holding node dies, the server frees the lock once the node's lease expires (NFSv4: 90 s by default),
and until then the new run is refused with the dead holder's host in the message. A volume mounted
with ``nolock`` keeps locks local to each node: no cross-node exclusion there. A filesystem without
``flock`` at all is refused in one line rather than run unlocked.

Under torchrun only rank 0 locks (the other ranks share its folders and never write them); the outcome
is all-reduced so every rank stops when rank 0 is refused. Tests: ``tests/reliability/test_lock.py``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from filelock import Timeout, UnixFileLock

log = logging.getLogger(__name__)


class FolderLocked(RuntimeError):
    """Another process holds the run folder; the message names the folder and the holder."""


def lock_path(folder: str | Path) -> Path:
    """``.<name>.lock`` beside `folder` (absolute: `.` has no name)."""
    folder = Path(os.path.abspath(folder))
    return folder.parent / f".{folder.name}.lock"


def _holder_text(raw: bytes) -> str:
    try:
        holder = json.loads(raw)
        return f"host {holder['host']}, pid {holder['pid']}, since {holder['since']}"
    except (ValueError, KeyError, TypeError):
        return "holder not recorded yet"


def _write_holder(key: str, folder: Path):
    """on_acquired callback: log a stale holder's record, then write ours into the locked file."""

    def write(fd: int) -> None:
        previous = os.pread(fd, 4096, 0)
        if previous.strip():
            log.info("%s %s: took over the lock left by a process that is gone (%s)", key, folder,
                     _holder_text(previous))
        record = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                             "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
        os.fsync(fd)

    return write


@contextlib.contextmanager
def _hold(folders: dict[str, str]) -> Iterator[None]:
    """Lock every folder of `folders` (config key -> path) for the duration; FolderLocked if one is held."""
    with contextlib.ExitStack() as stack:
        seen: set[Path] = set()
        for key, folder in folders.items():
            path = lock_path(folder)
            if path in seen:  # checkpoint_dir == output_dir: one lock
                continue
            seen.add(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            lock = UnixFileLock(path, timeout=0, on_acquired=_write_holder(key, folder))
            try:
                stack.enter_context(lock)
            except Timeout:
                try:
                    holder = _holder_text(path.read_bytes())
                except OSError:
                    holder = "holder not recorded yet"
                raise FolderLocked(f"{key} {folder} is in use by another run ({holder}); wait for it to end or "
                                   f"use another {key}") from None
            except OSError as e:  # ENOSYS/ENOLCK: no flock on this filesystem
                raise FolderLocked(f"{key} {folder}: cannot lock {path} ({e.strerror or e}); this filesystem "
                                   "offers no file locks, so concurrent runs could not be detected") from None
            stack.callback(os.truncate, path, 0)  # released cleanly: no holder left on record (runs first)
        yield


@contextlib.contextmanager
def hold_run_folders(folders: dict[str, str]) -> Iterator[None]:
    """Hold the locks of `folders` (config key -> path; empty paths are skipped) for a training run.

    Single process: lock here. Under torchrun (a process group is initialised): rank 0 locks, and the
    outcome is shared, so every rank raises FolderLocked when rank 0 could not lock.
    """
    folders = {k: v for k, v in folders.items() if v}
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    with contextlib.ExitStack() as stack:
        refused: FolderLocked | None = None
        if rank == 0:
            try:
                stack.enter_context(_hold(folders))
            except FolderLocked as e:
                refused = e
        if distributed:
            flag = torch.tensor([float(refused is not None)])  # CPU: gloo carries it under NCCL too
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() and refused is None:
                raise FolderLocked(f"rank 0 could not lock {', '.join(folders)}; see its message")
        if refused is not None:
            raise refused
        yield
