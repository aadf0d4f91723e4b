"""The method table's planning, per-question scoring and aggregate (bench/method_table.py; issue 12)."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for `bench`

from bench import method_table as mt  # noqa: E402
from dyme_core.data.schema import Sample  # noqa: E402

FACTS = {"columns": ["label", "value"], "rows": [["Apples", 12], ["Pears", 30], ["Plums", 45]]}
SMOKE = mt.load_scale("smoke")  # lr_grid 3e-4,1e-3, shared 1e-3, 2 seeds for the core methods
SCALE_REC = SMOKE.record()


def _sample(i: int, qtype: str = "value_lookup", question: str = "What is the value for Apples?", answer: str = "12",
            **kw) -> Sample:
    return Sample(id=f"t-{i:04d}", image="x.png", question=question, answer=answer, visual_facts=FACTS,
                  split="test", qtype=qtype, **kw)


@pytest.mark.parametrize(("thinking", "sample", "expected"), [
    # every number read off the chart, the difference equals the reference answer: nothing made up
    ("Pears is 30 and Apples is 12, so the difference is 18.", _sample(0, "difference", answer="18"), (3, 0)),
    # 77 is on no bar
    ("Apples is 12 and Pears is 77.", _sample(1), (2, 1)),
    # the threshold comes from the question
    ("Above 25: Pears 30, Plums 45.", _sample(2, "count", "How many are above 25?", "2"), (3, 0)),
    # hint-only data: the hint's numbers are the facts
    ("Apples has 12, Pears 13.", dataclasses.replace(_sample(3), visual_facts=None, hint="Apples has 12."), (2, 1)),
    # a value stated twice counts once; no numbers at all: nothing to count
    ("Apples 12. Apples 12 again.", _sample(4), (1, 0)),
    ("I cannot tell.", _sample(5), (0, 0)),
])
def test_hallucinated_numbers(thinking: str, sample: Sample, expected: tuple[int, int]) -> None:
    assert mt.hallucinated_numbers(thinking, sample) == expected


def test_question_steps_come_from_meta_else_the_question_type() -> None:
    assert mt.question_steps(_sample(0, "difference", meta={"steps": "single"})) == "single"
    assert [mt.question_steps(_sample(0, q)) for q in ("value_lookup", "max_label", "count", "difference", "sum",
                                                       "comparison")] == ["single"] * 3 + ["multi"] * 3


def _record(method: str, lr: float | None, seed: int, n_right: int, val_acc: float, samples: list[Sample]) -> dict:
    preds = [{"id": s.id, "qtype": s.qtype, "question": s.question, "reference": s.answer,
              "completion": "Apples is 12 and Pears is 99.\nAnswer: 12", "correct": i < n_right, "format": 1.0,
              "grounding": 0.5, "thinking_length": 28} for i, s in enumerate(samples)]
    history = [{"step": st, "phase_sft": 0.0, "mode/memorize": 0.5, "mode/explore": 0.3, "mode/skip": 0.2,
                "frac_reward_zero_std": 0.7, "reward/accuracy": 0.3, "loss/nll_memorized": 2.0 - st / 10,
                "time/step_s": 1.0} for st in (1, 2)]
    return {"id": mt.run_id(method, lr, seed), "method": method, "lr": lr, "seed": seed,
            "test": mt.score_predictions(preds, {s.id: s for s in samples}), "val": {"acc": val_acc, "n": 10},
            "scale": SCALE_REC, "device": "cpu", "torch": "t", "transformers": "tf", "date_utc": "2026-11-30 00:00",
            "train_s": 1.0, "wall_s": 2.0, "history": [] if method == "base" else history, "gate": None}


def test_lr_is_chosen_on_val_and_unlocks_the_other_seeds() -> None:
    samples = [_sample(i) for i in range(10)]
    done = {"base": _record("base", None, 0, 1, 0.1, samples)}
    ready, remaining = mt.planned_runs(["dyme", "sft_low"], SMOKE.plan, done)
    # the core method's grid first, the extended one after; seed 1 waits for dyme's grid
    assert [r["id"] for r in ready] == ["dyme@lr0.0003@seed0", "dyme@lr0.001@seed0", "sft_low@lr0.0003@seed0",
                                        "sft_low@lr0.001@seed0"]
    assert remaining == 5
    done["dyme@lr0.0003@seed0"] = _record("dyme", 3e-4, 0, 5, 0.6, samples)
    done["dyme@lr0.001@seed0"] = _record("dyme", 1e-3, 0, 9, 0.4, samples)  # better on test: must not matter
    assert mt.choose_lr("dyme", SMOKE.plan, done) == 3e-4
    ready, _ = mt.planned_runs(["dyme"], SMOKE.plan, done)
    assert [r["id"] for r in ready] == ["dyme@lr0.0003@seed1"]
    done["dyme@lr0.0003@seed0"]["val"]["acc"] = 0.4  # a tie goes to the shared LR
    assert mt.choose_lr("dyme", SMOKE.plan, done) == 1e-3


def test_records_survive_a_cut_line_and_failures_are_redone(tmp_path: Path) -> None:
    samples = [_sample(i) for i in range(4)]
    good = _record("base", None, 0, 1, 0.1, samples)
    (tmp_path / "runs-1.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(
        {"id": "dyme@lr0.001@seed0", "failed": True, "rc": 1}) + "\n" + '{"id": "grpo@lr0.001@se')
    done, failed = mt.load_records([tmp_path])
    assert list(done) == ["base"]
    assert [f["id"] for f in failed] == ["dyme@lr0.001@seed0"]
    ready, _ = mt.planned_runs(["dyme"], SMOKE.plan, done)
    assert "dyme@lr0.001@seed0" in [r["id"] for r in ready]


def test_aggregate_pairs_questions_and_reports_the_goal(tmp_path: Path) -> None:
    samples = [_sample(i, "value_lookup" if i % 2 else "difference") for i in range(200)]
    recs = [_record("base", None, 0, 60, 0.3, samples)]
    for seed in (0, 1):  # dyme: right on a superset of base's questions at its val-chosen LR 3e-4
        recs.append(_record("dyme", 3e-4, seed, 120, 0.5, samples))
        recs.append(_record("sft", 1e-3, seed, 64, 0.3, samples))
        recs.append(_record("grpo", 1e-3, seed, 50 + 10 * seed, 0.3, samples))
    recs += [_record("dyme", 1e-3, 0, 70, 0.4, samples), _record("sft", 3e-4, 0, 40, 0.2, samples),
             _record("grpo", 3e-4, 0, 40, 0.3, samples)]
    src = tmp_path / "call1"
    src.mkdir()
    (src / "runs-a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "agg"
    assert mt.main(["aggregate", "--scale", "smoke", "--out", str(out), "--from", str(src)]) == 0
    res = json.loads((out / "results.json").read_text())
    tuned, shared = res["tuned"]["methods"], res["shared_lr"]["methods"]
    assert (tuned["dyme"]["lr"], tuned["sft"]["lr"], tuned["grpo"]["lr"]) == (3e-4, 1e-3, 1e-3)
    assert tuned["dyme"]["acc"] == pytest.approx(0.6) and shared["dyme"]["acc"] == pytest.approx(0.35)
    assert tuned["grpo"]["acc"] == pytest.approx(0.275)  # seeds averaged
    for table in (tuned, shared):
        for row in table.values():
            assert row["ci"]["lo"] <= row["ci"]["point"] <= row["ci"]["hi"]
    vs_base = tuned["dyme"]["minus_base"]
    assert vs_base["point"] == pytest.approx(0.3) and vs_base["lo"] > 0
    # split by steps: value_lookup (odd ids) is single-step
    assert tuned["base"]["acc_single"] == pytest.approx(0.3) and tuned["base"]["acc_multi"] == pytest.approx(0.3)
    assert tuned["base"]["hallucinated_number_rate"] == pytest.approx(0.5)  # "99" of {12, 99}
    goal = res["tuned"]["goal"]
    assert goal["vs_base"]["met"] and goal["vs_best_baseline"]["best"] == "sft"
    assert goal["vs_best_baseline"]["met"] and goal["met"] is False  # two_stage has not run: not claimed
    table = (out / "table.md").read_text()
    assert "| +DyME | 0.0003 | 2 | 60.0 [" in table and "two_stage" not in res["tuned"]["dyme_minus"]
    assert (out / "curves.png").stat().st_size > 0 and (out / "modes.png").stat().st_size > 0


@pytest.mark.slow
def test_smoke_runs_aggregate_and_resume(tmp_path: Path) -> None:
    """The whole flow on the CPU: built-in base, every method over the LR grid and seeds, in 2 parallel
    subprocesses; then the same command again records nothing new."""
    args = ["all", "--scale", "smoke", "--parallel", "2", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o"),
            "--methods", "dyme,grpo,sft,sft_low"]
    assert mt.main(args) == 0
    lines = (tmp_path / "o" / "runs.jsonl").read_text().splitlines()
    recs = [json.loads(line) for line in lines]
    assert not [r for r in recs if r.get("failed")]
    # base + 2 LRs x 4 methods + 1 more seed for each of the 3 core methods
    assert len(recs) == 1 + 8 + 3
    n_test = recs[0]["test"]["n"]
    assert all(len(r["test"]["correct"]) == n_test and r["test"]["ids_sha"] == recs[0]["test"]["ids_sha"]
               for r in recs)
    assert all(r["history"] for r in recs if r["method"] != "base")
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    for row in res["tuned"]["methods"].values():
        assert row["ci"]["lo"] <= row["ci"]["point"] <= row["ci"]["hi"]
    assert set(res["tuned"]["methods"]) == {"base", "dyme", "grpo", "sft", "sft_low"}
    assert mt.main(args) == 0
    assert (tmp_path / "o" / "runs.jsonl").read_text().splitlines() == lines


def test_misstated_observations_change_one_observed_value_of_the_chosen_share(tmp_path: Path) -> None:
    """refined_noise: round(share * n) targets, a seeded choice, state one wrong value in their Observation; the
    reasoning and conclusion keep the true values; the same seed chooses the same targets and values."""
    traces = [
        "Goal: Find the Votes value for Navy.\nObservation: The chart 'Votes' shows Navy = 67.\n"
        "Reasoning: Read the value: this gives 67.\nConclusion: The answer is 67.",
        "Goal: Find the difference.\nObservation: The chart 'Votes' shows Gold = 45; Red = 23.\n"
        "Reasoning: Subtract: 45 - 23 = 22.\nConclusion: The answer is 22.",
    ] * 5
    original = [{"id": f"s{i}", "backend": "rule", "trace": t} for i, t in enumerate(traces)]
    path = tmp_path / "targets.jsonl"
    outputs = []
    for _ in range(2):
        path.write_text("".join(json.dumps(r) + "\n" for r in original))
        assert mt.misstate_observations(path, 0.3, seed=1) == 3
        outputs.append(path.read_text())
    assert outputs[0] == outputs[1]
    changed = 0
    for before, after in zip(original, map(json.loads, outputs[0].splitlines()), strict=True):
        old, new = before["trace"].splitlines(), after["trace"].splitlines()
        assert old[0] == new[0] and old[2:] == new[2:]  # goal, reasoning, conclusion untouched
        if old[1] != new[1]:
            changed += 1
            old_values, new_values = re.findall(r"= (\d+)", old[1]), re.findall(r"= (\d+)", new[1])
            assert len(new_values) == len(old_values)
            diff = [(a, b) for a, b in zip(old_values, new_values, strict=True) if a != b]
            assert len(diff) == 1 and 10 <= int(diff[0][1]) <= 99
    assert changed == 3
    with pytest.raises(ValueError, match="refined_noise must be in"):
        mt.misstate_observations(path, 1.5)


def test_a_scale_file_is_config_keys_and_a_plan_and_sets_reach_the_runs(tmp_path: Path) -> None:
    """`--set train.max_steps=7` is an ordinary config override of every run; a plan field is typed; both recorded."""
    scale = mt.load_scale("smoke", ["train.max_steps=7", "lr_grid=1e-4,1e-3", "shared_lr=1e-3"])
    assert scale.value("train.max_steps") == 7 and scale.value("evaluate.max_new_tokens") == 16
    assert scale.plan.lrs == [1e-4, 1e-3] and scale.plan.shared_lr == 1e-3
    spec = {"data": str(tmp_path), "base": str(tmp_path / "b"), "refined": str(tmp_path / "r" / "t.jsonl"),
            "seed": 1, "lr": 1e-4, "method": "dyme"}
    from dyme_core.config import load_config

    cfg = load_config(None, mt.run_overrides(spec, scale, tmp_path / "run"))
    assert (cfg.train.max_steps, cfg.train.num_generations, cfg.train.learning_rate, cfg.train.seed) == (7, 4, 1e-4, 1)
    assert mt.scale_of(scale.record()) == scale and scale.record()["overrides"]["train.max_steps"] == "7"


@pytest.mark.parametrize(("sets", "message"), [
    (["train.max_stepz=3"], "unknown config key train.max_stepz"),
    (["train.max_steps=0"], "train.max_steps must be >= 1"),
    (["seeds=3"], "expected section.key=VALUE"),
    (["seeds_core=two"], "seeds_core='two' is not a int"),
])
def test_a_bad_scale_override_is_one_line_naming_it(sets: list[str], message: str) -> None:
    with pytest.raises(SystemExit, match=re.escape(message)):
        mt.load_scale("smoke", sets)
