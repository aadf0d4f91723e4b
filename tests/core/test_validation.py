"""The validation step: a clean dataset passes; each class of bad data fails and names the bad row."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from dyme_core.config import ValidateConfig
from dyme_core.validation import summarize, validate_path, validate_rows

TABLE = {"columns": ["label", "value"], "rows": [["Apples", 3], ["Pears", 5]], "title": "Fruit"}


def _png(path: Path, side: int = 32) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (side, side), (200, 40, 40)).save(path)


def _row(i: int, split: str, answer: str = "Pears", **kw: Any) -> dict[str, Any]:
    row = {"id": f"r{i}", "image": f"images/{i}.png", "question": "Which fruit sold most?",
           "answer": answer, "hint": "Pears has the tallest bar, 5.", "visual_facts": TABLE,
           "direct_answers": [answer], "task": "chart", "split": split}
    return row | kw


@pytest.fixture
def dataset(tmp_path: Path) -> tuple[Path, list[dict[str, Any]]]:
    """A valid dataset root: 2 train rows, 1 val, 1 test, each with a real 32 px PNG."""
    root = tmp_path / "data"
    rows = [_row(0, "train"), _row(1, "train", answer="5"), _row(2, "val", visual_facts=None),
            _row(3, "test", task="vqa", visual_facts=[{"name": "apple", "color": "red"}], answer="two")]
    for i in range(len(rows)):
        _png(root / f"images/{i}.png")
    return root, rows


def _cfg(tmp_path: Path) -> ValidateConfig:
    return ValidateConfig(report=str(tmp_path / "reports/validation.json"), min_image_px=16,
                          min_rows={"train": 1, "test": 1}, require_answer_in_facts=True,
                          max_pixels=100_000, max_question_chars=500)


def test_valid_dataset_passes(dataset: tuple[Path, list[dict[str, Any]]], tmp_path: Path) -> None:
    root, rows = dataset
    report = validate_rows(rows, root, _cfg(tmp_path))
    assert report["failures"] == []
    assert report["success"] is True
    assert report["n_rows"] == 4
    assert report["rows_per_split"] == {"train": 2, "val": 1, "test": 1}
    checks = {e["check"] for e in report["expectations"]}
    assert {"id_unique", "image_decodable", "image_size", "split_rows", "answer_in_facts"} <= checks
    assert all(e["success"] and e["unexpected_count"] == 0 for e in report["expectations"])
    json.dumps(report)  # serialisable as is


Mutation = Callable[[dict[str, Any], Path], None]  # (the case's row, dataset root) -> None


def _set(**fields: Any) -> Mutation:
    return lambda row, root: row.update(fields)


def _drop(field: str) -> Mutation:
    return lambda row, root: row.pop(field)


def _corrupt_image(row: dict[str, Any], root: Path) -> None:
    (root / row["image"]).write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")


def _tiny_image(row: dict[str, Any], root: Path) -> None:
    _png(root / row["image"], side=4)


def _escape_relative(row: dict[str, Any], root: Path) -> None:
    _png(root.parent / "outside.png")  # exists and decodes: only the path itself is wrong
    row["image"] = "../outside.png"


def _escape_absolute(row: dict[str, Any], root: Path) -> None:
    row["image"] = str((root / "images/0.png").resolve())


def _fifo(row: dict[str, Any], root: Path) -> None:
    (root / row["image"]).unlink()
    os.mkfifo(root / row["image"])  # opening it would block the step for ever


def _symlink_out(row: dict[str, Any], root: Path) -> None:
    _png(root.parent / "secret.png")
    (root / row["image"]).unlink()
    (root / row["image"]).symlink_to(root.parent / "secret.png")  # lexically inside, really outside


def _bomb(row: dict[str, Any], root: Path) -> None:
    Image.new("L", (400, 400)).save(root / row["image"])  # 160,000 pixels > max_pixels in _cfg


BadReport = tuple[dict[str, Any], dict[str, tuple[Any, str]]]  # (report, case -> (id, check))
INDEX = object()  # the case's row has no usable id: the failure names its row index

# (case, mutation of one otherwise valid row whose id is the case name, check expected to fail, id the
# failure names). All cases go into one dataset, validated once (GE costs about 0.5 s a run).
BAD_CASES: list[tuple[str, Mutation, str, Any]] = [
    ("duplicate_id", _set(id="r0"), "id_unique", "r0"),
    ("missing_id", _drop("id"), "id_missing", INDEX),
    ("int_id", _set(id=7), "id_type", 7),
    ("list_id", _set(id=["x"]), "id_type", INDEX),
    ("empty_question", _set(question="   "), "question_empty", "empty_question"),
    ("missing_question", _drop("question"), "question_missing", "missing_question"),
    ("empty_answer", _set(answer="", direct_answers=None), "answer_empty", "empty_answer"),
    ("int_answer", _set(answer=12, direct_answers=None), "answer_type", "int_answer"),
    ("missing_image_file", _set(image="images/nope.png"), "image_exists", "missing_image_file"),
    ("corrupt_image", _corrupt_image, "image_decodable", "corrupt_image"),
    ("image_too_small", _tiny_image, "image_size", "image_too_small"),
    ("path_escapes_root", _escape_relative, "image_inside_root", "path_escapes_root"),
    ("absolute_path", _escape_absolute, "image_inside_root", "absolute_path"),
    ("bad_split", _set(split="dev"), "split", "bad_split"),
    ("null_split", _set(split=None), "split", "null_split"),
    ("int_hint", _set(hint=5), "hint_type", "int_hint"),
    ("facts_row_wrong_length", _set(visual_facts={"columns": ["label", "value"], "rows": [["A"]]}),
     "visual_facts", "facts_row_wrong_length"),
    ("facts_not_table", _set(visual_facts="Apples 3, Pears 5"), "visual_facts", "facts_not_table"),
    ("direct_answers_not_str", _set(direct_answers=["5", 5]), "direct_answers", "direct_answers_not_str"),
    ("direct_answers_not_list", _set(direct_answers="5"), "direct_answers", "direct_answers_not_list"),
    ("unknown_field", _set(label="5"), "unknown_fields", "unknown_field"),
    ("answer_not_in_facts", _set(answer="Bananas", direct_answers=None), "answer_in_facts",
     "answer_not_in_facts"),
    # hostile input (issue 10): reported, never followed, opened or decoded
    ("fifo_image", _fifo, "image_exists", "fifo_image"),
    ("symlink_out_of_root", _symlink_out, "image_inside_root", "symlink_out_of_root"),
    ("decompression_bomb", _bomb, "image_decodable", "decompression_bomb"),
    ("not_utf8", _set(hint="caf\udce9 bytes"), "text_encoding", "not_utf8"),  # what surrogateescape reads
    ("nan_in_facts", _set(visual_facts={"columns": ["label", "value"], "rows": [["Pears", float("nan")]]}),
     "finite_numbers", "nan_in_facts"),
    ("inf_in_meta", _set(meta={"score": float("inf")}), "finite_numbers", "inf_in_meta"),
    ("long_question", _set(question="Which? " * 100), "field_length", "long_question"),
]


@pytest.fixture(scope="module")
def bad_report(tmp_path_factory: pytest.TempPathFactory) -> BadReport:
    """The report on the valid rows plus one mutated row per case; and each case's (id, check)."""
    tmp = tmp_path_factory.mktemp("bad")
    root = tmp / "data"
    rows = [_row(0, "train"), _row(1, "train", answer="5"), _row(2, "val"), _row(3, "test")]
    expected = {}
    for name, mutate, check, bad_id in BAD_CASES:
        row = _row(0, "train") | {"id": name, "image": f"images/{name}.png"}
        _png(root / row["image"])
        mutate(row, root)
        expected[name] = (len(rows) if bad_id is INDEX else bad_id, check)
        rows.append(row)
    for i in range(4):
        _png(root / f"images/{i}.png")
    # a FIFO must be reported, not opened: fail instead of hanging if it ever is
    signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(TimeoutError("validation blocked")))
    signal.alarm(60)
    try:
        return validate_rows(rows, root, _cfg(tmp)), expected
    finally:
        signal.alarm(0)


