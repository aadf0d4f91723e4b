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
``trainer_state.pt`` someone planted) are never opened. A manifest proves only that the files were not
changed after it was written, so what they hold is validated too before anything is loaded: each
safetensors header (its size, JSON, dtypes, and offsets that cover the data exactly, what the
safetensors library checks only as it loads), the model's tensor names and shapes against the model,
the optimizer's state against its trainable parameters, ``trainer_state.json`` against `state_schema`
(every tensor it references present) and ``templates.json`` against `TEMPLATES_SCHEMA`. Any failure is
a broken checkpoint (:class:`CheckpointError` naming the file): `choose_checkpoint` falls back past it
to the one before with a warning; an explicit path fails in one line.

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
import math
import os
import re
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import torch
from safetensors import SafetensorError
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


# ---------------------------------------------------------------- validate what the files hold
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
# safetensors dtype -> bytes per element
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_TENSOR_ENTRY = {
    "type": "object", "required": ["dtype", "shape", "data_offsets"], "additionalProperties": False,
    "properties": {"dtype": {"enum": sorted(DTYPE_BYTES)},
                   "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                   "data_offsets": {"type": "array", "items": {"type": "integer", "minimum": 0},
                                    "minItems": 2, "maxItems": 2}},
}
_TENSOR = {"type": "object", "required": ["tensor", "shape"]}  # a tensor in the JSON view of a state
_COUNT = {"type": "integer", "minimum": 0}
TEMPLATES_SCHEMA = {
    "type": "object", "required": ["best", "templates"],
    "properties": {"best": {"type": "integer"},
                   "templates": {"type": "array", "minItems": 1, "items": {
                       "type": "object", "required": ["version", "text", "score"],
                       "properties": {"version": {"type": "integer"}, "text": {"type": "string"},
                                      "score": {"type": "number"}}}}},
}


def state_schema() -> dict[str, Any]:
    """JSON Schema of a trainer state (the JSON view of `read_checkpoint`'s result: tensors as
    {"tensor": dtype, "shape": [...]}, keys as strings): what the trainer reads back on resume."""
    from dyme_core.refiner import RefinerStats

    return {
        "type": "object",
        "required": ["step", "history", "optimizer", "scheduler", "rng", "config", "refiner_stats", "checker_stats"],
        "properties": {
            "step": _COUNT,
            "history": {"type": "array", "items": {"type": "object", "required": ["step"],
                                                    "properties": {"step": {"type": "number"}}}},
            "optimizer": {"type": "object", "required": ["state", "param_groups"], "properties": {
                "state": {"type": "object", "propertyNames": {"pattern": "^[0-9]+$"},
                          "additionalProperties": {"type": "object"}},
                "param_groups": {"type": "array", "items": {
                    "type": "object", "required": ["params"],
                    "properties": {"params": {"type": "array", "items": _COUNT}}}}}},
            "scheduler": {"type": "object"},
            "rng": {"type": "object", "required": ["cpu"], "properties": {"cpu": {
                **_TENSOR, "properties": {"tensor": {"const": "U8"},
                                          "shape": {"const": list(torch.get_rng_state().shape)}}}}},
            "config": {"type": "object", "additionalProperties": {"type": "object"}},
            "refiner_stats": {"type": "object", "propertyNames": {"enum": list(RefinerStats().as_dict())},
                              "additionalProperties": _COUNT},
            "checker_stats": {"type": "object", "required": ["calls", "fallbacks"], "additionalProperties": False,
                              "properties": {"calls": _COUNT, "fallbacks": _COUNT}},
            "switch_buffer": {"type": "array", "items": {"type": "integer"}},
        },
    }


def _schema_error(path: Path, doc: Any, schema: dict[str, Any]) -> CheckpointError | None:
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(doc))
    if error is None:
        return None
    where = "".join(f"[{p!r}]" for p in error.absolute_path) or "the top level"
    return CheckpointError(f"{path} does not match its schema at {where}: {error.validator} "
                           f"{json.dumps(error.validator_value)[:80]}")


