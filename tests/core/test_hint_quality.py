"""Trace quality as data (``data.hint_quality``): the same questions with reference traces of three qualities
(DyME's ``train_high.json`` / ``train_medium.json`` / ``train_low.json``, or the synthetic set's
``meta.traces``) ingest side by side into one dataset; the chosen quality's trace is the hint and every
quality's stays in ``meta.traces``. All data is written to tmp_path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from dyme_core import steps
from dyme_core.config import Config, ConfigError, load_config
from dyme_core.data.ingest import detect_format, ingest, open_dataset
from dyme_core.data.loaders import DataError

QUESTIONS = [("How many more boxes of Pears than Apples were sold?", "22"),
             ("What is the total of Pears and Apples?", "134"),
             ("Which fruit sold the most?", "Pears"),
             ("What is the value of Limes?", "12")]
HINTS = {
    "high": "Pears 78, Apples 56 and Limes 12.",
    "medium": "The chart shows boxes sold for 3 fruits; the result follows from it.",
    "low": "Looking at the picture, Pears are maybe 70 or so.",
}


def _official(folder: Path, stem: str = "train", qualities: tuple[str, ...] = ("high", "medium", "low")) -> None:
    """DyME's layout: one file per trace quality, the same questions in the same order, hints differing."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 18), "red").save(folder / "chart.png")
    for quality in qualities:
        rows = [{"question": q, "answer": a, "hint": f"{HINTS[quality]} (row {i})", "image": "chart.png",
                 "human_or_machine": 0} for i, (q, a) in enumerate(QUESTIONS)]
        (folder / f"{stem}_{quality}.json").write_text(json.dumps(rows))


def _cfg(tmp_path: Path, path: Path | str, *overrides: str) -> Config:
    return load_config(None, [f"data.path={path}", f"data.out_dir={tmp_path / 'out'}",
                              f"data.report={tmp_path / 'ingest.json'}", "data.val_fraction=0",
                              "data.test_fraction=0", *overrides])


@pytest.mark.parametrize("quality", ["high", "medium", "low"])
def test_a_folder_of_quality_files_ingests_side_by_side(tmp_path: Path, quality: str) -> None:
    _official(tmp_path / "dyme")
    assert detect_format(str(tmp_path / "dyme")) == "dyme_json"
    report = ingest(_cfg(tmp_path, tmp_path / "dyme", f"data.hint_quality={quality}"))
    samples = open_dataset(tmp_path / "out").samples
    assert [s.id for s in samples] == ["train-0", "train-1", "train-2", "train-3"]  # one row per question
    assert [(s.question, s.answer) for s in samples] == QUESTIONS
    for i, s in enumerate(samples):
        assert s.hint == f"{HINTS[quality]} (row {i})"  # the chosen quality is the hint
        assert s.meta["traces"] == {q: f"{HINTS[q]} (row {i})" for q in HINTS}  # every quality is kept
        assert s.split == "train" and s.meta["human_or_machine"] == 0
    assert any(f"hint_quality {quality}" in note for note in report["notes"])


def test_a_folder_of_quality_files_needs_a_choice(tmp_path: Path) -> None:
    _official(tmp_path / "dyme")
    with pytest.raises(DataError, match=r"holds traces of several qualities .*train_high.json.*set data.hint_quality"):
        ingest(_cfg(tmp_path, tmp_path / "dyme"))


def test_one_quality_file_gives_its_hints_and_keeps_its_siblings(tmp_path: Path) -> None:
    _official(tmp_path / "dyme")
    ingest(_cfg(tmp_path, tmp_path / "dyme/train_low.json"))
    first = open_dataset(tmp_path / "out").samples[0]
    assert first.hint == f"{HINTS['low']} (row 0)" and set(first.meta["traces"]) == {"high", "medium", "low"}
    ingest(_cfg(tmp_path, tmp_path / "dyme/train_low.json", "data.hint_quality=high"))  # the choice wins
    assert open_dataset(tmp_path / "out").samples[0].hint == f"{HINTS['high']} (row 0)"


