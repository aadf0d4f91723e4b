"""Completion parsing and the format and accuracy rewards of DESIGN.md section 2.

A completion is "thinking ... Answer: <answer>". Thinking is the text before the LAST answer flag;
the answer is the first non-empty line after it (flag matched case-insensitively). Accuracy is
ChartQA's relaxed accuracy for charts (numbers within 5% relative; percent and plain forms,
thousands separators, currency, trailing punctuation and markdown ignored; text compared
case-insensitively) and a match against any of the direct answers for VQA. Both rewards are 0/1.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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
