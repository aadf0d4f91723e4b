"""Readable synthetic charts (``synth.style: readable``; DESIGN.md section 4, the embedded default).

The classic generator (``synth.py``) draws matplotlib charts whose 7 pt value labels a small model at
224 px cannot read, so a base trained on them never learns to see. These charts are drawn for a small
model's eyes: a bar or line chart of 3-5 short labels (at most four letters) with integer values 10-99,
the value printed above every bar or point, the labels under the x axis, in DejaVu Sans (the TTF that
matplotlib ships, so the glyphs are the same on every machine). Font sizes scale with the image: at
224 px the values are 20 px (a 20 px value was legible to a 20M-parameter model at 224 px, a 15 px one
was not learnt) and the labels 14 px, the most that lets five four-letter labels fit under their bars
(they come from a closed set of words, easier to recognise than digits). Drawing one chart with PIL
takes a few milliseconds, so the pretraining stream (bench/chart_base.py) renders charts on the fly in
worker processes.

Questions, whose answers follow from the table:
- single-step: ``value_lookup`` (the value of one label), ``max_label``, ``min_label``, ``count`` (of
  bars or points);
- multi-step: ``comparison`` (which of two labels is larger), ``difference`` (of two values),
  ``count_above`` (how many values exceed a whole-number threshold between two neighbouring values).
Values are distinct within a chart, so the largest and smallest labels are unique.

A sample carries the same things the classic generator writes, so the refiner, the checker and the
evaluation work unchanged: ``visual_facts`` = ``{"title", "columns": ["label", <series>], "rows":
[[label, value], ...]}``, ``hint`` = the trace at ``synth.trace_quality``, ``qtype``, and in ``meta``:
``chart_type``, ``qtype``, ``steps`` (``single`` | ``multi``) and ``traces`` (high: grounded Goal /
Observation / Reasoning / Conclusion; medium: templated, no values; low: conversational, partly
ungrounded, with a misread value where the question has one).

Determinism: sample ``i`` of a split draws from ``numpy.random.default_rng([seed, split, i])``. The
pretraining stream draws from generators with a four-entry seed (:func:`stream_rng`), never equal to a
dataset sample's, and can refuse the tables of the dataset (:func:`table_key`).

Public helpers: :func:`random_chart` (one random table and its image from a Generator),
:func:`ask` (a question about a table), :func:`transcription` (``Label = value; ...``),
:func:`make_sample` (one dataset sample; what ``synth.synthesize`` calls for this style).
Tests: ``tests/core/test_charts.py``.
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dyme_core.config import SynthConfig
from dyme_core.data.schema import SPLITS, Sample

log = logging.getLogger(__name__)

CHART_TYPES = ("bar", "line")
SINGLE_STEP = ("value_lookup", "max_label", "min_label", "count")
MULTI_STEP = ("comparison", "difference", "count_above")
QTYPES = SINGLE_STEP + MULTI_STEP
TRANSCRIBE_QUESTION = "List every label and its value."
VALUE_RANGE = (10, 99)  # inclusive
MIN_IMAGE_SIZE = 112  # below it five labels no longer fit under their bars
FONT_PATH = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"

# Pixel sizes at 224 px; every length scales with image_size / 224.
_REF = 224
_VALUE_PX = 20
_LABEL_PX = 14
_TITLE_PX = 12
_COLORS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75))
_CHART_WORDS = {"bar": "bar chart", "line": "line chart"}
_MARK_WORDS = {"bar": "bar", "line": "point"}


@dataclass(frozen=True)
class Theme:
    noun: str
    nouns: str
    labels: tuple[str, ...]  # at most four letters: five of them fit under a 224 px chart at 15 px
    ordered: bool  # a sequence (months): a consecutive window in order
    title: str
    series: str


THEMES = (
    Theme("player", "players", ("Ann", "Bob", "Cal", "Dan", "Eve", "Fay", "Gus", "Ivy", "Kim", "Max"), False,
          "Points per player", "Points"),
    Theme("month", "months", ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"),
          True, "Monthly sales", "Sales"),
    Theme("city", "cities", ("Oslo", "Rome", "Lima", "Kyiv", "Doha", "Baku", "Riga", "Nice", "Bern", "Pune"), False,
          "Visitors by city", "Visitors"),
    Theme("fruit", "fruits", ("Kiwi", "Lime", "Fig", "Pear", "Plum", "Date", "Nut", "Pea"), False,
          "Harvest by crop", "Harvest"),
    Theme("color", "colors", ("Red", "Blue", "Gold", "Pink", "Gray", "Teal", "Navy", "Jade"), False,
          "Votes by color", "Votes"),
)


@dataclass(frozen=True)
class ChartTable:
    """One chart's data: one series of distinct integers, one per label, and how it is drawn."""

    theme: Theme
    chart_type: str
    labels: tuple[str, ...]
    values: tuple[int, ...]

    @property
    def title(self) -> str:
        return self.theme.title

    def value(self, label: str) -> int:
        return self.values[self.labels.index(label)]

    def facts(self) -> dict:
        """The classic generator's table structure (what the refiner and checker read)."""
        return {"title": self.title, "columns": ["label", self.theme.series],
                "rows": [[label, v] for label, v in zip(self.labels, self.values, strict=True)]}


