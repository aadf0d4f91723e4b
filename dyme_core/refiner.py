"""The visual refiner: grounded reference traces for memorisation (DESIGN.md section 2).

Default (rule): a deterministic writer that fills the current template's sections
(Goal / Observation / Reasoning / Conclusion) from the visual facts relevant to the question; without
structured facts it restructures the sample's hint into those sections and keeps every sentence (so
every number and entity) of it, as the official method memorises the refined hint; with neither, a
minimal honest trace (the question restated and the answer), counted as ungrounded.
Option (llm): an LLM over an OpenAI-compatible endpoint extracts the facts stated in the hint, then
rewrites the trace with the template (two calls; one when structured facts exist). The trace is checked
before it is cached (length cap, states the answer); a failure or a rejected trace falls back to the
rule path, counted and logged, or raises with ``llm.on_failure: fail``.
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
from dyme_core.config import RefineConfig
from dyme_core.data.schema import Sample
from dyme_core.llm import ChatClient, FallbackLog, LLMError, refine_with_llm, strip_answer_lines, template_sections
from dyme_core.rewards import normalize_answer, relaxed_match

DEFAULT_TEMPLATE = (
    "Goal: what the question asks.\n"
    "Observation: the values read from the image that the question needs.\n"
    "Reasoning: how those values give the answer.\n"
    "Conclusion: the answer."
)
_SECTION_LINE = re.compile(r"^\s*([^:\n]+?)\s*:")
_NUMBER_TEXT = re.compile(r"[-+]?\d*\.?\d+%?")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")
_OPERATIONS = [
    (("difference", "how much more", "how much less"), "Subtract the smaller value from the larger one"),
    (("sum", "total", "combined"), "Add the values together"),
    (("average", "mean"), "Add the values and divide by how many there are"),
    (("highest", "largest", "maximum", "most", "greatest"), "Compare the values and take the largest"),
    (("lowest", "smallest", "minimum", "least", "fewest"), "Compare the values and take the smallest"),
    (("how many",), "Count the items shown"),
    (("greater than", "more than", "less than", "higher than", "lower than", "larger", "smaller"),
     "Compare the two values"),
]


def _named(label: str, question_lower: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(label.lower())}(?!\w)", question_lower) is not None


def _relevant_rows(sample: Sample, observe: str = "relevant") -> list[str]:
    """Fact lines the observation states: with ``observe="relevant"`` the rows whose label the question
    names (all of them when it names none); with ``"all"`` every row, in the chart's order."""
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
            if _named(label, q):
                lines_named.append(text)
        return lines_all if observe == "all" else (lines_named or lines_all)
    lines = [", ".join(f"{k} = {v}" for k, v in obj.items()) for obj in facts]
    named = [line for line, obj in zip(lines, facts, strict=True) if any(str(v).lower() in q for v in obj.values())]
    return lines if observe == "all" else (named or lines)


def _number(text: object) -> float | None:
    try:
        return float(str(text).strip().rstrip("%").replace(",", ""))
    except ValueError:
        return None


def _same(x: float, y: float) -> bool:
    return abs(x - y) <= 1e-6 * max(1.0, abs(y))


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


_ABOVE = ("above", "more than", "greater than", "higher than", "over", "exceed")
_BELOW = ("below", "less than", "fewer than", "lower than", "under")


