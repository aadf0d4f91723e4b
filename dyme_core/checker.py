"""The visual checker: a reward for thinking that uses the image's facts (DESIGN.md section 2).

Default (rule): F1 between the facts the thinking states and the sample's facts, where a fact is a value
bound to its label. The facts are the structured visual facts (a row's label and its column's series
name with the row's values, or an object's text attributes with its numbers) when the sample has them,
else the facts its hint states: hint-only data such as ChartQA's is scored too, as the official checker
scores the thinking against the facts in the hint. :func:`read_values` binds every number a text states
to the labels beside it (the same reading for a hint and for a thinking), and a stated value counts only
beside a label whose value it is, within ChartQA's relaxed tolerance (5%): a thinking that lists the
labels, lists the values without labels, or puts the right values under the wrong labels scores 0.
Numbers that equal the reference answer count as grounded too (a derived result is not a hallucination)
and a threshold the question gives is left out, but only the facts count toward recall.
Option (llm): an LLM judge over an OpenAI-compatible endpoint rates low/medium/high -> 0/0.5/1; a failure
falls back to the rule score, counted and logged (or, with ``llm.on_failure: fail``, raises).
Tests: tests/core/test_checker_binding.py, tests/core/test_checker_refiner.py.
"""

from __future__ import annotations

import math
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from dyme_core.data.schema import VisualFacts
from dyme_core.llm import ChatClient, FallbackLog, LLMError, judge_thinking
from dyme_core.rewards import RELATIVE_TOLERANCE, extract_numbers

_SENTENCE = re.compile(r"[^\n;.!?]*(?:[.!?](?!\s|$)[^\n;.!?]*)*")  # "3.2" and "e.g" stay inside a sentence
# One token of a sentence: a number as written ("-5", "1,870", "$12.5", "3.9%"; a sign only where it cannot
# be a minus, so "16 - 10" is two numbers), a word, or a punctuation mark.
_TOKEN = re.compile(r"(?P<num>(?<![\w.)])[-−]?[$€£¥₹]?\d+(?:,\d{3})*(?:\.\d+)?(?![\d,]\d)%?)"
                    r"|(?P<word>[^\W\d_]+(?:['’][^\W\d_]+)*)|(?P<mark>\S)")
_CUT_MARKS = frozenset(",;")
_CUT_WORDS = frozenset({"and", "while", "whereas", "but"})
# A clause with one of these words states a result ("the difference is 5"), not a value read off a label.
_RESULT_WORDS = frozenset("""
difference differ differs total sum average mean median ratio gap combined altogether than times minus plus
result answer
""".split())
_YEAR_BEFORE = frozenset({"in", "during", "since", "until", "year", "fy", "by", "of", "for", "from", "to"})
# Words that never name a fact on their own: function words and the vocabulary of any chart description.
_NOT_LABELS = frozenset("""
a about above across after almost also among an and approximately are around as at axis bar bars be been below
between but by can chart compared could data diagram did do does each either equal equals every figure find first
for from gives graph had has have highest how i if in into is it its less line look looks lower lowest many more
most much nearly need no not number numbers of on or other our over per percent percentage pie plot point points
reads result roughly second see seems shown shows so some than that the their them then there therefore these they
this those thus to total under up us value values was we were what when where which while who why will with would
you answer difference sum average mean hence means shown show just only around whereas both largest smallest
larger smaller greater greatest least fewer fewest biggest bigger respectively reached stood while sold earned
recorded registered scored made received accounted amounted came got saw reported measured valued goal rose
fell grew increased decreased dropped declined climbed went
observation reasoning conclusion step steps
""".split())


@dataclass(frozen=True)
class Reading:
    """A number as a text states it, the labels bound to it (closest first) and those of its sentence's
    heading (`context`)."""

    value: float
    text: str  # as written, e.g. "1,870", "3.9%", "-5"
    labels: tuple[str, ...]
    context: tuple[str, ...] = ()

    @property
    def phrases(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.labels + self.context))


@dataclass(frozen=True)
class FactSet:
    """A sample's facts: every label with the values stated for it (``values_of``), the numbers, the labels."""

    values_of: dict[str, frozenset[float]]
    numbers: tuple[float, ...]  # every number of the facts (a hint's unbound numbers included)

    @property
    def labels(self) -> frozenset[str]:
        return frozenset(self.values_of)

    @property
    def values(self) -> frozenset[float]:
        """The values bound to a label: what a thinking can be credited for."""
        return frozenset(v for values in self.values_of.values() for v in values)

    def __len__(self) -> int:
        return len(self.values) + len(self.values_of)


