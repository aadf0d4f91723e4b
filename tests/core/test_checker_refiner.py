"""Visual checker and refiner: rule-based scores (structured facts and hint-only samples), template
evolution, the cache, and the LLM paths against a local OpenAI-compatible server that answers, errors,
hangs and returns garbage."""

import json
import logging
from pathlib import Path

import pytest
from fake_llm import FakeLLM

from dyme_core.checker import VisualChecker, rule_thinking_score
from dyme_core.config import LLMConfig
from dyme_core.data.schema import Sample
from dyme_core.llm import ChatClient, LLMError
from dyme_core.refiner import (
    DEFAULT_TEMPLATE,
    RefineCache,
    Refiner,
    TemplatePool,
    derivation,
    rule_refine,
    trace_problem,
)
from dyme_core.rewards import extract_numbers

FACTS = {"title": "Sales", "columns": ["label", "Sales"], "rows": [["Apples", 12], ["Pears", 7], ["Plums", 30]]}
SAMPLE = Sample(id="s1", image="a.png", question="What is the difference between Apples and Pears?",
                answer="5", hint="Apples look bigger than Pears by about 5.", visual_facts=FACTS)

THINKING_CASES = [
    # (thinking, expected score or range)
    ("Sales: Apples = 12, Pears = 7, Plums = 30.", 1.0),  # every fact (series name included), nothing else
    ("Apples is 12 and Pears is 7, so 12 - 7 = 5.", (0.7, 0.9)),  # relevant facts + derived answer
    ("Apples is 99 and Pears is 42.", 0.0),  # labels right, numbers hallucinated: no label has its value
    ("I think the answer is probably something.", 0.0),  # states no fact
    ("", 0.0),  # empty
]


@pytest.mark.parametrize(("thinking", "expected"), THINKING_CASES)
def test_rule_thinking_score(thinking: str, expected) -> None:
    score = rule_thinking_score(thinking, FACTS, answer="5")
    if isinstance(expected, tuple):
        assert expected[0] <= score <= expected[1], score
    else:
        assert score == pytest.approx(expected)


def test_rule_refiner_is_grounded_and_deterministic() -> None:
    trace = rule_refine(SAMPLE)
    assert trace == rule_refine(SAMPLE)
    assert [line.split(":")[0] for line in trace.splitlines()] == ["Goal", "Observation", "Reasoning", "Conclusion"]
    assert "Apples = 12" in trace and "Pears = 7" in trace and "Plums" not in trace  # only relevant rows
    assert "Answer:" not in trace
    assert rule_thinking_score(trace, FACTS, "5") > rule_thinking_score(SAMPLE.hint, FACTS, "5")


def test_template_evolution_persists_versions(tmp_path: Path) -> None:
    pool = TemplatePool()
    assert not pool.propose("no sections here", 0.9)
    assert pool.propose("Facts: Apples 12\nCompute: 12-7\nResult: 5", 0.8)
    assert pool.best == 2 and "Facts:" in pool.current["text"]
    assert not pool.propose("Step: x\nEnd: y", 0.5)  # scores lower than the best: kept out
    pool.save(tmp_path / "t.json")
    again = TemplatePool.load(tmp_path / "t.json")
    assert again.best == 2 and len(again.templates) == 2
    assert rule_refine(SAMPLE, again.current["text"]).startswith("Facts:")


DERIVATIONS = [
    # (question, answer, the reasoning's arithmetic or None)
    ("What is the difference between Apples and Pears?", "5", "12 - 7 = 5."),
    ("What is the difference between Apples and Pears?", "6", None),  # does not verify: nothing invented
    ("Which fruit sold more, Apples or Pears?", "Apples", "12 > 7, so Apples is larger."),
    ("Which fruit sold less, Apples or Plums?", "Apples", "12 < 30, so Apples is smaller."),
    ("Which fruit has the highest sales?", "Plums", "The largest value is 30 (Plums)."),
    ("Which fruit has the lowest sales?", "Pears", "The smallest value is 7 (Pears)."),
    ("What are the sales of Plums?", "30", "The value for Plums is 30."),
    ("What is the total of all sales?", "49", "12 + 7 + 30 = 49."),
    ("What is the average of Apples and Plums?", "21", "(12 + 30) / 2 = 21."),
    ("How many fruits sold more than 10?", "2", "Above 10: Apples (12), Plums (30); that is 2."),
    ("How many fruits sold less than 10?", "1", "Below 10: Pears (7); that is 1."),
    ("How many fruits are shown?", "3", "Counting Apples, Pears, Plums gives 3."),
    ("What is the median?", "12", None),  # no rule for it: no reasoning is written
]


