"""Atomic, verified, pickle-free checkpoints and staged run directories (DESIGN.md section 7).

A checkpoint is the folder ``<root>/checkpoint-<step>/``:

    model.safetensors     the model's state dict (tied weights stored once, by safetensors)
    state.safetensors     every tensor of the optimizer, scheduler and RNG states, flattened by path
    trainer_state.json    step, history and the structure of those states (tensors referenced by path)
    templates.json        the template pool (and any other file the trainer adds)
    manifest.json         {"format", "step", "files": {name: {"size", "sha256"}}}, written last

Writing: every file goes into ``.checkpoint-<step>.tmp-<pid>`` next to the final folder and is
fsynced; the manifest is written last; the folder is renamed into place and the parent fsynced. A
kill at any point leaves either the old set of checkpoints or the new one, plus at most a hidden
temporary folder that the next save removes. Only the last `keep` checkpoints stay (0 = all).

Reading: nothing is unpickled (safetensors and JSON only), and a checkpoint is used only after every
file its manifest lists matches its size and sha256; files the manifest does not list (for example a
``trainer_state.pt`` someone planted) are never opened. `choose_checkpoint` takes the newest intact
checkpoint and, when a newer one is broken, falls back with a warning naming the broken file.

Runs: a training run writes into a staging folder beside ``output_dir`` (``.<name>.staging``) and is
published by renaming it into place only when it succeeds, so a failed or killed run never touches a
finished run's config, metrics or model, and the three always come from the same run. The staging
folder is not a DVC output (DVC deletes outputs before it runs a stage), so an interrupted run's
checkpoints survive a `dvc repro` and `resume_from=auto` finds them there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

log = logging.getLogger(__name__)

FORMAT = 1
MANIFEST = "manifest.json"
MODEL_FILE = "model.safetensors"
STATE_TENSORS = "state.safetensors"
STATE_JSON = "trainer_state.json"
REQUIRED = (MODEL_FILE, STATE_TENSORS, STATE_JSON)
_NAME = re.compile(r"checkpoint-(\d+)")


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or corrupt; the message names the file."""


