"""The ingest step (DESIGN.md section 3): every source becomes ONE materialised project-format dataset.

``dyme ingest`` reads ``data.path`` and writes ``data.out_dir``; validate, init-model, refine, train and
evaluate read only that folder, through :func:`open_dataset`. Sources (``data.format: auto`` detects):

- ``synthetic``: ``data.path: synthetic``, the deterministic chart generator with the ``synth`` section.
- ``project``: a folder with ``samples.jsonl``/``samples.parquet``, one such file, or a ``.json`` list of
  rows whose fields are all :class:`~dyme_core.data.schema.Sample` fields.
- ``dyme_json``: the official DyME JSON list (``question``, ``answer``, ``hint``, ``image``, optional
  ``id``/``split``); its other fields (``question_wo_prompt``, ``human_or_machine``, ``visual_fact``, ...)
  are kept in ``meta``. The official ``question`` is the full training prompt: ``question_wo_prompt``,
  when present, becomes the question (our steps add their own prompt). An answer written as an SFT
  label (``<reasoning> Answer: <answer>``) is split: the answer after the last flag, the reasoning as
  the hint when the row has none. Absolute image paths (the official files store them) are read only
  inside an explicit ``data.image_root``. DyME's data layout, the same questions with traces of three
  qualities (``train_high.json``, ``train_medium.json``, ``train_low.json``), is read side by side from
  the folder (or from one of its files) and matched row by row: ``data.hint_quality`` picks the file whose
  traces become the hints, and every quality's trace is kept in ``meta.traces`` (tests:
  ``tests/core/test_hint_quality.py``).
- ``hf``: a Hugging Face dataset by hub id, a local folder in the hub layout (``data/<split>-*.parquet``
  or ``.arrow``), or a ``save_to_disk`` folder. ``data.hf_columns`` maps our fields to columns
  (ChartQA's ``query``/``label``/``image``), ``data.hf_split_map`` our splits to theirs; other columns
  go to ``meta``.

Every row is normalised the same way: a label list becomes ``direct_answers`` (answer = the first),
numbers become strings (answers and questions), ``data.human_only`` keeps ChartQA's human-written rows
(``human_or_machine``; rows without the field are kept, as the official loader does, and counted).
A row that would break a later step (hostile input of issue 10: an image path leaving the root or
through a symlink, a FIFO or other special file, a decompression bomb over
``validate.max_pixels``, text that is not UTF-8, NaN/Infinity, fields over the ``validate.max_*_chars``
limits, missing or wrongly typed fields, a duplicate id) fails the ingest with one line naming the row
and the reason, or with ``data.on_bad_row: drop`` is dropped and counted by reason. When the source has
no val or test split, a seeded carve of train makes them (``data.val_fraction``, ``data.test_fraction``,
``data.split_seed``): a row's place is decided by a hash of its id, so the carve does not depend on the
order of the rows.

Output, written into a staging folder and renamed into place (a failed ingest never leaves a half
dataset): ``samples.parquet``, ``images/<sha256 prefix>.<ext>`` (the source bytes, stored once however
many questions share a chart) and ``manifest.json`` = the ingest report plus ``digest``, the sha256 of
the content (:func:`dataset_digest`; the validation report is bound to it). The report also goes to
``data.report`` for ``dvc metrics show``. Tests: ``tests/core/test_ingest.py``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from dyme_core.config import Config, DataConfig, ValidateConfig
from dyme_core.data.loaders import (
    DataError,
    Dataset,
    bad_text,
    decode_image,
    non_finite,
    read_json_list,
    read_rows,
    safe_image_file,
    to_sample,
)
from dyme_core.data.schema import SPLITS, Sample
from dyme_core.rewards import ANSWER_FLAG_RE, parse_completion

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SAMPLES = "samples.parquet"
SAMPLE_FIELDS = frozenset(f.name for f in fields(Sample))
DYME_KEYS = frozenset({"question", "answer", "hint", "image", "id", "split"})
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # "name" or "owner/name"
_HUMAN = {"human", "0"}
_MACHINE = {"machine", "augmented", "1"}
_EXT = {"PNG": "png", "JPEG": "jpg", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff", "WEBP": "webp"}
_MAX_LISTED = 50  # dropped rows listed by name in the report; the counts cover all of them


class BadRow(Exception):
    """One source row that cannot be used; ``check`` groups the counts, ``reason`` is the line."""

    def __init__(self, check: str, reason: str) -> None:
        super().__init__(reason)
        self.check, self.reason = check, reason


@dataclass
class _Source:
    """Rows of one source, in our field names, before normalisation."""

    fmt: str
    root: Path  # image paths are relative to this
    rows: Iterable[tuple[str, dict[str, Any]]]  # (where, row): where names the row in messages; read lazily
    notes: list[str]


# --------------------------------------------------------------------------------------------------
# Detection and readers


def detect_format(path: str) -> str:
    """``synthetic`` | ``project`` | ``dyme_json`` | ``hf`` for ``data.path``; DataError if it is missing."""
    if path == "synthetic":
        return "synthetic"
    p = Path(path)
    if p.is_dir():
        if (p / "samples.jsonl").is_file() or (p / "samples.parquet").is_file():
            return "project"
        if quality_files(p):
            return "dyme_json"  # DyME's layout: train_high.json, train_medium.json, train_low.json
        return "hf"  # save_to_disk output, the hub layout, or a folder of data files
    if p.is_file():
        if p.suffix in (".jsonl", ".parquet"):
            return "project"
        if p.suffix == ".json":
            rows = read_json_list(p)
            project = all("id" in row and set(row) <= SAMPLE_FIELDS for row in rows)
            return "project" if project else "dyme_json"
        raise DataError(f"{p}: unknown dataset file type {p.suffix!r} (expected .jsonl, .parquet or .json)")
    # "owner/name" may be a hub id or a local folder not made yet; when its parent exists, it is missing
    parent_exists = p.parent != Path(".") and p.parent.is_dir()
    if _HUB_ID.match(path) and p.suffix not in (".jsonl", ".parquet", ".json") and not parent_exists:
        return "hf"
    raise DataError(f"dataset not found: {path}")


def _read_project(cfg: DataConfig) -> _Source:
    folder, rows = read_rows(Path(cfg.path))
    root = Path(cfg.image_root) if cfg.image_root else folder
    listed = [(f"{cfg.path} row {i}", dict(row)) for i, row in enumerate(rows)]
    return _Source("project", root, listed, [])


def _dyme_rows(p: Path, id_stem: str) -> list[dict[str, Any]]:
    """The rows of one DyME JSON file in our field names (ids ``<id_stem>-<i>`` where a row has none)."""
    rows = []
    for i, raw in enumerate(read_json_list(p)):
        row = {k: v for k, v in raw.items() if k in DYME_KEYS}
        row.setdefault("id", f"{id_stem}-{i}")
        # the official files' extra fields (question_wo_prompt, human_or_machine, visual_fact, ...)
        meta = {k: v for k, v in raw.items() if k not in DYME_KEYS}
        # official `question` is the full training prompt; our steps add their own prompt to the pure one
        pure = raw.get("question_wo_prompt")
        if isinstance(pure, str) and pure.strip() and pure != raw.get("question"):
            meta["question_with_prompt"] = raw.get("question")
            row["question"] = pure
        # an official SFT label is "<reasoning> <answer_flag> <answer>": the answer is what follows the
        # last flag, the reasoning is the reference trace (unless the row has a hint)
        answer = raw.get("answer")
        if isinstance(answer, str) and ANSWER_FLAG_RE.search(answer):
            parsed = parse_completion(answer)
            meta["answer_label"] = answer
            row["answer"] = parsed.answer
            if parsed.thinking and not row.get("hint"):
                row["hint"] = parsed.thinking
        row["meta"] = meta
        rows.append(row)
    return rows


QUALITIES = ("high", "medium", "low")
_QUALITY_FILE = re.compile(r"^(?P<stem>.+)_(?P<quality>high|medium|low)\.json$")


def quality_files(folder: Path) -> dict[str, dict[str, Path]]:
    """``{stem: {quality: file}}`` of a folder's ``<stem>_high|medium|low.json`` files (DyME's data layout)."""
    groups: dict[str, dict[str, Path]] = {}
    for f in sorted(folder.glob("*.json")):
        if (m := _QUALITY_FILE.match(f.name)) and f.is_file():
            groups.setdefault(m["stem"], {})[m["quality"]] = f
    return groups


def _quality_group(stem: str, files: dict[str, Path], chosen: str) -> list[tuple[str, dict[str, Any]]]:
    """The rows of one question set given at several trace qualities, matched row by row (by id where the rows
    have ids, else by position): the `chosen` file's row, every quality's hint in ``meta.traces``."""
    if chosen not in files:
        raise DataError(f"data.hint_quality={chosen}: there is no {stem}_{chosen}.json beside "
                        f"{', '.join(f.name for f in files.values())}")
    read = {q: _dyme_rows(f, stem) for q, f in files.items()}
    base = read[chosen]
    listed = []
    for q, rows in read.items():
        if len(rows) != len(base):
            raise DataError(f"{files[q]} has {len(rows)} rows, {files[chosen]} has {len(base)}: the quality files must "
                            "hold the same questions")
    by_id = {q: {str(r["id"]): r for r in rows} for q, rows in read.items()}
    for i, row in enumerate(base):
        traces = {}
        for q in QUALITIES:
            if q not in read:
                continue
            other = by_id[q].get(str(row["id"]))
            same = other is not None and all(other.get(k) == row.get(k) for k in ("question", "answer"))
            if not same:
                raise DataError(f"{files[q]}: no row matches {files[chosen]} row {i} (id {row['id']!r}) by id, "
                                "question and answer; the quality files must hold the same questions")
            traces[q] = other.get("hint")
        row["meta"]["traces"] = traces
        row.setdefault("split", stem if stem in SPLITS else None)
        listed.append((f"{files[chosen]} row {i}", row))
    return listed


def _read_dyme_json(cfg: DataConfig) -> _Source:
    """One DyME JSON file; or, where data.path is a folder of ``<split>_<quality>.json`` files or one of them
    with siblings, every question set read side by side (:func:`_quality_group`)."""
    p = Path(cfg.path)
    notes = []
    if p.is_dir():
        groups = quality_files(p)
        if not groups:
            raise DataError(f"{p}: no DyME JSON files named <split>_high.json, <split>_medium.json, <split>_low.json")
        if not cfg.hint_quality:
            raise DataError(f"data.path={cfg.path} holds traces of several qualities "
                            f"({', '.join(f.name for g in groups.values() for f in g.values())}): set "
                            "data.hint_quality to high, medium or low")
        listed = [row for stem, files in groups.items() for row in _quality_group(stem, files, cfg.hint_quality)]
        chosen, folder = cfg.hint_quality, p
    elif p.is_file():
        m = _QUALITY_FILE.match(p.name)
        siblings = quality_files(p.parent).get(m["stem"], {}) if m else {}
        folder = p.parent
        if len(siblings) > 1:
            chosen = cfg.hint_quality or m["quality"]
            listed = _quality_group(m["stem"], siblings, chosen)
        else:
            chosen = ""
            listed = [(f"{cfg.path} row {i}", row) for i, row in enumerate(_dyme_rows(p, p.stem))]
    else:
        raise DataError(f"dataset not found: {cfg.path}")
    if chosen:
        notes.append(f"hint_quality {chosen}: hints from the {chosen} files; meta.traces keeps every quality")
    root = Path(cfg.image_root) if cfg.image_root else folder
    return _Source("dyme_json", root, listed, notes)


def _hf_image(value: Any) -> Any:
    """An Image feature read with decode=False is {"bytes", "path"}: the bytes when present."""
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        return value.get("bytes") if value.get("bytes") is not None else value.get("path")
    return value


def _jsonable(value: Any) -> bool:
    if value is None or isinstance(value, str | int | float | bool):
        return True
    if isinstance(value, list):
        return all(_jsonable(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _jsonable(v) for k, v in value.items())
    return False


def _read_hf(cfg: DataConfig) -> _Source:
    import datasets  # seconds to import; only this source needs it

    p = Path(cfg.path)
    if not p.is_dir():  # a hub id: a bad one, or no network, is one line within seconds (not minutes of retries)
        from dyme_core.hub import hub_access

        hub_access(cfg.path, "data.path", repo_type="dataset")
    empty = _empty_parquet_files(p)  # `datasets` fails on them with a traceback and an ERROR log of its own
    if empty:
        raise DataError(f"{cfg.path}: {', '.join(empty)} hold{'s' if len(empty) == 1 else ''} 0 rows (an empty "
                        "source or split): fill it, or remove an empty split's file")
    try:
        if p.is_dir() and ((p / "dataset_dict.json").is_file() or (p / "state.json").is_file()):
            loaded = datasets.load_from_disk(str(p))
        else:
            loaded = datasets.load_dataset(cfg.path)
    except (OSError, ValueError, datasets.exceptions.DatasetNotFoundError) as e:  # no file, no network, bad layout
        raise DataError(f"dataset not found or not readable: {cfg.path} ({str(e).splitlines()[0]})") from None
    except datasets.exceptions.DatasetGenerationError as e:  # a data file it cannot read, in one line
        cause = e.__cause__ or e
        reason = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
        raise DataError(f"{cfg.path}: cannot read the dataset ({reason})") from None
    splits = loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict(train=loaded)

    columns = dict(cfg.hf_columns)
    missing_fields = [f for f in ("question", "answer", "image") if f not in columns]
    if missing_fields:
        raise DataError(f"data.hf_columns must map {missing_fields} to columns, got {columns}")
    unknown = sorted(set(columns) - SAMPLE_FIELDS)
    if unknown:
        raise DataError(f"data.hf_columns: unknown field(s) {unknown} (fields: {sorted(SAMPLE_FIELDS)})")

    notes: list[str] = []
    chosen: list[tuple[str, str, Any]] = []  # (our split, their split, datasets.Dataset)
    used: set[str] = set()
    for ours, theirs in cfg.hf_split_map.items():
        if ours not in SPLITS:
            raise DataError(f"data.hf_split_map: {ours!r} is not one of {list(SPLITS)}")
        # the hub layout names val-*.parquet "validation"; ChartQA's own card says "val"
        candidates = [theirs] + (["val", "validation"] if ours == "val" else [])
        split = next((c for c in candidates if c in splits), None)
        if split is None:
            continue
        used.add(split)
        ds = splits[split]
        missing = sorted(set(columns.values()) - set(ds.column_names))
        if missing:
            raise DataError(f"{cfg.path} [{split}]: column(s) {missing} not found (columns: {ds.column_names}); "
                            "set data.hf_columns")
        image_col = columns["image"]
        if isinstance(ds.features[image_col], datasets.Image):
            ds = ds.cast_column(image_col, datasets.Image(decode=False))  # raw bytes, no decode here
        notes.append(f"split {ours}: {len(ds)} rows from the source's {split!r}")
        chosen.append((ours, split, ds))
    ignored = sorted(set(splits) - used)
    if ignored:
        notes.append(f"source split(s) {ignored} not mapped by data.hf_split_map: ignored")
    if not chosen:
        raise DataError(f"{cfg.path}: none of the splits {list(splits)} is mapped by data.hf_split_map "
                        f"{dict(cfg.hf_split_map)}")
    root = Path(cfg.image_root) if cfg.image_root else (p if p.is_dir() else Path("."))
    name = re.sub(r"[^\w.-]", "_", p.name or cfg.path)
    return _Source("hf", root, _hf_rows(cfg.path, name, columns, chosen), notes)


def _empty_parquet_files(folder: Path) -> list[str]:
    """The Parquet files of a local folder that hold 0 rows (relative paths); [] for a hub id."""
    empty = []
    for f in sorted(folder.rglob("*.parquet")) if folder.is_dir() else []:
        try:
            if pq.ParquetFile(f).metadata.num_rows == 0:
                empty.append(str(f.relative_to(folder)))
        except Exception:  # noqa: BLE001 (pyarrow's errors vary; an unreadable file is not an empty one)
            continue
    return empty


def _hf_rows(path: str, name: str, columns: dict[str, str],
             chosen: list[tuple[str, str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Rows one at a time: a large dataset is never held in memory with its image bytes."""
    for ours, split, ds in chosen:
        extra = [c for c in ds.column_names if c not in columns.values()]
        for i, record in enumerate(ds):
            row = {ours_field: record[col] for ours_field, col in columns.items()}
            row["image"] = _hf_image(row["image"])
            row.setdefault("id", f"{name}-{ours}-{i:05d}")
            row["split"] = ours
            row["meta"] = {c: record[c] for c in extra if _jsonable(record[c])}
            yield f"{path} [{split}] row {i}", row


