"""Empty sources (issue 22, item 4): `dyme ingest` refuses, in one line and without a traceback, a source with
no rows (a Hugging Face folder whose Parquet files hold 0 rows, an empty samples file, an empty DyME JSON list)
and a source with no train rows, and leaves the dataset a previous ingest wrote untouched."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dyme_core import cli
from dyme_core.data.schema import Sample, write_jsonl

CHARTQA = pa.schema([("query", pa.string()), ("label", pa.list_(pa.string())),
                     ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())]))])


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 40, 40)).save(buf, format="PNG")
    return buf.getvalue()


def _hf_folder(root: Path, rows: dict[str, int]) -> Path:
    """A hub-layout folder (data/<split>-00000-of-00001.parquet) with ChartQA's columns and `rows[split]` rows."""
    (root / "data").mkdir(parents=True)
    for split, n in rows.items():
        table = pa.table({"query": [f"q{i}?" for i in range(n)], "label": [[str(i)] for i in range(n)],
                          "image": [{"bytes": _png(), "path": None} for _ in range(n)]}, schema=CHARTQA)
        pq.write_table(table, root / "data" / f"{split}-00000-of-00001.parquet")
    return root


def _project(root: Path, splits: list[str]) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "images" / "a.png").write_bytes(_png())
    write_jsonl([Sample(id=f"s{i}", image="images/a.png", question="How many?", answer="3", split=split)
                 for i, split in enumerate(splits)], root / "samples.jsonl")
    return root


def _dyme_json(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "train.json").write_text("[]")
    return root / "train.json"


@pytest.fixture
def published(tmp_path: Path) -> Path:
    """data.out_dir holding a dataset from an earlier, good ingest."""
    out = tmp_path / "dataset"
    args = ["ingest", f"data.path={_project(tmp_path / 'good', ['train', 'train', 'test'])}", f"data.out_dir={out}",
            f"data.report={tmp_path / 'ingest.json'}"]
    assert cli.main(args) == 0
    return out


# source -> what the one line must say
CASES = {
    "hf folder, every parquet file 0 rows": (lambda t: _hf_folder(t, {"train": 0, "test": 0}),
                                            "data/test-00000-of-00001.parquet, data/train-00000-of-00001.parquet "
                                            "hold 0 rows (an empty source or split)"),
    "hf folder, train parquet 0 rows": (lambda t: _hf_folder(t, {"train": 0, "test": 2}),
                                        "data/train-00000-of-00001.parquet holds 0 rows"),
    "hf folder, only a test split": (lambda t: _hf_folder(t, {"test": 3}), "no train rows (test: 3)"),
    "empty samples.jsonl": (lambda t: _project(t, []), "the source has no rows"),
    "project rows all in test and val": (lambda t: _project(t, ["test", "val", "test"]),
                                         "no train rows (test: 2, val: 1)"),
    "empty DyME JSON list": (_dyme_json, "the source has no rows"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_an_empty_source_is_refused_in_one_line(case: str, tmp_path: Path, published: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    make, expected = CASES[case]
    capsys.readouterr()
    before = (published / "manifest.json").read_text()
    source = make(tmp_path / "source")
    rc = cli.main(["ingest", f"data.path={source}", f"data.out_dir={published}",
                   f"data.report={tmp_path / 'ingest2.json'}"])
    err = capsys.readouterr().err
    # `datasets` draws its progress bar ("Generating test split: ...") on a source it reads; the error is one line
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("Generating ")]
    assert rc == 1 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert lines[0].startswith(f"dyme ingest: error: {source}") and expected in lines[0], lines[0]
    assert (published / "manifest.json").read_text() == before  # the earlier dataset is untouched
    assert json.loads(before)["rows_per_split"]["train"] == 2