def test_quality_files_must_hold_the_same_questions(tmp_path: Path) -> None:
    _official(tmp_path / "dyme")
    low = tmp_path / "dyme/train_low.json"
    rows = json.loads(low.read_text())
    rows[2]["question"] = "Which fruit sold the least?"
    low.write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"train_low.json: no row matches .*train_high.json row 2 \(id 'train-2'\)"):
        ingest(_cfg(tmp_path, tmp_path / "dyme", "data.hint_quality=high"))
    low.write_text(json.dumps(rows[:3]))
    with pytest.raises(DataError, match=r"train_low.json has 3 rows, .*train_medium.json has 4"):
        ingest(_cfg(tmp_path, tmp_path / "dyme", "data.hint_quality=medium"))


def test_a_missing_quality_file_is_named(tmp_path: Path) -> None:
    _official(tmp_path / "dyme", qualities=("high", "low"))
    with pytest.raises(DataError, match=r"data.hint_quality=medium: there is no train_medium.json"):
        ingest(_cfg(tmp_path, tmp_path / "dyme", "data.hint_quality=medium"))


def test_hint_quality_picks_the_synthetic_sets_trace(tmp_path: Path) -> None:
    overrides = ["synth.n_train=6", "synth.n_val=0", "synth.n_test=0", f"synth.out_dir={tmp_path / 'synth'}",
                 "synth.trace_quality=medium"]
    ingest(_cfg(tmp_path, "synthetic", *overrides, "data.hint_quality=high"))
    samples = open_dataset(tmp_path / "out").samples
    assert all(s.hint == s.meta["traces"]["high"] != s.meta["traces"]["medium"] for s in samples)
    ingest(_cfg(tmp_path, "synthetic", *overrides))  # unset: synth.trace_quality's trace
    assert all(s.hint == s.meta["traces"]["medium"] for s in open_dataset(tmp_path / "out").samples)


def test_hint_quality_on_rows_without_traces_is_a_named_row_error(tmp_path: Path) -> None:
    Image.new("RGB", (24, 18), "red").save(tmp_path / "chart.png")
    (tmp_path / "d.json").write_text(json.dumps([{"question": "Q?", "answer": "1", "hint": "h", "image": "chart.png"}]))
    with pytest.raises(DataError, match=r"row 0 \(id 'd-0'\): meta.traces holds no 'high' trace .*"
                                        r"data.hint_quality=high"):
        ingest(_cfg(tmp_path, tmp_path / "d.json", "data.hint_quality=high"))
    with pytest.raises(ConfigError, match=r"data.hint_quality must be one of \['', 'high', 'medium', 'low'\]"):
        _cfg(tmp_path, tmp_path / "d.json", "data.hint_quality=best")


def test_each_quality_refines_from_the_same_questions(tmp_path: Path) -> None:
    """The point of the option: one command line switch trains on high, medium or low traces of the same
    questions. The high hint states the values, so its targets write the arithmetic; the others cannot."""
    _official(tmp_path / "dyme")
    reasoning = {}
    for quality in HINTS:
        cfg = _cfg(tmp_path, tmp_path / "dyme", f"data.hint_quality={quality}",
                   f"refine.out={tmp_path / quality}.jsonl", f"refine.template_pool={tmp_path / 'templates.json'}",
                   f"refine.cache_dir={tmp_path / 'cache'}", f"model.name_or_path={tmp_path / 'no-model'}")
        ingest(cfg)
        steps.refine(cfg)
        rows = [json.loads(line) for line in Path(cfg.refine.out).read_text().splitlines()]
        assert [r["id"] for r in rows] == ["train-0", "train-1", "train-2", "train-3"]
        reasoning[quality] = [r["trace"] for r in rows]
    assert "78 - 56 = 22" in reasoning["high"][0] and "78 + 56 = 134" in reasoning["high"][1]
    assert not any("=" in t for q in ("medium", "low") for t in reasoning[q])  # nothing verifies: no arithmetic


def test_cli_ingest_of_a_quality_folder(tmp_path: Path) -> None:
    _official(tmp_path / "dyme")
    args = [sys.executable, "-m", "dyme_core.cli", "ingest", f"data.path={tmp_path / 'dyme'}",
            f"data.out_dir={tmp_path / 'out'}", f"data.report={tmp_path / 'ingest.json'}"]
    missing = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert missing.returncode != 0 and missing.stderr.count("\n") == 1 and "set data.hint_quality" in missing.stderr
    ok = subprocess.run([*args, "data.hint_quality=low"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert all(s.hint.startswith("Looking at") for s in open_dataset(tmp_path / "out").samples)