def read_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) of a safetensors file, after checking its header as a loader would need it:
    a header size within the file and MAX_HEADER_BYTES, JSON of the right structure, known dtypes, and
    tensors whose byte ranges have the size of their shape and tile the data section exactly."""
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        n = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if n < 0 or n > MAX_HEADER_BYTES or 8 + n > size:
            raise CheckpointError(f"{path} is not a safetensors file: its header size ({n} bytes) is too large for "
                                  f"the file ({size} bytes, limit {MAX_HEADER_BYTES})")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: the safetensors header is not JSON") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: the safetensors __metadata__ is not a mapping of strings")
    error = _schema_error(path, header, {"type": "object", "additionalProperties": _TENSOR_ENTRY})
    if error:
        raise error
    spans = []
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        nbytes = math.prod(entry["shape"]) * DTYPE_BYTES[entry["dtype"]]
        if end - begin != nbytes:
            raise CheckpointError(f"{path}: tensor {name!r} of shape {entry['shape']} and dtype {entry['dtype']} "
                                  f"needs {nbytes} bytes, its offsets span {end - begin}")
        spans.append((begin, end, name))
    covered = 0
    for begin, end, name in sorted(spans):
        if begin != covered:
            raise CheckpointError(f"{path}: tensor {name!r} starts at byte {begin} of the data, expected {covered} "
                                  "(overlapping or gap in the offsets)")
        covered = end
    if covered != size - 8 - n:
        raise CheckpointError(f"{path}: the tensors cover {covered} bytes of a data section of {size - 8 - n}")
    return {name: (entry["dtype"], tuple(entry["shape"])) for name, entry in header.items()}


def _check_model(path: Path, stored: dict[str, tuple[str, tuple[int, ...]]], model: torch.nn.Module) -> None:
    """The stored tensors are the model's: every name known, every shape equal, every tensor (or one of the
    names a tied tensor goes by: safetensors stores it once) present."""
    state = model.state_dict()
    for name, (_, shape) in stored.items():
        if name not in state:
            raise CheckpointError(f"{path}: tensor {name!r} is not in the model")
        if tuple(state[name].shape) != shape:
            raise CheckpointError(f"{path}: tensor {name!r} has shape {list(shape)}, the model's is "
                                  f"{list(state[name].shape)}")
    aliases: dict[tuple[int, int], list[str]] = {}
    for name, tensor in state.items():
        aliases.setdefault((tensor.untyped_storage().data_ptr(), tensor.storage_offset()), []).append(name)
    for names in aliases.values():
        if not any(n in stored for n in names):
            raise CheckpointError(f"{path} lacks the model's tensor {names[0]!r}")


def _json_view(obj: Any) -> Any:
    """A JSON-able view of an unflattened state whose tensors are placeholders (dtype, shape)."""
    if isinstance(obj, _Placeholder):
        return {"tensor": obj.dtype, "shape": list(obj.shape)}
    if isinstance(obj, dict):
        return {str(k): _json_view(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_view(v) for v in obj]
    return obj


class _Placeholder:
    def __init__(self, dtype: str, shape: tuple[int, ...]) -> None:
        self.dtype, self.shape = dtype, shape


def _check_structure(path: Path, node: Any, tensors: dict[str, Any]) -> None:
    """`node` is what `flatten_state` writes: scalars, lists, and the three tagged objects, every tensor
    reference naming a tensor of the state file."""
    if isinstance(node, list):
        for item in node:
            _check_structure(path, item, tensors)
    elif isinstance(node, dict):
        if set(node) == {"__tensor__"} and isinstance(node["__tensor__"], str):
            if node["__tensor__"] not in tensors:
                raise CheckpointError(f"{path} refers to tensor {node['__tensor__']!r}, which {STATE_TENSORS} "
                                      "does not hold")
        elif set(node) == {"__tuple__"} and isinstance(node["__tuple__"], list):
            _check_structure(path, node["__tuple__"], tensors)
        elif set(node) == {"__dict__"} and isinstance(node["__dict__"], list) and all(
                isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str | int | float | bool)
                for pair in node["__dict__"]):
            for _, value in node["__dict__"]:
                _check_structure(path, value, tensors)
        else:
            raise CheckpointError(f"{path}: unexpected object with keys {sorted(node)[:5]} in the stored state")
    elif not (node is None or isinstance(node, bool | int | float | str)):
        raise CheckpointError(f"{path}: unexpected value in the stored state")


def _check_optimizer(path: Path, view: dict[str, Any], model: torch.nn.Module) -> None:
    """One optimizer entry per trainable parameter; an entry's per-parameter tensors (Adam's moments) all have
    one shape, and those shapes are the trainable parameters' shapes (as a multiset: the optimizer's index
    order is the trainer's grouping, which this module does not know)."""
    trainable = Counter(tuple(p.shape) for p in model.parameters() if p.requires_grad)
    indices = sorted(i for group in view["optimizer"]["param_groups"] for i in group["params"])
    if indices != list(range(trainable.total())):
        raise CheckpointError(f"{path}: the optimizer's parameter groups list {len(indices)} parameters, the model "
                              f"trains {trainable.total()}")
    shapes: Counter[tuple[int, ...]] = Counter()
    for index, entry in view["optimizer"]["state"].items():
        per_param = {tuple(t["shape"]) for t in entry.values() if isinstance(t, dict) and t.get("shape")}
        if len(per_param) > 1 or int(index) >= trainable.total():
            raise CheckpointError(f"{path}: optimizer state {index} does not belong to one trainable parameter")
        shapes.update(per_param)
    if shapes - trainable:
        wrong = sorted(shapes - trainable)[0]
        raise CheckpointError(f"{path}: the optimizer holds state of shape {list(wrong)}, which no trainable "
                              "parameter of the model has")