def derivation(sample: Sample) -> str | None:
    """The arithmetic that takes a one-series table to the answer, written out (``45 - 23 = 22``), or None.

    Tried in order, each only where its result equals the reference answer exactly (so a derivation is
    never invented): the larger/smaller of the two named rows or the largest/smallest row (label answers);
    the named row's value; the difference, sum or mean of the named rows (of all rows for a total or an
    average); how many rows lie above/below a number in the question; how many rows there are. The
    numbers are written as the table states them, the result as the answer states it.
    """
    facts = sample.visual_facts
    if not isinstance(facts, dict) or len(facts.get("columns", [])) != 2:
        return None
    rows = [(str(r[0]), str(r[1]), _number(r[1])) for r in facts.get("rows", []) if len(r) >= 2]
    rows = [(label, text, v) for label, text, v in rows if v is not None]
    if not rows:
        return None
    q = sample.question.lower()
    named = [r for r in rows if _named(r[0], q)]
    answer = str(sample.answer).strip()
    by_label = {r[0].lower(): r for r in rows}
    if answer.lower() in by_label:  # a label: the largest or smallest of the rows in question
        scope = named if len(named) >= 2 else rows
        top, bottom = max(scope, key=lambda r: r[2]), min(scope, key=lambda r: r[2])
        chosen = by_label[answer.lower()]
        if len(scope) == 2:
            other = scope[0] if scope[1] is chosen else scope[1]
            if chosen is top and top is not bottom:
                return f"{chosen[1]} > {other[1]}, so {chosen[0]} is larger."
            if chosen is bottom and top is not bottom:
                return f"{chosen[1]} < {other[1]}, so {chosen[0]} is smaller."
            return None
        if chosen is top and sum(r[2] == top[2] for r in scope) == 1:
            return f"The largest value is {top[1]} ({top[0]})."
        if chosen is bottom and sum(r[2] == bottom[2] for r in scope) == 1:
            return f"The smallest value is {bottom[1]} ({bottom[0]})."
        return None
    want = _number(answer)
    if want is None:
        return None
    if len(named) == 1 and _same(named[0][2], want):
        return f"The value for {named[0][0]} is {named[0][1]}."
    if len(named) == 2:
        hi, lo = sorted(named, key=lambda r: r[2], reverse=True)
        if _same(hi[2] - lo[2], want):
            return f"{hi[1]} - {lo[1]} = {answer}."
    for scope in (named, rows) if len(named) >= 2 else (rows,):
        if any(k in q for k in ("sum", "total", "combined", "together")) and _same(sum(r[2] for r in scope), want):
            return f"{' + '.join(r[1] for r in scope)} = {answer}."
        if any(k in q for k in ("average", "mean")) and _same(sum(r[2] for r in scope) / len(scope), want):
            return f"({' + '.join(r[1] for r in scope)}) / {len(scope)} = {answer}."
    if "how many" in q:
        for t in (v for v in (_number(m) for m in re.findall(r"\d+(?:\.\d+)?", q)) if v is not None):
            for words, side, hit in ((_ABOVE, "above", lambda v, t=t: v > t), (_BELOW, "below", lambda v, t=t: v < t)):
                chosen = [r for r in rows if hit(r[2])]
                if any(w in q for w in words) and _same(len(chosen), want):
                    listed = ", ".join(f"{r[0]} ({r[1]})" for r in chosen) or "none"
                    return f"{side.capitalize()} {_fmt(t)}: {listed}; that is {answer}."
        if _same(len(rows), want):
            return f"Counting {', '.join(r[0] for r in rows)} gives {answer}."
    return None


def _operation(question: str) -> str:
    q = question.lower()
    for keys, text in _OPERATIONS:
        if any(k in q for k in keys):
            return text
    return "Read the value the question asks for"


# Section names -> the kind of content they hold, so an evolved template ("Facts / Compute / Result")
# gets the observation, the reasoning and the conclusion where a reader expects them.
_KINDS = {
    "goal": ("goal", "question", "task", "ask", "objective", "aim"),
    "observation": ("observ", "fact", "data", "evidence", "read", "see", "value", "detail", "information"),
    "reasoning": ("reason", "step", "comput", "calcul", "analy", "think", "logic", "work", "method", "deduc"),
    "conclusion": ("conclu", "result", "final", "summary"),
}
_REASONING = re.compile(
    r"\b(so|thus|therefore|hence|because|since|subtract\w*|add(?:s|ed|ing)?|divid\w*|multipl\w*|compar\w*|sum|"
    r"average|mean|difference|minus|plus|greater|smaller|larger|fewer|highest|lowest|largest|need to|"
    r"gives?|results? in)\b|[=×÷]|\d\s*[-+*/]\s*\d", re.IGNORECASE)
_INLINE_ANSWER_FLAG = re.compile(r"\banswer\s*:\s*", re.IGNORECASE)
_HINT_SENTENCE = re.compile(r"[^.!?\n]*(?:[.!?](?!\s|$)[^.!?\n]*)*[.!?]?")


def _kind(section: str) -> str | None:
    name = section.strip().lower()
    return next((kind for kind, keys in _KINDS.items() if any(k in name for k in keys)), None)


