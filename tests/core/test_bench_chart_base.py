"""bench/chart_base.py: pretraining examples are the trainer's prompt plus a target-only loss, the
mixture and the refused dataset charts hold, the gate judges by issue 12's thresholds, and the smoke
flow builds a base that the project's loader and DymeTrainer take unchanged."""

from __future__ import annotations

import argparse
import copy
import json
import re
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for `bench`

from bench import chart_base  # noqa: E402
from dyme_core.config import InitModelConfig, ModelConfig, load_config  # noqa: E402
from dyme_core.data import charts  # noqa: E402
from dyme_core.data.schema import Sample  # noqa: E402
from dyme_core.families import get_family  # noqa: E402
from dyme_core.models import build_prompt, init_tiny_model, load_processor  # noqa: E402
from dyme_core.refiner import derivation, rule_refine  # noqa: E402


@pytest.fixture(scope="module")
def processor(tmp_path_factory: pytest.TempPathFactory):
    texts = [charts.TRANSCRIBE_QUESTION, "Answer: 42", "Jan: 12", "What is the Sales value for Jan?"]
    out = tmp_path_factory.mktemp("model")
    init_tiny_model(InitModelConfig(out_dir=str(out), **chart_base.PRESETS["smoke"]), texts)
    return load_processor(ModelConfig(name_or_path=str(out)))


def test_a_pretraining_row_is_the_trainers_prompt_then_the_target_and_only_the_target_is_scored(processor) -> None:
    rng = np.random.default_rng(0)
    tables = [charts.random_chart(rng, 112) for _ in range(2)]
    images = [image for _, image in tables]
    questions = [charts.TRANSCRIBE_QUESTION, "What is the Sales value for Jan?"]
    targets = [charts.transcription(tables[0][0]), "Answer: 42"]
    batch = chart_base.encode_examples(processor, get_family("idefics3"), images, questions, targets,
                                       ["transcribe", "answer"])
    tok = processor.tokenizer
    for i, (image, question, target) in enumerate(zip(images, questions, targets, strict=True)):
        # the prompt as evaluation and the trainer build it: the processor over build_prompt's chat text
        prompt = processor(text=[build_prompt(processor, question, "reason")], images=[[image]],
                           return_tensors="pt")["input_ids"][0]
        row, labels = batch["input_ids"][i], batch["labels"][i]
        assert torch.equal(row[: len(prompt)], prompt)
        scored = labels[labels != -100]
        assert torch.equal(scored, row[len(prompt): len(prompt) + len(scored)])
        assert scored[-1] == tok.eos_token_id
        assert tok.decode(scored[:-1]) == target
        assert (labels[: len(prompt)] == -100).all()
    assert batch["pixel_values"].shape[:2] == (2, 1)


@pytest.mark.parametrize("mixture", [None, "transcribe=0.3,answer=0.4,skill=0.2,low_trace=0.1"])
def test_the_stream_mixes_transcription_answers_and_low_traces_and_refuses_dataset_charts(mixture) -> None:
    rng = np.random.default_rng(1)
    shares = chart_base.parse_mixture(mixture) if mixture else chart_base.MIXTURE
    kinds = Counter(chart_base.stream_example(rng, 112, set(), mixture=shares)[3] for _ in range(1500))
    for kind, share in shares.items():
        assert abs(kinds[kind] / 1500 - share) < 0.04, kinds
    # the first chart this generator would draw is refused: the example shows another table
    first, _ = charts.random_chart(np.random.default_rng(7), 112)
    image, question, target, kind = chart_base.stream_example(np.random.default_rng(7), 112, {charts.table_key(first)})
    redrawn, _ = charts.random_chart(np.random.default_rng(7), 112)
    assert charts.table_key(redrawn) == charts.table_key(first)  # same generator, same first table
    if kind == "transcribe":
        assert target != charts.transcription(first)


