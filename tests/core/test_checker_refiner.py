"""Visual checker and refiner: rule-based scores, template evolution, the cache, and the LLM paths
against a local OpenAI-compatible server that answers, errors, hangs and returns garbage."""

from pathlib import Path

import pytest
from fake_llm import FakeLLM

from dyme_core.checker import VisualChecker, rule_thinking_score
from dyme_core.config import LLMConfig
from dyme_core.data.schema import Sample
from dyme_core.llm import ChatClient
from dyme_core.refiner import DEFAULT_TEMPLATE, Refiner, TemplatePool, rule_refine

FACTS = {"title": "Sales", "columns": ["label", "Sales"], "rows": [["Apples", 12], ["Pears", 7], ["Plums", 30]]}
SAMPLE = Sample(id="s1", image="a.png", question="What is the difference between Apples and Pears?",
                answer="5", hint="Apples look bigger than Pears by about 5.", visual_facts=FACTS)

THINKING_CASES = [
    # (thinking, expected score or range)
    ("Sales: Apples = 12, Pears = 7, Plums = 30.", 1.0),  # every fact (series name included), nothing else
    ("Apples is 12 and Pears is 7, so 12 - 7 = 5.", (0.7, 0.9)),  # relevant facts + derived answer
    ("Apples is 99 and Pears is 42.", (0.2, 0.5)),  # labels right, numbers hallucinated
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


def test_rule_refiner_cache_hits(tmp_path: Path) -> None:
    refiner = Refiner("rule", cache_dir=tmp_path)
    first = refiner.refine([SAMPLE, SAMPLE], DEFAULT_TEMPLATE)
    assert refiner.stats.calls == 1 and refiner.stats.cache_hits == 1
    assert first[0] == first[1]
    Refiner("rule", cache_dir=tmp_path).refine([SAMPLE], "Goal: x\nConclusion: y")  # new template: new key
    assert len(list(tmp_path.rglob("*.txt"))) == 2


def _client(fake: FakeLLM) -> ChatClient:
    return ChatClient(LLMConfig(base_url=fake.base_url, timeout_s=0.3, max_retries=1, backoff_s=0.01))


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
    (trace, fell_back), = refiner.refine([other], DEFAULT_TEMPLATE)
    assert not fell_back and trace.startswith("Goal: difference.")
