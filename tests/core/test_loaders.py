"""The project-format reader and the safe image loader (dyme_core/data/loaders.py): rows load into the
same Samples, bad input fails with a message naming the file, line, row id or field, and hostile image
files (a FIFO, a symlink out of the root, a decompression bomb) raise a DataError instead of hanging or
decoding. Other sources are ingested by dyme_core/data/ingest.py (tests/core/test_ingest.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
from blocking import deadline
from PIL import Image

from dyme_core.config import DataConfig
from dyme_core.data.loaders import DataError, Dataset, decode_image, load_dataset, safe_image_file
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
    with pytest.raises(DataError, match=r"sample 'a'.*cannot decode image.*a\.png"):
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


def test_unknown_field_is_reported(tmp_path: Path) -> None:
    row = {**_samples()[0].to_dict(), "colour": "red"}
    (tmp_path / "samples.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match=r"unknown field\(s\) \['colour'\]"):
        load_dataset(DataConfig(path=str(tmp_path)))


def test_fifo_image_is_refused_without_opening_it(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.png")
    ds = Dataset(tmp_path, [Sample(id="f", image="pipe.png", question="Q?", answer="1")])
    with deadline(10), pytest.raises(DataError, match=r"sample 'f'.*is a FIFO, not a regular file"):
        ds.load_image(ds.samples[0])
    with deadline(10), pytest.raises(DataError, match="FIFO"):
        safe_image_file(tmp_path, "pipe.png")


def test_symlink_leaving_the_root_is_refused_one_inside_is_fine(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _png(tmp_path / "outside.png")
    _png(root / "images/real.png", "blue")
    (root / "images").mkdir(exist_ok=True)
    (root / "images/escape.png").symlink_to(tmp_path / "outside.png")
    (root / "images/inside.png").symlink_to(root / "images/real.png")
    ds = Dataset(root, [Sample(id="out", image="images/escape.png", question="Q?", answer="1"),
                        Sample(id="in", image="images/inside.png", question="Q?", answer="1"),
                        Sample(id="dots", image="../outside.png", question="Q?", answer="1")])
    with pytest.raises(DataError, match=r"sample 'out'.*symlink that leaves the dataset root"):
        ds.load_image(ds.samples[0])
    assert ds.load_image(ds.samples[1]).getpixel((0, 0)) == (0, 0, 255)
    with pytest.raises(DataError, match=r"sample 'dots'.*escapes the dataset root"):
        ds.load_image(ds.samples[2])


def test_decompression_bomb_is_refused_before_decoding(tmp_path: Path) -> None:
    # 4000 x 4000 black pixels compress to a few kB: the header says 16 M pixels
    Image.new("L", (4000, 4000)).save(tmp_path / "bomb.png")
    assert (tmp_path / "bomb.png").stat().st_size < 100_000
    ds = Dataset(tmp_path, [Sample(id="b", image="bomb.png", question="Q?", answer="1")], max_pixels=1_000_000)
    with pytest.raises(DataError, match=r"sample 'b'.*over the pixel limit of 1000000"):
        ds.load_image(ds.samples[0])
    with pytest.raises(DataError, match=r"4000x4000 = 16000000 pixels, over the pixel limit of 10000000"):
        decode_image((tmp_path / "bomb.png").read_bytes(), max_pixels=10_000_000)
    # under the limit, the same file decodes
    assert decode_image(tmp_path / "bomb.png", max_pixels=16_000_000).size == (4000, 4000)
