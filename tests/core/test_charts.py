"""Readable synthetic charts (dyme_core/data/charts.py, ``synth.style: readable``): deterministic files,
answers that follow from the table, legible layout, and traces the refiner and checker read unchanged."""

from __future__ import annotations

import functools
import logging
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFont

from dyme_core.checker import rule_thinking_score
from dyme_core.config import SynthConfig
from dyme_core.data import charts
from dyme_core.data.schema import Sample, read_jsonl
from dyme_core.data.synth import synthesize
from dyme_core.refiner import rule_refine


def _samples(root: Path) -> list[Sample]:
    return [Sample.from_dict(row) for row in read_jsonl(root / "samples.jsonl")]


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def readable(tmp_path_factory: pytest.TempPathFactory) -> list[Sample]:
    # 28 training samples: every (chart type, question type) pair twice
    cfg = SynthConfig(out_dir=str(tmp_path_factory.mktemp("readable")), n_train=28, n_val=2, n_test=2,
                      style="readable", chart_types=["bar", "line"], trace_quality="high")
    return _samples(synthesize(cfg))


def _expected(s: Sample) -> str:
    """The answer recomputed from the table and the question alone."""
    table = {str(r[0]): int(r[1]) for r in s.visual_facts["rows"]}
    named = [label for label in table if re.search(rf"\b{label}\b", s.question)]
    numbers = [int(n) for n in re.findall(r"\b\d+\b", s.question)]
    if s.qtype == "value_lookup":
        return str(table[named[0]])
    if s.qtype == "max_label":
        return max(table, key=table.get)
    if s.qtype == "min_label":
        return min(table, key=table.get)
    if s.qtype == "count":
        return str(len(table))
    if s.qtype == "comparison":
        return max(named, key=table.get)
    if s.qtype == "difference":
        return str(abs(table[named[0]] - table[named[1]]))
    if s.qtype == "count_above":
        return str(sum(v > numbers[-1] for v in table.values()))
    raise AssertionError(s.qtype)


def test_every_answer_follows_from_the_table_and_the_question(readable: list[Sample]) -> None:
    for s in readable:
        assert s.answer == _expected(s), (s.id, s.question, s.visual_facts)


def test_tables_are_small_distinct_integers_with_short_labels(readable: list[Sample]) -> None:
    for s in readable:
        rows = s.visual_facts["rows"]
        values = [r[1] for r in rows]
        assert 3 <= len(rows) <= 5
        assert all(isinstance(v, int) and 10 <= v <= 99 for v in values)
        assert len(set(values)) == len(values)  # the largest and smallest labels are unique
        assert all(len(r[0]) <= 4 for r in rows)
        assert s.visual_facts["columns"][0] == "label" and len(s.visual_facts["columns"]) == 2


def test_every_question_type_and_chart_type_occurs_with_its_step_count(readable: list[Sample]) -> None:
    train = [s for s in readable if s.split == "train"]
    pairs = {(s.meta["chart_type"], s.qtype) for s in train}
    assert pairs == {(c, q) for c in charts.CHART_TYPES for q in charts.QTYPES}
    for s in readable:
        assert s.meta["qtype"] == s.qtype
        assert s.meta["steps"] == ("single" if s.qtype in ("value_lookup", "max_label", "min_label", "count")
                                   else "multi")
        assert s.hint == s.meta["traces"]["high"]
        assert set(s.meta["traces"]) == {"high", "medium", "low"}


def test_same_seed_gives_identical_files_and_another_seed_differs(tmp_path: Path) -> None:
    def make(name: str, seed: int) -> dict[str, bytes]:
        return _files(synthesize(SynthConfig(out_dir=str(tmp_path / name), seed=seed, n_train=5, n_val=1, n_test=1,
                                             image_size=112, style="readable", chart_types=["bar", "line"])))

    a, b, c = make("a", 0), make("b", 0), make("c", 1)
    assert len(a) == 1 + 7 and a == b
    assert a["samples.jsonl"] != c["samples.jsonl"]
    image = Image.open(tmp_path / "a" / "images" / "synth-train-00000.png")
    assert image.size == (112, 112) and image.mode == "RGB"


def test_the_refiner_and_checker_read_the_facts_and_grounded_traces_score_higher(readable: list[Sample]) -> None:
    lookups = [s for s in readable if s.qtype == "value_lookup"]
    for s in lookups:
        refined = rule_refine(s)
        assert s.answer in refined  # the looked-up value is stated in the refined trace
    high = np.mean([rule_thinking_score(s.meta["traces"]["high"], s.visual_facts, s.answer) for s in readable])
    low = np.mean([rule_thinking_score(s.meta["traces"]["low"], s.visual_facts, s.answer) for s in readable])
    assert high > low + 0.2


@pytest.mark.parametrize("size", [112, 128, 224, 384])
def test_labels_fit_their_slots_and_fonts_scale_with_the_image(size: int) -> None:
    """At every size the widest five labels fit under their bars and the values stay ~9% of the height."""
    sizes = charts.font_sizes(size)
    assert abs(sizes["value"] - 20 * size / 224) <= 0.5
    label_font = charts.ImageFont.truetype(str(charts.FONT_PATH), sizes["label"])
    value_font = charts.ImageFont.truetype(str(charts.FONT_PATH), sizes["value"])
    slot = size * (1 - 6 / 224) / 5
    widest = max(label_font.getlength(label) for theme in charts.THEMES for label in theme.labels)
    assert widest <= slot
    assert value_font.getlength("99") <= slot