@pytest.mark.parametrize(("question", "answer", "expected"), DERIVATIONS)
def test_rule_refiner_writes_out_only_arithmetic_that_verifies(question: str, answer: str, expected) -> None:
    sample = Sample(id="d", image="a.png", question=question, answer=answer, visual_facts=FACTS)
    assert derivation(sample) == expected
    reasoning = [line for line in rule_refine(sample).splitlines() if line.startswith("Reasoning:")]
    if expected:
        assert expected in reasoning[0]
    else:  # nothing verifies: the facts and the answer, no operation named
        assert reasoning == [] and rule_refine(sample).endswith(f"Conclusion: The answer is {answer}.")


def test_rule_refiner_observes_every_row_in_order_when_asked() -> None:
    relevant, every = rule_refine(SAMPLE), rule_refine(SAMPLE, observe="all")
    assert "Plums" not in relevant
    assert "shows Apples = 12; Pears = 7; Plums = 30." in every  # the chart's order, the transcription's form
    assert RefineCache.key(SAMPLE, DEFAULT_TEMPLATE, "rule") != RefineCache.key(SAMPLE, DEFAULT_TEMPLATE, "rule",
                                                                                 observe="all")
    assert Refiner(observe="all").refine_one(SAMPLE, DEFAULT_TEMPLATE) == (every, False)


def test_rule_refiner_cache_hits(tmp_path: Path) -> None:
    refiner = Refiner("rule", cache_dir=tmp_path)
    first = refiner.refine([SAMPLE, SAMPLE], DEFAULT_TEMPLATE)
    assert refiner.stats.calls == 1 and refiner.stats.cache_hits == 1
    assert first[0] == first[1]
    Refiner("rule", cache_dir=tmp_path).refine([SAMPLE], "Goal: x\nConclusion: y")  # new template: new key
    assert len(list(tmp_path.rglob("*.txt"))) == 2


def _client(fake: FakeLLM, **kw) -> ChatClient:
    # breaker off: these tests walk one endpoint through several failure modes in a row
    cfg = {"timeout_s": 0.3, "max_retries": 1, "backoff_s": 0.01, "breaker_failures": 0, **kw}
    return ChatClient(LLMConfig(base_url=fake.base_url, **cfg))


def test_llm_judge_and_fallbacks(fake_llm: FakeLLM) -> None:
    checker = VisualChecker("llm", client=_client(fake_llm), max_workers=4)
    items = [("Apples = 12", FACTS, SAMPLE.question, "5")] * 3
    fake_llm.mode, fake_llm.reply = "ok", "high"
    assert checker.score_many(items) == [1.0, 1.0, 1.0]
    for mode in ("error", "hang", "garbage"):
        fake_llm.mode = mode
        scores = checker.score_many(items[:1])
        assert scores == [rule_thinking_score("Apples = 12", FACTS, "5")], mode  # the rule score, no crash
    assert checker.stats.fallbacks == 3 and checker.stats.llm_calls == 6


def test_llm_refiner_and_counted_fallbacks(fake_llm: FakeLLM, tmp_path: Path) -> None:
    refiner = Refiner("llm", cache_dir=tmp_path, client=_client(fake_llm))
    fake_llm.mode = "ok"
    fake_llm.reply = "Goal: difference.\nObservation: Apples = 12, Pears = 7.\nReasoning: 12 - 7 = 5.\nConclusion: 5."
    (trace, fell_back), = refiner.refine([SAMPLE], DEFAULT_TEMPLATE)
    assert trace.startswith("Goal: difference.") and not fell_back
    (again, _), = refiner.refine([SAMPLE], DEFAULT_TEMPLATE)
    assert again == trace and refiner.stats.cache_hits == 1
    other = Sample(**{**SAMPLE.to_dict(), "id": "s2", "question": "What is the Plums value?", "answer": "30"})
    for mode in ("error", "hang", "garbage"):
        fake_llm.mode = mode
        (trace, fell_back), = refiner.refine([other], DEFAULT_TEMPLATE)
        assert fell_back and trace == rule_refine(other, DEFAULT_TEMPLATE), mode
    assert refiner.stats.fallbacks == 3
    fake_llm.mode = "ok"  # a fallback is never cached: the endpoint is asked again once it is back
    fake_llm.reply = "Goal: the Plums value.\nObservation: Plums = 30.\nConclusion: 30."
    (trace, fell_back), = refiner.refine([other], DEFAULT_TEMPLATE)
    assert not fell_back and trace.startswith("Goal: the Plums value.")