def test_the_language_model_stage_is_the_text_skill_without_the_image_and_scores_only_the_target(processor) -> None:
    n = 24
    batch = chart_base.TextStream(processor, n, set()).make_batch(np.random.default_rng(4))
    expected = [chart_base.text_example(rng, set()) for rng in [np.random.default_rng(4)] for _ in range(n)]
    tok = processor.tokenizer
    assert "pixel_values" not in batch
    lookups = 0
    for i, (question, target, qtype) in enumerate(expected):
        ids = batch["input_ids"][i][batch["attention_mask"][i].bool()]
        labels = batch["labels"][i]
        scored = labels[labels != -100]
        # the trainer's reasoning prompt with the image placeholder left out, then the target and eos
        assert tok.decode(ids[: len(ids) - len(scored)]) == build_prompt(processor, question, "reason").replace(
            "<image>", "")
        assert tok.decode(scored[:-1]) == target and scored[-1] == tok.eos_token_id
        assert batch["kinds"][i] == qtype
        listing = charts.parse_transcription(question.split(". ")[0])
        assert 3 <= len(listing) <= 5  # the table given as text
        if charts.QTYPES[qtype] == "value_lookup":  # the target reads the asked row off the listed table
            label = question.rsplit(" for ", 1)[1].rstrip("?")
            assert target == f"The value for {label} is {listing[label]}."
            lookups += 1
    assert lookups and len({q for _, _, q in expected}) >= 5
    # a table of the dataset is refused: the stage never shows the RL, val or test tables
    rng = np.random.default_rng(9)
    first = charts.draw_table(rng, charts.CHART_TYPES[int(rng.integers(len(charts.CHART_TYPES)))])
    assert chart_base.text_example(np.random.default_rng(9), set())[0].startswith(charts.transcription(first))
    assert not chart_base.text_example(np.random.default_rng(9), {charts.table_key(first)})[0].startswith(
        charts.transcription(first))


@pytest.mark.parametrize(("text", "says"), [
    ("transcribe=0.5,answer=0.5,skill=0", "each of"),  # a kind left out
    ("transcribe=0.3,answer=0.4,skill=0.2,low_trace=0.1,noise=0", "unknown kinds ['noise']"),
    ("transcribe=0.3,answer=0.4,skill=0.2,low_trace=0.2", "sum to 1"),
    ("transcribe=half,answer=0.4,skill=0.2,low_trace=0.1", "each of"),
])
def test_a_bad_mixture_is_refused_with_the_reason(text: str, says: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=re.escape(says)):
        chart_base.parse_mixture(text)


def test_bare_answers_favour_single_step_and_text_skills_give_the_arithmetic_from_the_listed_table() -> None:
    rng = np.random.default_rng(3)
    examples = [chart_base.stream_example(rng, 112, set()) for _ in range(800)]
    answers = [q for _, q, _, kind in examples if kind == "answer"]
    single = sum(any(q.startswith(p) for p in ("What is the", "Which", "How many bars", "How many points"))
                 and " or " not in q and "difference" not in q for q in answers)
    assert 0.65 < single / len(answers) < 0.85  # single-step 3x as often as multi-step
    skills = [(q, t) for _, q, t, kind in examples if kind == "skill"]
    assert skills
    for question, target in skills:
        listing = charts.parse_transcription(question.split(". ")[0])
        assert len(listing) >= 3  # the table is given as text, in the transcription's form
        assert "Answer:" not in target and target.endswith(".")  # the derivation alone, e.g. "45 - 23 = 22."
    assert any(" - " in t and " = " in t for _, t in skills)


def test_refined_form_low_traces_misread_one_or_two_rows_and_keep_the_answer() -> None:
    rng = np.random.default_rng(11)
    for _ in range(50):
        table, _ = charts.random_chart(rng, 112)
        wrong = chart_base.misread(rng, table)
        changed = sum(a != b for a, b in zip(table.values, wrong.values, strict=True))
        assert 1 <= changed <= 2 and len(set(wrong.values)) == len(wrong.values)
        assert all(10 <= v <= 99 for v in wrong.values) and wrong.labels == table.labels
    lows = [t for _, _, t, kind in (chart_base.stream_example(rng, 112, set(), "refined") for _ in range(300))
            if kind == "low_trace"]
    assert lows
    for target in lows:  # the refined form over every row, then the reference answer
        lines = target.splitlines()
        assert lines[0].startswith("Goal: ") and lines[1].startswith("Observation: ") and " shows " in lines[1]
        assert lines[-1].startswith("Answer: ") and lines[-2] == f"Conclusion: The answer is {lines[-1][8:]}."


def _observed_sample(question: str, trace: str) -> tuple[Sample, str]:
    """The trace's own observation as a table, with the trace's answer: what its reasoning should follow."""
    lines = trace.splitlines()
    title, listing = re.match(r"Observation: The chart '(.*)' shows (.*)\.$", lines[1]).groups()
    rows = [[label, int(v)] for label, v in (item.split(" = ") for item in listing.split("; "))]
    answer = lines[-1].removeprefix("Answer: ")
    facts = {"title": title, "columns": ["label", "value"], "rows": rows}
    return Sample(id="s", image="", question=question, answer=answer, visual_facts=facts), "\n".join(lines[:-1])