# --------------------------------------------------------------------------------------------------
# One row


def _as_text(field_name: str, value: Any, limit: int, limit_key: str, required: bool = True) -> str | None:
    """Text from a string or a number (numbers become strings); BadRow for anything else."""
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise BadRow("missing", f"{field_name} is missing or empty")
        return None
    if isinstance(value, bool):
        raise BadRow("type", f"{field_name} must be text, got a boolean {value!r}")
    if isinstance(value, int | float):
        if non_finite(value):
            raise BadRow("non_finite", f"{field_name} is {value!r}, not a finite number")
        value = str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)
    if not isinstance(value, str):
        raise BadRow("type", f"{field_name} must be text, got {type(value).__name__}")
    if len(value) > limit:
        raise BadRow("too_long", f"{field_name} is {len(value)} characters, over {limit_key}={limit}")
    return value


def _image_source(value: Any, root: Path, max_pixels: int, decoded: dict[str, str | BadRow],
                  absolute_ok: bool) -> tuple[bytes, str]:
    """(bytes, file extension) of a row's image after every safety check; BadRow otherwise.

    ``decoded`` remembers each content hash's outcome: many questions share one chart, decoded once.
    Absolute paths (the official DyME files store them) are read only inside an explicit
    ``data.image_root`` (``absolute_ok``), which is then ``root``.
    """
    if isinstance(value, str) and os.path.isabs(value):
        if not absolute_ok:
            raise BadRow("image", f"image path {value!r} is absolute; set data.image_root to the folder that "
                                  "holds the images (absolute paths are read only inside it)")
        value = os.path.relpath(value, os.path.abspath(root))  # outside the root: refused just below
    if isinstance(value, bytes | bytearray):
        data = bytes(value)
    elif isinstance(value, str):
        try:
            data = safe_image_file(root, value).read_bytes()
        except DataError as e:
            raise BadRow("image", str(e)) from None
    elif value is None:
        raise BadRow("missing", "image is missing")
    else:
        raise BadRow("type", f"image must be a path or bytes, got {type(value).__name__}")
    key = hashlib.sha256(data).hexdigest()
    if key not in decoded:
        try:
            with decode_image(data, max_pixels) as image:
                fmt = image.format or "PNG"
            decoded[key] = _EXT.get(fmt, fmt.lower())
        except DataError as e:
            decoded[key] = BadRow("image", str(e))
    outcome = decoded[key]
    if isinstance(outcome, BadRow):
        raise outcome
    return data, outcome


