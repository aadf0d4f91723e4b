"""The visual refiner: grounded reference traces for memorisation (DESIGN.md section 2).

Default (rule): a deterministic writer that fills the current template's sections
(Goal / Observation / Reasoning / Conclusion) from the visual facts relevant to the question.
Option (llm): an LLM over an OpenAI-compatible endpoint extracts the facts stated in the hint, then
rewrites the trace with the template; any failure falls back to the rule path and is counted.
Templates evolve: a correct exploration trace that scores top on the checker may propose its section
structure as a new template; the pool is persisted as versioned JSON. Results are cached on disk by a
hash of everything that determines them, so reruns and online refinement cost nothing twice.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from dyme_core.checker import facts_text
from dyme_core.data.schema import Sample
from dyme_core.llm import ChatClient, LLMError, refine_with_llm, template_sections
from dyme_core.rewards import extract_numbers

DEFAULT_TEMPLATE = (
    "Goal: what the question asks.\n"
    "Observation: the values read from the image that the question needs.\n"
    "Reasoning: how those values give the answer.\n"
    "Conclusion: the answer."
)
_OPERATIONS = [
    (("difference", "how much more", "how much less"), "Subtract the smaller value from the larger one"),
    (("sum", "total", "combined"), "Add the values together"),
    (("average", "mean"), "Add the values and divide by how many there are"),
    (("highest", "largest", "maximum", "most", "greatest"), "Compare the values and take the largest"),
    (("lowest", "smallest", "minimum", "least", "fewest"), "Compare the values and take the smallest"),
    (("how many",), "Count the items shown"),
    (("greater than", "more than", "less than", "higher than", "lower than"), "Compare the two values"),
]


def _relevant_rows(sample: Sample) -> list[str]:
    """Fact lines relevant to the question: rows whose label it names, else all of them."""
    facts = sample.visual_facts
    if not facts:
        return []
    q = sample.question.lower()
    if isinstance(facts, dict):
        columns = [str(c) for c in facts.get("columns", [])]
        series = columns[1:]
        lines_all, lines_named = [], []
        for row in facts.get("rows", []):
            label, values = str(row[0]), row[1:]
            if len(series) <= 1:
                text = f"{label} = {values[0]}" if values else label
            else:
                text = f"{label}: " + ", ".join(f"{s} = {v}" for s, v in zip(series, values, strict=False))
            lines_all.append(text)
            if re.search(rf"(?<!\w){re.escape(label.lower())}(?!\w)", q):
                lines_named.append(text)
        return lines_named or lines_all
    lines = [", ".join(f"{k} = {v}" for k, v in obj.items()) for obj in facts]
    named = [line for line, obj in zip(lines, facts, strict=True) if any(str(v).lower() in q for v in obj.values())]
    return named or lines


def _operation(question: str) -> str:
    q = question.lower()
    for keys, text in _OPERATIONS:
        if any(k in q for k in keys):
            return text
    return "Read the value the question asks for"


def rule_refine(sample: Sample, template: str = DEFAULT_TEMPLATE) -> str:
    """A deterministic, grounded trace with the template's sections (no 'Answer:' line)."""
    observed = _relevant_rows(sample)
    title = sample.visual_facts.get("title") if isinstance(sample.visual_facts, dict) else None
    content = {
        "goal": f"Find {sample.question.rstrip('?').strip()[:1].lower()}{sample.question.rstrip('?').strip()[1:]}.",
        "observation": (f"The chart '{title}' shows " if title else "The image shows ")
        + ("; ".join(observed) if observed else "no structured facts")
        + ".",
        "reasoning": f"{_operation(sample.question)}: this gives {sample.answer}."
        if extract_numbers(sample.answer) or observed
        else f"From the observation, the answer is {sample.answer}.",
        "conclusion": f"The answer is {sample.answer}.",
    }
    lines = []
    for name in template_sections(template) or ["Goal", "Observation", "Reasoning", "Conclusion"]:
        key = name.strip().lower()
        text = next((v for k, v in content.items() if k in key), content["reasoning"])
        lines.append(f"{name}: {text}")
    return "\n".join(lines)


def trace_sections(trace: str) -> list[str]:
    """Section names ("Goal", "Observation", ...) a trace is written in, in order."""
    return template_sections(trace)


