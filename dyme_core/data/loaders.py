"""Dataset loaders of DESIGN.md section 3: every input format becomes one :class:`Dataset` of Samples.

Formats (``DataConfig.format``; ``auto`` picks by looking at ``DataConfig.path``):

- ``project``: a dataset root holding ``samples.jsonl`` or ``samples.parquet``, one of those files
  itself, or a ``.json`` list of sample rows with fields beyond the DyME ones. Rows are
  :class:`~dyme_core.data.schema.Sample` fields; in Parquet, ``visual_facts`` and ``meta`` may be
  JSON strings (a table's mixed-type rows do not fit an Arrow list column).
- ``dyme_json``: the official DyME JSON, a list of ``{"question", "answer", "hint"?, "image"}`` rows
  (optionally ``"id"``, ``"split"``); missing ids become ``<file stem>-<index>``, missing splits "train".
- ``hf``: a Hugging Face dataset by hub id, a folder written by ``save_to_disk``, or a folder of data
  files ``datasets.load_dataset`` understands. ``DataConfig.hf_columns`` maps our fields to columns
  (ChartQA's ``query``/``label``/``image`` by default; a list-valued answer gives ``answer`` = its first
  item and ``direct_answers`` = all of them). Decoded images are written once as PNG under
  ``<cache_dir>/<name>-<hash>/images/`` and that folder becomes the dataset root.

Image paths are relative to the dataset root (``DataConfig.image_root`` when set, else the folder of
the file). Loading checks only what it needs to build Samples; content checks (empty answers, paths
escaping the root, duplicate ids, undecodable images) are the validate step's job.
Tests: ``tests/core/test_loaders.py``.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from PIL import Image

from dyme_core.config import DataConfig
from dyme_core.data.schema import Sample, read_jsonl

REQUIRED = ("id", "image", "question", "answer")
DYME_KEYS = frozenset({"question", "answer", "hint", "image", "id", "split"})
_FILE_SUFFIXES = (".jsonl", ".parquet", ".json")
_SAMPLE_FIELDS = frozenset(f.name for f in fields(Sample))
# a hub id is "name" or "owner/name"; anything else that does not exist locally is a missing path
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class DataError(ValueError):
    """Input data that cannot be loaded; the message names the file, row id or field."""


@dataclass
class Dataset:
    """Samples plus the root folder their image paths are relative to."""

    root: Path
    samples: list[Sample]

    def split(self, name: str) -> list[Sample]:
        return [s for s in self.samples if s.split == name]

    def image_path(self, sample: Sample) -> Path:
        return self.root / sample.image

    def load_image(self, sample: Sample) -> Image.Image:
        """The sample's image as RGB; a missing or undecodable file raises :class:`DataError`."""
        path = self.image_path(sample)
        try:
            with Image.open(path) as image:
                image.load()  # decode now: a truncated file must fail here, not inside the model
                return image.convert("RGB")
        except FileNotFoundError:
            raise DataError(f"sample {sample.id!r}: image not found: {path}") from None
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(f"sample {sample.id!r}: cannot decode image {path}: {e}") from None


def load_dataset(cfg: DataConfig, cache_dir: str | Path = ".cache/hf_images") -> Dataset:
    """Load ``cfg.path`` in ``cfg.format`` (``auto``: detected, see the module docstring)."""
    fmt = detect_format(cfg.path) if cfg.format == "auto" else cfg.format
    if fmt == "project":
        return _load_project(cfg)
    if fmt == "dyme_json":
        return _load_dyme_json(cfg)
    if fmt == "hf":
        return _load_hf(cfg, Path(cache_dir))
    raise DataError(f"data.format must be auto | project | dyme_json | hf, got {fmt!r}")


def detect_format(path: str) -> str:
    """``project`` | ``dyme_json`` | ``hf`` for a dataset path or hub id; DataError if it is missing."""
    p = Path(path)
    if p.is_dir():
        if (p / "samples.jsonl").is_file() or (p / "samples.parquet").is_file():
            return "project"
        return "hf"  # save_to_disk output or a folder of data files
    if p.is_file():
        if p.suffix in (".jsonl", ".parquet"):
            return "project"
        if p.suffix == ".json":
            rows = _read_json_list(p)
            return "dyme_json" if all(set(row) <= DYME_KEYS for row in rows) else "project"
        raise DataError(f"{p}: unknown dataset file type {p.suffix!r} (expected .jsonl, .parquet or .json)")
    # "owner/name" may be a hub id or a local folder not made yet; when its parent folder exists
    # (data/synth before `dyme synth`), say so at once instead of asking the hub
    parent_exists = p.parent != Path(".") and p.parent.is_dir()
    if _HUB_ID.match(path) and p.suffix not in _FILE_SUFFIXES and not parent_exists:
        return "hf"
    raise DataError(f"dataset not found: {path}")


