"""The data validation step (DESIGN.md section 3): training never starts on data that failed it.

Raw rows (dicts, before they become :class:`~dyme_core.data.schema.Sample`) go into a pandas frame,
together with columns derived in Python that pandas cannot express (does the image decode, does its
path stay inside the dataset root, is ``visual_facts`` a well-formed table, ...). A Great Expectations
v1 suite (ephemeral context -> pandas data source -> dataframe asset -> whole-frame batch definition
-> suite -> validation definition) then checks the frame, and GE's unexpected rows become a JSON
report that names every bad row by its id and says why::

    {"success": false, "n_rows": 4, "rows_per_split": {"train": 2, ...},
     "failures": [{"id": "r1", "check": "image_exists", "reason": "image file images/x.png not found"}],
     "expectations": [{"check": "image_exists", "success": false, "unexpected_count": 1}, ...]}

Derived columns are True (pass), False (fail) or None (not applicable: GE skips nulls), e.g. an image
whose path escapes the root is reported by ``image_inside_root`` and never opened. Row-count minimums
per split are checked on a second, one-row-per-split frame; their failures name ``split:<name>``, and
failures about the whole dataset (no rows, unreadable source) name ``dataset``. A failure names a row
by its id, or by its index in the rows when the id is missing or not a JSON scalar.

Hostile input (issue 10) is reported, never followed: image paths that leave the root lexically or
through a symlink, FIFOs and other special files (type read with ``stat``, never opened), images over
``validate.max_pixels`` (checked on the header, before decoding), text that is not UTF-8, NaN/Infinity
anywhere in a row, and fields over the ``validate.max_*_chars`` limits. The report of a dataset folder
carries ``data_digest`` (:func:`dyme_core.data.ingest.dataset_digest`, computed before the rows are
read): ``dyme train`` refuses a report whose digest is not that of the data it is given.

Run: ``dyme validate`` (the CLI imports this module lazily: GE takes about 3 s to import);
test: ``pytest tests/core/test_validation.py``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from dyme_core.config import ValidateConfig
from dyme_core.data.loaders import DataError, bad_text, decode_image, non_finite, safe_image_file
from dyme_core.data.schema import SPLITS, Sample, jsonl_rows

KNOWN_FIELDS = frozenset(f.name for f in fields(Sample))
_NUMBER = re.compile(r"^[-+]?\$?(\d[\d,]*(\.\d*)?|\.\d+)([eE][-+]?\d+)?%?$")
_YES_NO = frozenset({"yes", "no"})
_DATASET = "dataset"  # the failure id of checks about the whole dataset rather than one row


@dataclass
class _Check:
    """One expectation of the suite, the report's name for it, and how to word a failing row."""

    name: str
    expectation: Any  # a great_expectations.expectations.Expectation
    reason: Callable[[dict[str, Any], dict[str, str]], str]  # (frame record, derived reasons) -> line


# --------------------------------------------------------------------------------------------------
# Derived columns, computed per row in Python. Each returns (ok: True | False | None, reason if False).