def _number_value(text: str) -> float:
    return float(re.sub(r"[,$€£¥₹%]", "", text.replace("−", "-")))


def _is_year(tokens: list[tuple[str, str]], i: int) -> bool:
    """A four-digit integer that labels a value ("In 2019, ...", "2019: 45") rather than being one."""
    text = tokens[i][1]
    if not re.fullmatch(r"(1[89]|20|21)\d\d", text):
        return False
    before = tokens[i - 1][1].lower() if i > 0 else ""
    after = tokens[i + 1][1] if i + 1 < len(tokens) else ""
    return before in _YEAR_BEFORE or after in (":", "=")


def _chunks(sentence: str, labels: list[str] | None) -> list[list[tuple[str, str]]]:
    """The sentence's clauses as (kind, text) items, kind "num", "label" or "result": cut at commas and
    semicolons, at a colon that ends a heading ("Laptops: Online 45"), and at "and"/"while"/"but" once the
    clause so far holds a number ("Apples is 12 and Pears is 7"). With known
    ``labels``, their occurrences are the label items (longest first; a number inside a label is part of it);
    without, every run of words that can name a fact is one ("unit" where it follows a number in lower case),
    and years that label a value are labels."""
    spans: list[tuple[int, int, str]] = []
    if labels is not None:
        sentence = sentence.lower()  # known labels are lower case; the spans index this text
        for label in sorted(labels, key=len, reverse=True):
            for m in re.finditer(rf"(?<!\w){re.escape(label)}(?!\w)", sentence):
                if all(m.end() <= s or m.start() >= e for s, e, _ in spans):
                    spans.append((m.start(), m.end(), label))
    tokens = [(m.lastgroup or "", m.group(0), m.start()) for m in _TOKEN.finditer(sentence)]
    plain = [(kind, text) for kind, text, _ in tokens]
    chunks: list[list[tuple[str, str]]] = [[]]
    run: list[str] = []  # words of the label phrase being read (no known labels)
    unit = False  # the phrase being read follows a number in lower case: its unit ("78 boxes", "1,870 billion")

    def close_run() -> None:
        if run:
            chunks[-1].append(("unit" if unit else "label", " ".join(run)))
            run.clear()

    for i, (kind, text, start) in enumerate(tokens):
        inside = next((s for s in spans if s[0] <= start < s[1]), None)
        if inside is not None:
            if start == inside[0]:
                chunks[-1].append(("label", inside[2]))
            continue
        holds_number = any(k == "num" for k, _ in chunks[-1])
        cut = (kind == "mark" and text in _CUT_MARKS) or (kind == "mark" and text == ":" and not holds_number) or (
            kind == "word" and text.lower() in _CUT_WORDS and holds_number)
        if cut:
            close_run()
            chunks.append([])
            continue
        if kind == "mark" and text == ":":  # "Above 10: Apples (12)": 10 is not Apples' value
            close_run()
            chunks[-1].append(("colon", text))
            continue
        if kind == "word" and text.lower() in _RESULT_WORDS:
            chunks[-1].append(("result", text))
        if labels is None and ((kind == "word" and len(text) > 1 and text.lower() not in _NOT_LABELS)
                               or (kind == "num" and _is_year(plain, i))):
            if not run:
                after_number = i > 0 and plain[i - 1][0] == "num" and not _is_year(plain, i - 1)
                unit = kind == "word" and text.islower() and after_number
            run.append(text)
            continue
        close_run()
        if kind == "num":
            chunks[-1].append(("num", text))
    close_run()
    return [c for c in chunks if c]


