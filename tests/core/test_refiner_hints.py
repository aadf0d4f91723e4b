"""The rule refiner on hint-only rows (DESIGN.md section 2): the values a hint states, the question's operation,
and arithmetic written only where it reproduces the answer. Every trace is checked by an independent verifier:
each equation it writes is parsed and evaluated, each comparison checked, and the result must be the answer
(ChartQA's relaxed accuracy); where nothing verifies, no operation may be named at all."""

from __future__ import annotations

import ast
import json
import operator
import re
from pathlib import Path

import pytest
from PIL import Image

from dyme_core import refiner, steps
from dyme_core.config import load_config
from dyme_core.data.ingest import ingest, open_dataset
from dyme_core.data.schema import Sample
from dyme_core.refiner import derive, facts_from_hint, operations, rule_refine
from dyme_core.rewards import relaxed_match

# What the refiner writes before a computation; none may appear where no computation verifies.
STEPS = ("Read the value", "Subtract", "Add the values", "Divide", "Take the change", "Compare the",
         "Count the items")

FRUIT = "Pears 78, Apples 56 and Limes 12."
CASES = [
    # (question, hint, answer, the step written)
    ("How many more boxes of Pears than Apples were sold?", "Pears 78, Apples 56", "22",
     "Subtract"),  # the issue's row: a difference said "how many more", not a count
    ("What is the difference between Oslo and Rome?", "Oslo 4.5, Rome 7.25", "2.75", "Subtract"),  # decimals
    ("What is the difference in temperature between Oslo and Rome?",
     "Oslo was at -3.5 degrees while Rome reached 6 degrees.", "9.5", "Subtract"),  # a negative value, units
    ("What is the total of Pears and Apples?", FRUIT, "134", "Add the values"),  # sum of the two named
    ("How many visitors came in total?", "Visitors: Lima 1,200 people, Oslo 2,350 people, Doha 800 people.",
     "4350", "Add the values"),  # thousands separators, a heading series, "how many" that is a total
    ("What is the average share of Chile, Peru and Spain?", "Chile holds 12.5%, Peru 20% and Spain 30.5%.",
     "21", "Add the values and divide"),  # percentages
    ("What is the mean score across all teams?", "Lions 10, Tigers 20, Eagles 33", "21",
     "Add the values and divide"),  # mean of every value
    ("What is the ratio of Pears to Apples?", "Pears 78, Apples 56", "1.39", "Divide"),  # rounded: written ≈
    ("By what percentage did the GDP grow from 2018 to 2019?",
     "In 2018 the GDP was 1,800 billion USD. In 2019 it reached 1,870 billion USD.", "3.89%",
     "Take the change"),  # percent change; years are labels, not values
    ("How much did the GDP increase from 2018 to 2019?",
     "In 2018 the GDP was 1,800 billion USD. In 2019 it reached 1,870 billion USD.", "70", "Subtract"),
    ("Which fruit sold the most?", FRUIT, "Pears", "Compare the values and take the largest"),  # max
    ("Which city was the coldest?", "Oslo -3.5, Rome 6, Lima 14.2", "Oslo",
     "Compare the values and take the smallest"),  # min over a negative value
    ("How many countries have more than 50 medals?", "Norway 45 medals, Chile 60 medals, Kenya 70 medals.", "2",
     "Count the items"),  # count above a threshold
    ("How many months were below 10 degrees?", "Jan 2.5, Feb 4, Mar 11, Apr 15", "2",
     "Count the items"),  # count below a threshold
    ("How many fruits are shown?", FRUIT, "3", "Count the items"),  # count of the values
    ("Which sold more, Apples or Limes?", FRUIT, "Apples", "Compare the two values"),  # comparison, a label
    ("Is the value of Apples greater than that of Pears?", "Pears 78, Apples 56", "No",
     "Compare the two values"),  # comparison, yes/no
    ("What is the difference between men and women in 2020?",
     "In 2019, men earned 45 and women 55. In 2020, men earned 50 and women 58.", "8",
     "Subtract"),  # several series: the question's year picks one
    ("What is the gap between Online and Retail sales of Laptops?",
     "Laptops: Online 45, Retail 30. Phones: Online 20, Retail 25.", "15", "Subtract"),  # series as headings
    ("What share of the vote did Labour get?", "Labour won 40.2% of the vote and the Greens 8.1%.", "40.2",
     "Read the value"),  # lookup of a percentage
    ("What was the balance of Acme?", "Acme closed at -12.5 million dollars, Beta at 3 million.", "-12.5",
     "Read the value"),  # lookup of a negative value with units
]
NOTHING_VERIFIES = [
    # (question, hint, answer): the trace states the facts and the answer, and names no operation
    ("How many more boxes of Pears than Apples were sold?", "Pears 78, Apples 56", "30"),  # a wrong answer
    ("What is the median?", FRUIT, "56"),  # no rule for a median
    ("What is the value of Plums?", "Pears 78, Apples 56", "30"),  # the hint never states it
    ("What is the difference between Apples and Pears?",
     "The bar chart shows Sales for 6 fruits. We need to find the difference between Apples and Pears, so the "
     "result is 5.", "5"),  # a templated hint without values
    ("What is the total of Pears and Apples?", "Looking at the picture, Pears are maybe 70 or so.", "134"),  # vague
]

