"""The visual refiner: grounded reference traces for memorisation (DESIGN.md section 2).

Default (rule): a deterministic writer that fills the current template's sections
(Goal / Observation / Reasoning / Conclusion) from the visual facts relevant to the question; without
structured facts it restructures the sample's hint into those sections and keeps every sentence (so
every number and entity) of it, as the official method memorises the refined hint; with neither, a
minimal honest trace (the question restated and the answer), counted as ungrounded. Its reasoning is
arithmetic only where it verifies: :func:`derive` reads the values (the table's cells, or the label-value
pairs a hint states, through the checker's :func:`~dyme_core.checker.read_values`), recognises the
question's operation (:func:`operations`) and writes the computation ("78 - 56 = 22") only when its
result reproduces the answer under ChartQA's relaxed accuracy; when nothing verifies, the trace states
the facts and the answer and names no operation.
Option (llm): an LLM over an OpenAI-compatible endpoint extracts the facts stated in the hint, then
rewrites the trace with the template (two calls; one when structured facts exist). The trace is checked
before it is cached (length cap, states the answer); a failure or a rejected trace falls back to the
rule path, counted and logged, or raises with ``llm.on_failure: fail``.
Templates evolve: a correct exploration trace that scores top on the checker may propose its section
structure as a new template; the pool is persisted as versioned JSON. Results are cached on disk by a
hash of everything that determines them, so reruns and online refinement cost nothing twice.
Tests: tests/core/test_refiner_hints.py, tests/core/test_checker_refiner.py.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from dyme_core.checker import facts_text, read_values
from dyme_core.config import RefineConfig
from dyme_core.data.schema import Sample, VisualFacts
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


# ---------------------------------------------------------------- derivations: arithmetic that verifies


@dataclass(frozen=True)
class Fact:
    """One value of the facts: its label, its series ("" when none), the value as written and as a number,
    and the lower-case names a question may call it by."""

    label: str
    series: str
    text: str
    value: float
    names: tuple[str, ...]


def facts_from_table(visual_facts: VisualFacts) -> list[Fact]:
    """A table's cells as facts (row label, column's series name); other structures give none."""
    if not isinstance(visual_facts, dict):
        return []
    columns = [str(c) for c in visual_facts.get("columns", [])]
    facts = []
    for row in visual_facts.get("rows", []):
        if not isinstance(row, list | tuple) or len(row) < 2:
            continue
        for series, cell in zip(columns[1:], row[1:], strict=False):
            value = None if isinstance(cell, bool) else _number(cell)
            if value is not None and math.isfinite(value):
                label = str(row[0])
                facts.append(Fact(label, series, str(cell), value, (label.lower(),)))
    return facts


def facts_from_hint(hint: str) -> list[Fact]:
    """The values a hint states, each with the phrases :func:`~dyme_core.checker.read_values` binds to it.

    Its label is the closest phrase that names this value alone, its series a further phrase shared by
    several values ("In 2019, men earned 45 and women 55": label "men earned", series "2019"; "In 2018
    the GDP was 1,800": label "2018", series "GDP"); every run of words of its phrases names it ("men").
    A value with no phrase bound to it is not a fact.
    """
    readings = [r for r in read_values(hint) if r.phrases]
    values_of: dict[str, set[float]] = {}
    for r in readings:
        for phrase in r.phrases:
            values_of.setdefault(phrase.lower(), set()).add(r.value)
    facts, seen = [], set()
    for r in readings:
        label = next((p for p in r.phrases if len(values_of[p.lower()]) == 1), r.phrases[0])
        series = next((p for p in r.phrases if p != label and len(values_of[p.lower()]) >= 2), "")
        key = (label.lower(), series.lower(), r.value)
        if key in seen:
            continue
        seen.add(key)
        names = set()
        for phrase in r.phrases:
            if phrase == series:
                continue
            words = phrase.lower().split()
            names |= {" ".join(words[i:j]) for i in range(len(words)) for j in range(i + 1, len(words) + 1)}
        facts.append(Fact(label, series, r.text, r.value, tuple(sorted(names, key=lambda n: (-len(n), n)))))
    return facts


def _number(text: object) -> float | None:
    try:
        return float(re.sub(r"[,$€£¥₹%\s]", "", str(text)).replace("−", "-"))
    except ValueError:
        return None


def _same(x: float, y: float) -> bool:
    return abs(x - y) <= 1e-6 * max(1.0, abs(y))


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _operand(fact: Fact) -> str:
    """A value inside arithmetic: as written, without % or currency; a negative one in parentheses."""
    text = re.sub(r"[$€£¥₹%]", "", fact.text).replace("−", "-")
    return f"({text})" if text.startswith("-") else text


def _has(q: str, *phrases: str) -> bool:
    return any(re.search(rf"(?<!\w){re.escape(p)}(?!\w)", q) for p in phrases)


_ABOVE = ("above", "more than", "greater than", "higher than", "over", "exceed", "exceeds", "exceeding")
_BELOW = ("below", "less than", "fewer than", "lower than", "under")
_DIFFERENCE = ("difference", "differ", "gap", "how much more", "how much less", "how much higher", "how much lower",
               "how much bigger", "how much larger", "how much smaller", "how much greater", "how many more",
               "how many fewer", "how many less", "by how much", "minus", "subtract", "increase", "increased",
               "decrease", "decreased", "change", "changed", "rise", "rose", "drop", "dropped", "fall", "fell",
               "grow", "grew")
_SUM = ("sum", "total", "combined", "together", "altogether", "add", "in all")
_AVERAGE = ("average", "mean")
_RATIO = ("ratio", "times", "divided by", "fraction")
_PERCENT_CHANGE = ("percent change", "percentage change", "% change", "percent increase", "percentage increase",
                   "percent decrease", "percentage decrease", "growth rate", "by what percent", "by what percentage",
                   "by how many percent", "percent growth", "percentage growth")
_GREATER = ("greater", "more", "higher", "larger", "bigger", "exceed", "above")
_LESS = ("less", "fewer", "lower", "smaller", "below")


def operations(question: str) -> list[str]:
    """The computations a question asks for, recognised from its words: difference, sum, average, ratio,
    percent_change, count (a lookup, the largest/smallest and a comparison are read off the answer)."""
    q = question.lower()
    found = [name for name, words in (("percent_change", _PERCENT_CHANGE), ("difference", _DIFFERENCE),
                                      ("ratio", _RATIO), ("sum", _SUM), ("average", _AVERAGE)) if _has(q, *words)]
    if _has(q, "how many", "number of", "count") and not _has(q, "how many more", "how many fewer",
                                                                "how many less", "how many times"):
        found.append("count")
    return found


@dataclass(frozen=True)
class Derivation:
    """How the facts give the answer: what was done (``step``) and the arithmetic (``text``)."""

    step: str
    text: str


def _scope(facts: list[Fact], q: str) -> tuple[list[Fact], list[Fact]]:
    """(the facts of the series the question names, or all; of those, one per label the question names,
    in the question's order). A label named twice with different values names nothing (ambiguous)."""
    counts = Counter(f.series for f in facts if f.series)
    named_series = {s for s in counts if counts[s] >= 2 and _named(s, q.lower())}
    rows = [f for f in facts if f.series in named_series] if len(named_series) == 1 else facts
    positions, spans = {}, {}
    for f in rows:
        found = [m.span() for n in f.names for m in re.finditer(rf"(?<!\w){re.escape(n)}(?!\w)", q.lower())]
        if found:
            positions[id(f)] = min(start for start, _ in found)
            spans[id(f)] = max(found, key=lambda s: s[1] - s[0])
    named = sorted((f for f in rows if id(f) in positions), key=lambda f: positions[id(f)])
    by_label = Counter(f.label.lower() for f in named)
    # a hint's phrase ("Labour won") is called what the question calls it ("Labour")
    called = {id(f): q[slice(*spans[id(f)])] if len(q) == len(q.lower()) else f.label for f in named}
    named = [f if called[id(f)].lower() == f.label.lower() else replace(f, label=called[id(f)])
             for f in named if by_label[f.label.lower()] == 1]
    return rows, named


def derive(sample: Sample) -> Derivation | None:
    """The arithmetic that takes the facts to the answer, written out (``45 - 23 = 22``), or None.

    The facts are the sample's table, else the values its hint states. Every candidate is
    computed from the facts and kept only where its result reproduces a reference answer (ChartQA's
    relaxed accuracy), so no derivation is ever invented: for a label answer, the larger/smaller of the
    two named values or the largest/smallest value; for yes/no, the comparison of the two named values;
    for a number, the named value itself, then the computations the question asks for (:func:`operations`):
    the difference of the two named values (or of the largest and smallest), their ratio or percent change,
    the sum or mean of the named values (of all values for a total or an average), how many values lie
    above/below a number the question gives, how many values there are. Values are written as the facts
    state them; a result equal to the answer as the answer states it, another one as computed.
    """
    facts = facts_from_table(sample.visual_facts) if sample.visual_facts else facts_from_hint(sample.hint or "")
    if not facts:
        return None
    q = sample.question.lower()
    rows, named = _scope(facts, sample.question)
    answer = str(sample.answer).strip()
    refs = sample.references()
    said = {answer.lower(), normalize_answer(answer)}
    if any(said & {f.label.lower(), *f.names} for f in rows):
        return _label_answer(rows, named, said)
    if normalize_answer(answer) in ("yes", "no"):
        return _yes_no(named, q, normalize_answer(answer) == "yes")
    want = _number(answer)
    if want is None:
        return None

    def result(x: float) -> str | None:
        """The result as written after "=" when it reproduces the answer, else None."""
        if _same(x, want):
            return f"= {answer}"
        rounded = round(x, 2)
        text = _fmt(rounded)
        if not any(relaxed_match(text, ref) for ref in refs):
            return None
        return f"= {text}" if _same(rounded, x) else f"≈ {text}"

    if len(named) == 1 and result(named[0].value):
        return Derivation("Read the value the question asks for", f"The value for {named[0].label} is {named[0].text}.")
    asked = operations(sample.question)
    a, b = (named[0], named[1]) if len(named) == 2 else (None, None)
    if "percent_change" in asked and a and b and a.value != 0:
        if r := result((b.value - a.value) / a.value * 100):
            return Derivation("Take the change relative to the first value",
                              f"({_operand(b)} - {_operand(a)}) / {_operand(a)} * 100 {r}.")
    if "difference" in asked and a and b:
        hi, lo = sorted((a, b), key=lambda f: f.value, reverse=True)
        if r := result(hi.value - lo.value):
            return Derivation("Subtract the smaller value from the larger one", f"{_operand(hi)} - {_operand(lo)} {r}.")
        if r := result(a.value - b.value):
            return Derivation("Subtract the second value from the first", f"{_operand(a)} - {_operand(b)} {r}.")
    if "difference" in asked and len(named) < 2 and _has(q, "highest", "largest", "maximum", "most") \
            and _has(q, "lowest", "smallest", "minimum", "least"):
        top, bottom = max(rows, key=lambda f: f.value), min(rows, key=lambda f: f.value)
        if (r := result(top.value - bottom.value)) and top is not bottom:
            return Derivation("Subtract the smallest value from the largest",
                              f"The largest value is {top.text} ({top.label}) and the smallest {bottom.text} "
                              f"({bottom.label}): {_operand(top)} - {_operand(bottom)} {r}.")
    if "ratio" in asked and a and b:
        for x, y in ((a, b), (b, a)):
            if y.value != 0 and (r := result(x.value / y.value)):
                return Derivation("Divide one value by the other", f"{_operand(x)} / {_operand(y)} {r}.")
    for scope in (named, rows) if len(named) >= 2 else (rows,):
        total = sum(f.value for f in scope)
        if "sum" in asked and (r := result(total)):
            return Derivation("Add the values together", f"{' + '.join(_operand(f) for f in scope)} {r}.")
        if "average" in asked and (r := result(total / len(scope))):
            return Derivation("Add the values and divide by how many there are",
                              f"({' + '.join(_operand(f) for f in scope)}) / {len(scope)} {r}.")
    if "count" in asked:
        for t in (v for v in (_number(m) for m in re.findall(r"\d+(?:\.\d+)?", q)) if v is not None):
            for words, side, hit in ((_ABOVE, "above", lambda v, t=t: v > t), (_BELOW, "below", lambda v, t=t: v < t)):
                chosen = [f for f in rows if hit(f.value)]
                if _has(q, *words) and _same(len(chosen), want):
                    listed = ", ".join(f"{f.label} ({f.text})" for f in chosen) or "none"
                    return Derivation("Count the items shown",
                                      f"{side.capitalize()} {_fmt(t)}: {listed}; that is {answer}.")
        shown = list(dict.fromkeys(f.label for f in rows))  # a label with several series is one item
        if _same(len(shown), want):
            return Derivation("Count the items shown", f"Counting {', '.join(shown)} gives {answer}.")
    return None


def _label_answer(rows: list[Fact], named: list[Fact], said: set[str]) -> Derivation | None:
    """The answer (`said`, as written and normalised) is a label: the larger/smaller of the two named values,
    or the largest/smallest."""
    scope = named if len(named) >= 2 else rows
    chosen = next((f for f in scope if said & {f.label.lower(), *f.names}), None)
    if chosen is None:
        return None
    top, bottom = max(scope, key=lambda f: f.value), min(scope, key=lambda f: f.value)
    if len(scope) == 2:
        other = scope[0] if scope[1] is chosen else scope[1]
        if chosen is top and top.value != bottom.value:
            return Derivation("Compare the two values", f"{chosen.text} > {other.text}, so {chosen.label} is larger.")
        if chosen is bottom and top.value != bottom.value:
            return Derivation("Compare the two values", f"{chosen.text} < {other.text}, so {chosen.label} is smaller.")
        return None
    if chosen is top and sum(f.value == top.value for f in scope) == 1:
        return Derivation("Compare the values and take the largest", f"The largest value is {top.text} ({top.label}).")
    if chosen is bottom and sum(f.value == bottom.value for f in scope) == 1:
        return Derivation("Compare the values and take the smallest",
                          f"The smallest value is {bottom.text} ({bottom.label}).")
    return None


def _yes_no(named: list[Fact], q: str, yes: bool) -> Derivation | None:
    """A yes/no comparison of the two named values, in the question's order ("Is A greater than B?")."""
    if len(named) != 2 or named[0].value == named[1].value:
        return None
    a, b = named
    greater, less = _has(q, *_GREATER), _has(q, *_LESS)
    if greater == less:  # neither, or both ("more or less"): the question's relation is unclear
        return None
    holds = (a.value > b.value) if greater else (a.value < b.value)
    if holds != yes:
        return None
    sign = ">" if a.value > b.value else "<"
    word = ("greater" if greater else "smaller") if holds else ("not greater" if greater else "not smaller")
    return Derivation("Compare the two values", f"{a.text} {sign} {b.text}, so {a.label} is {word} than {b.label}.")


def derivation(sample: Sample) -> str | None:
    """The text of :func:`derive` (the arithmetic alone), or None."""
    found = derive(sample)
    return found.text if found else None


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
    reasoning's arithmetic where :func:`derive` verifies it against the answer. Without them, the hint
    restructured into the sections, every sentence (so every number and entity) of it kept, and the
    arithmetic that takes the values it states to the answer where that verifies. With neither: the
    question restated and the answer. Nothing is invented: where no computation reproduces the answer the
    trace states the facts and the answer and names no operation (a section with nothing true to say is
    left out).
    """
    conclusion = f"The answer is {sample.answer}."
    found = derive(sample)
    step = f"{found.step}: {found.text}" if found else ""
    if sample.visual_facts:
        observed = _relevant_rows(sample, observe)
        title = sample.visual_facts.get("title") if isinstance(sample.visual_facts, dict) else None
        content = {
            "goal": _goal(sample.question),
            "observation": (f"The chart '{title}' shows " if title else "The image shows ") + "; ".join(observed) + ".",
            "reasoning": step,
            "conclusion": conclusion,
        }
    elif sample.hint and sample.hint.strip():
        pieces = _hint_pieces(sample.hint)
        if found and " ".join(found.text.split()) in " ".join(sample.hint.split()):
            step = ""  # the hint writes this arithmetic already
        content = {
            "goal": " ".join(pieces["goal"]) or _goal(sample.question),
            "observation": " ".join(pieces["observation"]),
            "reasoning": " ".join([*pieces["reasoning"], step]).strip(),
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

    VERSION = 4  # part of every key: bump it when the refiners' output for the same input changes

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
