"""Tiny-model training runs: every method moves the weights and logs what DESIGN.md section 6 lists;
a killed-and-resumed run ends with the same weights as an uninterrupted one; 2 processes (gloo) train."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dyme_core.config import load_config
from dyme_core.rewards import REWARDS, format_rewards
from dyme_core.trainer import VOLATILE_PREFIXES, DymeTrainer

pytestmark = pytest.mark.slow

METRICS = ["loss", "reward/format", "reward/accuracy", "reward/thinking", "reward/total", "mode/memorize",
           "mode/explore", "mode/skip", "frac_reward_zero_std", "completion/mean_length",
           "completion/clipped_ratio", "refiner/calls", "refiner/cache_hits", "refiner/fallbacks",
           "learning_rate", "grad_norm", "samples_per_s", "tokens_per_s", "time/generation_s",
           "time/update_s", "memory/peak_mb"]


def _cfg(tiny_setup: dict, out: Path, *extra: str):
    return load_config(None, [
        f"data.path={tiny_setup['data']}", f"model.name_or_path={tiny_setup['model']}",
        f"train.output_dir={out}", "train.refined=", "train.template_pool=",
        f"train.refine_cache_dir={out}/refine_cache", "train.max_steps=2", "train.batch_size=2",
        "train.num_generations=2", "train.max_new_tokens=8", "train.progress_bar=false",
        "train.learning_rate=1e-3", *extra,
    ])


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model" / "model.safetensors")


def _format_with_length_bonus(completions, samples, ctx) -> list[float]:
    """The format reward plus a bonus for shorter completions, so a random model's rollouts differ in reward."""
    return [f - len(t) / 100 for f, t in zip(format_rewards(completions, samples, ctx), completions, strict=True)]


def LengthBonusTrainer(cfg, dataset) -> DymeTrainer:  # noqa: N802 (reads as the trainer it makes)
    return DymeTrainer(cfg, dataset, rewards={**REWARDS, "format": _format_with_length_bonus})


