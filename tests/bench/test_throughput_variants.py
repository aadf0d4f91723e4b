"""bench/throughput.py's dyme-full and dyme-switch, each a DymeTrainer built through public entry points (config
keys and the bench's reward table): what each step really runs (refiner, checker, text rewards, full-length
rollouts), that both see the same mode mix, and the full/switch ratio in the summaries."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for `bench`

from bench import throughput as tp  # noqa: E402
from bench.common import ControlledRewards, Work, group_kinds, mix_accuracy  # noqa: E402
from dyme_core.checker import VisualChecker  # noqa: E402
from dyme_core.models import ANSWER_FLAG  # noqa: E402
from dyme_core.refiner import rule_refine  # noqa: E402
from dyme_core.rewards import RewardContext  # noqa: E402

K, PROMPTS = 2, 4


@pytest.fixture(scope="module")
def runner(bench_work: Work, tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Iterator[tp.DymeRunner]:
    """One DymeRunner with a dyme-full and a dyme-switch trainer (K=2, 4 prompts, 8 tokens) on the tiny model; run
    from a temporary folder, where the refiner's default cache (.cache/refine) goes."""
    argv = (
        f"--device cpu --k {K} --prompts {PROMPTS} --new-tokens 8 --warmup 1 --samples 8 --trl off "
        "--trainers dyme-full,dyme-switch --mix memorize75"
    )
    args = tp.parse_args([*argv.split(), "--work", str(bench_work.data_dir.parent)])
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path_factory.mktemp("cwd"))
        yield tp.DymeRunner(args, bench_work, torch.device("cpu"))


def test_the_default_trainers_are_still_the_four_of_the_earlier_tables() -> None:
    assert tp.parse_args([]).trainers == ["trl-default", "trl-same-gen", "dyme", "grpo"]
    new = tp.parse_args(["--trl", "off", "--trainers", "dyme-full,dyme-switch"])
    assert new.trainers == ["dyme-full", "dyme-switch"]
    with pytest.raises(SystemExit):
        tp.parse_args(["--trainers", "dyme-fast"])


def test_dyme_decode_picks_the_trainers_rollout_decode(runner: tp.DymeRunner, bench_work: Work) -> None:
    """auto keeps the earlier tables' decode (HF's static cache wherever trl-same-gen has it); the trainer gets the
    settings that the chosen decode names."""
    assert tp.parse_args(["--device", "cuda"]).dyme_decode == "hf-static"
    assert tp.parse_args(["--device", "cuda", "--static-cache", "off"]).dyme_decode == "captured"
    assert tp.parse_args(["--device", "cpu"]).dyme_decode == "captured"
    with pytest.raises(SystemExit):
        tp.parse_args(["--dyme-decode", "compiled"])
    t = runner.trainers["dyme-full"].cfg.train  # built with --device cpu: auto -> captured
    assert (t.static_cache, t.cuda_graph_decode, t.compile_decode) == (False, True, False)
    for decode, settings in (("hf-static", (True, True, False)), ("captured-compiled", (False, True, True)),
                             ("eager", (False, False, False))):
        args = tp.parse_args(["--device", "cpu", "--dyme-decode", decode])
        cfg = tp.dyme_config(args, bench_work)
        assert (cfg.train.static_cache, cfg.train.cuda_graph_decode, cfg.train.compile_decode) == settings, decode


def test_each_variant_is_its_own_config_and_runs_full_length_rollouts(runner: tp.DymeRunner) -> None:
    for name, variant in tp.DYME_VARIANTS.items():
        if name in runner.trainers:
            t = runner.trainers[name].cfg.train
            assert (t.method, t.use_refiner, t.checker, t.ignore_eos) == (
                variant.method, variant.use_refiner, variant.checker, True)
    rec = runner.step("dyme-switch", "memorize75")
    assert rec["completion_len"] == 8  # train.ignore_eos: every rollout has --new-tokens tokens
    assert rec["update_tokens"] > rec["rows_kept"] * 8  # prompt + completion of every kept row


def test_each_step_refines_and_checks_exactly_as_its_variant_says(
    runner: tp.DymeRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, list] = {"refined": [], "checked": []}
    for name in ("dyme-full", "dyme-switch"):
        tr = runner.trainers[name]
        refine, score_many = tr.refiner.refine, tr.checker.score_many

        def spy_refine(samples: list, template: str, refine=refine) -> list:
            seen["refined"].append(len(samples))
            return refine(samples, template)

        def spy_checker(items: list, score_many=score_many) -> list[float]:
            seen["checked"].append(len(items))
            return score_many(items)

        monkeypatch.setattr(tr.refiner, "refine", spy_refine)
        monkeypatch.setattr(tr.checker, "score_many", spy_checker)
    # full, switch, then full again: no step keeps the settings of the step before
    for variant in ("dyme-full", "dyme-switch", "dyme-full"):
        for calls in seen.values():
            calls.clear()
        rec = runner.step(variant, "memorize75")
        assert rec["modes"]["memorize"] == 0.75  # memorize75 of 4 prompts: 3 MEMORIZE groups
        if variant == "dyme-switch":  # memorises the raw hint: the refiner is not asked; no checker
            assert seen == {"refined": [], "checked": []}
            assert set(rec["rewards"]) == {"accuracy", "total"}  # the controlled accuracy alone is scored
        else:  # the online rule refiner writes the 3 MEMORIZE targets; the rule checker scores every thinking
            assert seen == {"refined": [3], "checked": [PROMPTS * K]}
            assert rec["rewards"]["format"] < 1.0  # a random model's text has no answer line


