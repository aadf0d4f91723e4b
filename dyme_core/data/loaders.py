"""Reading the project's dataset format (DESIGN.md section 3) and opening its images safely.

A project-format dataset is a root folder holding ``samples.parquet`` (what ``dyme ingest`` writes) or
``samples.jsonl``, and the images its rows name by paths relative to that root. One row is one
:class:`~dyme_core.data.schema.Sample`; in Parquet, ``visual_facts`` and ``meta`` may be JSON strings
(a table's mixed-type rows do not fit an Arrow list column). Every other source (DyME JSON, Hugging
Face, the synthetic generator) is turned into this format by :mod:`dyme_core.data.ingest`.

Images are read only through :func:`safe_image_file` and :func:`decode_image`, which never open what a
hostile dataset can plant (issue 10): a path leaving the root (also through a symlink), a FIFO or
other special file (``open`` on a FIFO blocks for ever: the type is checked with ``stat`` first), or a
decompression bomb (an explicit pixel limit, checked on the header before any pixel is decoded).
Tests: ``tests/core/test_loaders.py``.
"""

from __future__ import annotations

import io
import json
import math
import os
import stat
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from PIL import Image

from dyme_core.config import DataConfig, ValidateConfig
from dyme_core.data.schema import Sample, jsonl_rows

REQUIRED = ("id", "image", "question", "answer")
DEFAULT_MAX_PIXELS = ValidateConfig().max_pixels  # one home for the limit: validate.max_pixels
_PIL_LIMIT = threading.Lock()


class DataError(ValueError):
    """Input data that cannot be loaded; the message names the file, row id or field."""


def safe_image_file(root: Path, image: str) -> Path:
    """The regular file ``image`` names under ``root``; DataError (reason only) for anything else.

    Lexical escapes (``..``, absolute paths) and symlinks whose target leaves the root are refused;
    symlinks that stay inside (DVC's cache links into a folder of the dataset) are fine. The file type
    comes from ``stat`` so a FIFO or device is never opened.
    """
    if not isinstance(image, str) or not image.strip():
        raise DataError(f"no image path (got {image!r})")
    if Path(image).is_absolute():
        raise DataError(f"image path {image!r} is absolute; it must be relative to the dataset root")
    root_abs = Path(os.path.abspath(root))
    lexical = Path(os.path.normpath(root_abs / image))
    if not lexical.is_relative_to(root_abs):
        raise DataError(f"image path {image!r} escapes the dataset root")
    real = Path(os.path.realpath(lexical))
    if not real.is_relative_to(Path(os.path.realpath(root_abs))):
        raise DataError(f"image path {image!r} is a symlink that leaves the dataset root (-> {real})")
    try:
        mode = os.stat(real).st_mode
    except FileNotFoundError:
        raise DataError(f"image not found: {image}") from None
    except OSError as e:
        raise DataError(f"cannot stat image {image}: {e.strerror}") from None
    if not stat.S_ISREG(mode):
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a folder" if stat.S_ISDIR(mode) else "a special file"
        raise DataError(f"image {image} is {kind}, not a regular file")
    return real


