"""The built-in synthetic chart-QA set (DESIGN.md section 4: the embedded default).

:func:`synthesize` draws small random tables (3-6 short labels, one or two series of integer or
one-decimal values), renders each as a bar, grouped bar, line or pie chart with matplotlib's Agg
canvas, and asks one question whose answer is computed from the table. The table is the sample's
``visual_facts``; ``hint`` is a reference reasoning trace at ``SynthConfig.trace_quality``, and all
three qualities (the paper's data study: grounded / template / conversational) are kept in
``meta["traces"]`` so the refiner and checker can be compared against each of them.

Determinism: every sample has its own ``numpy`` generator seeded by (seed, split, index), so the same
seed gives byte-identical ``samples.jsonl`` and PNGs, and resizing one split leaves the others alone.
PNGs are encoded by Pillow from the rendered pixel buffer, so no timestamp or version string is written.

``synth.style: readable`` hands the drawing and the questions to ``charts.py`` (PIL charts a small model
can read); everything here is the ``classic`` style.

Run: ``dyme synth`` (or ``synthesize(SynthConfig(out_dir=...))``); tests: ``tests/core/test_synth.py``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from dyme_core.config import SynthConfig
from dyme_core.data import charts
from dyme_core.data.schema import SPLITS, Sample, write_jsonl

CHART_TYPES = ("bar", "grouped_bar", "line", "pie")
QTYPES = ("value_lookup", "max_label", "min_label", "difference", "sum", "count", "comparison")

_CHART_WORDS = {"bar": "bar chart", "grouped_bar": "grouped bar chart", "line": "line chart",
                "pie": "pie chart"}
_MARK_WORDS = {"bar": "bar", "grouped_bar": "bar", "line": "point", "pie": "slice"}
_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")
# The figure is always FIG_INCHES square and the dpi scales with image_size, so fonts (in points)
# keep the same share of the image at every size; at 224 px a 7 pt label is about 7 px tall.
_FIG_INCHES = 3.2


@dataclass(frozen=True)
class _Theme:
    noun: str  # singular, for "Which <noun> has ..."
    nouns: str
    labels: tuple[str, ...]
    ordered: bool  # labels are a sequence (months): take a consecutive window, keep the order
    title: str
    series: str  # the one series' name
    pair_title: str
    pair: tuple[str, str]  # two series' names


_THEMES = (
    _Theme("product", "products",
           ("Laptops", "Phones", "Tablets", "Cameras", "Monitors", "Printers", "Speakers", "Routers"),
           False, "Sales by product (units)", "Sales", "Online vs retail sales (units)",
           ("Online", "Retail")),
    _Theme("country", "countries",
           ("Norway", "Chile", "Kenya", "Japan", "Peru", "Spain", "Egypt", "Canada", "Brazil", "India"),
           False, "Tourist arrivals (thousands)", "Arrivals", "Tourist arrivals by season",
           ("Summer", "Winter")),
    _Theme("fruit", "fruits",
           ("Apples", "Bananas", "Cherries", "Grapes", "Mangoes", "Oranges", "Pears", "Plums"),
           False, "Fruit harvest (tons)", "Harvest", "Fruit harvest by region (tons)", ("North", "South")),
    _Theme("team", "teams",
           ("Lions", "Tigers", "Eagles", "Sharks", "Wolves", "Bears", "Hawks", "Foxes"),
           False, "Points by team", "Points", "Home and away points", ("Home", "Away")),
    _Theme("month", "months",
           ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"),
           True, "Monthly revenue ($k)", "Revenue", "Revenue and costs ($k)", ("Revenue", "Costs")),
)
_MONTHS = _THEMES[-1]


@dataclass
class _Table:
    """A chart's data; values are integers in units of 1/scale so sums and differences are exact."""

    title: str
    theme: _Theme
    labels: list[str]
    series: list[str]
    cells: list[list[int]]  # cells[s][i]: series s, label i, in units of 1/scale
    scale: int  # 1 (integer values) or 10 (one decimal)

    def get(self, label: str, series: str) -> int:
        return self.cells[self.series.index(series)][self.labels.index(label)]

    def fmt(self, units: int) -> str:
        """How a value is written on the chart and in answers: "12", "3.5" (never "12.0")."""
        whole, tenths = divmod(units, self.scale)
        return str(whole) if tenths == 0 else f"{units / self.scale:.1f}"

    def number(self, units: int) -> int | float:
        return units if self.scale == 1 else units / self.scale

    def facts(self) -> dict:
        rows = [[label, *(self.number(col[i]) for col in self.cells)] for i, label in enumerate(self.labels)]
        return {"title": self.title, "columns": ["label", *self.series], "rows": rows}