def table_from_facts(facts: dict, chart_type: str = "bar") -> ChartTable:
    """The table a sample's ``visual_facts`` describe (:meth:`ChartTable.facts` read back)."""
    theme = next((t for t in THEMES if t.title == facts["title"]), None)
    if theme is None:
        raise ValueError(f"no readable-chart theme is titled {facts['title']!r}")
    return ChartTable(theme, chart_type, tuple(r[0] for r in facts["rows"]), tuple(r[1] for r in facts["rows"]))


def table_key(table: ChartTable) -> tuple:
    """What makes two charts show the same data (the pretraining stream refuses the dataset's keys)."""
    return (table.theme.title, table.labels, table.values)


def transcription(table: ChartTable) -> str:
    """The chart read out, left to right: ``Label = value`` pairs joined by ``; `` (the form the rule
    refiner's Observation states a table's rows in, so a model that transcribes can reuse the skill
    inside its reasoning)."""
    return "; ".join(f"{label} = {v}" for label, v in zip(table.labels, table.values, strict=True))


def parse_transcription(text: str) -> dict[str, str]:
    """``Label = value`` pairs (``;``- or line-separated; ``Label: value`` lines too) back to {label: value
    text}; the first mention of a label counts."""
    out: dict[str, str] = {}
    for piece in re.split(r"[;\n]", text):
        match = re.match(r"\s*([^=:]+?)\s*[=:]\s*(.*?)\s*\.?\s*$", piece)
        if match and match.group(1) not in out:
            out[match.group(1)] = match.group(2)
    return out


# ------------------------------------------------------------------------------------------ drawing
def draw_table(rng: np.random.Generator, chart_type: str) -> ChartTable:
    theme = THEMES[int(rng.integers(len(THEMES)))]
    n = int(rng.integers(3, 6))
    if theme.ordered:
        start = int(rng.integers(len(theme.labels) - n + 1))
        labels = theme.labels[start: start + n]
    else:
        labels = tuple(theme.labels[int(j)] for j in rng.choice(len(theme.labels), n, replace=False))
    lo, hi = VALUE_RANGE
    values = tuple(int(v) + lo for v in rng.choice(hi - lo + 1, n, replace=False))  # distinct
    return ChartTable(theme, chart_type, tuple(labels), values)


@functools.lru_cache(maxsize=32)
def _font(px: int) -> ImageFont.FreeTypeFont:
    # Pillow lays text out with libraqm where it is installed and with its basic engine elsewhere; the two
    # place glyphs differently, and a base trained on one misread labels drawn by the other (transcription 54%
    # against 100%). The basic engine exists in every Pillow build, so every machine draws the same chart.
    return ImageFont.truetype(str(FONT_PATH), px, layout_engine=ImageFont.Layout.BASIC)