def validate_contents(ckpt: Path, model: torch.nn.Module | None = None) -> None:
    """What a checkpoint's files hold is loadable and, given `model`, belongs to it (module docstring)."""
    model_header = read_header(ckpt / MODEL_FILE)
    if model is not None:
        _check_model(ckpt / MODEL_FILE, model_header, model)
    state_header = read_header(ckpt / STATE_TENSORS)
    path = ckpt / STATE_JSON
    try:
        doc = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{path} is not JSON") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or "state" not in doc:
        raise CheckpointError(f"{path} is not a trainer state of format {FORMAT}")
    _check_structure(path, doc["state"], state_header)
    placeholders = {name: _Placeholder(dtype, shape) for name, (dtype, shape) in state_header.items()}
    view = _json_view(unflatten_state(doc["state"], placeholders))
    error = _schema_error(path, view, state_schema())
    if error:
        raise error
    if model is not None:
        _check_optimizer(path, view, model)
    templates = ckpt / "templates.json"
    if templates.is_file():
        try:
            pool = json.loads(templates.read_text())
        except (ValueError, UnicodeDecodeError):
            raise CheckpointError(f"{templates} is not JSON") from None
        error = _schema_error(templates, pool, TEMPLATES_SCHEMA)
        if error:
            raise error
        if pool["best"] not in [t["version"] for t in pool["templates"]]:
            raise CheckpointError(f"{templates}: best={pool['best']} names no template")


# ---------------------------------------------------------------- read
def verify_checkpoint(ckpt: Path, model: torch.nn.Module | None = None) -> dict[str, Any]:
    """The manifest of an intact checkpoint; CheckpointError naming the first bad file otherwise.

    Intact: every file the manifest lists has its size and sha256, and what they hold passes
    `validate_contents` (against `model` when given)."""
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
    validate_contents(ckpt, model)
    return manifest


def choose_checkpoint(root: Path, model: torch.nn.Module | None = None) -> Path | None:
    """The newest intact checkpoint under `root` (None if there is none), checked against `model` if given.

    A newer checkpoint that fails verification is skipped with a warning that names the broken file.
    """
    broken = 0
    for ckpt in list_checkpoints(root):
        try:
            verify_checkpoint(ckpt, model)
        except CheckpointError as e:
            broken += 1
            log.warning("skipping checkpoint %s: %s; falling back to the one before", ckpt.name, e)
            continue
        return ckpt
    if broken:
        log.warning("no intact checkpoint under %s (%d broken); starting from step 0", root, broken)
    return None


def read_checkpoint(ckpt: Path, model: torch.nn.Module) -> dict[str, Any]:
    """Verify `ckpt` against `model`, load its weights into `model` (strict) and return the rest of its state.

    Everything is checked before the first weight is copied, so a broken checkpoint leaves `model` as it was.
    """
    verify_checkpoint(ckpt, model)
    device = next(model.parameters()).device
    try:
        load_model(model, ckpt / MODEL_FILE, strict=True, device=str(device))
        tensors = load_file(ckpt / STATE_TENSORS)
    except (SafetensorError, RuntimeError, ValueError) as e:  # what validation cannot foresee: one line still
        raise CheckpointError(f"{ckpt}: cannot load ({str(e).splitlines()[0] if str(e) else type(e).__name__})") \
            from None
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