def _root(cfg: DataConfig, default: Path) -> Path:
    return Path(cfg.image_root) if cfg.image_root else default


def _read_json_list(path: Path) -> list[dict[str, Any]]:
    try:
        rows = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise DataError(f"{path}: expected a JSON list of objects")
    return rows


def _to_sample(row: dict[str, Any], where: str, task: str) -> Sample:
    """Check the required fields, decode JSON-string columns, build the Sample; errors name the row."""
    # Parquet/HF float columns hold NaN where a value is missing; missing is None everywhere else
    row = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}
    sample_id = row.get("id")
    for name in REQUIRED:
        if row.get(name) is None:
            raise DataError(f"{where}: sample {sample_id!r}: missing required field {name!r}")
    if isinstance(sample_id, int):  # ids written as numbers are still ids
        row["id"] = str(sample_id)
    for name in ("visual_facts", "meta"):
        if isinstance(row.get(name), str):
            try:
                row[name] = json.loads(row[name])
            except json.JSONDecodeError:
                raise DataError(f"{where}: sample {sample_id!r}: field {name!r} is not valid JSON") from None
    # optional columns that a table format fills with nulls mean "not given", i.e. the default
    defaults = {"task": task, "split": "train", "meta": {}}
    for name, default in defaults.items():
        if row.get(name) is None:
            row[name] = default
    try:
        return Sample.from_dict(row)
    except ValueError as e:
        raise DataError(f"{where}: {e}") from None


def _load_project(cfg: DataConfig) -> Dataset:
    p = Path(cfg.path)
    if p.is_dir():
        p = p / "samples.jsonl" if (p / "samples.jsonl").is_file() else p / "samples.parquet"
    if not p.is_file():
        raise DataError(f"dataset not found: {cfg.path}")
    if p.suffix == ".jsonl":
        try:
            rows = read_jsonl(p)
        except ValueError as e:  # read_jsonl names file:line
            raise DataError(str(e)) from None
    elif p.suffix == ".parquet":
        table = pq.read_table(p)
        # pandas writes its index as an extra column; it is not a sample field
        keep = [c for c in table.column_names if not c.startswith("__index_level_")]
        rows = table.select(keep).to_pylist()
    elif p.suffix == ".json":
        rows = _read_json_list(p)
    else:
        raise DataError(f"{p}: the project format reads .jsonl, .parquet or .json, got {p.suffix!r}")
    samples = [_to_sample(row, f"{p} row {i + 1}", cfg.task) for i, row in enumerate(rows)]
    return Dataset(_root(cfg, p.parent), samples)


def _load_dyme_json(cfg: DataConfig) -> Dataset:
    p = Path(cfg.path)
    if not p.is_file():
        raise DataError(f"dataset not found: {cfg.path}")
    samples = []
    for i, row in enumerate(_read_json_list(p)):
        sample_id = str(row.get("id", f"{p.stem}-{i}"))
        unknown = sorted(set(row) - DYME_KEYS)
        if unknown:
            raise DataError(f"{p}: sample {sample_id!r}: unknown field(s) {unknown} for the DyME JSON format")
        answer = row.get("answer")
        # DyME files often store numeric answers as numbers; the answer is text everywhere else
        if isinstance(answer, int | float) and not isinstance(answer, bool):
            answer = str(answer)
        samples.append(_to_sample({**row, "id": sample_id, "answer": answer}, str(p), cfg.task))
    return Dataset(_root(cfg, p.parent), samples)


def _is_saved_to_disk(p: Path) -> bool:
    return (p / "dataset_dict.json").is_file() or (p / "state.json").is_file()


def _cache_folder(path: str, cache_dir: Path) -> Path:
    """``<cache_dir>/<name>-<hash>``: hub ids hash by id, local folders by path and file times."""
    p = Path(path)
    key = path
    if p.is_dir():
        # a dataset re-saved at the same path must not reuse the old images
        stamps = sorted(f"{f.relative_to(p)}:{f.stat().st_mtime_ns}" for f in p.rglob("*") if f.is_file())
        key = f"{p.resolve()}|{'|'.join(stamps)}"
    name = re.sub(r"[^\w.-]", "_", p.name or path)
    return cache_dir / f"{name}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"


