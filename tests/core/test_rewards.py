"""Parsing, format and accuracy rewards: tables of cases, one comment each."""

import pytest

from dyme_core.checker import VisualChecker
from dyme_core.config import ConfigError, load_config
from dyme_core.data.schema import Sample
from dyme_core.rewards import (
    REWARDS,
    RewardContext,
    accuracy_reward,
    format_reward,
    parse_completion,
    relaxed_match,
)

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


# ---------------------------------------------------------------- the reward table

TABLE_SAMPLE = Sample(id="s", image="i.png", question="Which month is highest?", answer="Aug",
                      hint="Aug is 82 and Jul is 40, so Aug is highest.")
FACTS_SAMPLE = Sample(id="f", image="i.png", question="What is Aug?", answer="82",
                      visual_facts=[{"name": "Aug", "value": 82}, {"name": "Jul", "value": 40}])

TABLE_CASES = [
    # (reward, completion, sample, prompt style, expected)
    ("format", "Aug reads 82, Jul 40.\nAnswer: Aug", TABLE_SAMPLE, "reason", 1.0),  # thinking + one flag
    ("format", "Answer: Aug", TABLE_SAMPLE, "reason", 0.0),  # no thinking
    ("format", "Aug", TABLE_SAMPLE, "direct", 1.0),  # direct prompts ask for no thinking
    ("accuracy", "Aug reads 82.\nAnswer: aug", TABLE_SAMPLE, "reason", 1.0),  # case-insensitive text
    ("accuracy", "Answer: Jul", TABLE_SAMPLE, "reason", 0.0),  # wrong label
    ("accuracy", "Aug", TABLE_SAMPLE, "direct", 1.0),  # direct: the first line is the answer
    ("accuracy", "Aug is 82.\nAnswer: 81", FACTS_SAMPLE, "reason", 1.0),  # relaxed: within 5%
    ("thinking", "Aug is 82 and Jul is 40.\nAnswer: Aug", TABLE_SAMPLE, "reason", 1.0),  # every hint fact stated
    ("thinking", "Jan Feb Mar Aug Jul.\nAnswer: Aug", TABLE_SAMPLE, "reason", 0.0),  # names without values
    ("thinking", "Aug is 82 and Jul is 40.\nAnswer: Aug", TABLE_SAMPLE, "direct", 0.0),  # no thinking asked
    ("thinking", "Aug is 82, Jul is 40.\nAnswer: 82", FACTS_SAMPLE, "reason", 1.0),  # structured facts
]


@pytest.mark.parametrize(("name", "completion", "sample", "style", "expected"), TABLE_CASES)
def test_reward_table(name: str, completion: str, sample: Sample, style: str, expected: float) -> None:
    ctx = RewardContext(prompt_style=style, min_thinking_chars=10, checker=VisualChecker("rule"))
    assert REWARDS[name]([completion], [sample], ctx) == pytest.approx([expected])


def test_every_reward_has_the_one_signature() -> None:
    ctx = RewardContext(checker=VisualChecker("rule"))
    completions = ["Aug is 82.\nAnswer: Aug", "Answer: Jul", "nothing"]
    for name, fn in REWARDS.items():
        out = fn(completions, [TABLE_SAMPLE] * 3, ctx)
        assert isinstance(out, list) and len(out) == 3 and all(0.0 <= x <= 1.0 for x in out), name


def test_thinking_reward_hands_the_checker_the_hint() -> None:
    """Contract C2: items are (thinking, visual_facts, question, answer, hint)."""
    seen = []

    class Recorder:
        def score_many(self, items):
            seen.extend(items)
            return [0.5] * len(items)

    out = REWARDS["thinking"](["Aug is 82.\nAnswer: Aug"], [TABLE_SAMPLE], RewardContext(checker=Recorder()))
    assert out == [0.5]
    assert seen == [("Aug is 82.", None, TABLE_SAMPLE.question, "Aug", TABLE_SAMPLE.hint)]
    assert REWARDS["thinking"](["Aug is 82.\nAnswer: Aug"], [TABLE_SAMPLE], RewardContext()) == [0.0]  # no checker


def test_reward_weights_are_a_mapping_of_known_names() -> None:
    assert load_config(None, []).train.reward_weights == {"format": 1.0, "accuracy": 1.0, "thinking": 1.0}
    cfg = load_config(None, ["train.reward_weights={accuracy: 2, thinking: 0.5}"])
    assert cfg.train.reward_weights == {"accuracy": 2, "thinking": 0.5}
    with pytest.raises(ConfigError, match=r"train.reward_weights: unknown reward\(s\) \['length'\]"):
        load_config(None, ["train.reward_weights={accuracy: 1, length: 1}"])
    with pytest.raises(ConfigError, match="train.reward_weights.accuracy must be a finite number"):
        load_config(None, ["train.reward_weights={accuracy: .nan}"])
    with pytest.raises(ConfigError, match="train.reward_weights: expected a mapping"):
        load_config(None, ["train.reward_weights=[1,1,1]"])  # the old positional form names no reward