def _short(value: Any, limit: int = 80) -> str:
    """repr() cut to one short line: reasons quote the offending value, which may be huge."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_number(text: str) -> bool:
    return bool(_NUMBER.match(text.strip()))


def _norm(value: Any) -> str:
    return str(value).strip().casefold()


def _check_visual_facts(vf: Any) -> tuple[bool, str]:
    if vf is None:
        return True, ""
    if isinstance(vf, dict):
        extra = set(vf) - {"columns", "rows", "title"}
        if extra:
            return False, f"visual_facts table has unknown key(s) {sorted(extra)}"
        cols, rows = vf.get("columns"), vf.get("rows")
        if not isinstance(cols, list) or not isinstance(rows, list):
            return False, "visual_facts table needs a list 'columns' and a list 'rows'"
        for i, row in enumerate(rows):
            if not isinstance(row, list) or len(row) != len(cols):
                n = len(row) if isinstance(row, list) else type(row).__name__
                return False, f"visual_facts row {i} has {n} cells, expected {len(cols)} (one per column)"
        if "title" in vf and not isinstance(vf["title"], str):
            return False, "visual_facts title must be a string"
        return True, ""
    if isinstance(vf, list):
        for i, obj in enumerate(vf):
            if not isinstance(obj, dict):
                return False, f"visual_facts object {i} is a {type(obj).__name__}, expected a dict"
        return True, ""
    return False, f"visual_facts must be a table dict, a list of dicts or null, got {type(vf).__name__}"


def _fact_labels(vf: dict[str, Any] | list[dict[str, Any]]) -> set[str]:
    """Every label and cell of a table, or every attribute value of a list of objects, normalised."""
    if isinstance(vf, dict):
        values = list(vf["columns"]) + [cell for row in vf["rows"] for cell in row]
    else:
        values = [v for obj in vf for v in obj.values()]
    return {_norm(v) for v in values if v is not None}


def _answer_in_facts(row: dict[str, Any], facts_ok: bool) -> tuple[bool | None, str]:
    """Chart rows only: a non-numeric, non-yes/no answer must be one of the facts' labels or cells."""
    answer, vf = row.get("answer"), row.get("visual_facts")
    if row.get("task", "chart") != "chart" or not facts_ok or vf is None:
        return None, ""
    if not isinstance(answer, str) or not answer.strip():
        return None, ""  # answer_type / answer_empty report it
    if _is_number(answer) or _norm(answer) in _YES_NO:
        return True, ""
    if _norm(answer) in _fact_labels(vf):
        return True, ""
    return False, f"answer {_short(answer)} is neither numeric nor a label/cell of visual_facts"


def _field_types(row: dict[str, Any]) -> tuple[bool, str]:
    task, qtype, meta = row.get("task", "chart"), row.get("qtype"), row.get("meta", {})
    if not isinstance(task, str) or not task:
        return False, f"task must be a non-empty string, got {_short(task)}"
    if qtype is not None and not isinstance(qtype, str):
        return False, f"qtype must be a string or null, got {type(qtype).__name__}"
    if meta is not None and not isinstance(meta, dict):
        return False, f"meta must be a dict, got {type(meta).__name__}"
    return True, ""


@dataclass
class _ImageInfo:
    inside_root: bool | None = None
    exists: bool | None = None
    decodable: bool | None = None
    width: int | None = None
    height: int | None = None
    reason: str = ""


def _decode(source: Path | bytes, info: _ImageInfo, shown: str, max_pixels: int) -> _ImageInfo:
    try:
        with decode_image(source, max_pixels) as im:  # decodes the pixels: catches truncated files and bombs
            info.width, info.height = im.size
        info.decodable = True
    except DataError as e:
        info.decodable, info.reason = False, f"{shown}: {e}"
    return info


def _inspect_image(image: Any, root: Path, cache: dict[Path, _ImageInfo], max_pixels: int) -> _ImageInfo:
    if isinstance(image, bytes):
        return _decode(image, _ImageInfo(inside_root=True, exists=True), "image bytes", max_pixels)
    if not isinstance(image, str) or not image.strip():
        return _ImageInfo(exists=False, reason=f"no image path (got {_short(image)})")
    key = Path(image)  # as written: an absolute path must not hit the entry of the file it names
    if key in cache:
        return cache[key]
    # the safe loader refuses paths that leave the root (lexically or through a symlink) without opening
    # them, and checks the file type with stat, so a FIFO is reported instead of hanging the step
    try:
        path = safe_image_file(root, image)
    except DataError as e:
        reason = str(e)
        escapes = "escapes the dataset root" in reason or "leaves the dataset root" in reason or "absolute" in reason
        info = _ImageInfo(inside_root=False, reason=reason) if escapes else \
            _ImageInfo(inside_root=True, exists=False, reason=reason)
    else:
        info = _decode(path, _ImageInfo(inside_root=True, exists=True), image, max_pixels)
    cache[key] = info
    return info


