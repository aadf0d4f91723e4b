"""The ingest step (dyme_core/data/ingest.py): every source becomes one materialised dataset that later
steps open, with the row-level normalisation and hostile-input handling of issues 8 and 10, and the
validation report bound to the data's digest. All data is written to tmp_path; no network."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from blocking import deadline
from PIL import Image

from dyme_core import steps
from dyme_core.config import Config, load_config
from dyme_core.data.ingest import dataset_digest, detect_format, ingest, open_dataset
from dyme_core.data.loaders import DataError
from dyme_core.data.schema import Sample, write_jsonl

COLORS = ("red", "green", "blue", "yellow", "purple", "orange")


def _png(path: Path, color: str = "red", size: tuple[int, int] = (24, 18)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def _png_bytes(tmp_path: Path, color: str) -> bytes:
    _png(tmp_path / f"_{color}.png", color)
    return (tmp_path / f"_{color}.png").read_bytes()


def _cfg(tmp_path: Path, path: str | Path, *overrides: str) -> Config:
    return load_config(None, [f"data.path={path}", f"data.out_dir={tmp_path / 'out'}",
                              f"data.report={tmp_path / 'reports/ingest.json'}",
                              f"validate.report={tmp_path / 'reports/validation.json'}", *overrides])


def _project(root: Path) -> list[Sample]:
    """A project-format folder: 2 train rows sharing one chart, 1 val, 1 test."""
    _png(root / "images/a.png", "red")
    _png(root / "images/b.png", "blue")
    samples = [
        Sample(id="a1", image="images/a.png", question="How many phones?", answer="12",
               visual_facts={"columns": ["label", "v"], "rows": [["Phones", 12]]}, split="train"),
        Sample(id="a2", image="images/a.png", question="Which is larger?", answer="Phones", split="train",
               hint="Phones is 12."),
        Sample(id="b1", image="images/b.png", question="Colour?", answer="blue", split="val", task="vqa"),
        Sample(id="b2", image="images/b.png", question="Count?", answer="1", split="test"),
    ]
    write_jsonl(samples, root / "samples.jsonl")
    return samples


# --------------------------------------------------------------------------------------------------
# Sources


def test_project_folder_is_materialised_and_opens(tmp_path: Path) -> None:
    src = tmp_path / "src"
    original = _project(src)
    report = ingest(_cfg(tmp_path, src))

    out = tmp_path / "out"
    assert report["format"] == "project"
    assert report["rows_per_split"] == {"train": 2, "val": 1, "test": 1}
    assert report["carve"] == {} and report["n_dropped"] == 0
    # the shared chart is stored once; images are files under images/, named by content
    assert report["n_images"] == 2 and len(list((out / "images").iterdir())) == 2
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["digest"] == dataset_digest(out) == report["digest"]
    assert json.loads((tmp_path / "reports/ingest.json").read_text()) == report
    assert sorted(p.name for p in out.iterdir()) == ["images", "manifest.json", "samples.parquet"]

    ds = open_dataset(out)
    by_id = {s.id: s for s in ds.samples}
    for s in original:
        got = by_id[s.id]
        assert (got.question, got.answer, got.split, got.task, got.hint, got.visual_facts) == \
            (s.question, s.answer, s.split, s.task, s.hint, s.visual_facts)
        assert got.image.startswith("images/")
    assert by_id["a1"].image == by_id["a2"].image
    assert ds.load_image(by_id["b1"]).getpixel((0, 0)) == (0, 0, 255)
    # the same source gives the same dataset (digest), so DVC does not rerun what follows
    assert ingest(_cfg(tmp_path, src))["digest"] == report["digest"]


def test_dyme_json_with_official_extra_fields_and_numeric_answer(tmp_path: Path) -> None:
    _png(tmp_path / "pics/1.png")
    prompt = "Look at the chart and think step by step, then answer.\nQuestion: {}"
    rows = [{"question": prompt.format(f"Value {i}?"), "question_wo_prompt": f"Value {i}?",
             "answer": i * 1.5 if i % 2 else i, "hint": f"The bar reads {i}.", "image": "pics/1.png",
             "human_or_machine": i % 2, "visual_fact": f"bar {i}: {i}"} for i in range(20)]
    rows[3] = {"question": 2024, "answer": 4.5, "image": "pics/1.png"}  # a numeric question, no extras
    # an official SFT label: reasoning, then the answer flag and the answer
    rows[5]["answer"] = "The bar for 5 reads 7.5 on the axis.\nAnswer: 7.5"
    del rows[5]["hint"]
    path = tmp_path / "chart_train.json"
    path.write_text(json.dumps(rows))
    assert detect_format(str(path)) == "dyme_json"

    report = ingest(_cfg(tmp_path, path))
    ds = open_dataset(tmp_path / "out")
    by_id = {s.id: s for s in ds.samples}
    assert len(by_id) == 20 and report["n_dropped"] == 0
    first = by_id["chart_train-0"]
    # the pure question is ours (our steps add their own prompt); the extras are kept in meta
    assert first.question == "Value 0?"
    assert first.meta == {"question_wo_prompt": "Value 0?", "human_or_machine": 0, "visual_fact": "bar 0: 0",
                          "question_with_prompt": prompt.format("Value 0?")}
    assert (by_id["chart_train-1"].answer, by_id["chart_train-4"].answer) == ("1.5", "4")
    assert (by_id["chart_train-3"].question, by_id["chart_train-3"].answer) == ("2024", "4.5")
    fifth = by_id["chart_train-5"]
    assert (fifth.answer, fifth.hint) == ("7.5", "The bar for 5 reads 7.5 on the axis.")
    assert all(isinstance(s.answer, str) and isinstance(s.question, str) for s in ds.samples)
    # a training file has no val/test: both carved from train, and the report says so
    assert report["rows_per_split"] == {"train": 16, "val": 2, "test": 2}
    assert report["carve"]["rows"] == {"test": 2, "val": 2} and report["carve"]["seed"] == 0


def test_dyme_json_absolute_image_paths_need_an_image_root(tmp_path: Path) -> None:
    _png(tmp_path / "store/charts/1.png")
    rows = [{"question": "Q?", "answer": "1", "image": str(tmp_path / "store/charts/1.png")}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"row 0 \(id 'd-0'\): image path .* is absolute; set data.image_root"):
        ingest(_cfg(tmp_path, tmp_path / "d.json"))
    report = ingest(_cfg(tmp_path, tmp_path / "d.json", f"data.image_root={tmp_path / 'store'}"))
    assert report["n_rows"] == 1
    with pytest.raises(DataError, match="escapes the dataset root"):  # absolute, but outside the root
        ingest(_cfg(tmp_path, tmp_path / "d.json", f"data.image_root={tmp_path / 'other'}"))


def _chartqa_records(tmp_path: Path, n: int, start: int = 0) -> dict[str, list[Any]]:
    images = [{"bytes": _png_bytes(tmp_path, COLORS[i % len(COLORS)]), "path": None} for i in range(start, start + n)]
    return {"imgname": [f"{i}.png" for i in range(start, start + n)],
            "query": [f"What is the value for item {i}?" for i in range(start, start + n)],
            "label": [[str(i * 10)] if i % 3 else [f"{i}%", str(i)] for i in range(start, start + n)],
            "human_or_machine": [i % 2 for i in range(start, start + n)],
            "image": images}


def test_local_hf_parquet_folder_in_hub_layout_with_human_only(tmp_path: Path) -> None:
    import datasets

    features = datasets.Features({"imgname": datasets.Value("string"), "query": datasets.Value("string"),
                                  "label": datasets.Sequence(datasets.Value("string")),
                                  "human_or_machine": datasets.ClassLabel(names=["human", "machine"]),
                                  "image": datasets.Image()})
    folder = tmp_path / "ChartQA"
    for split, (n, start) in {"train": (8, 0), "val": (4, 100), "test": (6, 200)}.items():
        part = datasets.Dataset.from_dict(_chartqa_records(tmp_path, n, start), features=features)
        (folder / "data").mkdir(parents=True, exist_ok=True)
        part.to_parquet(str(folder / f"data/{split}-00000-of-00001.parquet"))
    assert detect_format(str(folder)) == "hf"

    report = ingest(_cfg(tmp_path, folder, "data.human_only=true"))
    # ChartQA's human split: odd items are machine-made and dropped, and counted
    assert report["rows_per_split"] == {"train": 4, "val": 2, "test": 3}
    assert report["dropped"] == {"machine_generated": 9} and report["n_dropped"] == 9
    assert report["carve"] == {}
    ds = open_dataset(tmp_path / "out")
    test = ds.split("test")
    first = next(s for s in test if s.question == "What is the value for item 204?")
    assert (first.answer, first.direct_answers) == ("204%", ["204%", "204"])  # a label list: any is right
    assert first.meta["imgname"] == "204.png" and first.meta["human_or_machine"] == 0
    assert ds.load_image(first).size == (24, 18)


def test_saved_to_disk_dataset_is_the_train_split_and_is_carved(tmp_path: Path) -> None:
    import io

    import datasets

    records = _chartqa_records(tmp_path, 30)
    records["image"] = [Image.open(io.BytesIO(r["bytes"])) for r in records["image"]]
    datasets.Dataset.from_dict(records).save_to_disk(str(tmp_path / "saved"))  # one Dataset, no splits

    report = ingest(_cfg(tmp_path, tmp_path / "saved", "data.val_fraction=0.2", "data.test_fraction=0.1"))
    assert report["format"] == "hf"
    assert report["rows_per_split"] == {"train": 21, "val": 6, "test": 3}
    ds = open_dataset(tmp_path / "out")
    assert {s.answer for s in ds.samples} >= {"10", "0%"}


def test_carve_is_deterministic_and_independent_of_row_order(tmp_path: Path) -> None:
    _png(tmp_path / "i.png")
    rows = [{"id": f"q{i}", "question": f"Q{i}?", "answer": str(i), "image": "i.png"} for i in range(50)]

    def carve(order: list[dict[str, Any]], *extra: str) -> dict[str, str]:
        (tmp_path / "d.json").write_text(json.dumps(order))
        ingest(_cfg(tmp_path, tmp_path / "d.json", "data.val_fraction=0.2", *extra))
        return {s.id: s.split for s in open_dataset(tmp_path / "out").samples}

    first = carve(rows)
    assert sum(v == "val" for v in first.values()) == 10 and sum(v == "test" for v in first.values()) == 5
    assert carve(rows) == first
    assert carve(list(reversed(rows))) == first
    assert carve(rows, "data.split_seed=1") != first


# --------------------------------------------------------------------------------------------------
# Bad rows


def _fifo(root: Path, row: dict[str, Any]) -> None:
    os.mkfifo(root / "pipe.png")
    row["image"] = "pipe.png"


def _symlink_out(root: Path, row: dict[str, Any]) -> None:
    _png(root.parent / "secret.png")
    (root / "link.png").symlink_to(root.parent / "secret.png")
    row["image"] = "link.png"


def _bomb(root: Path, row: dict[str, Any]) -> None:
    Image.new("L", (3000, 3000)).save(root / "bomb.png")  # 9 M pixels, a few kB of PNG
    row["image"] = "bomb.png"


def _nan_facts(root: Path, row: dict[str, Any]) -> None:
    row["visual_facts"] = {"columns": ["label", "v"], "rows": [["A", float("nan")]]}


def _long_question(root: Path, row: dict[str, Any]) -> None:
    row["question"] = "why? " * 1000


def _list_in_question(root: Path, row: dict[str, Any]) -> None:
    row["question"] = ["not", "text"]


# (case, mutation of row "bad" of a JSONL project folder, the reason the one-line error must state)
BAD = [
    ("fifo", _fifo, "is a FIFO, not a regular file"),
    ("symlink_out_of_root", _symlink_out, "symlink that leaves the dataset root"),
    ("decompression_bomb", _bomb, "over the pixel limit of 1000000"),
    ("nan_in_visual_facts", _nan_facts, "visual_facts holds a NaN or Infinity"),
    ("over_long_question", _long_question, "question is 5000 characters, over validate.max_question_chars=4000"),
    ("question_not_text", _list_in_question, "question must be text, got list"),
]


def _bad_folder(root: Path, mutate: Any) -> None:
    _png(root / "ok.png")
    rows = [{"id": f"ok{i}", "image": "ok.png", "question": "Q?", "answer": "1", "split": s}
            for i, s in enumerate(("train", "train", "test"))]
    bad = {"id": "bad", "image": "ok.png", "question": "Q?", "answer": "1"}
    mutate(root, bad)
    rows.insert(1, bad)
    (root / "samples.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


@pytest.mark.parametrize(("case", "mutate", "reason"), BAD, ids=[b[0] for b in BAD])
def test_bad_row_fails_with_row_and_reason_or_is_dropped(tmp_path: Path, case: str, mutate: Any,
                                                         reason: str) -> None:
    src = tmp_path / "src"
    _bad_folder(src, mutate)
    with deadline(30), pytest.raises(DataError) as err:
        ingest(_cfg(tmp_path, src, "validate.max_pixels=1000000"))
    message = str(err.value)
    assert "\n" not in message and "row 1 (id 'bad')" in message and reason in message
    assert not (tmp_path / "out").exists(), "a failed ingest must not leave a dataset behind"

    with deadline(30):
        report = ingest(_cfg(tmp_path, src, "validate.max_pixels=1000000", "data.on_bad_row=drop"))
    assert report["n_dropped"] == 1 and report["rows_per_split"] == {"train": 2, "val": 0, "test": 1}
    dropped = report["dropped_rows"][0]
    assert dropped["row"].endswith("row 1 (id 'bad')") and reason in dropped["reason"]
    assert sum(report["dropped"].values()) == 1
    assert "bad" not in {s.id for s in open_dataset(tmp_path / "out").samples}


def test_non_utf8_bytes_name_the_row(tmp_path: Path) -> None:
    _png(tmp_path / "src/i.png")
    good = json.dumps({"id": "g", "image": "i.png", "question": "Q?", "answer": "1"}).encode()
    bad = json.dumps({"id": "b", "image": "i.png", "question": "QX?", "answer": "1"}).encode().replace(b"QX", b"Q\xff")
    (tmp_path / "src/samples.jsonl").write_bytes(good + b"\n" + bad + b"\n")
    with pytest.raises(DataError, match=r"row 1 \(id 'b'\): question is not valid UTF-8 text"):
        ingest(_cfg(tmp_path, tmp_path / "src"))


def test_failed_ingest_keeps_the_previous_dataset(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _project(src)
    digest = ingest(_cfg(tmp_path, src))["digest"]
    (src / "images/b.png").write_bytes(b"broken")
    with pytest.raises(DataError, match=r"id 'b1'.*cannot decode image"):
        ingest(_cfg(tmp_path, src))
    assert dataset_digest(tmp_path / "out") == digest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "reports", "src"]  # no staging left


def test_human_only_keeps_rows_without_the_field_and_says_so(tmp_path: Path) -> None:
    _project(tmp_path / "src")  # no human_or_machine anywhere: the official loader keeps such rows
    report = ingest(_cfg(tmp_path, tmp_path / "src", "data.human_only=true"))
    assert report["n_rows"] == 4 and report["n_dropped"] == 0
    assert "data.human_only: 4 row(s) without human_or_machine kept as human-written" in report["notes"]


def test_missing_source_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="dataset not found"):
        ingest(_cfg(tmp_path, tmp_path / "nowhere" / "x.json"))
    with pytest.raises(DataError, match="dataset not found"):
        open_dataset(tmp_path / "nowhere")


# --------------------------------------------------------------------------------------------------
# Validation bound to the data


def test_train_refuses_a_report_made_for_other_data(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _project(src)
    cfg = _cfg(tmp_path, src)
    with pytest.raises(steps.ValidationFailed, match="no validation report"):
        steps.check_validated(cfg)
    ingest(cfg)
    report = steps.validate(cfg)
    assert report["success"] is True and report["data_digest"] == dataset_digest(tmp_path / "out")
    steps.check_validated(cfg)  # the report fits the data

    _png(src / "images/b.png", "green")  # the source changes and is ingested again
    ingest(cfg)
    with pytest.raises(steps.ValidationFailed, match="was made for other data"):
        steps.check_validated(cfg)
    steps.validate(cfg)
    steps.check_validated(cfg)


# --------------------------------------------------------------------------------------------------
# The CLI


def _dyme(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dyme_core.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_cli_ingest_help_and_one_line_errors(tmp_path: Path) -> None:
    done = _dyme("ingest", "--help", cwd=tmp_path)
    assert done.returncode == 0
    assert all(k in done.stdout for k in ("data.path", "data.on_bad_row", "data.human_only", "data.val_fraction",
                                          "validate.max_pixels", "synth.n_train"))

    src = tmp_path / "src"
    _bad_folder(src, _fifo)
    done = _dyme("ingest", f"data.path={src}", cwd=tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "id 'bad'" in lines[0] and "FIFO" in lines[0], done.stderr

    done = _dyme("ingest", f"data.path={src}", "data.on_bad_row=drop", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "3 rows (train=2, val=0, test=1)" in done.stdout and "1 dropped" in done.stdout
    assert pq.read_table(tmp_path / "data/dataset/samples.parquet").num_rows == 3


def test_cli_train_refuses_a_report_for_other_data(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _project(src)
    assert _dyme("ingest", f"data.path={src}", cwd=tmp_path).returncode == 0
    assert _dyme("validate", cwd=tmp_path).returncode == 0
    _png(src / "images/a.png", "black")
    assert _dyme("ingest", f"data.path={src}", cwd=tmp_path).returncode == 0  # other data, old report
    done = _dyme("train", cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "was made for other data" in done.stderr


def test_synthetic_source_is_deterministic(tmp_path: Path) -> None:
    tiny = ["synth.n_train=5", "synth.n_val=1", "synth.n_test=2", "synth.image_size=64"]
    first = ingest(_cfg(tmp_path, "synthetic", *tiny))
    assert (first["format"], first["rows_per_split"], first["carve"]) == \
        ("synthetic", {"train": 5, "val": 1, "test": 2}, {})
    ds = open_dataset(tmp_path / "out")
    assert all(s.visual_facts and s.hint for s in ds.samples)  # the table and a reference trace survive
    assert ingest(_cfg(tmp_path, "synthetic", *tiny))["digest"] == first["digest"]
    assert ingest(_cfg(tmp_path, "synthetic", *tiny, "synth.seed=1"))["digest"] != first["digest"]