@dataclass
class TemplatePool:
    """Versioned templates; `best` is the one refinement uses. Persisted as JSON."""

    templates: list[dict] = field(default_factory=lambda: [
        {"version": 1, "text": DEFAULT_TEMPLATE, "score": 0.0, "source": "default"}
    ])
    best: int = 1

    @property
    def current(self) -> dict:
        return next(t for t in self.templates if t["version"] == self.best)

    def propose(self, trace: str, score: float) -> bool:
        """Adopt a correct, top-scoring trace's structure as the new template if it beats the best."""
        sections = trace_sections(trace)
        if len(sections) < 2 or score <= self.current["score"]:
            return False
        if sections == template_sections(self.current["text"]):
            self.current["score"] = score
            return False
        text = "\n".join(f"{s}: ..." for s in sections)
        version = max(t["version"] for t in self.templates) + 1
        self.templates.append({"version": version, "text": text, "score": score, "source": "evolved"})
        self.best = version
        return True

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({"best": self.best, "templates": self.templates}, indent=2))

    @classmethod
    def load(cls, path: str | Path) -> TemplatePool:
        p = Path(path)
        if not p.is_file():
            return cls()
        data = json.loads(p.read_text())
        return cls(templates=data["templates"], best=data["best"])


class RefineCache:
    """On-disk cache: key = sha256 of everything that determines a refined trace."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @staticmethod
    def key(sample: Sample, template: str, backend: str, model: str = "") -> str:
        payload = json.dumps(
            [sample.question, sample.answer, sample.hint, sample.visual_facts, template, backend, model],
            sort_keys=True, default=str,
        )
        return hashlib.sha256(payload.encode()).hexdigest()

    def get(self, key: str) -> str | None:
        path = self.root / key[:2] / f"{key}.txt"
        return path.read_text() if path.is_file() else None

    def put(self, key: str, trace: str) -> None:
        path = self.root / key[:2] / f"{key}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(trace)
        tmp.replace(path)  # atomic: a killed run never leaves half an entry


@dataclass
class RefinerStats:
    calls: int = 0
    cache_hits: int = 0
    fallbacks: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)

    def as_dict(self) -> dict[str, int]:
        return {"refiner/calls": self.calls, "refiner/cache_hits": self.cache_hits,
                "refiner/fallbacks": self.fallbacks}


class Refiner:
    """Refines samples with the configured backend, through the cache, concurrently for the LLM."""

    def __init__(self, backend: str = "rule", cache_dir: str | Path | None = None,
                 client: ChatClient | None = None, max_workers: int = 8):
        if backend == "llm" and client is None:
            raise ValueError("refine backend 'llm' needs an LLM endpoint (refine.llm.base_url)")
        self.backend = backend
        self.client = client
        self.cache = RefineCache(cache_dir) if cache_dir else None
        self.max_workers = max_workers
        self.stats = RefinerStats()

    def refine_one(self, sample: Sample, template: str) -> tuple[str, bool]:
        """(trace, fell_back)."""
        model = self.client.cfg.model if self.client is not None else ""
        key = RefineCache.key(sample, template, self.backend, model) if self.cache else ""
        if self.cache and (hit := self.cache.get(key)) is not None:
            self.stats.add(cache_hits=1)
            return hit, False
        self.stats.add(calls=1)
        fell_back = False
        if self.backend == "llm" and self.client is not None and (sample.visual_facts or sample.hint):
            try:
                facts = facts_text(sample.visual_facts) if sample.visual_facts else None
                trace = refine_with_llm(self.client, question=sample.question, answer=sample.answer,
                                        template=template, facts=facts, hint=sample.hint)
            except LLMError:
                self.stats.add(fallbacks=1)
                trace, fell_back = rule_refine(sample, template), True
        else:
            trace = rule_refine(sample, template)
        if self.cache and not fell_back:  # never cache a fallback: the endpoint may be back next time
            self.cache.put(key, trace)
        return trace, fell_back

    def refine(self, samples: list[Sample], template: str) -> list[tuple[str, bool]]:
        if self.backend != "llm":
            return [self.refine_one(s, template) for s in samples]
        with ThreadPoolExecutor(max_workers=self.max_workers) as pool:
            return list(pool.map(lambda s: self.refine_one(s, template), samples))