def decode_image(source: Path | bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode a checked file (see :func:`safe_image_file`) or raw bytes; DataError (reason only) if the
    data is not an image, is truncated, or has more than ``max_pixels`` pixels (read from the header,
    before decoding)."""
    try:
        with _PIL_LIMIT, warnings.catch_warnings():
            # PIL's own bomb guard, set explicitly to our limit (it errors above twice its limit); its
            # warning between once and twice is replaced by our error just below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            Image.MAX_IMAGE_PIXELS = max_pixels
            image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        width, height = image.size
        if width * height > max_pixels:
            image.close()
            raise DataError(f"image is {width}x{height} = {width * height} pixels, over the pixel limit of "
                            f"{max_pixels} (validate.max_pixels; a decompression bomb?)")
        image.load()  # decode now: a truncated file must fail here, not inside the model
        return image
    except DataError:
        raise
    except Image.DecompressionBombError as e:
        raise DataError(f"image over the pixel limit of {max_pixels} (validate.max_pixels; a decompression "
                        f"bomb?): {e}") from None
    except (OSError, SyntaxError, ValueError, TypeError, EOFError) as e:  # UnidentifiedImageError is an OSError
        raise DataError(f"cannot decode image: {type(e).__name__}: {e}") from None


@dataclass
class Dataset:
    """Samples plus the root folder their image paths are relative to."""

    root: Path
    samples: list[Sample]
    max_pixels: int = field(default=DEFAULT_MAX_PIXELS)

    def split(self, name: str) -> list[Sample]:
        return [s for s in self.samples if s.split == name]

    def image_path(self, sample: Sample) -> Path:
        return self.root / sample.image

    def load_image(self, sample: Sample) -> Image.Image:
        """The sample's image as RGB; anything that is not a safe, decodable image file raises
        :class:`DataError` naming the sample (never a hang on a FIFO, never a bomb decoded)."""
        try:
            path = safe_image_file(self.root, sample.image)
            with decode_image(path, self.max_pixels) as image:
                return image.convert("RGB")
        except DataError as e:
            raise DataError(f"sample {sample.id!r}: {e} ({self.image_path(sample)})") from None


def read_rows(path: Path) -> tuple[Path, list[dict[str, Any]]]:
    """(folder of the file, raw rows) of a dataset root or a .jsonl/.parquet/.json file.

    Text is decoded as UTF-8 with ``surrogateescape``: invalid bytes survive as lone surrogates, so the
    row that holds them can be named (see :func:`bad_text`) instead of the whole file failing.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "samples.jsonl" if (p / "samples.jsonl").is_file() else p / "samples.parquet"
    if not p.is_file():
        raise DataError(f"dataset not found: {path}")
    if p.suffix == ".jsonl":
        rows = []
        for lineno, row, reason in jsonl_rows(p):
            if row is None:
                raise DataError(f"{p}:{lineno}: {reason}")
            rows.append(row)
    elif p.suffix == ".parquet":
        try:
            table = pq.read_table(p)
            # pandas writes its index as an extra column; it is not a sample field
            keep = [c for c in table.column_names if not c.startswith("__index_level_")]
            rows = table.select(keep).to_pylist()
        except Exception as e:  # pyarrow raises ArrowInvalid, OSError, UnicodeDecodeError, ... on bad files
            raise DataError(f"{p}: cannot read Parquet: {type(e).__name__}: {e}") from None
    elif p.suffix == ".json":
        rows = read_json_list(p)
    else:
        raise DataError(f"{p}: the project format reads .jsonl, .parquet or .json, got {p.suffix!r}")
    return p.parent, rows


def read_json_list(path: Path) -> list[dict[str, Any]]:
    try:
        rows = json.loads(path.read_bytes().decode("utf-8", errors="surrogateescape"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise DataError(f"{path}: expected a JSON list of objects")
    return rows


def bad_text(value: Any) -> bool:
    """True when a string inside ``value`` holds bytes that were not UTF-8 (lone surrogates)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(bad_text(k) or bad_text(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(bad_text(v) for v in value)
    return False


def non_finite(value: Any) -> bool:
    """True when a number inside ``value`` is NaN or +-Infinity."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(non_finite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(non_finite(v) for v in value)
    return False


def to_sample(row: dict[str, Any], where: str, task: str) -> Sample:
    """Check the required fields, decode JSON-string columns, build the Sample; errors name the row."""
    # Parquet float columns hold NaN where a value is missing; missing is None everywhere else
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
    for name, default in {"task": task, "split": "train", "meta": {}}.items():
        if row.get(name) is None:
            row[name] = default
    try:
        return Sample.from_dict(row)
    except (ValueError, TypeError) as e:
        raise DataError(f"{where}: {e}") from None


def load_dataset(cfg: DataConfig) -> Dataset:
    """A project-format dataset in place (no ingest): ``cfg.path`` is a dataset root or samples file.

    Pipeline steps read the materialised dataset through :func:`dyme_core.data.ingest.open_dataset`;
    this reader serves tools and tests that hold a project-format folder already.
    """
    folder, rows = read_rows(Path(cfg.path))
    samples = [to_sample(row, f"{cfg.path} row {i + 1}", cfg.task) for i, row in enumerate(rows)]
    return Dataset(Path(cfg.image_root) if cfg.image_root else folder, samples)