def read_values(text: str, labels: list[str] | frozenset[str] | None = None) -> list[Reading]:
    """Every number `text` states, each with the labels bound to it.

    A number is bound to the labels between it and the previous number of its clause (closest first), or,
    when there are none, to those between it and the next number or colon ("12 for Apples"); a number in a clause
    that states a result ("the difference is 5") or arithmetic ("12 - 7 = 5") is bound to none. The labels
    of a sentence's first clause, when it holds no number ("In 2019, ...", "Laptops: ..."), are the
    `context` of all its numbers. `labels` given:
    only those (lower-case) count as labels; None: any run of words that can name a fact does (how a
    hint's facts are read), keeping the hint's case.
    """
    known = None if labels is None else list(labels)
    readings = []
    for m in _SENTENCE.finditer(text):
        chunks = _chunks(m.group(0), known)
        context: list[str] = []
        if chunks and not any(kind == "num" for kind, _ in chunks[0]):
            context = [t for kind, t in chunks[0] if kind == "label"][::-1]
        for chunk in chunks:
            if not any(kind == "num" for kind, _ in chunk):
                continue
            result = any(kind == "result" for kind, _ in chunk)
            items = [(kind, t) for kind, t in chunk if kind in ("num", "label", "colon")]
            for i, (kind, t) in enumerate(items):
                if kind != "num":
                    continue
                before = []
                for k, lt in reversed(items[:i]):
                    if k == "num":
                        break
                    if k == "label":
                        before.append(lt)
                after = []
                for k, lt in items[i + 1:]:
                    if k != "label":  # a colon ends what a value can be bound to forwards
                        break
                    after.append(lt)
                bound = () if result else tuple(dict.fromkeys(before or after))
                readings.append(Reading(_number_value(t), t, bound, () if result else tuple(context)))
    return readings


def _cells(visual_facts: VisualFacts) -> list[Any]:
    if not visual_facts:
        return []
    if isinstance(visual_facts, dict):
        cells: list[Any] = list(visual_facts.get("columns", [])[1:])  # series names; the first is a header
        for row in visual_facts.get("rows", []):
            cells.extend(row)
        return cells
    return [v for obj in visual_facts for v in obj.values()]


def _cell_number(cell: Any) -> float | None:
    if isinstance(cell, bool):
        return None
    if isinstance(cell, int | float):
        return float(cell) if math.isfinite(cell) else None
    if isinstance(cell, str) and re.fullmatch(r"\s*[-+]?[$€£¥₹]?[\d.,]*\d%?\s*", cell):
        found = extract_numbers(cell)
        return found[0] if len(found) == 1 else None
    return None


def _cell_label(cell: Any, first: bool = False) -> str | None:
    if isinstance(cell, str) and cell.strip() and (first or _cell_number(cell) is None):
        return cell.strip().lower()
    return None


def fact_set(visual_facts: VisualFacts) -> FactSet:
    """The facts of structured visual facts: a row's label (and the column's series name) with the row's
    values; an object's text attributes with its numeric attributes."""
    values_of: dict[str, set[float]] = {}

    def bind(label: Any, values: list[float], first: bool = False) -> None:
        if (name := _cell_label(label, first)) is not None:
            values_of.setdefault(name, set()).update(values)

    if isinstance(visual_facts, dict):
        columns = list(visual_facts.get("columns", []))
        rows = [list(r) for r in visual_facts.get("rows", []) if isinstance(r, list | tuple) and r]
        for row in rows:  # the first cell labels its row, a year written as a number too
            bind(str(row[0]), [v for v in map(_cell_number, row[1:]) if v is not None], first=True)
            for cell in row[1:]:  # a text cell ("Oslo", "red") is a fact of its row
                bind(cell, [v for v in map(_cell_number, row) if v is not None])
        for j, name in enumerate(columns[1:], 1):
            bind(name, [v for r in rows if len(r) > j and (v := _cell_number(r[j])) is not None])
    elif visual_facts:
        for obj in visual_facts:
            numbers = [v for v in map(_cell_number, obj.values()) if v is not None]
            for value in obj.values():
                bind(value, numbers)
    numbers = tuple(v for v in map(_cell_number, _cells(visual_facts)) if v is not None)
    return FactSet({k: frozenset(v) for k, v in values_of.items()}, numbers)


def hint_facts(hint: str) -> FactSet:
    """The facts a free-text hint states: each number with the labels :func:`read_values` binds to it."""
    values_of: dict[str, set[float]] = {}
    for reading in read_values(hint):
        for label in reading.phrases:
            values_of.setdefault(label.lower(), set()).add(reading.value)
    return FactSet({k: frozenset(v) for k, v in values_of.items()}, tuple(extract_numbers(hint)))


def _near(a: float, b: float) -> bool:
    """Within ChartQA's relaxed tolerance (5% of the fact; zero only matches zero)."""
    return a == b if b == 0 else abs(a - b) <= RELATIVE_TOLERANCE * abs(b)