@dataclass
class _QA:
    """One question with what each trace quality needs to explain its answer."""

    qtype: str
    question: str
    answer: str
    goal: str  # "find the Sales value for Tablets" (lower-case verb phrase)
    observed: list[tuple[str, str]]  # the relevant (label, series) cells, stated by the high trace
    reasoning: str
    conclusion: str
    vague: str  # what the low trace half-remembers; "{GUESS}" stands for a misread value
    misread: int | None = None  # the value (in table units) the low trace misreads, if any


def _draw_table(rng: np.random.Generator, chart_type: str) -> _Table:
    theme = _MONTHS if chart_type == "line" else _THEMES[int(rng.integers(len(_THEMES)))]
    n = int(rng.integers(3, 7))
    if theme.ordered:
        start = int(rng.integers(len(theme.labels) - n + 1))
        labels = list(theme.labels[start:start + n])
    else:
        labels = [theme.labels[int(j)] for j in rng.choice(len(theme.labels), n, replace=False)]
    n_series = 2 if chart_type == "grouped_bar" or (chart_type == "line" and rng.random() < 0.5) else 1
    series = list(theme.pair) if n_series == 2 else [theme.series]
    title = theme.pair_title if n_series == 2 else theme.title
    scale = 10 if chart_type != "pie" and rng.random() < 0.3 else 1
    # distinct values within a series, so max/min/comparison questions have one right answer
    low, high = (5, 61) if chart_type == "pie" else (5, 100)
    cells = [[int(v) for v in rng.choice(np.arange(low * scale, high * scale), n, replace=False)]
             for _ in series]
    return _Table(title, theme, labels, series, cells, scale)


def _render(table: _Table, chart_type: str, size: int, path: Path) -> None:
    fig = Figure(figsize=(_FIG_INCHES, _FIG_INCHES), dpi=size / _FIG_INCHES)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title(table.title, fontsize=8.5)
    n = len(table.labels)
    x = np.arange(n)
    if chart_type == "pie":
        values = table.cells[0]
        names = [f"{label}\n{table.fmt(v)}" for label, v in zip(table.labels, values, strict=True)]
        ax.pie(values, labels=names, colors=_COLORS[:n], startangle=90, counterclock=False, radius=0.85,
               labeldistance=1.15, textprops={"fontsize": 7}, wedgeprops={"linewidth": 0.8, "edgecolor": "w"})
    else:
        width = 0.8 / len(table.series)
        crowded = len(table.series) > 1 and (table.scale > 1 or n > 4)
        for s, (name, col) in enumerate(zip(table.series, table.cells, strict=True)):
            values = [v / table.scale for v in col]
            texts = [table.fmt(v) for v in col]
            if chart_type == "line":
                ax.plot(x, values, marker="o", markersize=3, linewidth=1.2, color=_COLORS[s], label=name)
                for i, (yi, text) in enumerate(zip(values, texts, strict=True)):
                    # of two points at one x, the higher is labelled above and the lower below, so
                    # the labels never sit on each other
                    below = len(table.cells) > 1 and col[i] < table.cells[1 - s][i]
                    ax.annotate(text, (x[i], yi), textcoords="offset points", xytext=(0, -9 if below else 4),
                                ha="center", fontsize=7, color=_COLORS[s])
            else:
                shift = (s - (len(table.series) - 1) / 2) * width
                bars = ax.bar(x + shift, values, width=width, color=_COLORS[s], label=name)
                # two bars per label leave no room for horizontal decimals: write those upright
                ax.bar_label(bars, labels=texts, fontsize=6 if len(table.series) > 1 else 7, padding=1,
                             rotation=90 if crowded else 0)
        top = max(max(col) for col in table.cells) / table.scale
        low = min(min(col) for col in table.cells) / table.scale
        # room above for the value labels (and the legend with two series) and, for lines, below
        # the lowest point for its label
        margin = 0.15 if len(table.series) > 1 else 0.08
        bottom = 0.0 if chart_type != "line" else low - margin * (top - low)
        ax.set_ylim(bottom, top + (0.32 if len(table.series) > 1 else 0.15) * (top - bottom))
        ax.set_xticks(x, table.labels, fontsize=7, rotation=30 if n > 4 else 0)
        ax.tick_params(axis="y", labelsize=6.5)
        ax.spines[["top", "right"]].set_visible(False)
        if len(table.series) > 1:
            ax.legend(fontsize=6.5, frameon=False, loc="upper left", ncols=2)
        else:
            ax.set_ylabel(table.series[0], fontsize=7)
    fig.tight_layout(pad=0.4)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    image = Image.fromarray(rgba[..., :3])
    if image.size != (size, size):  # dpi rounding can cost a pixel; the contract is an exact size
        image = image.resize((size, size), Image.Resampling.LANCZOS)
    image.save(path, format="PNG")