def test_a_chart_draws_its_values_where_the_marks_are() -> None:
    """The image is not blank and differs between values: a 99 bar is drawn taller than a 10 bar."""
    theme = charts.THEMES[0]
    tall = charts.render(charts.ChartTable(theme, "bar", ("Ann", "Bob", "Cal"), (99, 10, 50)), 224)
    short = charts.render(charts.ChartTable(theme, "bar", ("Ann", "Bob", "Cal"), (10, 99, 50)), 224)
    a, b = np.asarray(tall.convert("L")), np.asarray(short.convert("L"))
    first_slot = slice(10, 70)  # columns of the first bar
    assert (a[60:120, first_slot] < 200).mean() > (b[60:120, first_slot] < 200).mean() + 0.3


def test_charts_are_drawn_with_the_layout_engine_every_pillow_has() -> None:
    """libraqm (present on some machines only) places glyphs differently from Pillow's basic engine: a chart must
    not depend on which one a machine has, or a base trained on one machine's charts misreads another's."""
    table = charts.ChartTable(charts.THEMES[4], "bar", ("Red", "Gold", "Navy", "Teal"), (64, 24, 45, 29))
    drawn = np.asarray(charts.render(table, 224))
    original = charts._font
    try:
        charts._font = functools.lru_cache(maxsize=8)(lambda px: ImageFont.truetype(
            str(charts.FONT_PATH), px, layout_engine=ImageFont.Layout.BASIC))
        basic = np.asarray(charts.render(table, 224))
    finally:
        charts._font = original
    assert (drawn == basic).all()


def test_a_samples_facts_give_back_its_table_and_an_unknown_title_is_named() -> None:
    table = charts.ChartTable(charts.THEMES[2], "bar", ("Oslo", "Rome", "Lima"), (12, 99, 45))
    assert charts.table_from_facts(table.facts()) == table
    with pytest.raises(ValueError, match="'Sales'"):
        charts.table_from_facts({"title": "Sales", "rows": [["a", 1]]})


def test_transcription_round_trips() -> None:
    table = charts.ChartTable(charts.THEMES[1], "line", ("Jan", "Feb", "Mar"), (12, 99, 45))
    text = charts.transcription(table)
    assert text == "Jan = 12; Feb = 99; Mar = 45"
    assert charts.parse_transcription(text + "; Jan = 13\nnoise") == {"Jan": "12", "Feb": "99", "Mar": "45"}
    assert charts.parse_transcription("Jan: 12\nFeb: 99.") == {"Jan": "12", "Feb": "99"}


def test_unsupported_chart_types_are_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="dyme_core.data.charts"):
        root = synthesize(SynthConfig(out_dir=str(tmp_path / "mixed"), n_train=4, n_val=1, n_test=1, image_size=112,
                                      style="readable", chart_types=["bar", "pie"]))
    assert "skipping synth.chart_types ['pie']" in caplog.text
    assert {s.meta["chart_type"] for s in _samples(root)} == {"bar"}
    with pytest.raises(ValueError, match=r"synth.style=readable draws \['bar', 'line'\]"):
        synthesize(SynthConfig(out_dir=str(tmp_path / "pie"), n_train=2, n_val=1, n_test=1, image_size=112,
                               style="readable", chart_types=["pie"]))
    with pytest.raises(ValueError, match="synth.image_size >= 112"):
        synthesize(SynthConfig(out_dir=str(tmp_path / "small"), n_train=2, n_val=1, n_test=1, image_size=96,
                               style="readable", chart_types=["bar"]))


def test_the_pretraining_stream_never_uses_a_dataset_generator() -> None:
    """stream_rng's seeds have four entries, the dataset's three: the streams are different."""
    dataset = np.random.default_rng([0, 0, 0]).integers(1 << 30, size=8)
    stream = charts.stream_rng(0, 0, 0).integers(1 << 30, size=8)
    assert not np.array_equal(dataset, stream)


@pytest.mark.parametrize("style", ["readable", "classic"])
def test_train_question_types_follow_their_weights_and_leave_the_charts_val_and_test_alone(
        tmp_path: Path, style: str) -> None:
    def make(name: str, **kw) -> list[Sample]:
        return _samples(synthesize(SynthConfig(out_dir=str(tmp_path / name), n_train=60, n_val=7, n_test=7,
                                               image_size=112, style=style, chart_types=["bar", "line"], **kw)))

    plain = make("plain")
    weighted = make("weighted", train_qtypes=["difference", "difference", "difference", "value_lookup"])
    train = [s for s in weighted if s.split == "train"]
    share = sum(s.qtype == "difference" for s in train) / len(train)
    assert {s.qtype for s in train} == {"difference", "value_lookup"} and 0.6 < share < 0.9  # 3 in 4 drawn
    # the same chart at every index (only the question differs), and val and test exactly as without the option
    for a, b in zip(plain, weighted, strict=True):
        assert a.id == b.id and a.visual_facts == b.visual_facts
        if a.split != "train":
            assert a.to_dict() == b.to_dict()
    # the val and test splits still cycle through every type
    assert len({s.qtype for s in weighted if s.split == "val"}) == 7


def test_a_train_question_type_the_style_does_not_ask_is_named(tmp_path: Path) -> None:
    cfg = SynthConfig(out_dir=str(tmp_path / "x"), n_train=2, n_val=1, n_test=1, style="readable",
                      chart_types=["bar"], train_qtypes=["difference", "sum"])
    with pytest.raises(ValueError, match=r"train_qtypes names \['sum'\], which synth.style=readable does not ask"):
        synthesize(cfg)