# ---------------------------------------------------------------- state <-> tensors + JSON
def flatten_state(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON-able copy of `obj` (an optimizer/scheduler state dict, RNG states...) whose tensors are
    moved into `tensors` under their path and replaced by ``{"__tensor__": path}``.

    Dicts keep non-string keys (the optimizer's parameter indices) as ``{"__dict__": [[k, v], ...]}``
    and tuples stay tuples, so `unflatten_state` returns an equal object.
    """
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[k, flatten_state(v, f"{prefix}/{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [flatten_state(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [flatten_state(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise CheckpointError(f"cannot store {prefix} of type {type(obj).__name__} in a checkpoint")


def unflatten_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `flatten_state`."""
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(unflatten_state(v, tensors) for v in obj["__tuple__"])
        return {k: unflatten_state(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [unflatten_state(v, tensors) for v in obj]
    return obj


def rng_state() -> dict[str, Any]:
    """Torch's RNG states (CPU and every CUDA device). The trainer reseeds per (seed, step, accum, rank)
    before every batch, so resume is exact without them; they are kept so that anything drawn outside a
    step (now or later) continues the same stream."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- files
def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _fsync_file(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    """Delete a folder so that no half-deleted folder keeps a checkpoint's name: rename, then delete."""
    trash = path.with_name(f".{path.name}.trash-{os.getpid()}")
    path.rename(trash)
    shutil.rmtree(trash)


def checkpoint_step(path: Path) -> int | None:
    m = _NAME.fullmatch(path.name)
    return int(m.group(1)) if m else None


def list_checkpoints(root: Path) -> list[Path]:
    """Folders named checkpoint-N under `root`, newest (highest N) first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=lambda p: checkpoint_step(p) or 0, reverse=True)


# ---------------------------------------------------------------- write
def write_checkpoint(root: Path, step: int, model: torch.nn.Module, state: dict[str, Any],
                     extra_files: dict[str, Callable[[Path], None]] | None = None, keep: int = 2) -> Path:
    """Write ``root/checkpoint-<step>`` atomically and keep the newest `keep` checkpoints (0 = all).

    `state` holds everything but the model weights (optimizer, scheduler, RNG, step, history...);
    its tensors go to safetensors and the rest to JSON. `extra_files` maps a file name to a function
    that writes that file at the path it is given.
    """
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".checkpoint-*"):  # temporary or half-deleted folders of a killed process
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"checkpoint-{step}"
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    save_model(model, str(tmp / MODEL_FILE))
    tensors: dict[str, torch.Tensor] = {}
    structure = flatten_state(state, "state", tensors)
    save_file(tensors, str(tmp / STATE_TENSORS))
    (tmp / STATE_JSON).write_text(json.dumps({"format": FORMAT, "state": structure}))
    for name, write in (extra_files or {}).items():
        write(tmp / name)
    files = {}
    for path in sorted(tmp.iterdir()):
        _fsync_file(path)
        files[path.name] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    manifest = tmp / MANIFEST
    manifest.write_text(json.dumps({"format": FORMAT, "step": step, "files": files}, indent=1))
    _fsync_file(manifest)
    _fsync_dir(tmp)
    if final.exists():  # a broken checkpoint of the same step that resume fell back from
        _remove(final)
    tmp.rename(final)
    _fsync_dir(root)
    if keep > 0:
        for old in list_checkpoints(root)[keep:]:
            _remove(old)
    return final


# ---------------------------------------------------------------- read
def verify_checkpoint(ckpt: Path) -> dict[str, Any]:
    """The manifest of an intact checkpoint; CheckpointError naming the first bad file otherwise."""
    manifest_path = ckpt / MANIFEST
    if not ckpt.is_dir():
        raise CheckpointError(f"no checkpoint folder at {ckpt}")
    if not manifest_path.is_file():
        raise CheckpointError(f"{manifest_path} is missing (incomplete or not written by this version)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        if manifest.get("format") != FORMAT or not isinstance(files, dict):
            raise ValueError(f"format {manifest.get('format')!r}")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{manifest_path} is unreadable ({e})") from None
    for name in REQUIRED:
        if name not in files:
            raise CheckpointError(f"{manifest_path} does not list {name}")
    for name, meta in files.items():
        path = ckpt / name
        if Path(name).name != name:
            raise CheckpointError(f"{manifest_path} lists a path outside the checkpoint: {name!r}")
        if not path.is_file():
            raise CheckpointError(f"{path} is missing")
        size = path.stat().st_size
        if size != meta.get("size"):
            raise CheckpointError(f"{path} has {size} bytes, the manifest says {meta.get('size')}")
        if _sha256(path) != meta.get("sha256"):
            raise CheckpointError(f"{path} does not match its sha256 in the manifest")
    return manifest


def choose_checkpoint(root: Path) -> Path | None:
    """The newest intact checkpoint under `root` (None if there is none).

    A newer checkpoint that fails verification is skipped with a warning that names the broken file.
    """
    broken = 0
    for ckpt in list_checkpoints(root):
        try:
            verify_checkpoint(ckpt)
        except CheckpointError as e:
            broken += 1
            log.warning("skipping checkpoint %s: %s; falling back to the one before", ckpt.name, e)
            continue
        return ckpt
    if broken:
        log.warning("no intact checkpoint under %s (%d broken); starting from step 0", root, broken)
    return None


def read_checkpoint(ckpt: Path, model: torch.nn.Module) -> dict[str, Any]:
    """Verify `ckpt`, load its weights into `model` (strict) and return the rest of its state."""
    verify_checkpoint(ckpt)
    device = next(model.parameters()).device
    load_model(model, ckpt / MODEL_FILE, strict=True, device=str(device))
    tensors = load_file(ckpt / STATE_TENSORS)
    doc = json.loads((ckpt / STATE_JSON).read_text())
    return unflatten_state(doc["state"], tensors)


def config_changes(saved: dict[str, Any], current: dict[str, Any], ignore: set[str], prefix: str = "") -> list[str]:
    """`key: old -> new` for every leaf that differs between two config dicts, except `ignore`d keys."""
    changes = []
    for key in sorted(set(saved) | set(current)):
        dotted = f"{prefix}{key}"
        if dotted in ignore:
            continue
        old, new = saved.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict) and old and new:
            changes += config_changes(old, new, ignore, f"{dotted}.")
        elif old != new:
            changes.append(f"{dotted}: {old!r} -> {new!r}")
    return changes


# ---------------------------------------------------------------- run directories
def staging_dir(output_dir: Path) -> Path:
    """Where a run is written before it is published to `output_dir` (absolute: `.` has no name)."""
    output_dir = Path(os.path.abspath(output_dir))
    return output_dir.parent / f".{output_dir.name}.staging"


def _previous_dir(output_dir: Path) -> Path:
    output_dir = Path(os.path.abspath(output_dir))
    return output_dir.parent / f".{output_dir.name}.previous"


def begin_run(output_dir: Path, resume: bool) -> Path:
    """Prepare and return the staging folder of a run that will publish to `output_dir`.

    A fresh run starts from an empty staging folder; a resumed run keeps it (its checkpoints and
    metrics). A publish that a kill interrupted is completed or rolled back first.
    """
    previous = _previous_dir(output_dir)
    if previous.exists():
        if output_dir.exists():  # killed after the new run was in place: only the clean-up was left
            shutil.rmtree(previous)
        else:  # killed between the two renames: put the finished run back
            log.warning("restoring %s from an interrupted publish", output_dir)
            previous.rename(output_dir)
    stage = staging_dir(output_dir)
    if stage.exists() and not resume:
        shutil.rmtree(stage)
    stage.mkdir(parents=True, exist_ok=True)
    return stage


def publish_run(stage: Path, output_dir: Path) -> None:
    """Make the finished run in `stage` the content of `output_dir`, replacing any earlier run."""
    for path in stage.rglob("*"):
        if path.is_file():
            _fsync_file(path)
    _fsync_dir(stage)
    previous = _previous_dir(output_dir)
    if output_dir.exists():
        output_dir.rename(previous)
    stage.rename(output_dir)
    _fsync_dir(output_dir.parent)
    if previous.exists():
        shutil.rmtree(previous)
