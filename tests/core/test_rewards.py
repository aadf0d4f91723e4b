"""Parsing, format and accuracy rewards: tables of cases, one comment each."""

import pytest

from dyme_core.rewards import accuracy_reward, format_reward, parse_completion, relaxed_match

ACCURACY_CASES = [
    # (completion, reference, expected)
    ("The bar is 12.\nAnswer: 12", "12", 1.0),  # exact number
    ("Answer: 12.5", "12", 1.0),  # 4.2% relative: inside the tolerance
    ("Answer: 12.6", "12", 1.0),  # 5.0% relative: inside the tolerance
    ("Answer: 12.7", "12", 0.0),  # 5.8% relative: outside
    ("Answer: 45%", "45", 1.0),  # percent and plain forms are equivalent
    ("Answer: 0.45", "45%", 1.0),  # a fraction matches the percent
    ("Answer: 1,234", "1234", 1.0),  # thousands separator ignored
    ("Answer: $1,234.", "1234", 1.0),  # currency and trailing punctuation ignored
    ("Answer: **Mar**", "Mar", 1.0),  # markdown around the answer stripped
    ("Answer: mar", "Mar", 1.0),  # text is case-insensitive
    ("Answer: March", "Mar", 0.0),  # text needs an exact match
    ("Answer: yes", "Yes", 1.0),  # yes/no
    ("thinking only, 12", "12", 0.0),  # no flag scores 0
    ("Answer:   \n", "12", 0.0),  # empty answer scores 0
    ("Answer: 3\nmore thoughts\nAnswer: 12", "12", 1.0),  # the LAST flag counts
    ("answer: 12\nAnswer: 7", "12", 0.0),  # ... even when an earlier one was right
    ("ANSWER:\n\n 12 \nextra", "12", 1.0),  # first non-empty line after the flag, any case
    ("Answer: 0", "0", 1.0),  # zero matches zero
    ("Answer: 0.01", "0", 0.0),  # nothing is within 5% of zero but zero
    ("Answer: -5", "-5.1", 1.0),  # negatives
]


@pytest.mark.parametrize(("completion", "reference", "expected"), ACCURACY_CASES)
def test_accuracy_reward(completion: str, reference: str, expected: float) -> None:
    assert accuracy_reward(completion, reference) == expected


def test_accuracy_reward_direct_answers_match_any() -> None:
    # VQA: any of the direct answers counts
    assert accuracy_reward("Answer: two", ["2", "two"]) == 1.0
    assert accuracy_reward("Answer: three", ["2", "two"]) == 0.0


FORMAT_CASES = [
    # (completion, expected)
    ("The Aug bar reads 82.2.\nAnswer: 82.2", 1.0),  # one flag, enough thinking
    ("Answer: 82.2", 0.0),  # no thinking
    ("short\nAnswer: 82.2", 0.0),  # thinking under 10 characters
    ("The Aug bar reads 82.2.\nAnswer: 82.2\nAnswer: 82.2", 0.0),  # two flags
    ("The Aug bar reads 82.2 and that is all.", 0.0),  # no flag
    ("The Aug bar reads 82.2.\nanswer: 82.2", 1.0),  # flag is case-insensitive
    ("The Aug bar reads 82.2.\nAnswer:", 0.0),  # flag with nothing after it
]


@pytest.mark.parametrize(("completion", "expected"), FORMAT_CASES)
def test_format_reward(completion: str, expected: float) -> None:
    assert format_reward(completion) == expected


def test_parse_splits_on_last_flag() -> None:
    p = parse_completion("Goal: x\nAnswer: 1\nReasoning: y\nAnswer: 2\n")
    assert p.thinking == "Goal: x\nAnswer: 1\nReasoning: y"
    assert p.answer == "2"
    assert p.n_flags == 2


def test_relaxed_match_text_vs_number() -> None:
    assert not relaxed_match("Mar", "12")
    assert not relaxed_match("", "12")