def _normalise(row: dict[str, Any], split: str, cfg: DataConfig, limits: ValidateConfig, root: Path,
               decoded: dict[str, str | BadRow]) -> tuple[Sample, bytes, str]:
    """A checked Sample (image not yet placed), its image bytes and extension; BadRow if unusable."""
    unknown = sorted(set(row) - SAMPLE_FIELDS)
    if unknown:
        raise BadRow("unknown_field", f"unknown field(s) {unknown}")
    # meta holds a source's extra fields (DyME JSON's visual_fact, ...): name the field inside it
    named = [(f"meta.{k}", v) for k, v in row["meta"].items()] if isinstance(row.get("meta"), dict) else []
    top = [(k, v) for k, v in row.items() if k != "image" and not (k == "meta" and named)]
    for name, value in [*top, *named]:
        if bad_text(value):
            raise BadRow("encoding", f"{name} is not valid UTF-8 text")
        if non_finite(value):
            raise BadRow("non_finite", f"{name} holds a NaN or Infinity")
    sample_id = row.get("id")
    if isinstance(sample_id, int) and not isinstance(sample_id, bool):
        sample_id = str(sample_id)
    if not isinstance(sample_id, str) or not sample_id.strip():
        raise BadRow("missing", f"id must be a non-empty string, got {sample_id!r}")
    question = _as_text("question", row.get("question"), limits.max_question_chars, "validate.max_question_chars")
    answer, direct = row.get("answer"), row.get("direct_answers")
    if isinstance(answer, list):  # a label list (ChartQA, VQA): every entry is accepted
        direct = direct or answer
        answer = answer[0] if answer else None
    answer = _as_text("answer", answer, limits.max_answer_chars, "validate.max_answer_chars")
    if direct is not None:
        if not isinstance(direct, list):
            raise BadRow("type", f"direct_answers must be a list, got {type(direct).__name__}")
        direct = [_as_text("direct answer", a, limits.max_answer_chars, "validate.max_answer_chars")
                  for a in direct]
    hint = _as_text("hint", row.get("hint"), limits.max_hint_chars, "validate.max_hint_chars", required=False)
    facts = row.get("visual_facts")
    if isinstance(facts, str):
        try:
            facts = json.loads(facts)
        except json.JSONDecodeError:
            raise BadRow("type", "visual_facts is not valid JSON") from None
        if non_finite(facts):
            raise BadRow("non_finite", "visual_facts holds a NaN or Infinity")
    if facts is not None and not isinstance(facts, dict | list):
        raise BadRow("type", f"visual_facts must be a table, a list of objects or null, got {type(facts).__name__}")
    meta = row.get("meta") or {}
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except json.JSONDecodeError:
            raise BadRow("type", "meta is not valid JSON") from None
    if not isinstance(meta, dict):
        raise BadRow("type", f"meta must be a mapping, got {type(meta).__name__}")
    if cfg.hint_quality:  # the chosen quality's trace is the hint; meta.traces keeps them all
        traces = meta.get("traces")
        if not isinstance(traces, dict) or not isinstance(traces.get(cfg.hint_quality), str):
            raise BadRow("hint_quality", f"meta.traces holds no {cfg.hint_quality!r} trace to use as the hint "
                                         f"(data.hint_quality={cfg.hint_quality})")
        hint = _as_text("hint", traces[cfg.hint_quality], limits.max_hint_chars, "validate.max_hint_chars",
                        required=False)
    if split not in SPLITS:
        raise BadRow("split", f"split {split!r} is not one of {list(SPLITS)}")
    task, qtype = row.get("task") or cfg.task, row.get("qtype")
    if not isinstance(task, str) or (qtype is not None and not isinstance(qtype, str)):
        raise BadRow("type", "task and qtype must be strings")
    data, ext = _image_source(row.get("image"), root, limits.max_pixels, decoded, bool(cfg.image_root))
    sample = Sample(id=sample_id, image="", question=question, answer=answer, hint=hint, visual_facts=facts,
                    direct_answers=direct, task=task, split=split, qtype=qtype, meta=meta)
    return sample, data, ext