@pytest.mark.parametrize("case", [c[0] for c in BAD_CASES])
def test_bad_data_is_reported_with_row_id(bad_report: BadReport, case: str) -> None:
    report, expected = bad_report
    assert report["success"] is False
    bad_id, check = expected[case]
    reasons = [f["reason"] for f in report["failures"] if (f["id"], f["check"]) == (bad_id, check)]
    assert reasons, f"{case}: no failure ({bad_id!r}, {check!r}) in {report['failures']}"
    assert all(r and "\n" not in r for r in reasons)


def test_bad_data_reports_nothing_else(bad_report: BadReport) -> None:
    """Each mutated row fails only its own check; the valid rows (except r0, duplicated) pass."""
    report, expected = bad_report
    assert {(f["id"], f["check"]) for f in report["failures"]} == set(expected.values())
    failed = {e["check"] for e in report["expectations"] if not e["success"]}
    assert failed == {check for _, check in expected.values()}
    json.dumps(report)


def test_too_few_rows_in_split(dataset: tuple[Path, list[dict[str, Any]]], tmp_path: Path) -> None:
    root, rows = dataset
    rows[3]["split"] = "val"  # the only test row moves: test has 0 < min_rows["test"] = 1
    report = validate_rows(rows, root, _cfg(tmp_path))
    assert report["success"] is False
    assert report["rows_per_split"] == {"train": 2, "val": 2}
    assert [(f["id"], f["check"]) for f in report["failures"]] == [("split:test", "split_rows")]
    assert report["failures"][0]["reason"] == "split 'test' has 0 row(s), needs at least 1"