# ---------------------------------------------------------------- hint-only samples (no structured facts)

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
MONTH_FACTS = {"title": "Visitors", "columns": ["month", "Visitors"],
               "rows": [[m, 10 + 3 * i] for i, m in enumerate(MONTHS)]}
MONTH_LIST = "The chart shows the months " + ", ".join(MONTHS) + "."
MONTH_HINT = ("Visitors in January were 10, in February 13, and in March 16. "
              "The largest is March with 16, so 16 - 10 = 6.")

HINTS = [
    # (hint, why it is here)
    (MONTH_HINT, "values stated with labels, then a computation"),
    ("The bar chart shows Sales for 6 fruits. We need to find the difference between Apples and Pears, "
     "so the result is 5.", "synthetic 'medium' trace: a description and the result"),
    ("Looking at the picture, it seems like Apples are about 14 or so. I think it's probably 12.",
     "synthetic 'low' trace: a misread value is kept, not corrected"),
    ("Goal: Find the difference.\nObservation: Apples = 12, Pears = 7.\nReasoning: 12 - 7 = 5.\n"
     "Conclusion: The answer is 5.\nAnswer: 5", "already in sections, with an answer line"),
    ("In 2019 the GDP of Brazil was 1,870 billion USD, up from 1,800 in 2018 (3.9%). Answer: 1870",
     "ChartQA style: thousands separators, a percentage, an inline answer flag"),
]


@pytest.mark.parametrize(("hint", "why"), HINTS)
def test_rule_refiner_restructures_the_hint_keeping_every_number(hint: str, why: str) -> None:
    sample = Sample(id="h", image="a.png", question="What is the difference?", answer="5", hint=hint)
    trace = rule_refine(sample)
    names = [line.split(":")[0] for line in trace.splitlines()]
    assert names[0] == "Goal" and names[-1] == "Conclusion" and set(names) <= {
        "Goal", "Observation", "Reasoning", "Conclusion"}, (why, trace)
    assert sorted(set(extract_numbers(hint)) - set(extract_numbers(trace))) == [], (why, trace)
    assert "no structured facts" not in trace and "answer:" not in trace.lower(), (why, trace)
    assert trace.endswith("The answer is 5."), (why, trace)
    assert rule_thinking_score(trace, None, "5", hint=hint) > 0.9, why  # the refined hint keeps its facts


def test_rule_refiner_hint_entities_kept_under_an_evolved_template() -> None:
    sample = Sample(id="h", image="a.png", question="How many more visitors in March than in January?",
                    answer="6", hint=MONTH_HINT)
    trace = rule_refine(sample, "Facts: ...\nCompute: ...\nResult: ...")
    assert trace.splitlines()[0].startswith("Facts: Visitors in January were 10")
    assert trace.splitlines()[-1] == "Result: The answer is 6."
    two = rule_refine(sample, "Think: ...\nSo: ...")  # fewer sections: nothing is dropped
    assert all(w in two for w in ("January", "February", "March", "16 - 10 = 6", "The answer is 6."))


def test_rule_refiner_without_facts_or_hint_is_minimal_and_counted(tmp_path: Path) -> None:
    bare = Sample(id="b", image="a.png", question="What is the largest value?", answer="42")
    assert rule_refine(bare) == "Goal: Find what is the largest value.\nConclusion: The answer is 42."
    for _ in range(2):  # the second run reads the cache: the count describes the data, so it stays
        refiner = Refiner("rule", cache_dir=tmp_path)
        refiner.refine([bare, SAMPLE], DEFAULT_TEMPLATE)
        assert refiner.stats.as_dict()["refiner/ungrounded"] == 1
    assert refiner.stats.cache_hits == 2