def _hint_pieces(hint: str) -> dict[str, list[str]]:
    """The hint's text by kind, every word of it kept: lines under a recognised section name go to that
    kind; other sentences go to reasoning when they compute or conclude, else to observation."""
    text = _INLINE_ANSWER_FLAG.sub("answer is ", strip_answer_lines(hint))
    pieces: dict[str, list[str]] = {kind: [] for kind in _KINDS}
    for line in text.splitlines():
        match = _SECTION_LINE.match(line)
        kind = _kind(match.group(1)) if match and len(match.group(1).split()) <= 3 else None
        if kind is not None:
            body = line[match.end():].strip()
            if body:
                pieces[kind].append(body)
            continue
        for sentence in (m.group(0).strip() for m in _HINT_SENTENCE.finditer(line)):
            if sentence:
                pieces["reasoning" if _REASONING.search(sentence) else "observation"].append(sentence)
    return pieces


def _goal(question: str) -> str:
    q = question.rstrip("?").strip()
    return f"Find {q[:1].lower()}{q[1:]}."


def rule_refine(sample: Sample, template: str = DEFAULT_TEMPLATE, observe: str = "relevant") -> str:
    """A deterministic, grounded trace with the template's sections (no 'Answer:' line).

    With structured facts: the rows relevant to the question (every row with ``observe="all"``), and the
    reasoning's arithmetic written out where :func:`derivation` verifies it. Without them, the hint restructured into
    the sections, every sentence (so every number and entity) of it kept. With neither: the question
    restated and the answer, nothing invented (sections with nothing true to say are left out).
    """
    conclusion = f"The answer is {sample.answer}."
    if sample.visual_facts:
        observed = _relevant_rows(sample, observe)
        title = sample.visual_facts.get("title") if isinstance(sample.visual_facts, dict) else None
        content = {
            "goal": _goal(sample.question),
            "observation": (f"The chart '{title}' shows " if title else "The image shows ") + "; ".join(observed) + ".",
            "reasoning": f"{_operation(sample.question)}: {derivation(sample) or f'this gives {sample.answer}.'}",
            "conclusion": conclusion,
        }
    elif sample.hint and sample.hint.strip():
        pieces = _hint_pieces(sample.hint)
        content = {
            "goal": " ".join(pieces["goal"]) or _goal(sample.question),
            "observation": " ".join(pieces["observation"]),
            "reasoning": " ".join(pieces["reasoning"]) or f"{_operation(sample.question)}: this gives {sample.answer}.",
            "conclusion": " ".join(pieces["conclusion"]) if _states_answer(" ".join(pieces["conclusion"]), sample)
            else " ".join([*pieces["conclusion"], conclusion]),
        }
    else:
        content = {"goal": _goal(sample.question), "observation": "", "reasoning": "", "conclusion": conclusion}
    return _fill(template, content)