@pytest.mark.parametrize("mix", ["memorize75", "mixed"])
def test_full_and_switch_see_the_same_mode_mix_and_the_controlled_accuracy(runner: tp.DymeRunner, mix: str) -> None:
    full, switch = runner.step("dyme-full", mix), runner.step("dyme-switch", mix)
    kinds = group_kinds(mix, PROMPTS)  # all-wrong groups are MEMORIZE, all-right SKIP, mixed EXPLORE
    expected = {
        "memorize": kinds.count("wrong") / PROMPTS,
        "explore": kinds.count("mixed") / PROMPTS,
        "skip": kinds.count("right") / PROMPTS,
    }
    assert full["modes"] == switch["modes"] == pytest.approx(expected)
    accuracy = sum(mix_accuracy(mix, PROMPTS, K)) / (PROMPTS * K)
    assert full["rewards"]["accuracy"] == switch["rewards"]["accuracy"] == pytest.approx(accuracy)
    # the total is recombined with train.reward_weights (all 1 by default), the controlled accuracy in it
    r = full["rewards"]
    assert r["total"] == pytest.approx(r["format"] + r["accuracy"] + r["thinking"])
    assert switch["rewards"]["total"] == pytest.approx(accuracy)


def test_full_scoring_reads_format_and_thinking_from_the_text_but_not_the_accuracy(bench_work: Work) -> None:
    rewards = ControlledRewards("explore")  # one mixed group: completion 0 right, 1 wrong
    sample = bench_work.dataset.split("train")[1]  # "Which month has the highest Revenue value?" -> Mar
    texts = [
        # well formed, thinking that states the chart's values, a wrong answer: the mix makes it right
        f"{rule_refine(sample)}\n{ANSWER_FLAG} Jan",
        # the right answer with no thinking: format 0, thinking 0, and the mix makes it wrong
        f"{ANSWER_FLAG} {sample.answer}",
    ]
    ctx = RewardContext(checker=VisualChecker("rule"), num_generations=2)
    table = rewards.table()
    assert table["format"](texts, [sample] * 2, ctx) == [1.0, 0.0]
    assert table["accuracy"](texts, [sample] * 2, ctx) == [1.0, 0.0]
    thinking = table["thinking"](texts, [sample] * 2, ctx)
    assert thinking[0] > 0 and thinking[1] == 0
    rewards.mix = "memorize75"  # set before a step: the next call sees it (one group: all wrong)
    assert table["accuracy"](texts, [sample] * 2, ctx) == [0.0, 0.0]
    with pytest.raises(ValueError, match="not whole groups of K=2"):
        table["accuracy"](texts[:1], [sample], ctx)


def _record(trainer: str, mix: str, step_s: float) -> dict:
    return {
        "trainer": trainer,
        "mix": mix,
        "step_s": step_s,
        "generation_s": step_s / 2,
        "reward_s": 0.01,
        "update_s": step_s / 4,
        "other_s": step_s / 4 - 0.01,
        "samples": 64,
        "gen_tokens": 1024.0,
        "update_tokens": 2048,
        "rows_kept": 16,
        "new_tokens": 16,
        "transient_bytes": 0,
    }


def test_the_full_over_switch_ratio_and_its_target_line_reach_the_json_and_markdown() -> None:
    args = tp.parse_args(["--trl", "off", "--trainers", "dyme-full,dyme-switch", "--mix", "memorize75,mixed"])
    records = [_record("dyme-full", "memorize75", s) for s in (1.0, 1.1, 1.2)]
    records += [_record("dyme-switch", "memorize75", 1.0) for _ in range(3)]
    records += [_record("dyme-full", "mixed", 1.3) for _ in range(3)]
    records += [_record("dyme-switch", "mixed", s) for s in (0.9, 1.0, 1.1)]
    meta = {
        "shape": "tiny",
        "params_m": 0.7,
        "trainable_m": 0.6,
        "k": 8,
        "prompts": 8,
        "new_tokens": 16,
        "device_name": "CPU (2 cores)",
        "date": "2026-11-30",
        "mixes": args.mix,
        "command": "python x",
        "trainers": {name: {"warmup_s": [2.0], "resident_bytes": 0, "params": {"trainable": 1000}}
                     for name in ("dyme-full", "dyme-switch")},
    }
    rows = tp.summarize(records, args, meta, None)
    ratio = {r["mix"]: r["x_full_vs_switch"] for r in rows if r["trainer"] == "dyme-full"}
    assert ratio == pytest.approx({"memorize75": 1.1, "mixed": 1.3})  # medians over medians
    assert not any("x_full_vs_switch" in r for r in rows if r["trainer"] == "dyme-switch")
    assert all(not math.isnan(r[p]) for r in rows for p in tp.PHASES)  # gen/reward/update/other for both
    meta["targets"] = tp.targets(rows)
    assert meta["targets"] == [
        "memorize75: dyme-full step 1.100x dyme-switch's (target <= 1.15): PASS",
        "mixed: dyme-full step 1.300x dyme-switch's (target <= 1.15): FAIL",
    ]
    md = tp.markdown(rows, meta)
    assert "x full vs switch" in md and "| 1.10 |" in md and "- mixed: dyme-full step 1.300x" in md