def test_consistent_low_traces_reason_from_what_they_observe_where_refined_ones_do_not() -> None:
    def lows(form: str) -> list[tuple[str, str]]:
        rng = np.random.default_rng(9)
        return [(q, t) for _, q, t, kind in (chart_base.stream_example(rng, 112, set(), form) for _ in range(1500))
                if kind == "low_trace"]

    consistent = lows("consistent")
    assert len(consistent) > 150
    for question, trace in consistent:  # the whole trace is the rule refiner's over the misread table it observed
        smp, body = _observed_sample(question, trace)
        assert body == rule_refine(smp, observe="all") and derivation(smp) is not None, trace
    # the third base's form ends on the true answer: where a misread row matters, its reasoning does not follow
    unfollowed = [t for q, t in lows("refined") if derivation(_observed_sample(q, t)[0]) is None]
    assert len(unfollowed) > 20


@pytest.mark.parametrize("qtype", charts.QTYPES)
def test_the_misread_answer_is_what_the_misread_table_gives(qtype: str) -> None:
    rng = np.random.default_rng(4)
    wrong_answers = 0
    for _ in range(60):
        table, _ = charts.random_chart(rng, 112)
        before = copy.deepcopy(rng)
        qa = charts.ask(rng, table, qtype)
        assert chart_base.misread_answer(copy.deepcopy(before), table, qtype, qa.question) == qa.answer
        wrong = chart_base.misread(rng, table)
        answer = chart_base.misread_answer(before, wrong, qtype, qa.question)
        if qtype == "value_lookup":
            assert answer == str(wrong.value(qa.question.rsplit(" ", 1)[1].rstrip("?")))
        if qtype == "count_above":
            threshold = int(qa.question.rsplit(" ", 1)[1].rstrip("?"))
            assert answer == str(sum(v > threshold for v in wrong.values))
        wrong_answers += answer != qa.answer
    # a misread row changes some answers (never the number of bars)
    assert (wrong_answers == 0) if qtype == "count" else (wrong_answers > 0)


@pytest.mark.parametrize(("figures", "failing"), [
    # every figure inside its band
    ({"transcription_cells": 0.9, "greedy_qa_accuracy": 0.3, "sampled_format_rate": 0.1,
      "rl_groups_some_right": 0.4, "rl_groups_none_right": 0.4}, set()),
    # a base that reads too little and answers too well: transcription and QA out of band
    ({"transcription_cells": 0.84, "greedy_qa_accuracy": 0.56, "sampled_format_rate": 0.1,
      "rl_groups_some_right": 0.4, "rl_groups_none_right": 0.4}, {"transcription_cells", "greedy_qa_accuracy"}),
    # never writes a trace, and GRPO would see no signal: most groups none right
    ({"transcription_cells": 0.95, "greedy_qa_accuracy": 0.2, "sampled_format_rate": 0.0,
      "rl_groups_some_right": 0.29, "rl_groups_none_right": 0.65},
     {"sampled_format_rate", "rl_groups_some_right", "rl_groups_none_right"}),
])
def test_the_gate_judges_by_issue_12s_thresholds(figures: dict, failing: set) -> None:
    verdict = chart_base.judge(figures)
    assert {name for name, v in verdict.items() if not v["pass"]} == failing