def _is_human(sample: Sample) -> bool:
    """ChartQA's flag: 0/"human" or 1/"machine" (rows without it are counted by the caller)."""
    value = sample.meta.get("human_or_machine")
    text = str(value).strip().casefold()
    if text in _HUMAN:
        return True
    if text in _MACHINE:
        return False
    raise BadRow("human_or_machine", f"human_or_machine is {value!r}, expected human|machine or 0|1")


def _carve(samples: list[Sample], missing: list[str], cfg: DataConfig) -> dict[str, Any]:
    """Move a seeded, order-independent share of train into each missing split (in place)."""
    fractions = {"val": cfg.val_fraction, "test": cfg.test_fraction}
    train = [s for s in samples if s.split == "train"]
    # rank by a hash of (seed, id): the same rows go to the same split whatever the source order
    ranked = sorted(train, key=lambda s: hashlib.sha256(f"{cfg.split_seed}:{s.id}".encode()).hexdigest())
    carved, start = {}, 0
    for split in ("test", "val"):
        if split not in missing or fractions[split] <= 0:
            continue
        n = round(fractions[split] * len(train))
        for s in ranked[start:start + n]:
            s.split = split
        carved[split] = n
        start += n
    return {"from": "train", "seed": cfg.split_seed, "fractions": {k: fractions[k] for k in carved},
            "rows": carved} if carved else {}