def font_sizes(image_size: int) -> dict[str, int]:
    """Pixel font sizes at ``image_size`` (value labels, axis labels, title)."""
    s = image_size / _REF
    return {"value": round(_VALUE_PX * s), "label": round(_LABEL_PX * s), "title": round(_TITLE_PX * s)}


def render(table: ChartTable, image_size: int, color_index: int = 0) -> Image.Image:
    """The chart as an RGB image of ``image_size`` square pixels.

    Heights are drawn on a fixed 0-100 scale (no y axis: every value is printed), so the same value is
    the same height in every chart.
    """
    size = image_size
    s = size / _REF
    fs = font_sizes(size)
    f_value, f_label, f_title = _font(fs["value"]), _font(fs["label"]), _font(fs["title"])
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    draw.text((size / 2, 3 * s), table.title, font=f_title, fill=(60, 60, 60), anchor="ma")
    top = 4 * s + fs["title"] + fs["value"] + 4 * s  # room for the highest value's label
    bottom = size - fs["label"] - 8 * s  # the x axis
    left, right = 3 * s, size - 3 * s
    n = len(table.labels)
    slot = (right - left) / n
    centers = [left + slot * (i + 0.5) for i in range(n)]
    ys = [bottom - (bottom - top) * v / 100 for v in table.values]
    color = _COLORS[color_index % len(_COLORS)]
    if table.chart_type == "bar":
        half = slot * 0.32
        for x, y in zip(centers, ys, strict=True):
            draw.rectangle((x - half, y, x + half, bottom), fill=color)
    elif table.chart_type == "line":
        draw.line(list(zip(centers, ys, strict=True)), fill=color, width=max(1, round(2 * s)))
        r = max(2.0, 3.5 * s)
        for x, y in zip(centers, ys, strict=True):
            draw.ellipse((x - r, y - r, x + r, y + r), fill=color)
    else:
        raise ValueError(f"readable charts draw {' and '.join(CHART_TYPES)}, not {table.chart_type!r}")
    draw.line((left, bottom, right, bottom), fill=(90, 90, 90), width=max(1, round(s)))
    for x, y, v in zip(centers, ys, table.values, strict=True):
        # a white outline keeps the digits readable where a line segment passes behind them
        draw.text((x, y - 3 * s), str(v), font=f_value, fill="black", anchor="md",
                  stroke_width=max(1, round(2 * s)), stroke_fill="white")
    for x, label in zip(centers, table.labels, strict=True):
        draw.text((x, bottom + 3 * s), label, font=f_label, fill="black", anchor="ma")
    return image


def random_chart(rng: np.random.Generator, image_size: int,
                 chart_types: tuple[str, ...] = CHART_TYPES) -> tuple[ChartTable, Image.Image]:
    """One random table and its drawing, everything drawn from ``rng``."""
    chart_type = chart_types[int(rng.integers(len(chart_types)))]
    table = draw_table(rng, chart_type)
    return table, render(table, image_size, color_index=int(rng.integers(len(_COLORS))))


def stream_rng(seed: int, worker: int, index: int) -> np.random.Generator:
    """The pretraining stream's generator: a four-entry seed, never one of the dataset's three-entry ones."""
    return np.random.default_rng([seed, 1_000_003, worker, index])


# ---------------------------------------------------------------------------------------- questions
@dataclass(frozen=True)
class ChartQA:
    """One question about a table with its answer and reference traces of three qualities."""

    qtype: str
    question: str
    answer: str
    traces: dict[str, str]

    @property
    def steps(self) -> str:
        return "single" if self.qtype in SINGLE_STEP else "multi"


