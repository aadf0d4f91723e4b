"""Completion parsing, the rewards of DESIGN.md section 2, and the reward table the trainer loops over.

A completion is "thinking ... Answer: <answer>". Thinking is the text before the LAST answer flag;
the answer is the first non-empty line after it (flag matched case-insensitively). Accuracy is
ChartQA's relaxed accuracy for charts (numbers within 5% relative; percent and plain forms,
thousands separators, currency, trailing punctuation and markdown ignored; text compared
case-insensitively) and a match against any of the direct answers for VQA. Both rewards are 0/1.

`REWARDS` maps a reward's name to a function with one signature,
``fn(completions, samples, ctx) -> list[float]`` (one completion per entry, `samples[i]` the sample
completion i answers, `ctx` a :class:`RewardContext`), so a new reward is one function here and one
``train.reward_weights`` entry; ``total = sum(weight[name] * reward[name])``. The trainer takes any table of
that signature (``DymeTrainer(..., rewards=...)``, default `REWARDS`); evaluation scores accuracy and format
through `REWARDS` with the training's ``train.min_thinking_chars``. Tests:
tests/core/test_rewards.py.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from dyme_core.data.schema import Sample

ANSWER_FLAG_RE = re.compile(r"answer\s*:", re.IGNORECASE)
_NUMBER_RE = re.compile(r"[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?")
_MARKDOWN_RE = re.compile(r"[*_`#>]+")
_CURRENCY = "$€£¥₹"
RELATIVE_TOLERANCE = 0.05


@dataclass(frozen=True)
class ParsedCompletion:
    thinking: str
    answer: str  # "" when there is no flag or nothing after it
    n_flags: int


def parse_completion(text: str) -> ParsedCompletion:
    flags = list(ANSWER_FLAG_RE.finditer(text))
    if not flags:
        return ParsedCompletion(thinking=text.strip(), answer="", n_flags=0)
    last = flags[-1]
    after = text[last.end():]
    answer = next((line.strip() for line in after.splitlines() if line.strip()), "")
    return ParsedCompletion(thinking=text[: last.start()].strip(), answer=answer, n_flags=len(flags))


def format_reward(response: str, min_thinking_chars: int = 10) -> float:
    """1.0 if the flag occurs exactly once and the thinking has at least `min_thinking_chars` chars."""
    parsed = parse_completion(response)
    return float(parsed.n_flags == 1 and len(parsed.thinking) >= min_thinking_chars and parsed.answer != "")


def normalize_answer(text: str) -> str:
    """Strip markdown, quotes, trailing punctuation and extra spaces; lower-case."""
    text = _MARKDOWN_RE.sub("", text).strip().strip("\"'“”‘’")
    text = text.rstrip(".,;:!?").strip()
    return " ".join(text.split()).lower()


def _numeric_values(text: str) -> set[float] | None:
    """The numbers a text may mean: '45%' -> {45, 0.45}; '1,234' -> {1234}; None if not a number."""
    t = normalize_answer(text).replace(" ", "")
    t = t.strip(_CURRENCY)
    percent = t.endswith("%") or t.endswith("percent")
    t = t.removesuffix("%").removesuffix("percent").strip(_CURRENCY)
    if re.fullmatch(r"[-+]?\d{1,3}(,\d{3})+(\.\d+)?", t):
        t = t.replace(",", "")
    try:
        value = float(t)
    except ValueError:
        return None
    return {value, value / 100} if percent else {value}


def relaxed_match(prediction: str, target: str, tolerance: float = RELATIVE_TOLERANCE) -> bool:
    """ChartQA relaxed accuracy for one prediction/target pair."""
    if not prediction.strip():
        return False
    pred_nums, target_nums = _numeric_values(prediction), _numeric_values(target)
    if pred_nums is not None and target_nums is not None:
        for t in target_nums:
            for p in pred_nums:
                if (t == 0 and p == 0) or (t != 0 and abs(p - t) / abs(t) <= tolerance):
                    return True
        return False
    return normalize_answer(prediction) == normalize_answer(target)


def accuracy_reward(response: str, reference: str | list[str]) -> float:
    """1.0 if the parsed answer matches the reference (or any of a list of direct answers)."""
    answer = parse_completion(response).answer
    references = [reference] if isinstance(reference, str) else list(reference)
    return float(any(relaxed_match(answer, r) for r in references))


def direct_accuracy(response: str, reference: str | list[str]) -> float:
    """Accuracy for direct-answer prompts: the flag is optional, the first line is the answer."""
    parsed = parse_completion(response)
    answer = parsed.answer if parsed.n_flags else next(
        (line.strip() for line in response.splitlines() if line.strip()), ""
    )
    references = [reference] if isinstance(reference, str) else list(reference)
    return float(any(relaxed_match(answer, r) for r in references))


def extract_numbers(text: str) -> list[float]:
    """Numbers stated in free text ('1,234' -> 1234.0; '45%' -> 45.0)."""
    cleaned = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)
    return [float(m) for m in _NUMBER_RE.findall(cleaned)]


# ---------------------------------------------------------------- the reward table


class ThinkingScorer(Protocol):
    """What the thinking reward needs of the visual checker (dyme_core.checker.VisualChecker)."""

    def score_many(self, items: list[tuple[str, Any, str, str, str | None]]) -> list[float]: ...


@dataclass(frozen=True)
class RewardContext:
    """What rewards need beyond a completion and its sample: the prompt style and the trainer's checker."""

    prompt_style: str = "reason"  # "direct": no thinking is asked for (format 1, thinking 0)
    min_thinking_chars: int = 10
    checker: ThinkingScorer | None = None  # None: the thinking reward is 0
    num_generations: int = 1  # completions come sample-major, this many per sample (the trainer's K)


RewardFn = Callable[[list[str], list["Sample"], RewardContext], list[float]]


def format_rewards(completions: list[str], samples: list[Sample], ctx: RewardContext) -> list[float]:
    """`format_reward` per completion; 1 for direct prompts, which ask for no thinking."""
    if ctx.prompt_style == "direct":
        return [1.0] * len(completions)
    return [format_reward(c, ctx.min_thinking_chars) for c in completions]


def accuracy_rewards(completions: list[str], samples: list[Sample], ctx: RewardContext) -> list[float]:
    """Relaxed accuracy of each completion's answer against its sample's references."""
    score = direct_accuracy if ctx.prompt_style == "direct" else accuracy_reward
    return [score(c, s.references()) for c, s in zip(completions, samples, strict=True)]


def thinking_rewards(completions: list[str], samples: list[Sample], ctx: RewardContext) -> list[float]:
    """The visual checker's grounding score of each thinking, against the sample's facts or its hint."""
    if ctx.prompt_style == "direct" or ctx.checker is None:
        return [0.0] * len(completions)
    items = []
    for c, s in zip(completions, samples, strict=True):
        parsed = parse_completion(c)
        items.append((parsed.thinking, s.visual_facts, s.question, parsed.answer, s.hint))
    return list(ctx.checker.score_many(items))


REWARDS: dict[str, RewardFn] = {
    "format": format_rewards,
    "accuracy": accuracy_rewards,
    "thinking": thinking_rewards,
}