# --------------------------------------------------------------------------------------------------
# The step


def _read_source(cfg: Config, staging: Path) -> _Source:
    d = cfg.data
    fmt = detect_format(d.path) if d.format == "auto" else d.format
    if fmt == "synthetic":
        from dyme_core.data.synth import synthesize

        out = synthesize(dataclasses.replace(cfg.synth, out_dir=str(staging / "synthetic")))
        src = _read_project(dataclasses.replace(d, path=str(out), image_root=""))
        return dataclasses.replace(src, fmt="synthetic", notes=[f"synthetic charts, synth.seed={cfg.synth.seed}"])
    if fmt == "project":
        return _read_project(d)
    if fmt == "dyme_json":
        return _read_dyme_json(d)
    if fmt == "hf":
        return _read_hf(d)
    raise DataError(f"data.format must be auto | synthetic | project | dyme_json | hf, got {fmt!r}")


def _drop(report: dict[str, Any], where: str, bad: BadRow) -> None:
    report["dropped"][bad.check] = report["dropped"].get(bad.check, 0) + 1
    if len(report["dropped_rows"]) < _MAX_LISTED:
        report["dropped_rows"].append({"row": where, "check": bad.check, "reason": bad.reason})


def ingest(cfg: Config) -> dict[str, Any]:
    """Materialise ``cfg.data.path`` into ``cfg.data.out_dir``; returns the report (also the manifest)."""
    d = cfg.data
    out = Path(d.out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.ingest-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        report = _materialise(cfg, staging)
        _publish(staging / "dataset", out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    report_path = Path(d.report)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    return report


def _materialise(cfg: Config, staging: Path) -> dict[str, Any]:
    d = cfg.data
    dest = staging / "dataset"
    (dest / "images").mkdir(parents=True)
    source = _read_source(cfg, staging)
    report: dict[str, Any] = {"source": d.path, "format": source.fmt, "out_dir": d.out_dir, "notes": source.notes,
                              "dropped": {}, "dropped_rows": []}
    kept: list[Sample] = []  # image already written under images/
    seen: set[str] = set()
    decoded: dict[str, str | BadRow] = {}
    no_flag = 0
    for where, row in source.rows:
        raw_id = row.get("id")
        label = f"{where} (id {raw_id!r})" if raw_id is not None else where
        try:
            split = row.pop("split", None) or "train"
            sample, data, ext = _normalise(row, split, d, cfg.validate, source.root, decoded)
            if sample.id in seen:
                raise BadRow("duplicate_id", f"id {sample.id!r} is used by an earlier row")
            seen.add(sample.id)
            if d.human_only and "human_or_machine" not in sample.meta:
                no_flag += 1  # the official DyME loader keeps such rows as human-written
            elif d.human_only and not _is_human(sample):
                report["dropped"]["machine_generated"] = report["dropped"].get("machine_generated", 0) + 1
                continue
        except BadRow as bad:
            if d.on_bad_row == "fail":
                raise DataError(f"{label}: {bad.reason} (data.on_bad_row=drop skips such rows)") from None
            _drop(report, label, bad)
            continue
        sample.image = f"images/{hashlib.sha256(data).hexdigest()[:32]}.{ext}"
        if not (dest / sample.image).exists():  # many questions share one chart: stored once
            (dest / sample.image).write_bytes(data)
        kept.append(sample)
    if not kept:
        if not report["dropped"]:
            raise DataError(f"{d.path}: the source has no rows")
        raise DataError(f"{d.path}: no usable rows (dropped: {report['dropped']})")
    if no_flag:
        report["notes"].append(f"data.human_only: {no_flag} row(s) without human_or_machine kept as human-written")
        log.warning("data.human_only: %d row(s) of %s have no human_or_machine field; kept as human-written",
                    no_flag, d.path)

    samples = kept
    present = {s.split for s in samples}
    missing = [s for s in ("val", "test") if s not in present]
    report["carve"] = _carve(samples, missing, d) if missing and "train" in present else {}
    for split in missing:
        if split not in report["carve"].get("rows", {}):
            report["notes"].append(f"split {split}: absent from the source and not carved")
    counts = Counter(s.split for s in samples)
    if not counts["train"]:  # validate and train would refuse it later; say so where the data comes in
        carved = f", after carving {report['carve']['rows']} from it" if report["carve"] else ""
        raise DataError(f"{d.path}: no train rows ({', '.join(f'{k}: {v}' for k, v in sorted(counts.items()))}"
                        f"{carved}); training needs some: give rows split=train, or map the source's training "
                        "split with data.hf_split_map")

    order = {name: i for i, name in enumerate(SPLITS)}
    rows = sorted(samples, key=lambda s: order[s.split])  # stable: source order inside a split
    n_images = len({s.image for s in rows})
    _write_samples(rows, dest / SAMPLES)

    counts = Counter(s.split for s in rows)
    report.update({
        "n_rows": len(rows),
        "rows_per_split": {s: counts.get(s, 0) for s in SPLITS},
        "n_images": n_images,
        "n_dropped": sum(report["dropped"].values()),
        "limits": {k: getattr(cfg.validate, k) for k in
                   ("max_pixels", "max_question_chars", "max_answer_chars", "max_hint_chars")},
        "digest": dataset_digest(dest),
    })
    (dest / MANIFEST).write_text(json.dumps(report, indent=2) + "\n")
    log.info("ingested %s (%s): %s rows %s, %s dropped", d.path, source.fmt, len(rows),
             report["rows_per_split"], report["n_dropped"])
    return report


def _publish(new: Path, out: Path) -> None:
    """Put the finished folder at ``out``: rename, never copy, so readers see the old or the new one."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists() or out.is_symlink():
        os.replace(out, old)
    os.replace(new, out)
    if old.exists() or old.is_symlink():
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()


def _write_samples(samples: list[Sample], path: Path) -> None:
    """samples.parquet: visual_facts and meta as JSON strings (a table's mixed-type cells fit no column)."""
    columns: dict[str, list[Any]] = {f.name: [] for f in fields(Sample)}
    for s in samples:
        for name, value in s.to_dict().items():
            if name in ("visual_facts", "meta"):
                value = None if value is None else json.dumps(value, sort_keys=True, allow_nan=False)
            columns[name].append(value)
    schema = pa.schema([(name, pa.list_(pa.string()) if name == "direct_answers" else pa.string())
                        for name in columns])
    pq.write_table(pa.table(columns, schema=schema), path)


# --------------------------------------------------------------------------------------------------
# Readers of the materialised dataset


def open_dataset(root: str | Path, max_pixels: int | None = None) -> Dataset:
    """The materialised dataset at ``root`` (``data.out_dir``) as a :class:`Dataset`.

    Any project-format folder opens (``samples.parquet`` or ``samples.jsonl``); images are read through
    the safe loader with ``max_pixels`` (default ``validate.max_pixels``'s default).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset not found: {root} (run `dyme ingest` to materialise data.path there)")
    folder, rows = read_rows(root)
    samples = [to_sample(row, f"{root} row {i}", "chart") for i, row in enumerate(rows)]
    if max_pixels is None:
        return Dataset(folder, samples)
    return Dataset(folder, samples, max_pixels)


def dataset_digest(root: str | Path) -> str:
    """sha256 of a dataset's content: every row (canonical JSON) and the bytes of every image it names.

    The manifest is not part of it (it holds the digest); an image that is missing or not a safe regular
    file enters as a marker (never opened), so the digest of a damaged dataset still differs.
    """
    root = Path(root)
    folder, rows = read_rows(root)
    h = hashlib.sha256()
    images = set()
    for row in rows:
        # JSON-string columns and the native form hash alike
        norm = {k: (_json_or_text(v) if k in ("visual_facts", "meta") else v) for k, v in row.items() if v is not None}
        h.update(json.dumps(norm, sort_keys=True, ensure_ascii=True, default=str).encode("utf-8", "surrogateescape"))
        h.update(b"\n")
        if isinstance(row.get("image"), str):
            images.add(row["image"])
    for image in sorted(images):
        try:
            data_hash = _file_sha256(safe_image_file(folder, image))
        except DataError as e:
            data_hash = f"<{e}>"
        h.update(f"{image}\0{data_hash}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _json_or_text(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def _file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