@pytest.mark.slow
def test_smoke_flow_builds_a_base_that_loads_and_trains_with_the_project_trainer(tmp_path: Path) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    assert chart_base.main(["all", "--scale", "smoke", "--preset", "smoke", "--out", str(out), "--work", str(work),
                            "--workers", "0"]) == 0
    progress = json.loads((out / "progress.json").read_text())
    assert progress["status"] == "done" and progress["steps_done"] == chart_base.SCALES["smoke"].steps
    rows = progress["rows"]
    assert rows[-1]["loss"] < rows[0]["loss"]  # it learns
    assert progress["refined_target_tokens"]["p95"] >= progress["refined_target_tokens"]["p50"] > 0
    gate = json.loads((out / "gate.json").read_text())
    assert set(gate["criteria"]) == {*chart_base.GATE, "single_above_multi"}
    for name in chart_base.GATE:
        assert 0.0 <= gate["criteria"][name]["value"] <= 1.0
    assert gate["pass"] == all(c["pass"] for c in gate["criteria"].values())
    assert sum(gate["figures"]["rl_correct_per_group_histogram"]) == gate["setup"]["rl_prompts"]
    # the never-solved share per question type averages, weighted by each type's prompts, to the overall one
    from dyme_core.data.ingest import open_dataset as _open_rl

    rl_types = Counter(x.qtype for x in _open_rl(work / "data").split("train")[: gate["setup"]["rl_prompts"]])
    by_type = gate["figures"]["rl_groups_none_right_by_type"]
    assert set(by_type) == set(rl_types)
    assert sum(by_type[q] * n for q, n in rl_types.items()) / sum(rl_types.values()) == pytest.approx(
        gate["criteria"]["rl_groups_none_right"]["value"], abs=1e-3)
    # the trace probe measures transcription as the gate does (the same val charts, greedy, 64 tokens)
    from bench import trace_probe

    n_val = chart_base.SCALES["smoke"].gate_val
    assert trace_probe.main(["--model", str(work / "base"), "--data", str(work / "data"), "--n", str(n_val),
                             "--out", str(out / "probe.json")]) == 0
    probe = json.loads((out / "probe.json").read_text())
    assert probe["n"] == n_val and set(probe["summary"]) == {"transcribe", "observe", "derive", "derive_text",
                                                              "chain", "bare"}
    assert probe["summary"]["transcribe"] == pytest.approx(gate["figures"]["transcription_cells"], abs=1e-4)
    read_by_gate = [e["read"] for e in gate["examples"]["transcription"]]
    assert [e["transcribe"] for e in probe["examples"][: len(read_by_gate)]] == read_by_gate  # the same tokens
    # the forced prefixes end on a token boundary of the full trace (a trailing space would end on a lone-space
    # token that training never shows)
    from dyme_core.data.ingest import open_dataset as _open
    from dyme_core.models import load_processor

    tok = load_processor(ModelConfig(name_or_path=str(work / "base"))).tokenizer
    for smp in _open(work / "data").split("val"):
        trace = rule_refine(smp, observe="all")
        full = tok(trace, add_special_tokens=False)["input_ids"]
        for prefix in trace_probe.forced_prefixes(trace).values():
            assert trace.startswith(prefix) and not prefix[-1].isspace()
            ids = tok(prefix, add_special_tokens=False)["input_ids"]
            assert full[: len(ids)] == ids, prefix
    # the base: bf16 safetensors that the project's trainer takes as it is
    assert (work / "base" / "model.safetensors").is_file()
    assert not list((work / "base").glob("*.bin")) and not list((work / "base").glob("*.pt"))
    from dyme_core.data.ingest import open_dataset
    from dyme_core.trainer import train

    cfg = load_config(None, [
        f"model.name_or_path={work / 'base'}", f"data.out_dir={work / 'data'}", "train.method=dyme",
        "train.max_steps=1", "train.batch_size=2", "train.num_generations=2", "train.max_new_tokens=8",
        f"train.output_dir={tmp_path / 'run'}", "train.report_to=[jsonl]", "train.refined=",
    ])
    metrics = train(cfg, open_dataset(work / "data"))
    assert "loss" in metrics and np.isfinite(metrics["loss"])
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    # continued pretraining from that base (--init-from): its tokenizer and weights, a new low-trace form
    more_out, more_work = tmp_path / "more-out", tmp_path / "more-work"
    shutil.copytree(work / "data", more_work / "data")
    shutil.copy(work / "data_spec.json", more_work / "data_spec.json")
    assert chart_base.main(["pretrain", "--scale", "smoke", "--preset", "smoke", "--out", str(more_out), "--work",
                            str(more_work), "--workers", "0", "--init-from", str(work / "base"), "--steps", "10",
                            "--low-traces", "consistent", "--text-steps", "3", "--text-batch", "4"]) == 0
    more = json.loads((more_out / "progress.json").read_text())
    assert more["init_from"] == str(work / "base") and more["steps_done"] == 10 and more["vocab"] == progress["vocab"]
    assert more["text_steps_done"] == 3 and more["text_rows"][-1]["step"] == 3  # the language-model stage ran first
    assert set(more["text_rows"][-1]) >= {f"loss/{q}" for q in charts.QTYPES}
    assert more["rows"][0]["loss"] < rows[0]["loss"]  # it starts where the base ended, not from random weights
    with pytest.raises(SystemExit, match="112 px, preset full's 224 px"):
        chart_base.main(["pretrain", "--scale", "smoke", "--preset", "full", "--out", str(more_out), "--work",
                         str(more_work), "--workers", "0", "--init-from", str(work / "base"), "--steps", "2"])


@pytest.mark.slow
def test_a_deadline_stops_pretraining_early_with_a_saved_base_and_a_progress_row(tmp_path: Path) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    # the smoke scale keeps 20 s for the gate: with a 20 s deadline the first step is already past it,
    # whatever the machine's speed
    assert chart_base.main(["data", "pretrain", "--scale", "smoke", "--preset", "smoke", "--out", str(out),
                            "--work", str(work), "--workers", "0", "--deadline-s", "20"]) == 0
    progress = json.loads((out / "progress.json").read_text())
    assert progress["status"] == "deadline"
    assert progress["steps_done"] == 1
    assert progress["rows"][-1]["step"] == progress["steps_done"] == progress["saved_step"]
    from dyme_core.models import load_model

    model = load_model(ModelConfig(name_or_path=str(work / "base")))
    assert sum(p.numel() for p in model.parameters()) == progress["n_params"]