def _fill(template: str, content: dict[str, str]) -> str:
    """Write `content` (by kind) under the template's section names; no content is ever dropped."""
    sections = template_sections(template) or ["Goal", "Observation", "Reasoning", "Conclusion"]
    kinds = [_kind(name) for name in sections]
    unused = [k for k in _KINDS if k not in kinds]
    if kinds[-1] is None and "conclusion" in unused and len(kinds) > 1:
        kinds[-1] = "conclusion"  # an unnamed last section concludes
        unused.remove("conclusion")
    kinds = [k if k is not None else (unused.pop(0) if unused else "reasoning") for k in kinds]
    texts = {i: content[k] for i, k in enumerate(kinds)}
    # A kind no section holds (e.g. a two-section template) joins the reasoning-like or the last section.
    target = kinds.index("reasoning") if "reasoning" in kinds else len(kinds) - 1
    for kind in ("observation", "reasoning"):
        if kind not in kinds and content[kind]:
            texts[target] = f"{content[kind]} {texts[target]}".strip()
    if "conclusion" not in kinds:
        texts[len(kinds) - 1] = f"{texts[len(kinds) - 1]} {content['conclusion']}".strip()
    return "\n".join(f"{name}: {texts[i]}" for i, name in enumerate(sections) if texts[i].strip())


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

    VERSION = 3  # part of every key: bump it when the refiners' output for the same input changes

    @staticmethod
    def key(sample: Sample, template: str, backend: str, model: str = "", observe: str = "relevant") -> str:
        payload = json.dumps(
            [RefineCache.VERSION, sample.question, sample.answer, sample.hint, sample.visual_facts, template,
             backend, model, observe],
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


def _states_answer(text: str, sample: Sample) -> bool:
    """Whether `text` states one of the sample's accepted answers (a number within relaxed accuracy)."""
    lowered = text.lower()
    numbers = _NUMBER_TEXT.findall(_THOUSANDS.sub("", text))
    for ref in sample.references():
        target = normalize_answer(ref)
        if target and re.search(rf"(?<!\w){re.escape(target)}(?!\w)", lowered):
            return True
        if any(relaxed_match(number, ref) for number in numbers):
            return True
    return False


def trace_problem(trace: str, sample: Sample, max_chars: int) -> str | None:
    """Why an LLM-refined trace must not be memorised (None if it may): too long, or never states the answer."""
    if len(trace) > max_chars:
        return f"refined trace of {len(trace)} characters exceeds refine.max_trace_chars={max_chars}"
    if not _states_answer(trace, sample):
        return f"refined trace does not state the answer {sample.answer!r}"
    return None


@dataclass
class RefinerStats:
    calls: int = 0
    cache_hits: int = 0
    fallbacks: int = 0  # LLM failures and rejected LLM traces, refined by the rule path instead
    rejected: int = 0  # of the fallbacks: LLM traces that failed `trace_problem`
    ungrounded: int = 0  # samples with neither facts nor hint: a minimal trace (question + answer)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)

    def as_dict(self) -> dict[str, int]:
        return {"refiner/calls": self.calls, "refiner/cache_hits": self.cache_hits,
                "refiner/fallbacks": self.fallbacks, "refiner/rejected": self.rejected,
                "refiner/ungrounded": self.ungrounded}


class Refiner:
    """Refines samples with the configured backend, through the cache, concurrently for the LLM.

    An LLM failure or an LLM trace that fails :func:`trace_problem` falls back to the rule refiner,
    counted in `stats` and logged by `fallback_log`; with the client's ``llm.on_failure: fail`` it raises
    :class:`LLMError` instead.
    """

    def __init__(self, backend: str = "rule", cache_dir: str | Path | None = None,
                 client: ChatClient | None = None, max_workers: int = 8,
                 max_trace_chars: int = RefineConfig.max_trace_chars, observe: str = RefineConfig.observe):
        if backend == "llm" and client is None:
            raise ValueError("refine backend 'llm' needs an LLM endpoint (refine.llm.base_url)")
        self.backend = backend
        self.client = client
        self.cache = RefineCache(cache_dir) if cache_dir else None
        self.max_workers = max_workers
        self.max_trace_chars = max_trace_chars
        self.observe = observe
        self.stats = RefinerStats()
        self.fallback_log = FallbackLog("LLM refiner (falling back to the rule refiner)")

    def refine_one(self, sample: Sample, template: str) -> tuple[str, bool]:
        """(trace, fell_back)."""
        if not sample.visual_facts and not (sample.hint and sample.hint.strip()):
            self.stats.add(ungrounded=1)  # counted on cache hits too: it describes the data, not the work
        model = self.client.cfg.model if self.client is not None else ""
        key = RefineCache.key(sample, template, self.backend, model, self.observe) if self.cache else ""
        if self.cache and (hit := self.cache.get(key)) is not None:
            self.stats.add(cache_hits=1)
            return hit, False
        self.stats.add(calls=1)
        fell_back = False
        if self.backend == "llm" and self.client is not None and (sample.visual_facts or sample.hint):
            try:
                trace = self._llm_trace(sample, template)
            except LLMError as e:
                if self.client.cfg.on_failure == "fail":
                    raise LLMError(f"LLM refiner failed on sample {sample.id!r} (llm.on_failure=fail): {e}") from None
                self.stats.add(fallbacks=1)
                self.fallback_log.record(f"sample {sample.id!r}: {e}")
                trace, fell_back = rule_refine(sample, template, self.observe), True
        else:
            trace = rule_refine(sample, template, self.observe)
        if self.cache and not fell_back:  # never cache a fallback: the endpoint may be back next time
            self.cache.put(key, trace)
        return trace, fell_back

    def _llm_trace(self, sample: Sample, template: str) -> str:
        assert self.client is not None
        facts = facts_text(sample.visual_facts) if sample.visual_facts else None
        trace = refine_with_llm(self.client, question=sample.question, answer=sample.answer,
                                template=template, facts=facts, hint=sample.hint)
        problem = trace_problem(trace, sample, self.max_trace_chars)
        if problem is not None:
            self.stats.add(rejected=1)
            raise LLMError(problem)
        return trace

    def refine(self, samples: list[Sample], template: str) -> list[tuple[str, bool]]:
        if self.backend != "llm":
            return [self.refine_one(s, template) for s in samples]
        with ThreadPoolExecutor(max_workers=self.max_workers) as pool:
            return list(pool.map(lambda s: self.refine_one(s, template), samples))
