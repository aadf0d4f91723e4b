"""The visual checker: a reward for thinking that uses the image's facts (DESIGN.md section 2).

Default (rule): F1 between the facts stated in the thinking (numbers, and the sample's labels that it
states WITH a value) and the sample's facts. The facts are the structured visual facts (table cells and
labels, or object attributes) when the sample has them, else the facts its hint states (every number,
and the label each number is stated with): hint-only data such as ChartQA's is scored too, as the
official checker scores the thinking against the facts in the hint. A label earns credit only where a
number stands near it in the same sentence (at most ``LABEL_WINDOW`` words apart), so a thinking that
lists the chart's labels and reads no value scores 0. Numbers that equal the reference answer count as
grounded too (a derived result is not a hallucination), but only the facts count toward recall.
Option (llm): an LLM judge over an OpenAI-compatible endpoint rates low/medium/high -> 0/0.5/1; a failure
falls back to the rule score, counted and logged (or, with ``llm.on_failure: fail``, raises).
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
from dyme_core.rewards import extract_numbers

LABEL_WINDOW = 4  # words between a label and its value, e.g. "Apples sold about 12", "12 for Apples"
_SENTENCE = re.compile(r"[^\n;.!?]*(?:[.!?](?!\s|$)[^\n;.!?]*)*")  # "3.2" and "e.g" stay inside a sentence
_NUMBER = re.compile(r"[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")
_WORD = re.compile(r"[^\W\d_]+|\d+(?:\.\d+)?")
# Words that never name a fact on their own: function words and the vocabulary of any chart description.
_NOT_LABELS = frozenset("""
a about above across after almost also among an and approximately are around as at axis bar bars be been below
between but by can chart compared could data diagram did do does each either equal equals every figure find first
for from gives graph had has have highest how i if in into is it its less line look looks lower lowest many more
most much nearly need no not number numbers of on or other our over per percent percentage pie plot point points
reads result roughly second see seems shown shows so some than that the their them then there therefore these they
this those thus to total under up us value values was we were what when where which while who why will with would
you answer difference sum average mean hence means shown show just only around whereas both
""".split())


@dataclass(frozen=True)
class FactSet:
    numbers: tuple[float, ...]
    labels: frozenset[str]

    def __len__(self) -> int:
        return len(set(self.numbers)) + len(self.labels)


def _cells(visual_facts: VisualFacts) -> list[Any]:
    if not visual_facts:
        return []
    if isinstance(visual_facts, dict):
        cells: list[Any] = list(visual_facts.get("columns", [])[1:])  # series names; the first is a header
        for row in visual_facts.get("rows", []):
            cells.extend(row)
        return cells
    return [v for obj in visual_facts for v in obj.values()]


def fact_set(visual_facts: VisualFacts) -> FactSet:
    """The numbers and labels of structured visual facts."""
    numbers, labels = [], set()
    for cell in _cells(visual_facts):
        if isinstance(cell, bool):
            continue
        if isinstance(cell, int | float):
            if math.isfinite(cell):
                numbers.append(float(cell))
        elif isinstance(cell, str) and cell.strip():
            found = extract_numbers(cell)
            if found and re.fullmatch(r"[\d.,%$\s+-]+", cell):
                numbers.extend(found)
            else:
                labels.add(cell.strip().lower())
    return FactSet(numbers=tuple(numbers), labels=frozenset(labels))


def _sentences(text: str) -> list[str]:
    """Sentences/clauses of `text`, lower-cased, thousands separators removed ("1,234" -> "1234")."""
    cleaned = _THOUSANDS.sub("", text.lower())
    return [m.group(0) for m in _SENTENCE.finditer(cleaned) if m.group(0).strip()]


def hint_facts(hint: str) -> FactSet:
    """The facts a free-text hint states: every number, and for each number the label stated with it
    (the nearest word before it that is not a function or chart word, else the nearest after it)."""
    labels = set()
    for sentence in _sentences(hint):
        tokens = _WORD.findall(sentence)
        for i, token in enumerate(tokens):
            if not token[0].isdigit():
                continue
            before = tokens[max(0, i - LABEL_WINDOW - 1):i][::-1]
            after = tokens[i + 1:i + LABEL_WINDOW + 2]
            label = _label_word(before) or _label_word(after)
            if label:
                labels.add(label)
    return FactSet(numbers=tuple(extract_numbers(hint)), labels=frozenset(labels))


def _label_word(tokens: list[str]) -> str | None:
    """The first word in `tokens` (walking away from a number) that can name a fact; None at another number."""
    for token in tokens:
        if token[0].isdigit():
            return None  # another value comes first: a label there belongs to that one
        if len(token) > 1 and token not in _NOT_LABELS:
            return token
    return None


def _near(sentence: str, label: tuple[int, int], number: tuple[int, int]) -> bool:
    gap = sentence[label[1]:number[0]] if number[0] >= label[1] else sentence[number[1]:label[0]]
    return len(_WORD.findall(gap)) <= LABEL_WINDOW


def _labels_with_values(thinking: str, labels: frozenset[str]) -> set[str]:
    """The labels `thinking` states with a number near them in the same sentence."""
    credited = set()
    for sentence in _sentences(thinking):
        numbers = [m.span() for m in _NUMBER.finditer(sentence)]
        if not numbers:
            continue
        for label in labels - credited:
            spans = [m.span() for m in re.finditer(rf"(?<!\w){re.escape(label)}(?!\w)", sentence)]
            if any(_near(sentence, span, number) for span in spans for number in numbers):
                credited.add(label)
    return credited


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


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


def rule_thinking_score(thinking: str, visual_facts: VisualFacts, answer: str = "", hint: str | None = None) -> float:
    """F1 in [0, 1] between facts stated in `thinking` and the sample's facts.

    The facts are `visual_facts` when given, else those `hint` states; with neither the score is 0.
    """
    facts = fact_set(visual_facts) if visual_facts else hint_facts(hint or "")
    if len(facts) == 0 or not thinking.strip():
        return 0.0
    stated_numbers = set(extract_numbers(thinking))
    fact_numbers = set(facts.numbers)
    answer_numbers = set(extract_numbers(answer))
    grounded_numbers = {n for n in stated_numbers if any(_close(n, f) for f in fact_numbers)}
    derived = {n for n in stated_numbers - grounded_numbers if any(_close(n, a) for a in answer_numbers)}
    named_labels = _labels_with_values(thinking, facts.labels)
    stated = len(stated_numbers) + len(named_labels)
    if stated == 0:
        return 0.0
    precision = (len(grounded_numbers) + len(derived) + len(named_labels)) / stated
    recalled = len({f for f in fact_numbers if any(_close(f, n) for n in stated_numbers)}) + len(named_labels)
    recall = recalled / len(facts)
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


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
        return rule_thinking_score(thinking, visual_facts, answer, hint)

    def score_many(self, items: list[tuple[str, VisualFacts, str, str, str | None]]) -> list[float]:
        """Score (thinking, facts, question, answer, hint) items; LLM requests run concurrently."""
        if self.backend != "llm":
            return [self.score(*item) for item in items]
        with ThreadPoolExecutor(max_workers=self.max_workers) as pool:
            return list(pool.map(lambda item: self.score(*item), items))