def _text_checks(row: dict[str, Any], cfg: ValidateConfig) -> dict[str, tuple[bool | None, str]]:
    """Hostile text (issue 10): bytes that are not UTF-8, NaN/Infinity, fields over the length limits."""
    encoding = [name for name, value in row.items() if bad_text(value)]
    finite = [name for name, value in row.items() if non_finite(value)]
    limits = {"question": cfg.max_question_chars, "answer": cfg.max_answer_chars, "hint": cfg.max_hint_chars}
    long = [f"{name} is {len(row[name])} characters, over validate.max_{name}_chars={limit}"
            for name, limit in limits.items() if isinstance(row.get(name), str) and len(row[name]) > limit]
    direct = row.get("direct_answers")
    if isinstance(direct, list) and any(isinstance(a, str) and len(a) > cfg.max_answer_chars for a in direct):
        long.append(f"a direct answer is over validate.max_answer_chars={cfg.max_answer_chars}")
    return {
        "text_encoding": (not encoding, f"field(s) {encoding} are not valid UTF-8 text"),
        "finite_numbers": (not finite, f"field(s) {finite} hold NaN or Infinity"),
        "field_length": (not long, "; ".join(long)),
    }


def _scalar(value: Any) -> Any:
    """JSON scalars stay as they are; lists and dicts (which GE's pandas metrics cannot take) become
    their repr: the ``*_type`` checks report them, the frame column only serves uniqueness and sets."""
    return value if value is None or isinstance(value, str | int | float | bool) else repr(value)


def _is_str(field: str, value: Any) -> tuple[bool | None, str]:
    if value is None:
        return None, ""  # *_missing reports it
    return isinstance(value, str), f"{field} must be a string, got {type(value).__name__} {_short(value)}"


def _row_label(raw_id: Any, index: int) -> str | int | float | bool:
    """The id a failure names: the row's id if it is a JSON scalar, else the row index."""
    return raw_id if isinstance(raw_id, str | int | float | bool) and raw_id != "" else index


def _derive(row: dict[str, Any], index: int, root: Path, cache: dict[Path, _ImageInfo],
            cfg: ValidateConfig) -> tuple[dict[str, Any], dict[str, str]]:
    """One frame record (raw scalar fields + derived columns) and the reasons of failed derived ones."""
    why: dict[str, str] = {}

    def flag(name: str, result: tuple[bool | None, str]) -> bool | None:
        ok, reason = result
        if ok is False:
            why[name] = reason
        return ok

    question, answer = row.get("question"), row.get("answer")
    img = _inspect_image(row.get("image"), root, cache, cfg.max_pixels)
    for name in ("image_inside_root", "image_exists", "image_decodable"):
        why[name] = img.reason
    unknown = sorted(set(row) - KNOWN_FIELDS)
    facts_ok = flag("visual_facts", _check_visual_facts(row.get("visual_facts")))
    direct = row.get("direct_answers")
    hint = row.get("hint")
    rec = {
        "row": index,
        "id": _scalar(row.get("id")) if row.get("id") != "" else None,
        "question": _scalar(question),
        "answer": _scalar(answer),
        "split": _scalar(row.get("split", "train")),
        "id_type": flag("id_type", _is_str("id", row.get("id"))),
        "question_type": flag("question_type", _is_str("question", question)),
        "answer_type": flag("answer_type", _is_str("answer", answer)),
        "question_len": len(question.strip()) if isinstance(question, str) else None,
        "answer_len": len(answer.strip()) if isinstance(answer, str) else None,
        "image_inside_root": img.inside_root,
        "image_exists": img.exists,
        "image_decodable": img.decodable,
        "image_width": img.width,
        "image_height": img.height,
        "unknown_fields": flag("unknown_fields", (not unknown, f"unknown field(s) {unknown}")),
        "field_types": flag("field_types", _field_types(row)),
        "hint_type": flag("hint_type", (hint is None or isinstance(hint, str),
                                        f"hint must be a string or null, got {type(hint).__name__}")),
        "visual_facts": facts_ok,
        "direct_answers": flag("direct_answers", (
            direct is None or (isinstance(direct, list) and all(isinstance(a, str) for a in direct)),
            f"direct_answers must be a list of strings or null, got {_short(direct)}")),
        "answer_in_facts": flag("answer_in_facts", _answer_in_facts(row, bool(facts_ok))),
        **{name: flag(name, result) for name, result in _text_checks(row, cfg).items()},
    }
    return rec, why


# --------------------------------------------------------------------------------------------------
# The suite