def rule_thinking_score(thinking: str, visual_facts: VisualFacts, answer: str = "", hint: str | None = None,
                        question: str = "") -> float:
    """F1 in [0, 1] between the facts `thinking` states and the sample's facts.

    The facts are `visual_facts` when given, else those `hint` states; with neither the score is 0. A
    stated number is grounded only where it is bound (:func:`read_values`) to a label whose value it is,
    within relaxed tolerance, and a label is credited only with its own value beside it; a number equal
    to the answer counts as derived (precision only), and one the `question` gives (a threshold) is left
    out, though a label stated with it still counts. Precision is over the distinct numbers stated and the
    labels stated with a number; recall over the facts' values and labels.
    """
    facts = fact_set(visual_facts) if visual_facts else hint_facts(hint or "")
    if not facts.values_of or not thinking.strip():
        return 0.0
    readings = read_values(thinking, facts.labels)
    credited = [(label, r.value) for r in readings for label in r.phrases
                if any(_near(r.value, v) for v in facts.values_of[label])]
    credited_labels = {label for label, _ in credited}
    grounded = {n for _, n in credited}
    given = set(extract_numbers(question)) - grounded  # a threshold the question gives
    stated = {r.value for r in readings} - given
    bound_labels = {label for r in readings for label in r.labels}
    if not stated and not bound_labels:
        return 0.0
    answers = extract_numbers(answer)
    derived = {n for n in stated - grounded if any(_near(n, a) for a in answers)}
    precision = (len(grounded) + len(derived) + len(credited_labels & bound_labels)) / (len(stated) + len(bound_labels))
    recalled = {v for label, n in credited for v in facts.values_of[label] if _near(n, v)}
    recall = (len(recalled) + len(credited_labels)) / len(facts)
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def facts_text(visual_facts: VisualFacts) -> str:
    """Facts as plain text for an LLM prompt."""
    if not visual_facts:
        return "(none)"
    if isinstance(visual_facts, dict):
        lines = [f"Title: {visual_facts['title']}"] if visual_facts.get("title") else []
        columns = visual_facts.get("columns", [])
        lines.append(" | ".join(str(c) for c in columns))
        lines.extend(" | ".join(str(c) for c in row) for row in visual_facts.get("rows", []))
        return "\n".join(lines)
    return "\n".join(", ".join(f"{k}={v}" for k, v in obj.items()) for obj in visual_facts)


def judge_facts(visual_facts: VisualFacts, hint: str | None) -> str | None:
    """What the LLM judge is shown as the image's facts: the structured facts, else the hint; None if neither."""
    if visual_facts:
        return facts_text(visual_facts)
    if hint and hint.strip():
        return f"(no table; the facts stated by a reference reasoning about the image)\n{hint.strip()}"
    return None


@dataclass
class CheckerStats:
    llm_calls: int = 0
    fallbacks: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, calls: int = 0, fallbacks: int = 0) -> None:
        with self._lock:
            self.llm_calls += calls
            self.fallbacks += fallbacks


class VisualChecker:
    """Scores thinking against the sample's facts with the configured backend: rule | llm | none."""

    def __init__(self, backend: str = "rule", client: ChatClient | None = None, max_workers: int = 8):
        if backend == "llm" and client is None:
            raise ValueError("checker backend 'llm' needs an LLM endpoint (train.llm.base_url)")
        self.backend = backend
        self.client = client
        self.max_workers = max_workers
        self.stats = CheckerStats()
        self.fallback_log = FallbackLog("LLM checker (falling back to the rule checker)")

    def score(self, thinking: str, visual_facts: VisualFacts, question: str = "", answer: str = "",
              hint: str | None = None) -> float:
        if self.backend == "none":
            return 0.0
        facts = judge_facts(visual_facts, hint) if self.backend == "llm" else None
        if self.client is not None and facts is not None:  # nothing to ground in: no call, the rule's 0
            try:
                self.stats.add(calls=1)
                return judge_thinking(self.client, facts, question, answer, thinking)
            except LLMError as e:
                if self.client.cfg.on_failure == "fail":
                    raise LLMError(f"LLM checker failed (llm.on_failure=fail): {e}") from None
                self.stats.add(fallbacks=1)
                self.fallback_log.record(str(e))
        return rule_thinking_score(thinking, visual_facts, answer, hint, question)

    def score_many(self, items: list[tuple[str, VisualFacts, str, str, str | None]]) -> list[float]:
        """Score (thinking, facts, question, answer, hint) items; LLM requests run concurrently."""
        if self.backend != "llm":
            return [self.score(*item) for item in items]
        with ThreadPoolExecutor(max_workers=self.max_workers) as pool:
            return list(pool.map(lambda item: self.score(*item), items))