@pytest.mark.parametrize("method", ["dyme", "grpo", "sft", "two_stage"])
def test_each_method_trains_and_logs(tiny_setup: dict, tmp_path: Path, method: str) -> None:
    cfg = _cfg(tiny_setup, tmp_path / method, f"train.method={method}")
    before = load_file(Path(tiny_setup["model"]) / "model.safetensors")
    trainer_cls = LengthBonusTrainer if method in ("grpo", "two_stage") else DymeTrainer
    trainer_cls(cfg, tiny_setup["dataset"]).train()
    after = _weights(tmp_path / method)
    text_moved = [k for k in before if "text_model" in k and not torch.equal(before[k], after[k])]
    vision_moved = [k for k in before if "vision_model" in k and not torch.equal(before[k], after[k])]
    assert text_moved, f"{method}: no language-model weight changed"
    assert not vision_moved, f"{method}: the frozen vision tower changed: {vision_moved[:3]}"
    history = [json.loads(x) for x in (tmp_path / method / "metrics.jsonl").read_text().splitlines()]
    timings = [json.loads(x) for x in (tmp_path / method / "timings.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [t["step"] for t in timings] == [1, 2]
    # every figure is in the run dir; the machine- and cache-dependent ones only in timings.jsonl
    for key in METRICS:
        assert key in {**history[-1], **timings[-1]}, key
        assert (key in history[-1]) != key.startswith(VOLATILE_PREFIXES), key
    if method != "sft":
        fractions = [h["mode/memorize"] + h["mode/explore"] + h["mode/skip"] for h in history
                     if not h["phase_sft"]]
        assert fractions and all(abs(f - 1) < 1e-6 for f in fractions)


@pytest.mark.parametrize("switch", ["binary", "threshold", "anneal", "budget"])
def test_each_switching_strategy_trains_and_logs(tiny_setup: dict, tmp_path: Path, switch: str) -> None:
    """`dyme train train.switch=...` on the tiny model: a random model gets nothing right, so binary and threshold
    memorise every group, anneal adds the reference to every group at its cosine weight, and budget buffers the
    failed prompts (2 per step, nothing left to update on) and takes its SFT step at the third, once
    switch_budget x batch_size = 4 are buffered."""
    out = tmp_path / switch
    cfg = _cfg(tiny_setup, out, f"train.switch={switch}", "train.max_steps=3", "train.switch_budget=2")
    DymeTrainer(cfg, tiny_setup["dataset"]).train()
    history = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [1, 2, 3]
    assert all(h["loss"] > 0 for h in history if h["rows/kept"])  # the memorised references' NLL
    if switch == "anneal":
        assert [h["switch/reference_advantage"] for h in history] == pytest.approx([1.0, 0.75, 0.25])
    if switch == "budget":  # capacity 2 x batch_size 2 = 4 prompts: buffered after steps 1 and 2
        assert [h["phase_sft"] for h in history] == [0.0, 0.0, 1.0]
        assert [h["switch/buffered"] for h in history] == [2.0, 4.0, 0.0]
        assert [h["rows/kept"] for h in history] == [0, 0, 4] and "loss/sft" not in history[0]
    else:
        assert all(h["mode/memorize"] == 1.0 and h["loss/sft"] > 0 for h in history)
    before = load_file(Path(tiny_setup["model"]) / "model.safetensors")
    after = _weights(out)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_grpo_collapses_without_reward_variance(tiny_setup: dict, tmp_path: Path) -> None:
    """Plain GRPO on a model that gets nothing right: all advantages 0, no row reaches the update."""
    cfg = _cfg(tiny_setup, tmp_path / "g", "train.method=grpo", "train.max_steps=1", "train.checker=none",
               "train.reward_weights={format: 0, accuracy: 1, thinking: 0}")
    m = DymeTrainer(cfg, tiny_setup["dataset"]).train()
    assert m["frac_reward_zero_std"] == 1.0 and m["rows/kept"] == 0 and m["grad_norm"] == 0.0


def test_dyme_memorizes_when_nothing_is_right(tiny_setup: dict, tmp_path: Path) -> None:
    """A random model gets nothing right: every group memorises, so exactly one row per prompt is kept."""
    cfg = _cfg(tiny_setup, tmp_path / "m", "train.max_steps=1", "train.num_generations=3")
    m = DymeTrainer(cfg, tiny_setup["dataset"]).train()
    assert m["reward/accuracy"] == 0.0 and m["mode/memorize"] == 1.0
    assert m["rows/kept"] == 2 and m["rows/total"] == 6  # 2 prompts x K=3, one memorised row each
    assert m["refiner/calls"] == 2  # refined online: no offline targets were given


def test_resume_is_exact(tiny_setup: dict, tmp_path: Path) -> None:
    common = ["train.max_steps=4", "train.save_steps=2", "train.method=dyme", "train.template_evolution=true"]
    DymeTrainer(_cfg(tiny_setup, tmp_path / "straight", *common), tiny_setup["dataset"]).train()
    # "killed" after step 2: run only the first two steps, keeping their checkpoint
    # checkpoints on their own volume (train.checkpoint_dir), as on a cluster
    killed = _cfg(tiny_setup, tmp_path / "resumed", *common, f"train.checkpoint_dir={tmp_path / 'ckpt'}")
    killed.train.max_steps = 2
    killed.train.save_steps = 1
    DymeTrainer(killed, tiny_setup["dataset"]).train()
    assert (tmp_path / "ckpt" / "checkpoint-1").is_dir()
    resumed = _cfg(tiny_setup, tmp_path / "resumed", *common, "train.resume_from=auto",
                   f"train.checkpoint_dir={tmp_path / 'ckpt'}")
    trainer = DymeTrainer(resumed, tiny_setup["dataset"])
    trainer.train()
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(x)["step"] for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_two_processes_gloo(tiny_setup: dict, tmp_path: Path) -> None:
    from dyme_core import steps

    out = tmp_path / "ddp"
    data = [f"data.path={tiny_setup['data']}", f"data.out_dir={tmp_path / 'dataset'}",
            f"data.report={tmp_path / 'ingest.json'}", f"validate.report={tmp_path / 'validation.json'}"]
    data_cfg = load_config(None, data)
    steps.ingest(data_cfg)  # `dyme train` reads the materialised dataset, validated
    steps.validate(data_cfg)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "dyme_core.cli", "train", *data,
           f"model.name_or_path={tiny_setup['model']}", f"train.output_dir={out}", "train.refined=",
           "train.max_steps=2", "train.batch_size=1", "train.num_generations=2", "train.max_new_tokens=8",
           "train.progress_bar=false", f"train.checkpoint_dir={tmp_path / 'ckpt'}", "train.report_to=[jsonl]"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    history = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 2
    assert history[-1]["rows/total"] == 4  # 2 processes x 1 prompt x K=2, summed across ranks
    before = load_file(Path(tiny_setup["model"]) / "model.safetensors")
    after = _weights(out)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_a_truncated_target_keeps_its_answer_line(tiny_setup: dict, tmp_path: Path) -> None:
    """train.max_target_tokens cuts the thinking of a long memorised reference, never its "Answer:" line."""
    trainer = DymeTrainer(_cfg(tiny_setup, tmp_path, "train.max_target_tokens=40"), tiny_setup["dataset"])
    tok = trainer.tokenizer
    thinking = " ".join(f"The bar for year {y} is {y % 97}." for y in range(2000, 2020))
    ids = trainer._encode_target(f"{thinking}\nAnswer: 42")
    assert len(ids) == 41 and int(ids[-1]) == trainer.eos_id  # the budget, then eos
    text = tok.decode(ids[:-1])
    kept = text.removesuffix("\nAnswer: 42")
    assert kept != text and len(kept) > 10 and thinking.startswith(kept)  # the start of the thinking, the answer
    short = "The bar is 3.\nAnswer: 3"  # within the budget: encoded as is
    expected = tok(short, add_special_tokens=False)["input_ids"] + [trainer.eos_id]
    assert trainer._encode_target(short).tolist() == expected
    no_answer = trainer._encode_target(thinking)  # nothing to keep: a plain cut
    assert len(no_answer) == 41 and thinking.startswith(tok.decode(no_answer[:-1]))


def test_budget_switch_under_two_processes_shares_one_buffer(tiny_setup: dict, tmp_path: Path) -> None:
    """2 processes x 1 prompt, budget 1: each step both ranks' failed prompts join the buffer (the same on every
    rank), so the capacity of 1 x 1 x 2 processes is reached after step 1 and step 2 is SFT, one row per rank;
    the checkpoint (rank 0's) holds the whole buffer."""
    from dyme_core import steps

    out = tmp_path / "ddp"
    data = [f"data.path={tiny_setup['data']}", f"data.out_dir={tmp_path / 'dataset'}",
            f"data.report={tmp_path / 'ingest.json'}", f"validate.report={tmp_path / 'validation.json'}"]
    data_cfg = load_config(None, data)
    steps.ingest(data_cfg)
    steps.validate(data_cfg)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "dyme_core.cli", "train", *data,
           f"model.name_or_path={tiny_setup['model']}", f"train.output_dir={out}", "train.refined=",
           "train.max_steps=3", "train.batch_size=1", "train.num_generations=2", "train.max_new_tokens=8",
           "train.progress_bar=false", f"train.checkpoint_dir={tmp_path / 'ckpt'}", "train.report_to=[jsonl]",
           "train.switch=budget", "train.switch_budget=1", "train.save_steps=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    history = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["phase_sft"] for h in history] == [0.0, 1.0, 0.0]
    assert [h["switch/buffered"] for h in history] == [2.0, 0.0, 2.0]
    assert history[1]["rows/kept"] == 2  # one memorised reference on each rank, summed
    saved = json.loads((tmp_path / "ckpt" / "checkpoint-1" / "trainer_state.json").read_text())
    assert len(dict(saved["state"]["__dict__"])["switch_buffer"]) == 2  # both ranks' failed prompts