def _row_checks(cfg: ValidateConfig) -> list[_Check]:
    import great_expectations.expectations as gxe

    def flag(name: str) -> _Check:
        return _Check(name, gxe.ExpectColumnValuesToBeInSet(column=name, value_set=[True]),
                      lambda r, why: why[name])

    def size(col: str) -> _Check:
        return _Check("image_size", gxe.ExpectColumnValuesToBeBetween(
            column=col, min_value=cfg.min_image_px, max_value=cfg.max_image_px),
            lambda r, why: f"image is {r['image_width']}x{r['image_height']} px, sides must be within "
                           f"[{cfg.min_image_px}, {cfg.max_image_px}]")

    checks = [
        _Check("n_rows", gxe.ExpectTableRowCountToBeBetween(min_value=1), lambda r, why: "no rows"),
        _Check("id_missing", gxe.ExpectColumnValuesToNotBeNull(column="id"),
               lambda r, why: "id is missing or empty"),
        flag("id_type"),
        _Check("id_unique", gxe.ExpectColumnValuesToBeUnique(column="id"),
               lambda r, why: f"id {_short(r['id'])} is used by more than one row"),
    ]
    for text in ("question", "answer"):
        checks += [
            _Check(f"{text}_missing", gxe.ExpectColumnValuesToNotBeNull(column=text),
                   lambda r, why, t=text: f"{t} is missing"),
            flag(f"{text}_type"),
            _Check(f"{text}_empty", gxe.ExpectColumnValuesToBeBetween(column=f"{text}_len", min_value=1),
                   lambda r, why, t=text: f"{t} is empty"),
        ]
    checks += [
        _Check("split", gxe.ExpectColumnValuesToNotBeNull(column="split"),
               lambda r, why: "split is null (leave it out for the default 'train')"),
        _Check("split", gxe.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS)),
               lambda r, why: f"split {_short(r['split'])} is not one of {list(SPLITS)}"),
        flag("unknown_fields"),
        flag("field_types"),
        flag("image_inside_root"),
        flag("image_exists"),
        flag("image_decodable"),
        size("image_width"),
        size("image_height"),
        flag("hint_type"),
        flag("visual_facts"),
        flag("direct_answers"),
        flag("text_encoding"),
        flag("finite_numbers"),
        flag("field_length"),
    ]
    if cfg.require_answer_in_facts:
        checks.append(flag("answer_in_facts"))
    return checks


def _split_checks() -> list[_Check]:
    import great_expectations.expectations as gxe

    return [_Check("split_rows", gxe.ExpectColumnPairValuesAToBeGreaterThanB(
        column_A="n_rows", column_B="min_rows", or_equal=True),
        lambda r, why: f"split {r['split']!r} has {r['n_rows']} row(s), needs at least {r['min_rows']}")]


def _exception_message(info: Any) -> str | None:
    """GE's exception_info is either one {raised_exception, exception_message} dict or one per metric."""
    if not isinstance(info, dict):
        return None
    if "raised_exception" in info:
        return info["exception_message"] if info["raised_exception"] else None
    for sub in info.values():
        msg = _exception_message(sub)
        if msg:
            return msg
    return None


def _run_suite(context: Any, name: str, frame: Any, checks: list[_Check]) -> list[Any]:
    """Validate ``frame`` against ``checks``; returns GE's results in the order of ``checks``.

    Every frame has an integer ``row`` column that GE reports for each unexpected value.
    """
    import great_expectations as gx

    asset = context.data_sources.add_pandas(f"{name}_source").add_dataframe_asset(name)
    batch = asset.add_batch_definition_whole_dataframe(f"{name}_all")
    for i, check in enumerate(checks):
        check.expectation.meta = {"check": check.name, "index": i}
    # expectations passed at construction: one store write instead of one per add_expectation
    suite = context.suites.add(gx.ExpectationSuite(
        name=f"{name}_suite", expectations=[c.expectation for c in checks]))
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=f"{name}_validation", data=batch, suite=suite))
    result = definition.run(batch_parameters={"dataframe": frame}, result_format={
        "result_format": "COMPLETE", "unexpected_index_column_names": ["row"]})
    return sorted(result.results, key=lambda r: r.expectation_config.meta["index"])