def ask(rng: np.random.Generator, table: ChartTable, qtype: str) -> ChartQA:
    """The question of ``qtype`` about ``table``, its answer and its traces (all randomness from ``rng``)."""
    labels, values, th = table.labels, table.values, table.theme
    series, mark = th.series, _MARK_WORDS[table.chart_type]
    a, b = (labels[int(j)] for j in rng.choice(len(labels), 2, replace=False))
    va, vb = table.value(a), table.value(b)
    listing = ", ".join(f"{label} = {v}" for label, v in zip(labels, values, strict=True))
    misread = None  # the value a careless glance gets wrong in the low trace
    if qtype == "value_lookup":
        question, answer = f"What is the {series} value for {a}?", str(va)
        goal, observed = f"find the {series} value for {a}", f"{a} = {va}"
        reasoning, conclusion = f"The {mark} for {a} reads {va}.", f"The {series} value for {a} is {va}."
        vague, misread = f"the {a} {mark} is around {{GUESS}}", va
    elif qtype in ("max_label", "min_label"):
        word = "highest" if qtype == "max_label" else "lowest"
        order = sorted(zip(values, labels, strict=True), reverse=qtype == "max_label")
        question, answer = f"Which {th.noun} has the {word} {series} value?", order[0][1]
        goal, observed = f"find the {th.noun} with the {word} {series} value", listing
        chain = (" > " if qtype == "max_label" else " < ").join(f"{label} ({v})" for v, label in order)
        reasoning, conclusion = f"Ordering the values: {chain}.", f"{answer} has the {word} {series} value."
        vague, misread = f"the {answer} {mark} looks {'tall' if word == 'highest' else 'short'}, maybe {{GUESS}}", \
            order[0][0]
    elif qtype == "count":
        question, answer = f"How many {mark}s are shown in the chart?", str(len(labels))
        goal, observed = f"count the {mark}s", ", ".join(labels)
        reasoning = f"Counting the {mark}s: {', '.join(labels)} gives {len(labels)}."
        conclusion, vague = f"The chart shows {len(labels)} {mark}s.", f"there are a few {mark}s, not too many"
    elif qtype == "comparison":
        big = a if va > vb else b
        question, answer = f"Which {th.noun} has the larger {series} value, {a} or {b}?", big
        goal, observed = f"compare the {series} values of {a} and {b}", f"{a} = {va}, {b} = {vb}"
        reasoning = f"{max(va, vb)} > {min(va, vb)}, so {big} is larger."
        conclusion, vague = f"{big} has the larger {series} value.", f"{a} and {b} look close, {a} is maybe {{GUESS}}"
        misread = va
    elif qtype == "difference":
        question, answer = f"What is the difference in {series} between {a} and {b}?", str(abs(va - vb))
        goal, observed = f"find the difference in {series} between {a} and {b}", f"{a} = {va}, {b} = {vb}"
        hi_l, lo_l = (a, b) if va > vb else (b, a)
        reasoning = f"{hi_l} minus {lo_l}: {max(va, vb)} - {min(va, vb)} = {answer}."
        conclusion, vague = f"The difference is {answer}.", f"{a} is roughly {{GUESS}} and {b} is a bit different"
        misread = va
    elif qtype == "count_above":
        ordered = sorted(values)
        k = int(rng.integers(1, len(ordered)))
        # a whole number strictly between two neighbouring values (they differ by at least 1)
        threshold = int(rng.integers(ordered[k - 1], ordered[k]))
        above = [(label, v) for label, v in zip(labels, values, strict=True) if v > threshold]
        question = f"How many {th.nouns} have a {series} value above {threshold}?"
        answer = str(len(above))
        goal, observed = f"count the {th.nouns} with a {series} value above {threshold}", listing
        named = ", ".join(f"{label} ({v})" for label, v in above)
        reasoning = f"Above {threshold}: {named}; that is {len(above)}."
        noun = th.noun + " has" if len(above) == 1 else th.nouns + " have"
        conclusion = f"{len(above)} {noun} a {series} value above {threshold}."
        vague = f"some {mark}s go past {threshold} and some don't"
    else:
        raise ValueError(f"unknown readable question type {qtype!r} (known: {', '.join(QTYPES)})")
    chart = _CHART_WORDS[table.chart_type]
    high = (f"Goal: {goal[0].upper()}{goal[1:]}.\n"
            f"Observation: The {chart} \"{table.title}\" shows {observed}.\n"
            f"Reasoning: {reasoning}\n"
            f"Conclusion: {conclusion}")
    medium = (f"The {chart} shows {table.title.lower()} for {len(labels)} {th.nouns}. "
              f"We need to {goal}, so the result is {answer}.")
    if misread is not None:
        # the low trace misreads the value by 10-40%, as a careless glance would
        factor = 1 + float(rng.choice([-1, 1])) * float(rng.uniform(0.1, 0.4))
        vague = vague.replace("{GUESS}", f"{round(misread * factor)} or so")
    low = f"Looking at the picture, it seems like {vague}. I think it's probably {answer}."
    return ChartQA(qtype, question, answer, {"high": high, "medium": medium, "low": low})


