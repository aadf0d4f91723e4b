"""The rule checker binds each stated value to its label (DESIGN.md section 2): a value counts only beside its
own label, within ChartQA's relaxed tolerance, on structured visual facts and on hint-only rows alike. Tables
of cases, one comment each; then the rule refiner's own traces, which must score 1.0."""

from __future__ import annotations

import pytest

from dyme_core.checker import VisualChecker, hint_facts, read_values, rule_thinking_score
from dyme_core.config import DataConfig, SynthConfig
from dyme_core.data.loaders import load_dataset
from dyme_core.data.synth import synthesize
from dyme_core.refiner import rule_refine

FACTS = {"title": "Sales", "columns": ["label", "Sales"], "rows": [["Apples", 12], ["Pears", 7], ["Plums", 30]]}

FACTS_CASES = [
    # (thinking, expected score) against FACTS, answer "5"
    ("Pears 1, Grapes 2, Apples 3, Limes 4", 0.0),  # labels, no true value (the old checker: 0.31)
    ("Apples 7, Pears 30, Plums 12", 0.0),  # every value right, each under a wrong label (was 0.92)
    ("Apples = 7, Pears = 12.", 0.0),  # two values swapped (was 0.73)
    ("7 for Apples, 12 for Pears", 0.0),  # swapped, the label after its value (was 0.73)
    ("The values are 12, 7 and 30.", 0.0),  # values without labels: nothing binds them (was 0.60)
    ("Apples, Pears and Plums are shown.", 0.0),  # labels without values
    ("12 for Apples, 7 for Pears", pytest.approx(0.727, abs=1e-3)),  # right, the label after its value
    ("Apples is 12 and Pears is 7, so 12 - 7 = 5.", pytest.approx(0.727, abs=1e-3)),  # two facts, a derived 5
    ("Apples is about 12.4, Pears 7 and Plums 30.", pytest.approx(0.923, abs=1e-3)),  # 12.4 is within 5% of 12
    ("Apples is 13, Pears 7 and Plums 30.", pytest.approx(0.615, abs=1e-3)),  # 13 is 8% off: Apples uncredited
    ("Plums (30) > Apples (12) > Pears (7).", pytest.approx(0.923, abs=1e-3)),  # an ordering states each value
    ("Sales: Apples = 12, Pears = 7, Plums = 30.", 1.0),  # every fact, the series name with its values
]


@pytest.mark.parametrize(("thinking", "expected"), FACTS_CASES)
def test_a_value_counts_only_beside_its_label_on_visual_facts(thinking: str, expected) -> None:
    assert rule_thinking_score(thinking, FACTS, answer="5") == expected


HINT = "Pears 78, Apples 56, Grapes 30 and Limes 12."
HINT_CASES = [
    # (thinking, expected score) against HINT (no structured facts), answer "22"
    ("Pears 1, Grapes 2, Apples 3, Limes 4", 0.0),  # the case: no true value (was 0.50)
    ("Pears 56, Apples 78, Grapes 12, Limes 30", 0.0),  # every value right, under wrong labels (was 1.0)
    ("The values are 78, 56, 30 and 12.", 0.0),  # values without labels (was 0.67)
    ("Pears, Apples, Grapes and Limes are shown.", 0.0),  # labels without values
    ("Pears 78, Apples 56, so 78 - 56 = 22.", pytest.approx(0.667, abs=1e-3)),  # half the facts and the result
    ("Pears sold 78 boxes and Apples 56 boxes.", pytest.approx(0.667, abs=1e-3)),  # a unit after each value
    ("Pears 80, Apples 55, Grapes 30 and Limes 12.", 1.0),  # within relaxed tolerance of every value
    (HINT, 1.0),  # the hint itself
]


@pytest.mark.parametrize(("thinking", "expected"), HINT_CASES)
def test_a_value_counts_only_beside_its_label_on_hint_only_rows(thinking: str, expected) -> None:
    assert rule_thinking_score(thinking, None, answer="22", hint=HINT) == expected


BINDINGS = [
    # (text, the labels each number is bound to) with the hint's labels known
    ("Pears 78, Apples 56", [(78, ("pears",)), (56, ("apples",))]),  # label before
    ("78 for Pears, 56 for Apples", [(78, ("pears",)), (56, ("apples",))]),  # label after
    ("Pears is 78 and Apples is 56", [(78, ("pears",)), (56, ("apples",))]),  # "and" between two facts
    ("The difference between Pears and Apples is 22", [(22, ())]),  # a result is bound to no label
    ("So 78 - 56 = 22.", [(78, ()), (56, ()), (22, ())]),  # arithmetic is bound to no label
]


@pytest.mark.parametrize(("text", "expected"), BINDINGS)
def test_read_values_binds_each_number_to_its_label(text: str, expected) -> None:
    readings = read_values(text, hint_facts(HINT).labels)
    assert [(r.value, r.labels) for r in readings] == expected


def test_a_threshold_the_question_gives_is_not_counted_against_the_thinking() -> None:
    thinking = "Sales: Apples = 12, Pears = 7, Plums = 30. Above 10: Apples (12), Plums (30); that is 2."
    question = "How many fruits sold more than 10?"
    assert rule_thinking_score(thinking, FACTS, "2") < 1.0  # 10 is stated and is no fact
    with_question = rule_thinking_score(thinking, FACTS, "2", question=question)
    assert with_question == 1.0  # the question gave the 10
    # a label stated with the question's number is still a wrong reading
    assert rule_thinking_score("Apples = 10, Pears = 7.", FACTS, "2", question=question) == pytest.approx(0.4)
    assert rule_thinking_score("Apples = 12, Pears = 7.", FACTS, "2", question=question) == pytest.approx(0.727, 1e-3)
    checker = VisualChecker("rule")  # the training checker passes the question
    assert checker.score(thinking, FACTS, question, "2") == with_question


@pytest.mark.parametrize("style", ["readable", "classic"])
def test_the_rule_refiners_traces_score_one(tmp_path, style: str) -> None:
    """Memorised targets must be what the checker rewards: on a synthetic set (every question type, one and
    two series, decimals), each rule-refined trace that states the whole chart scores 1.0."""
    root = synthesize(SynthConfig(out_dir=str(tmp_path / style), n_train=14, n_val=0, n_test=0, image_size=224,
                                  style=style))
    samples = load_dataset(DataConfig(path=str(root))).samples
    scores = {s.id: rule_thinking_score(rule_refine(s, observe="all"), s.visual_facts, s.answer, s.hint, s.question)
              for s in samples}
    assert len({s.qtype for s in samples}) == 7
    assert scores == {s.id: 1.0 for s in samples}