HINT_CHECKER_CASES = [
    # (thinking, expected score or range) against MONTH_HINT, with no structured facts
    (MONTH_HINT, 1.0),  # the hint's own facts
    ("January is 10 and March is 16, so the difference is 6.", (0.7, 0.9)),  # some facts, all right
    (MONTH_LIST, 0.0),  # the labels without any value: no credit
    ("January, February and March are shown; the values are high.", 0.0),  # names, no numbers
    ("January is 55 and March is 70.", 0.0),  # labels with values, values hallucinated
    ("", 0.0),
]


@pytest.mark.parametrize(("thinking", "expected"), HINT_CHECKER_CASES)
def test_rule_checker_scores_against_the_hint(thinking: str, expected) -> None:
    score = rule_thinking_score(thinking, None, answer="6", hint=MONTH_HINT)
    if isinstance(expected, tuple):
        assert expected[0] <= score <= expected[1], score
    else:
        assert score == pytest.approx(expected)


def test_rule_checker_label_needs_its_value() -> None:
    # the case: a line chart over 12 months; listing the months read no value (it scored 0.65-0.73)
    assert rule_thinking_score(MONTH_LIST, MONTH_FACTS, "40") == 0.0
    read = "Observation: " + ", ".join(f"{m} = {10 + 3 * i}" for i, m in enumerate(MONTHS)) + "."
    assert rule_thinking_score(read, MONTH_FACTS, "40") > 0.95
    assert rule_thinking_score("Apples, Pears and Plums are shown.", FACTS, "5") == 0.0
    assert rule_thinking_score("A hint, nothing to compare", None, "5") == 0.0  # neither facts nor hint


def test_trace_problem_rejects_long_or_answerless_traces() -> None:
    assert trace_problem("Goal: x.\nConclusion: The answer is 5.", SAMPLE, 2000) is None
    assert trace_problem("Conclusion: it is 5.0 units", SAMPLE, 2000) is None  # relaxed numbers
    assert "does not state the answer" in trace_problem("Conclusion: it is 55.", SAMPLE, 2000)
    assert "max_trace_chars=20" in trace_problem("Conclusion: The answer is 5. " * 3, SAMPLE, 20)
    apples = Sample(id="t", image="a.png", question="Which is larger?", answer="Apples")
    assert trace_problem("Apples sell more, so: apples.", apples, 2000) is None
    assert trace_problem("Pineapples sell more.", apples, 2000) is not None  # a word, not a substring