def _collect(results: list[Any], checks: list[_Check], records: list[dict[str, Any]],
             whys: list[dict[str, str]], labels: list[Any],
             failures: list[dict[str, Any]], summary: dict[str, dict[str, Any]]) -> None:
    """Turn GE results into report failures (one per bad row and check) and per-check summaries."""
    position = {rec["row"]: i for i, rec in enumerate(records)}
    for check, res in zip(checks, results, strict=True):
        entry = summary.setdefault(check.name, {"check": check.name, "success": True, "rows": set()})
        entry["success"] = entry["success"] and bool(res.success)
        error = _exception_message(res.exception_info)
        if error:
            failures.append({"id": _DATASET, "check": check.name, "reason": f"check raised: {error}"[:300]})
            continue
        if res.success:
            continue
        unexpected = res.result.get("unexpected_index_list")
        if unexpected is None:  # a table-level expectation (row count)
            failures.append({"id": _DATASET, "check": check.name, "reason": check.reason({}, {})})
            entry["rows"].add(_DATASET)
            continue
        for item in unexpected:
            i = position[int(item["row"])]  # GE hands back numpy ints
            reason = check.reason(records[i], whys[i])
            failures.append({"id": labels[i], "check": check.name, "reason": reason})
            entry["rows"].add(i)


def _quiet_ge() -> None:
    """great_expectations' loggers to ERROR. Called before it is imported (the import alone logs about 200 INFO
    lines) and again after (one of its modules sets its own logger to INFO when imported)."""
    loggers = [name for name in logging.root.manager.loggerDict if name.startswith("great_expectations.")]
    for name in ("great_expectations", *loggers):
        logging.getLogger(name).setLevel(logging.ERROR)


def validate_rows(rows: list[dict[str, Any]], root: Path, cfg: ValidateConfig) -> dict[str, Any]:
    """Check raw sample rows against the data contract; returns the JSON-serialisable report.

    ``root`` is the dataset root that image paths are relative to. Rows that are not dicts are reported
    (check ``row_type``) and left out of the frame.
    """
    _quiet_ge()
    import great_expectations as gx
    import pandas as pd
    from great_expectations.data_context.types.base import ProgressBarsConfig

    _quiet_ge()
    root = Path(os.path.abspath(root))
    failures: list[dict[str, Any]] = []
    records: list[dict[str, Any]] = []
    whys: list[dict[str, str]] = []
    labels: list[Any] = []
    cache: dict[Path, _ImageInfo] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            reason = f"row is a {type(row).__name__}, not a dict"
            failures.append({"id": i, "check": "row_type", "reason": reason})
            continue
        rec, why = _derive(row, i, root, cache, cfg)
        records.append(rec)
        whys.append(why)
        labels.append(_row_label(row.get("id"), i))

    rows_per_split = dict(Counter(str(rec["split"]) for rec in records))
    split_records = [{"row": j, "split": s, "n_rows": rows_per_split.get(s, 0), "min_rows": int(n)}
                     for j, (s, n) in enumerate(cfg.min_rows.items())]

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    columns = ["row", "id", "question", "answer", "split", "id_type", "question_type", "answer_type",
               "question_len", "answer_len",
               "image_inside_root", "image_exists", "image_decodable", "image_width", "image_height",
               "unknown_fields", "field_types", "hint_type", "visual_facts", "direct_answers",
               "answer_in_facts", "text_encoding", "finite_numbers", "field_length"]
    frame = pd.DataFrame(records, columns=columns).astype(object)  # keep raw Python values and types
    frame["row"] = frame["row"].astype("int64")
    for col in ("image_width", "image_height"):
        frame[col] = pd.to_numeric(frame[col], errors="coerce").astype("float64")

    summary: dict[str, dict[str, Any]] = {}
    row_checks = _row_checks(cfg)
    results = _run_suite(context, "rows", frame, row_checks)
    _collect(results, row_checks, records, whys, labels, failures, summary)
    if split_records:
        split_checks = _split_checks()
        split_frame = pd.DataFrame(split_records, columns=["row", "split", "n_rows", "min_rows"])
        results = _run_suite(context, "splits", split_frame, split_checks)
        _collect(results, split_checks, split_records, [{} for _ in split_records],
                 [f"split:{r['split']}" for r in split_records], failures, summary)

    failures = _dedupe(failures)
    expectations = [{"check": e["check"], "success": e["success"], "unexpected_count": len(e["rows"])}
                    for e in summary.values()]
    return {
        "success": not failures,
        "n_rows": len(rows),
        "rows_per_split": rows_per_split,
        "failures": failures,
        "expectations": expectations,
    }


