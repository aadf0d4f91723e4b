"""The visual checker: a reward for thinking that uses the image's facts (DESIGN.md section 2).

Default (rule): F1 between the facts stated in the thinking (numbers, and the sample's labels that
it names) and the sample's visual facts (table cells and labels, or object attributes). Numbers that
equal the reference answer count as grounded too (a derived result is not a hallucination), but only
the image's facts count toward recall. Option (llm): an LLM judge over an OpenAI-compatible endpoint
rates low/medium/high -> 0/0.5/1; any failure falls back to the rule score and is counted.
"""

from __future__ import annotations

import math
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from dyme_core.data.schema import VisualFacts
from dyme_core.llm import ChatClient, LLMError, judge_thinking
from dyme_core.rewards import extract_numbers


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
    numbers, labels = [], set()
    for cell in _cells(visual_facts):
        if isinstance(cell, bool):
            continue
        if isinstance(cell, int | float):
            numbers.append(float(cell))
        elif isinstance(cell, str) and cell.strip():
            found = extract_numbers(cell)
            if found and re.fullmatch(r"[\d.,%$\s+-]+", cell):
                numbers.extend(found)
            else:
                labels.add(cell.strip().lower())
    return FactSet(numbers=tuple(numbers), labels=frozenset(labels))


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


def rule_thinking_score(thinking: str, visual_facts: VisualFacts, answer: str = "") -> float:
    """F1 in [0, 1] between facts stated in `thinking` and the sample's visual facts."""
    facts = fact_set(visual_facts)
    if len(facts) == 0 or not thinking.strip():
        return 0.0
    text = thinking.lower()
    stated_numbers = set(extract_numbers(thinking))
    fact_numbers = set(facts.numbers)
    answer_numbers = set(extract_numbers(answer))
    grounded_numbers = {n for n in stated_numbers if any(_close(n, f) for f in fact_numbers)}
    derived = {n for n in stated_numbers - grounded_numbers if any(_close(n, a) for a in answer_numbers)}
    named_labels = {label for label in facts.labels if re.search(rf"(?<!\w){re.escape(label)}(?!\w)", text)}
    stated = len(stated_numbers) + len(named_labels)
    if stated == 0:
        return 0.0
    precision = (len(grounded_numbers) + len(derived) + len(named_labels)) / stated
    recalled = len({f for f in fact_numbers if any(_close(f, n) for n in stated_numbers)}) + len(named_labels)
    recall = recalled / len(facts)
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


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
    """Scores thinking against visual facts with the configured backend: rule | llm | none."""

    def __init__(self, backend: str = "rule", client: ChatClient | None = None, max_workers: int = 8):
        if backend == "llm" and client is None:
            raise ValueError("checker backend 'llm' needs an LLM endpoint (train.llm.base_url)")
        self.backend = backend
        self.client = client
        self.max_workers = max_workers
        self.stats = CheckerStats()

    def score(self, thinking: str, visual_facts: VisualFacts, question: str = "", answer: str = "") -> float:
        if self.backend == "none":
            return 0.0
        if self.backend == "llm" and self.client is not None:
            try:
                self.stats.add(calls=1)
                return judge_thinking(self.client, facts_text(visual_facts), question, answer, thinking)
            except LLMError:
                self.stats.add(fallbacks=1)
        return rule_thinking_score(thinking, visual_facts, answer)

    def score_many(self, items: list[tuple[str, VisualFacts, str, str]]) -> list[float]:
        """Score (thinking, facts, question, answer) items; LLM requests run concurrently."""
        if self.backend != "llm":
            return [self.score(*item) for item in items]
        with ThreadPoolExecutor(max_workers=self.max_workers) as pool:
            return list(pool.map(lambda item: self.score(*item), items))