def test_answer_in_facts_only_when_configured(dataset: tuple[Path, list[dict[str, Any]]],
                                              tmp_path: Path) -> None:
    root, rows = dataset
    rows[1]["answer"] = "Bananas"
    cfg = _cfg(tmp_path)
    cfg.require_answer_in_facts = False
    assert validate_rows(rows, root, cfg)["success"] is True


def test_validate_path_writes_report_and_names_bad_json_line(
        dataset: tuple[Path, list[dict[str, Any]]], tmp_path: Path) -> None:
    root, rows = dataset
    lines = [json.dumps(r) for r in rows]
    lines.insert(2, '{"id": "r9", "question": ')  # line 3 is cut short
    (root / "samples.jsonl").write_text("\n".join(lines) + "\n")
    cfg = _cfg(tmp_path)

    report = validate_path(root, cfg)

    assert report["success"] is False
    assert [(f["id"], f["check"]) for f in report["failures"]] == [("line 3", "json")]
    assert report["failures"][0]["reason"].startswith("samples.jsonl:3: not valid JSON")
    assert report["n_rows"] == 4  # the other rows were still checked
    assert json.loads(Path(cfg.report).read_text()) == report
    assert "line 3: json: samples.jsonl:3: not valid JSON" in summarize(report)

    # the .jsonl file itself works as the path too (root = its folder)
    (root / "samples.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    report = validate_path(root / "samples.jsonl", cfg)
    assert report["success"] is True
    assert summarize(report).startswith("validation passed: 4 rows")


def test_validate_path_reads_parquet(dataset: tuple[Path, list[dict[str, Any]]], tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    root, rows = dataset
    rows = [r | {"visual_facts": None} for r in rows]  # mixed-type table cells do not fit a parquet column
    rows[2]["image"] = "../escape.png"
    pq.write_table(pa.Table.from_pylist(rows), root / "samples.parquet")
    report = validate_path(root, _cfg(tmp_path))
    assert [(f["id"], f["check"]) for f in report["failures"]] == [("r2", "image_inside_root")]


def test_missing_source_is_a_failure_not_a_crash(tmp_path: Path) -> None:
    report = validate_path(tmp_path / "nowhere", _cfg(tmp_path))
    assert report["success"] is False
    assert {f["check"] for f in report["failures"]} >= {"source", "n_rows", "split_rows"}


def test_summarize_limits_failures(bad_report: BadReport) -> None:
    report, _ = bad_report
    text = summarize(report, limit=2)
    n = len(report["failures"])
    assert text.splitlines()[0].startswith(f"validation FAILED: {report['n_rows']} rows (")
    assert text.endswith(f"... and {n - 2} more")
    first = report["failures"][0]
    assert f"  {first['id']}: {first['check']}: {first['reason']}" in text.splitlines()


def test_non_utf8_bytes_in_jsonl_name_the_row(dataset: tuple[Path, list[dict[str, Any]]], tmp_path: Path) -> None:
    root, rows = dataset
    lines = [json.dumps(r).encode() for r in rows]
    lines[1] = lines[1].replace(b"tallest bar", b"tallest \xff\xfe bar")  # raw bytes that are not UTF-8
    (root / "samples.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    report = validate_path(root, _cfg(tmp_path))
    assert [(f["id"], f["check"]) for f in report["failures"]] == [("r1", "text_encoding")]
    assert "['hint']" in report["failures"][0]["reason"]


def test_report_carries_the_digest_of_the_data(dataset: tuple[Path, list[dict[str, Any]]], tmp_path: Path) -> None:
    from dyme_core.data.ingest import dataset_digest

    root, rows = dataset
    (root / "samples.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    first = validate_path(root, _cfg(tmp_path))["data_digest"]
    assert first == dataset_digest(root) and len(first) == 64
    _png(root / "images/1.png", side=33)  # one image changes: another dataset
    assert validate_path(root, _cfg(tmp_path))["data_digest"] not in (first, None)