def _dedupe(failures: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drop repeats (width and height both out of range give one line per row)."""
    seen, out = set(), []
    for f in failures:
        key = (repr(f["id"]), f["check"], f["reason"])
        if key not in seen:
            seen.add(key)
            out.append(f)
    return out


# --------------------------------------------------------------------------------------------------
# Files


def _read_jsonl_rows(path: Path) -> tuple[list[Any], list[dict[str, Any]]]:
    """Rows of a JSONL file; a line that is not a JSON object becomes a failure naming the line."""
    rows, failures = [], []
    for lineno, row, reason in jsonl_rows(path):  # non-UTF-8 bytes survive, reported by text_encoding
        if row is None:
            failures.append({"id": f"line {lineno}", "check": "json", "reason": f"{path.name}:{lineno}: {reason}"})
        else:
            rows.append(row)
    return rows, failures


def _read_rows(path: Path) -> tuple[Path, list[Any], list[dict[str, Any]]]:
    """(dataset root, raw rows, read failures) for a dataset root or a .jsonl/.parquet file."""
    if path.is_dir():
        for name in ("samples.jsonl", "samples.parquet"):
            if (path / name).is_file():
                return _read_rows(path / name)
        reason = f"{path} holds neither samples.jsonl nor samples.parquet"
    elif not path.is_file():
        reason = f"{path} does not exist"
    elif path.suffix == ".jsonl":
        rows, failures = _read_jsonl_rows(path)
        return path.parent, rows, failures
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
            keep = [c for c in table.column_names if not c.startswith("__index_level_")]
            return path.parent, [_decode_json_columns(r) for r in table.select(keep).to_pylist()], []
        except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... on bad files
            reason = f"cannot read {path.name}: {type(e).__name__}: {e}"
    else:
        reason = f"{path}: expected a dataset root, a .jsonl or a .parquet file"
    return path if path.is_dir() else path.parent, [], [{"id": _DATASET, "check": "source", "reason": reason}]


def _decode_json_columns(row: dict[str, Any]) -> dict[str, Any]:
    """Parquet stores visual_facts and meta as JSON strings (see dyme_core.data.ingest); decode them
    (a string that is not JSON stays, and the visual_facts/field_types checks report it)."""
    for name in ("visual_facts", "meta"):
        if isinstance(row.get(name), str):
            try:
                row[name] = json.loads(row[name])
            except json.JSONDecodeError:
                pass
    return row


def validate_path(path: Path, cfg: ValidateConfig) -> dict[str, Any]:
    """Validate a dataset root (samples.jsonl or samples.parquet inside) or a .jsonl/.parquet file.

    Writes the report to ``cfg.report`` (JSON, indent 2) and returns it.
    """
    from dyme_core.data.ingest import dataset_digest

    path = Path(path)
    # the digest first: the report is bound to the content it was computed from
    try:
        digest = dataset_digest(path) if path.is_dir() else None
    except DataError:  # no samples file: _read_rows reports it
        digest = None
    root, rows, read_failures = _read_rows(path)
    report = validate_rows(rows, root, cfg)
    report["source"] = str(path)
    report["data_digest"] = digest
    report["failures"] = read_failures + report["failures"]
    report["success"] = report["success"] and not read_failures
    out = Path(cfg.report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def summarize(report: dict[str, Any], limit: int = 10) -> str:
    """A few lines for the console: verdict, counts, then the first ``limit`` failures."""
    failures = report["failures"]
    splits = ", ".join(f"{k}={v}" for k, v in sorted(report["rows_per_split"].items()))
    head = f"validation {'passed' if report['success'] else 'FAILED'}: {report['n_rows']} rows ({splits})"
    if not failures:
        return head
    lines = [f"{head}; {len(failures)} failure(s)"]
    lines += [f"  {f['id']}: {f['check']}: {f['reason']}" for f in failures[:limit]]
    if len(failures) > limit:
        lines.append(f"  ... and {len(failures) - limit} more")
    return "\n".join(lines)