def _file_name(sample_id: str) -> str:
    """A file name for an id; ids with other characters get a hash suffix so two cannot collide."""
    safe = re.sub(r"[^\w.-]", "_", sample_id)
    return safe if safe == sample_id else f"{safe}-{hashlib.sha1(sample_id.encode()).hexdigest()[:8]}"


def _write_png(image_value: dict[str, Any], target: Path, where: str) -> None:
    if target.is_file():
        return
    try:
        if image_value.get("bytes") is not None:
            image = Image.open(io.BytesIO(image_value["bytes"]))
        else:
            image = Image.open(image_value["path"])
        image.load()
    except (OSError, SyntaxError, ValueError, TypeError) as e:
        raise DataError(f"{where}: cannot decode image: {e}") from None
    if image.mode not in ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"):  # e.g. CMYK JPEGs
        image = image.convert("RGB")
    # write then rename: a run killed mid-write must not leave a broken file that later runs reuse, and
    # processes of one multi-GPU job writing the same image must not share a temporary file
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, target)


def _load_hf(cfg: DataConfig, cache_dir: Path) -> Dataset:
    # imported here: `datasets` costs seconds to import and only this format needs it
    import datasets

    p = Path(cfg.path)
    try:
        if p.is_dir() and _is_saved_to_disk(p):
            loaded = datasets.load_from_disk(str(p))
        else:
            loaded = datasets.load_dataset(cfg.path)
    except (OSError, datasets.exceptions.DatasetNotFoundError) as e:  # OSError: no file, no network
        raise DataError(f"dataset not found: {cfg.path} ({e})") from None
    # a single saved Dataset (no splits) is the training split
    splits = loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict(train=loaded)

    columns = dict(cfg.hf_columns)
    for needed in ("question", "answer", "image"):
        if needed not in columns:
            raise DataError(f"data.hf_columns must map {needed!r} to a column, got {columns}")
    unknown = sorted(set(columns) - _SAMPLE_FIELDS)
    if unknown:
        raise DataError(f"data.hf_columns: unknown field(s) {unknown} (fields: {sorted(_SAMPLE_FIELDS)})")

    folder = _cache_folder(cfg.path, cache_dir)
    dataset_name = re.sub(r"[^\w.-]", "_", p.name or cfg.path)
    samples: list[Sample] = []
    image_root: Path | None = None
    for our_split, their_split in cfg.hf_split_map.items():
        if their_split not in splits:
            continue
        ds = splits[their_split]
        missing = sorted(set(columns.values()) - set(ds.column_names))
        if missing:
            raise DataError(f"{cfg.path} [{their_split}]: column(s) {missing} not found "
                            f"(columns: {ds.column_names}); set data.hf_columns")
        image_col = columns["image"]
        decoded = isinstance(ds.features[image_col], datasets.Image)
        if decoded:
            # raw bytes: no decode at all when the PNG is already cached
            ds = ds.cast_column(image_col, datasets.Image(decode=False))
            (folder / "images").mkdir(parents=True, exist_ok=True)
            image_root = folder
        for i, record in enumerate(ds):
            row = {field: record[col] for field, col in columns.items()}
            given_id = row.get("id")
            sample_id = f"{dataset_name}-{our_split}-{i:05d}" if given_id is None else str(given_id)
            where = f"{cfg.path} [{their_split}] row {i}"
            answer = row.get("answer")
            if isinstance(answer, list):
                row["direct_answers"] = [str(a) for a in answer]
                answer = answer[0] if answer else None
            if isinstance(answer, int | float) and not isinstance(answer, bool):
                answer = str(answer)
            image = row.get("image")
            if decoded and image is not None:
                name = f"images/{_file_name(sample_id)}.png"
                _write_png(image, folder / name, f"{where}: sample {sample_id!r}")
                image = name
            samples.append(_to_sample({**row, "id": sample_id, "answer": answer, "image": image,
                                       "split": our_split}, where, cfg.task))
    if image_root is not None:  # decoded images: the cache folder is the root, whatever image_root says
        return Dataset(image_root, samples)
    # image columns hold paths: relative to data.image_root, else the dataset's folder
    return Dataset(_root(cfg, p if p.is_dir() else Path(".")), samples)