def test_llm_refiner_rejects_a_trace_without_the_answer(fake_llm: FakeLLM, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    refiner = Refiner("llm", cache_dir=tmp_path, client=_client(fake_llm))
    fake_llm.reply = "Goal: difference.\nObservation: Apples = 12, Pears = 7.\nConclusion: Apples win."
    with caplog.at_level(logging.WARNING):
        (trace, fell_back), = refiner.refine([SAMPLE], DEFAULT_TEMPLATE)
    assert fell_back and trace == rule_refine(SAMPLE, DEFAULT_TEMPLATE)
    assert refiner.stats.as_dict()["refiner/rejected"] == 1 and refiner.stats.fallbacks == 1
    assert not list(tmp_path.rglob("*.txt"))  # nothing cached
    assert "1 fallback(s)" in caplog.text and "does not state the answer" in caplog.text


def test_llm_refiner_hint_only_extracts_then_rewrites(fake_llm: FakeLLM) -> None:
    def reply(messages: list[dict]) -> str:
        if "bullet" in messages[-1]["content"]:
            return "- January: 10\n- March: 16"
        return "Goal: the increase.\nObservation: January 10, March 16.\nReasoning: 16 - 10 = 6.\nConclusion: 6."

    fake_llm.reply = reply
    sample = Sample(id="m", image="a.png", question="How much higher is March than January?", answer="6",
                    hint=MONTH_HINT)
    (trace, fell_back), = Refiner("llm", client=_client(fake_llm)).refine([sample], DEFAULT_TEMPLATE)
    assert not fell_back and "16 - 10 = 6" in trace
    assert fake_llm.count == 2  # the official two steps: extract the facts, then rewrite
    assert "- January: 10" in fake_llm.requests[1]["body"]["messages"][-1]["content"]


def test_llm_checker_judges_against_the_hint(fake_llm: FakeLLM) -> None:
    fake_llm.reply = "high"
    checker = VisualChecker("llm", client=_client(fake_llm))
    assert checker.score("January is 10", None, "q", "6", MONTH_HINT) == 1.0
    assert MONTH_HINT in fake_llm.requests[0]["body"]["messages"][-1]["content"]
    assert checker.score("January is 10", None, "q", "6", None) == 0.0  # nothing to judge against: no call
    assert fake_llm.count == 1


def test_on_failure_fail_raises_instead_of_falling_back(fake_llm: FakeLLM) -> None:
    fake_llm.mode = "error"
    client = _client(fake_llm, on_failure="fail")
    with pytest.raises(LLMError, match=r"on_failure=fail.*HTTP 500"):
        Refiner("llm", client=client).refine([SAMPLE], DEFAULT_TEMPLATE)
    with pytest.raises(LLMError, match=r"on_failure=fail.*HTTP 500"):
        VisualChecker("llm", client=client).score_many([("Apples = 12", FACTS, "q", "5", None)])


# ---------------------------------------------------------------- the refine step


def _refine_cfg(tiny_setup: dict, tmp_path: Path, *extra: str):
    from dyme_core.config import load_config

    return load_config(None, [f"data.out_dir={tiny_setup['data']}", f"refine.out={tmp_path / 'targets.jsonl'}",
                              f"refine.template_pool={tmp_path / 'templates.json'}",
                              f"refine.cache_dir={tmp_path / 'cache'}", *extra])


def test_refine_step_refuses_splits_without_samples(tiny_setup: dict, tmp_path: Path, capsys) -> None:
    from dyme_core import cli, steps

    with pytest.raises(ValueError, match=r"refine.splits=\['nope'\] select 0 samples; the dataset has: test \(4\), "
                                         r"train \(8\), val \(2\)"):
        steps.refine(_refine_cfg(tiny_setup, tmp_path, "refine.splits=[nope]"))
    args = [f"data.out_dir={tiny_setup['data']}", f"refine.out={tmp_path / 'targets.jsonl'}", "refine.splits=[nope]"]
    assert cli.main(["refine", *args]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "select 0 samples" in err
    assert not (tmp_path / "targets.jsonl").exists()


def test_refine_step_reports_target_lengths_in_model_tokens(tiny_setup: dict, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    from transformers import AutoTokenizer

    from dyme_core import steps

    cfg = _refine_cfg(tiny_setup, tmp_path, f"model.name_or_path={tiny_setup['model']}", "train.max_new_tokens=4")
    with caplog.at_level(logging.WARNING):
        stats = steps.refine(cfg)
    tokenizer = AutoTokenizer.from_pretrained(tiny_setup["model"])
    answers = {s.id: s.answer for s in tiny_setup["dataset"].samples}
    rows = [json.loads(line) for line in (tmp_path / "targets.jsonl").read_text().splitlines()]
    lengths = sorted(len(tokenizer(f"{r['trace']}\nAnswer: {answers[r['id']]}", add_special_tokens=False)["input_ids"])
                     for r in rows)
    assert stats["target_tokens_unit"] == "tokens" and stats["target_tokens_max"] == lengths[-1]
    assert lengths[0] <= stats["target_tokens_p50"] <= stats["target_tokens_p95"] <= lengths[-1]
    written = json.loads((tmp_path / "refine_stats.json").read_text())
    # the file is the same in a fresh clone: counters that depend on the local cache are left out
    assert written == {k: v for k, v in stats.items() if k not in ("refiner/calls", "refiner/cache_hits")}
    assert any("train.max_new_tokens=4 is below the p95" in r.getMessage() for r in caplog.records)
    caplog.clear()
    words = steps.refine(_refine_cfg(tiny_setup, tmp_path, f"model.name_or_path={tmp_path / 'absent'}",
                                     "train.max_new_tokens=100000", "train.max_target_tokens=100000"))
    assert words["target_tokens_unit"] == "whitespace words" and words["target_tokens_max"] > 0
    assert not any("is below the p95" in r.getMessage() for r in caplog.records)