# ------------------------------------------------------------------------------------------ dataset
def usable_chart_types(chart_types: list[str] | tuple[str, ...], image_size: int) -> tuple[str, ...]:
    """The configured chart types this style draws; the others are named in a warning, none is an error
    (as is an image too small for the labels)."""
    usable = tuple(t for t in chart_types if t in CHART_TYPES)
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"synth.style=readable needs synth.image_size >= {MIN_IMAGE_SIZE} px (five labels must fit "
                         f"under their bars), got {image_size}")
    if not usable:
        raise ValueError(f"synth.style=readable draws {list(CHART_TYPES)}; synth.chart_types={list(chart_types)} "
                         "names none of them")
    if skipped := [t for t in chart_types if t not in CHART_TYPES]:
        log.warning("synth.style=readable draws only %s: skipping synth.chart_types %s", list(CHART_TYPES), skipped)
    return usable


def pick_qtype(cfg: SynthConfig, split: str, index: int, qtypes: tuple[str, ...]) -> str:
    """The question type of sample ``index`` of ``split``: every type of ``qtypes`` in turn, or in the train split
    with ``synth.train_qtypes`` set, one drawn from that list by a generator of its own (the chart drawn is the
    same either way)."""
    if split != "train" or not cfg.train_qtypes:
        return qtypes[index % len(qtypes)]
    rng = np.random.default_rng([cfg.seed, SPLITS.index(split), index, 1])
    return cfg.train_qtypes[int(rng.integers(len(cfg.train_qtypes)))]


def check_train_qtypes(cfg: SynthConfig, qtypes: tuple[str, ...]) -> None:
    """One line naming what is wrong when ``synth.train_qtypes`` names a type this style does not ask."""
    if unknown := sorted(set(cfg.train_qtypes) - set(qtypes)):
        raise ValueError(f"synth.train_qtypes names {unknown}, which synth.style={cfg.style} does not ask "
                         f"(known: {', '.join(qtypes)})")


def make_sample(cfg: SynthConfig, split: str, index: int, images: Path,
                chart_types: tuple[str, ...] = CHART_TYPES) -> Sample:
    """Sample ``index`` of ``split``: draws, writes ``images/<id>.png`` and returns the row."""
    rng = np.random.default_rng([cfg.seed, SPLITS.index(split), index])
    # 7 question types against 1 or 2 chart types (coprime): every pair within 14 samples
    chart_type = chart_types[index % len(chart_types)]
    qtype = pick_qtype(cfg, split, index, QTYPES)
    table = draw_table(rng, chart_type)
    image = render(table, cfg.image_size, color_index=int(rng.integers(len(_COLORS))))
    qa = ask(rng, table, qtype)
    sample_id = f"synth-{split}-{index:05d}"
    image.save(images / f"{sample_id}.png", format="PNG")
    return Sample(
        id=sample_id, image=f"images/{sample_id}.png", question=qa.question, answer=qa.answer,
        hint=qa.traces[cfg.trace_quality], visual_facts=table.facts(), task="chart", split=split, qtype=qtype,
        meta={"chart_type": chart_type, "qtype": qtype, "steps": qa.steps, "traces": qa.traces},
    )
