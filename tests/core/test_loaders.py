"""Every input format loads into the same Samples, and bad input fails with a message that names the
file, line, row id or field (dyme_core/data/loaders.py). All data is written to tmp_path; no network."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from dyme_core.config import DataConfig
from dyme_core.data.loaders import DataError, Dataset, detect_format, load_dataset
from dyme_core.data.schema import Sample, write_jsonl

FACTS = {"title": "Sales", "columns": ["label", "Sales"], "rows": [["Phones", 12], ["Tablets", 3.5]]}


def _png(path: Path, color: str = "red", size: tuple[int, int] = (8, 6)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def _samples() -> list[Sample]:
    return [
        Sample(id="a", image="images/a.png", question="How many?", answer="12", hint="Goal: count.",
               visual_facts=FACTS, split="train", qtype="count", meta={"chart_type": "bar"}),
        Sample(id="b", image="images/b.png", question="Which?", answer="Tablets", direct_answers=["Tablets"],
               split="test"),
    ]


def _project(tmp_path: Path) -> Path:
    _png(tmp_path / "images/a.png")
    _png(tmp_path / "images/b.png", "blue")
    write_jsonl(_samples(), tmp_path / "samples.jsonl")
    return tmp_path


def test_project_jsonl_folder_round_trips_and_loads_images(tmp_path: Path) -> None:
    ds = load_dataset(DataConfig(path=str(_project(tmp_path))))
    assert ds.root == tmp_path and ds.samples == _samples()
    assert [s.id for s in ds.split("test")] == ["b"]
    image = ds.load_image(ds.samples[1])
    assert image.mode == "RGB" and image.size == (8, 6) and image.getpixel((0, 0)) == (0, 0, 255)


def test_project_jsonl_file_with_image_root(tmp_path: Path) -> None:
    _project(tmp_path / "imgs")
    write_jsonl(_samples(), tmp_path / "meta" / "rows.jsonl")
    ds = load_dataset(DataConfig(path=str(tmp_path / "meta/rows.jsonl"), image_root=str(tmp_path / "imgs")))
    assert ds.root == tmp_path / "imgs"
    assert ds.load_image(ds.samples[0]).size == (8, 6)


def test_project_parquet_with_json_string_facts_and_nulls(tmp_path: Path) -> None:
    _project(tmp_path)
    (tmp_path / "samples.jsonl").unlink()
    rows = [s.to_dict() for s in _samples()]
    for row in rows:
        # mixed-type table rows do not fit an Arrow list column, so they are stored as JSON text
        row["visual_facts"] = json.dumps(row["visual_facts"])
        row["meta"] = json.dumps(row["meta"])
    pd.DataFrame(rows).to_parquet(tmp_path / "samples.parquet")
    ds = load_dataset(DataConfig(path=str(tmp_path)))
    assert ds.samples == _samples()
    assert ds.samples[1].visual_facts is None and ds.samples[1].hint is None


def test_dyme_json_fills_ids_and_splits(tmp_path: Path) -> None:
    _png(tmp_path / "pics/1.png")
    _png(tmp_path / "pics/2.png")
    rows = [
        {"question": "Q1?", "answer": "7", "hint": "Look at the bar.", "image": "pics/1.png"},
        {"question": "Q2?", "answer": 3.5, "image": "pics/2.png", "id": "custom", "split": "test"},
    ]
    path = tmp_path / "chart_train.json"
    path.write_text(json.dumps(rows))
    assert detect_format(str(path)) == "dyme_json"
    ds = load_dataset(DataConfig(path=str(path), task="vqa"))
    first, second = ds.samples
    assert (first.id, first.split, first.task) == ("chart_train-0", "train", "vqa")
    assert first.hint == "Look at the bar."
    assert (second.id, second.split, second.answer, second.hint) == ("custom", "test", "3.5", None)
    assert ds.load_image(second).size == (8, 6)


def test_project_json_list_is_told_apart_from_dyme_json(tmp_path: Path) -> None:
    path = tmp_path / "samples.json"
    path.write_text(json.dumps([s.to_dict() for s in _samples()]))
    assert detect_format(str(path)) == "project"
    assert load_dataset(DataConfig(path=str(path))).samples == _samples()


def _hf_images() -> list[Image.Image]:
    return [Image.new("RGB", (10, 7), c) for c in ("red", "green", "blue")]


def test_hf_saved_dataset_with_chartqa_columns(tmp_path: Path) -> None:
    import datasets  # here, not at the top: it takes seconds to import for the whole test session

    images = _hf_images()
    train = datasets.Dataset.from_dict(
        {"query": ["Max?", "Sum?"], "label": [["Phones"], ["15.5"]], "image": images[:2]})
    test = datasets.Dataset.from_dict(
        {"query": ["Min?"], "label": [["Tablets", "tablets"]], "image": images[2:]})
    datasets.DatasetDict(train=train, test=test).save_to_disk(str(tmp_path / "chartqa"))
    cfg = DataConfig(path=str(tmp_path / "chartqa"))
    assert detect_format(cfg.path) == "hf"

    ds = load_dataset(cfg, cache_dir=tmp_path / "cache")
    assert ds.root.parent == tmp_path / "cache"
    assert [(s.id, s.split, s.question, s.answer) for s in ds.samples] == [
        ("chartqa-train-00000", "train", "Max?", "Phones"),
        ("chartqa-train-00001", "train", "Sum?", "15.5"),
        ("chartqa-test-00000", "test", "Min?", "Tablets"),  # no "val" split in the data: skipped
    ]
    assert ds.samples[2].direct_answers == ["Tablets", "tablets"]
    assert ds.load_image(ds.samples[2]).getpixel((0, 0)) == (0, 0, 255)

    # a second load reuses the cached PNGs instead of writing them again
    cached = ds.image_path(ds.samples[0])
    stamp = cached.stat().st_mtime_ns
    again = load_dataset(cfg, cache_dir=tmp_path / "cache")
    assert again.samples == ds.samples and cached.stat().st_mtime_ns == stamp


def test_hf_column_and_split_mapping_with_list_answers(tmp_path: Path) -> None:
    import datasets

    data = datasets.Dataset.from_dict({
        "qid": ["q/1", "q/2"], "prompt": ["Is A > B?", "Value of A?"],
        "answers": [["Yes", "yes"], ["4"]], "picture": _hf_images()[:2], "kind": ["comparison", "lookup"],
    })
    datasets.DatasetDict(training=data).save_to_disk(str(tmp_path / "vqa"))
    cfg = DataConfig(path=str(tmp_path / "vqa"), task="vqa",
                     hf_split_map={"train": "training", "test": "test"},
                     hf_columns={"id": "qid", "question": "prompt", "answer": "answers", "image": "picture",
                                 "qtype": "kind"})
    ds = load_dataset(cfg, cache_dir=tmp_path / "cache")
    first, second = ds.samples
    assert (first.id, first.answer, first.direct_answers, first.qtype) == ("q/1", "Yes", ["Yes", "yes"],
                                                                          "comparison")
    assert (second.split, second.task, second.references()) == ("train", "vqa", ["4"])
    assert "/" not in Path(first.image).name  # ids with '/' still give a flat file name
    assert ds.load_image(first).size == (10, 7)


def test_hf_missing_column_names_the_column(tmp_path: Path) -> None:
    import datasets

    data = datasets.Dataset.from_dict({"question": ["Q?"], "label": [["1"]], "image": _hf_images()[:1]})
    data.save_to_disk(str(tmp_path / "hf"))
    with pytest.raises(DataError, match=r"'query'.*hf_columns"):
        load_dataset(DataConfig(path=str(tmp_path / "hf")), cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("name", ["missing.jsonl", "missing_dir", "missing.json"])
def test_missing_path_is_reported_as_not_found(tmp_path: Path, name: str) -> None:
    with pytest.raises(DataError, match=f"dataset not found: .*{name}"):
        load_dataset(DataConfig(path=str(tmp_path / name)))


def test_explicit_project_format_on_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="dataset not found"):
        load_dataset(DataConfig(path=str(tmp_path), format="project"))


def test_corrupt_or_missing_image_names_the_sample(tmp_path: Path) -> None:
    ds = load_dataset(DataConfig(path=str(_project(tmp_path))))
    (tmp_path / "images/a.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match=r"sample 'a'.*cannot decode image .*a\.png"):
        ds.load_image(ds.samples[0])
    (tmp_path / "images/b.png").unlink()
    with pytest.raises(DataError, match=r"sample 'b'.*image not found: .*b\.png"):
        ds.load_image(ds.samples[1])


def test_truncated_image_is_a_data_error(tmp_path: Path) -> None:
    _png(tmp_path / "big.png", size=(64, 64))
    data = (tmp_path / "big.png").read_bytes()
    (tmp_path / "big.png").write_bytes(data[: len(data) // 2])
    ds = Dataset(tmp_path, [Sample(id="t", image="big.png", question="Q?", answer="1")])
    with pytest.raises(DataError, match="sample 't'"):
        ds.load_image(ds.samples[0])


def test_bad_json_line_names_file_and_line(tmp_path: Path) -> None:
    good = json.dumps(_samples()[0].to_dict())
    (tmp_path / "samples.jsonl").write_text(f"{good}\n{{not json\n")
    with pytest.raises(DataError, match=r"samples\.jsonl:2: not valid JSON"):
        load_dataset(DataConfig(path=str(tmp_path)))


def test_missing_required_field_names_row_and_field(tmp_path: Path) -> None:
    row = _samples()[0].to_dict()
    del row["answer"]
    (tmp_path / "samples.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match=r"sample 'a': missing required field 'answer'"):
        load_dataset(DataConfig(path=str(tmp_path)))
    (tmp_path / "d.json").write_text(json.dumps([{"question": "Q?", "image": "x.png"}]))
    with pytest.raises(DataError, match=r"sample 'd-0': missing required field 'answer'"):
        load_dataset(DataConfig(path=str(tmp_path / "d.json")))


def test_unknown_field_is_reported(tmp_path: Path) -> None:
    row = {**_samples()[0].to_dict(), "colour": "red"}
    (tmp_path / "samples.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match=r"unknown field\(s\) \['colour'\]"):
        load_dataset(DataConfig(path=str(tmp_path)))