def _ask(rng: np.random.Generator, table: _Table, chart_type: str, qtype: str) -> _QA:
    """Build the question of ``qtype`` about ``table`` and everything its traces say."""
    series = table.series[int(rng.integers(len(table.series)))]
    col = table.cells[table.series.index(series)]
    labels = table.labels
    a, b = (labels[int(j)] for j in rng.choice(len(labels), 2, replace=False))
    va, vb = table.get(a, series), table.get(b, series)
    f = table.fmt
    mark = _MARK_WORDS[chart_type]
    everything = [(label, series) for label in labels]
    listing = ", ".join(f"{label} ({f(v)})" for label, v in zip(labels, col, strict=True))
    nouns = table.theme.nouns

    if qtype == "value_lookup":
        return _QA(qtype, f"What is the {series} value for {a}?", f(va), f"find the {series} value for {a}",
                   [(a, series)], f"The {mark} for {a} reads {f(va)}.",
                   f"The {series} value for {a} is {f(va)}.", f"the {a} {mark} is around {{GUESS}}",
                   misread=va)
    if qtype in ("max_label", "min_label"):
        highest = qtype == "max_label"
        word = "highest" if highest else "lowest"
        order = sorted(zip(col, labels, strict=True), reverse=highest)
        best = order[0][1]
        chain = (" > " if highest else " < ").join(f"{label} ({f(v)})" for v, label in order)
        return _QA(qtype, f"Which {table.theme.noun} has the {word} {series} value?", best,
                   f"find the {table.theme.noun} with the {word} {series} value", everything,
                   f"Ordering the values: {chain}.", f"{best} has the {word} {series} value.",
                   f"the {order[0][1]} {mark} looks {'big' if highest else 'small'}, maybe "
                   "{GUESS}", misread=order[0][0])
    if qtype == "difference":
        big, small = (a, b) if va > vb else (b, a)
        diff = abs(va - vb)
        return _QA(qtype, f"What is the difference in {series} between {a} and {b}?", f(diff),
                   f"find the difference in {series} between {a} and {b}", [(a, series), (b, series)],
                   f"{big} minus {small}: {f(max(va, vb))} - {f(min(va, vb))} = {f(diff)}.",
                   f"The difference is {f(diff)}.", f"{a} is roughly {{GUESS}} and {b} is a bit different",
                   misread=va)
    if qtype == "sum":
        total = sum(col)
        return _QA(qtype, f"What is the total {series} across all {nouns}?", f(total),
                   f"find the total {series} across all {nouns}", everything,
                   f"Adding the values: {' + '.join(f(v) for v in col)} = {f(total)}.",
                   f"The total {series} is {f(total)}.", f"there are some {nouns}, adding them up in my head")
    if qtype == "count":
        threshold = _threshold(rng, table, col)
        if threshold is None:
            # the question names no series; the trace reads the labels off the first one
            return _QA(qtype, f"How many {nouns} are shown in the chart?", str(len(labels)),
                       f"find the number of {nouns} shown", [(label, table.series[0]) for label in labels],
                       f"Counting the {nouns}: {', '.join(labels)} gives {len(labels)}.",
                       f"The chart shows {len(labels)} {nouns}.", f"there are a few {mark}s, not too many")
        above = [(label, v) for label, v in zip(labels, col, strict=True) if v > threshold * table.scale]
        named = ", ".join(f"{label} ({f(v)})" for label, v in above)
        return _QA(qtype, f"How many {nouns} have a {series} value above {threshold}?", str(len(above)),
                   f"find the number of {nouns} with a {series} value above {threshold}", everything,
                   f"Values: {listing}. Above {threshold}: {named}; that is {len(above)}.",
                   f"{len(above)} {table.theme.noun + ' has' if len(above) == 1 else nouns + ' have'} a "
                   f"{series} value above {threshold}.",
                   f"some {mark}s go past {threshold} and some don't")
    if qtype == "comparison":
        yes = va > vb
        return _QA(qtype, f"Is the {series} value of {a} greater than that of {b}?", "Yes" if yes else "No",
                   f"check whether {a} has a greater {series} value than {b}", [(a, series), (b, series)],
                   f"{f(va)} {'>' if yes else '<'} {f(vb)}, so {a} is {'' if yes else 'not '}greater.",
                   f"{a}'s {series} value is {'' if yes else 'not '}greater than {b}'s.",
                   f"{a} and {b} look kind of close, {a} is maybe {{GUESS}}", misread=va)
    raise ValueError(f"unknown question type {qtype!r} (known: {', '.join(QTYPES)})")