_EQUATION = re.compile(r"(?P<lhs>[\d\s.,+\-*/()]*\d[\d\s.,+\-*/()]*?)\s*(?P<sign>=|≈)\s*"
                       r"(?P<rhs>-?\d[\d,]*(?:\.\d+)?%?)")
_COMPARISON = re.compile(r"(?<![\w.])(?P<a>-?\d[\d,]*(?:\.\d+)?)%?\s*(?P<sign>[<>])\s*(?P<b>-?\d[\d,]*(?:\.\d+)?)")
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _evaluate(expression: str) -> float:
    """Arithmetic only (numbers, + - * /, parentheses): nothing in a trace is ever executed."""
    def walk(node: ast.AST) -> float:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return float(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        raise ValueError(f"not arithmetic: {expression!r}")

    return walk(ast.parse(re.sub(r"(?<=\d),(?=\d{3})", "", expression), mode="eval"))


def _number(text: str) -> float:
    return float(text.replace(",", "").rstrip("%"))


def verify(trace: str, answer: str) -> tuple[list[str], list[str]]:
    """(the equations and comparisons the trace writes, the problems with them): an equation must hold (within
    the rounding its result is written with, for ≈), a comparison must hold, and the trace's last equation must
    reproduce the answer under relaxed accuracy."""
    written, problems, results = [], [], []
    for m in _EQUATION.finditer(trace):
        lhs = m["lhs"].strip(" ,.")
        if not re.search(r"\d\s*[-+*/]\s*[-(]*\s*\d", lhs):  # "Apples = 12" states a value; not arithmetic
            continue
        written.append(m.group(0))
        value, rhs = _evaluate(lhs), _number(m["rhs"])
        decimals = len(m["rhs"].rstrip("%").partition(".")[2])
        slack = 0.5 * 10 ** -decimals + 1e-9 if m["sign"] == "≈" else 1e-6 * max(1.0, abs(rhs))
        if abs(value - rhs) > slack:
            problems.append(f"false arithmetic: {m.group(0)!r} ({lhs} is {value:g})")
        results.append(m["rhs"])
    for m in _COMPARISON.finditer(trace):
        written.append(m.group(0))
        a, b = _number(m["a"]), _number(m["b"])
        if not (a > b if m["sign"] == ">" else a < b):
            problems.append(f"false comparison: {m.group(0)!r}")
    if results and not relaxed_match(results[-1], answer):
        problems.append(f"the arithmetic gives {results[-1]}, not the answer {answer}")
    for m in re.finditer(r"so \w+ is (not )?(?:greater|smaller) than", trace):  # a yes/no comparison's verdict
        if answer.lower() not in ("yes", "no") or (m.group(1) is None) != (answer.lower() == "yes"):
            problems.append(f"{m.group(0)!r} does not give the answer {answer}")
    return written, problems


def _reasoning(trace: str) -> str:
    return next((line for line in trace.splitlines() if line.startswith("Reasoning:")), "")


@pytest.mark.parametrize(("question", "hint", "answer", "step"), CASES)
def test_hint_only_rows_get_the_arithmetic_that_gives_the_answer(question: str, hint: str, answer: str,
                                                                 step: str) -> None:
    sample = Sample(id="h", image="a.png", question=question, answer=answer, hint=hint)
    trace = rule_refine(sample)
    reasoning = _reasoning(trace)
    assert reasoning.startswith(f"Reasoning: {step}"), trace
    written, problems = verify(trace, answer)
    assert problems == [], trace
    if step in ("Subtract", "Add the values", "Add the values and divide", "Divide", "Take the change"):
        assert written, trace  # a computed answer is written as arithmetic
    assert trace.endswith(f"Conclusion: The answer is {answer}."), trace
    assert all(line.split(":")[0] in ("Goal", "Observation", "Reasoning", "Conclusion") for line in trace.splitlines())


def test_the_issue_row_says_the_subtraction() -> None:
    sample = Sample(id="h", image="a.png", question="How many more boxes of Pears than Apples were sold?",
                    answer="22", hint="Pears 78, Apples 56")
    assert _reasoning(rule_refine(sample)) == "Reasoning: Subtract the smaller value from the larger one: 78 - 56 = 22."
    assert "Count" not in rule_refine(sample)


@pytest.mark.parametrize(("question", "hint", "answer"), NOTHING_VERIFIES)
def test_no_operation_is_named_when_none_verifies(question: str, hint: str, answer: str) -> None:
    sample = Sample(id="h", image="a.png", question=question, answer=answer, hint=hint)
    trace = rule_refine(sample)
    assert derive(sample) is None
    assert not any(s in trace for s in STEPS), trace
    assert verify(trace, answer) == ([], []), trace
    assert trace.endswith(f"The answer is {answer}."), trace


@pytest.mark.parametrize(("question", "hint", "answer", "step"), CASES)
def test_whatever_the_answer_nothing_false_is_written(question: str, hint: str, answer: str, step: str) -> None:
    # the same rows with answers the facts do not give (or give by another route): every equation and
    # comparison written is still true, and any arithmetic still ends at the answer it claims
    for other in ("0", "1", "7", "-4.5", "1000", "12.34", "No", "Yes", "Limes", "Rome"):
        sample = Sample(id="h", image="a.png", question=question, answer=other, hint=hint)
        assert verify(rule_refine(sample), other)[1] == [], (other, rule_refine(sample))


def test_the_verifier_catches_an_invented_operation(monkeypatch: pytest.MonkeyPatch) -> None:
    sample = Sample(id="h", image="a.png", question="How many more boxes of Pears than Apples were sold?",
                    answer="22", hint="Pears 78, Apples 56")
    trace = rule_refine(sample)
    assert verify(trace, "22")[1] == []
    # mutations of the trace: an invented operation, a wrong result, a false comparison all fail the verifier
    assert verify(trace.replace("78 - 56", "78 + 56"), "22")[1]
    assert verify(trace.replace("= 22", "= 23"), "22")[1]
    assert verify("Reasoning: 56 > 78, so Apples is larger.", "Apples")[1]
    # mutations of the refiner: a wrongly recognised operation finds nothing that verifies, so it writes none
    monkeypatch.setattr(refiner, "operations", lambda question: ["sum", "ratio", "average"])
    wrong = rule_refine(sample)
    assert derive(sample) is None and not any(s in wrong for s in STEPS) and verify(wrong, "22") == ([], [])


def test_a_hint_that_writes_the_arithmetic_is_not_repeated() -> None:
    hint = "Visitors in January were 10, in February 13, and in March 16. The largest is March with 16, so 16 - 10 = 6."
    sample = Sample(id="h", image="a.png", question="How many more visitors in March than January?", answer="6",
                    hint=hint)
    trace = rule_refine(sample)
    assert trace.count("16 - 10 = 6") == 1 and verify(trace, "6")[1] == []


HINT_FACTS = [
    # (hint, the facts read: (label, series, value as written))
    ("Pears 78, Apples 56", [("Pears", "", "78"), ("Apples", "", "56")]),  # label before the value
    ("78 for Pears, 56 for Apples", [("Pears", "", "78"), ("Apples", "", "56")]),  # label after the value
    ("Oslo was at -3.5 degrees while Rome reached 6 degrees.", [("Oslo", "", "-3.5"), ("Rome", "", "6")]),
    ("In 2019, men earned 45 and women 55. In 2020, men earned 50 and women 58.",
     [("men", "2019", "45"), ("women", "2019", "55"), ("men", "2020", "50"), ("women", "2020", "58")]),
    ("GDP rose to 1,870 billion USD (3.9%).", [("GDP", "", "1,870")]),  # 3.9% is after a value: unbound
    ("The difference between Apples and Pears is 5, so 12 - 7 = 5.", []),  # results are not facts
]


@pytest.mark.parametrize(("hint", "expected"), HINT_FACTS)
def test_hint_facts(hint: str, expected: list[tuple[str, str, str]]) -> None:
    assert [(f.label, f.series, f.text) for f in facts_from_hint(hint)] == expected


OPERATIONS = [
    # (question, the operations recognised)
    ("How many more boxes of Pears than Apples were sold?", ["difference"]),  # not a count
    ("What is the total number of boxes sold?", ["sum", "count"]),  # a total first
    ("How many times larger is A than B?", ["ratio"]),
    ("By what percentage did sales grow from 2018 to 2019?", ["percent_change", "difference"]),
    ("What is the average of A and B?", ["average"]),
    ("How many bars exceed 50?", ["count"]),
    ("How much did sales increase from 2018 to 2019?", ["difference"]),
    ("By what percentage did sales change?", ["percent_change", "difference"]),  # percent first, then points
    ("What is the Summer value for Peru?", []),  # "sum" inside a word is not a sum
]


@pytest.mark.parametrize(("question", "expected"), OPERATIONS)
def test_operations_recognised(question: str, expected: list[str]) -> None:
    assert operations(question) == expected


TABLE = {"columns": ["month", "Revenue", "Costs"], "rows": [["Jan", 20, 76.5], ["Feb", 92, 38], ["Mar", 18, 88]]}
TABLE_CASES = [
    # (question, answer, the arithmetic) on a table of two series: the question's series is used
    ("Which month has the highest Costs value?", "Mar", "The largest value is 88 (Mar)."),
    ("What is the difference in Revenue between Jan and Feb?", "72", "92 - 20 = 72."),
    ("What is the total Costs across all months?", "202.5", "76.5 + 38 + 88 = 202.5."),
    ("Is the Costs value of Feb greater than that of Jan?", "No", "38 < 76.5, so Feb is not greater than Jan."),
    ("How many months are shown?", "3", "Counting Jan, Feb, Mar gives 3."),  # a label with two series counts once
    ("What is the difference between Jan and Feb?", "72", None),  # no series named: ambiguous, nothing written
]


@pytest.mark.parametrize(("question", "answer", "expected"), TABLE_CASES)
def test_structured_facts_of_several_series_verify_the_same_way(question: str, answer: str, expected) -> None:
    sample = Sample(id="t", image="a.png", question=question, answer=answer, visual_facts=TABLE)
    found = derive(sample)
    assert (found.text if found else None) == expected
    assert verify(rule_refine(sample), answer)[1] == []
    if expected is None:
        assert "Reasoning:" not in rule_refine(sample)


# ---------------------------------------------------------------- end to end: a DyME JSON file


def test_a_dyme_json_file_of_every_operation_refines_to_verified_arithmetic(tmp_path: Path) -> None:
    Image.new("RGB", (24, 18), "white").save(tmp_path / "chart.png")
    rows = [{"question": q, "answer": a, "hint": h, "image": "chart.png"} for q, h, a, _ in CASES]
    rows += [{"question": q, "answer": a, "hint": h, "image": "chart.png"} for q, h, a in NOTHING_VERIFIES]
    (tmp_path / "train.json").write_text(json.dumps(rows))
    cfg = load_config(None, [f"data.path={tmp_path / 'train.json'}", f"data.out_dir={tmp_path / 'dataset'}",
                             f"data.report={tmp_path / 'ingest.json'}", "data.val_fraction=0", "data.test_fraction=0",
                             f"refine.out={tmp_path / 'targets.jsonl'}", f"refine.cache_dir={tmp_path / 'cache'}",
                             f"refine.template_pool={tmp_path / 'templates.json'}",
                             f"model.name_or_path={tmp_path / 'no-model'}"])
    assert ingest(cfg)["format"] == "dyme_json"
    stats = steps.refine(cfg)
    assert stats["n"] == len(rows) and stats["refiner/ungrounded"] == 0
    samples = {s.id: s for s in open_dataset(tmp_path / "dataset").samples}
    targets = {r["id"]: r["trace"] for r in map(json.loads, (tmp_path / "targets.jsonl").read_text().splitlines())}
    computed = ("Subtract", "Add the values", "Add the values and divide", "Divide", "Take the change")
    for i, (question, _, answer, step) in enumerate(CASES):
        trace, sample = targets[f"train-{i}"], samples[f"train-{i}"]
        assert sample.question == question and verify(trace, answer)[1] == [], trace
        written = verify(trace, answer)[0]
        assert _reasoning(trace).startswith(f"Reasoning: {step}") and (written or step not in computed), trace
    for j in range(len(NOTHING_VERIFIES)):
        trace = targets[f"train-{len(CASES) + j}"]
        assert not any(s in trace for s in STEPS), trace