def _threshold(rng: np.random.Generator, table: _Table, col: list[int]) -> int | None:
    """A whole-number threshold strictly between two neighbouring values, or None (then: count all)."""
    if rng.random() < 0.5:
        return None
    ordered = sorted(col)
    for k in rng.permutation(np.arange(1, len(ordered))):
        lo, hi = ordered[int(k) - 1], ordered[int(k)]
        t = lo // table.scale + 1  # smallest whole number strictly above lo
        if t * table.scale < hi:
            return t
    return None


def _traces(rng: np.random.Generator, table: _Table, chart_type: str, qa: _QA) -> dict[str, str]:
    cells = ", ".join(
        f"{label} = {table.fmt(table.get(label, s))}" if len(table.series) == 1
        else f"{label} ({s}) = {table.fmt(table.get(label, s))}"
        for label, s in qa.observed
    )
    chart = _CHART_WORDS[chart_type]
    high = (f"Goal: {qa.goal[0].upper()}{qa.goal[1:]}.\n"
            f"Observation: The {chart} \"{table.title}\" shows {cells}.\n"
            f"Reasoning: {qa.reasoning}\n"
            f"Conclusion: {qa.conclusion}")
    medium = (f"The {chart} shows {table.title} for {len(table.labels)} {table.theme.nouns}. "
              f"We need to {qa.goal}, so the result is {qa.answer}.")
    vague = qa.vague
    if qa.misread is not None:
        # a low-quality trace misreads the value by 10-40%, as a careless glance at the chart would
        factor = 1 + float(rng.choice([-1, 1])) * float(rng.uniform(0.1, 0.4))
        vague = vague.replace("{GUESS}", f"{round(qa.misread / table.scale * factor)} or so")
    low = f"Looking at the picture, it seems like {vague}. I think it's probably {qa.answer}."
    return {"high": high, "medium": medium, "low": low}


def _make_sample(cfg: SynthConfig, split: str, index: int, images: Path) -> Sample:
    rng = np.random.default_rng([cfg.seed, SPLITS.index(split), index])
    # cycling (7 question types against at most 4 chart types, coprime) covers every pair in 28 samples
    chart_type = cfg.chart_types[index % len(cfg.chart_types)]
    qtype = charts.pick_qtype(cfg, split, index, QTYPES)
    table = _draw_table(rng, chart_type)
    qa = _ask(rng, table, chart_type, qtype)
    traces = _traces(rng, table, chart_type, qa)
    sample_id = f"synth-{split}-{index:05d}"
    _render(table, chart_type, cfg.image_size, images / f"{sample_id}.png")
    return Sample(
        id=sample_id, image=f"images/{sample_id}.png", question=qa.question, answer=qa.answer,
        hint=traces[cfg.trace_quality], visual_facts=table.facts(), task="chart", split=split,
        qtype=qtype, meta={"chart_type": chart_type, "traces": traces},
    )


def synthesize(cfg: SynthConfig) -> Path:
    """Write ``<out_dir>/samples.jsonl`` and ``<out_dir>/images/<id>.png``; return ``out_dir``."""
    unknown = sorted(set(cfg.chart_types) - set(CHART_TYPES))
    if unknown or not cfg.chart_types:
        raise ValueError(f"synth.chart_types must be a non-empty subset of {list(CHART_TYPES)}, "
                         f"got {list(cfg.chart_types)}")
    if cfg.image_size < 64:
        raise ValueError(f"synth.image_size must be >= 64 px for readable charts, got {cfg.image_size}")
    make = _make_sample
    charts.check_train_qtypes(cfg, charts.QTYPES if cfg.style == "readable" else QTYPES)
    if cfg.style == "readable":  # PIL charts a small model can read (charts.py)
        usable = charts.usable_chart_types(cfg.chart_types, cfg.image_size)
        make = functools.partial(charts.make_sample, chart_types=usable)
    out = Path(cfg.out_dir)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    sizes = {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test}
    samples = [make(cfg, split, i, images) for split in SPLITS for i in range(sizes[split])]
    # images of an earlier, larger run would otherwise linger and be versioned with this one
    keep = {Path(s.image).name for s in samples}
    for stale in images.glob("synth-*.png"):
        if stale.name not in keep:
            stale.unlink()
    write_jsonl(samples, out / "samples.jsonl")
    return out
