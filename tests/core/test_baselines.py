"""The baselines run as the paper runs them (issue "DyME's claim, tested fairly"), each checked against a
plain reimplementation of the official update: rows of advantage 0 keep their KL gradient when beta > 0;
`bnpo` divides by the tokens of the rows the official update sees (a memorised target in place of the
rollout it replaces); num_iterations > 1 with gradient accumulation steps once per iteration, after every
batch, and the LR schedule once per train step; `top_k=0` samples from the whole vocabulary; the bucketed
gradient all-reduce of 2 gloo processes equals one process's gradient over the union of their rows; the
logged loss figures mean what docs/DESIGN.md says.
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from dyme_core.algorithm import (
    EXPLORE,
    MEMORIZE,
    REPLACED,
    SKIP,
    aggregate_loss,
    batch_token_count,
    dyme_advantages,
    group_advantages,
    kept_rollouts,
    policy_loss,
)
from dyme_core.config import load_config
from dyme_core.rewards import RewardContext
from dyme_core.trainer import DymeTrainer, Row

# ---------------------------------------------------------------- seeded random tensors


def _official_batch(seed: int, b: int = 6, k: int = 4, t: int = 9):
    """B*K rows as the official update sees them: in a MEMORIZE group the reference trace (advantage +1)
    sits in rollout REPLACED's place. Returns what both updates need."""
    g = torch.Generator().manual_seed(seed)
    modes = torch.tensor([MEMORIZE, EXPLORE, SKIP, EXPLORE, MEMORIZE, EXPLORE][:b])
    rewards = torch.rand(b, k, generator=g)
    rewards[modes == SKIP] = 1.0
    adv = dyme_advantages(rewards, modes)  # (B, K): 0 outside EXPLORE
    memorize = modes == MEMORIZE
    base = torch.randn(b, k, t, generator=g)  # per-token log-probs (as logits of a trivial policy)
    ref = torch.randn(b, k, t, generator=g)
    lengths = torch.randint(2, t + 1, (b, k), generator=g)  # rollout lengths, right-aligned as in the trainer
    target_lengths = torch.randint(2, t + 1, (b,), generator=g)
    full_lengths = lengths.clone()
    full_lengths[memorize, REPLACED] = target_lengths[memorize]
    full_adv = adv.clone()
    full_adv[memorize, REPLACED] = 1.0
    mask = torch.arange(t).expand(b, k, t) >= (t - full_lengths).unsqueeze(-1)  # (B, K, T)
    return dict(adv=adv, memorize=memorize, base=base, ref=ref, lengths=lengths, target_lengths=target_lengths,
                full_adv=full_adv, mask=mask, b=b, k=k, t=t)


def _plain_official_loss(logps, ref, adv, mask, beta, loss_type):
    """The official update written out: per-token -A * ratio + beta * k3 KL over every one of the B*K rows."""
    ratio = torch.exp(logps - logps.detach())
    delta = ref - logps
    per_token = -adv.unsqueeze(-1) * ratio + beta * (torch.exp(delta) - delta - 1)
    m = mask.float()
    if loss_type == "grpo":
        return ((per_token * m).sum(-1) / m.sum(-1)).sum() / adv.numel()
    assert loss_type == "bnpo"
    return (per_token * m).sum() / m.sum()


def _our_loss(x, d, beta, loss_type, total_tokens=None):
    """Our update: only the rows `kept_rollouts` keeps, plus the memorised targets, normalised by the counts
    of the full batch."""
    keep = kept_rollouts(d["adv"], d["memorize"], beta)
    keep[d["memorize"], REPLACED] = True  # the target row in the replaced rollout's slot of the tensors
    logps, ref, mask, adv = x[keep], d["ref"][keep], d["mask"][keep], d["full_adv"][keep]
    per_token = policy_loss(logps, logps.detach(), adv, ref_logps=ref, beta=beta)
    if total_tokens is None:
        total_tokens = batch_token_count(d["lengths"], d["memorize"], d["target_lengths"])
    return aggregate_loss(per_token, mask, loss_type, total_rows=d["b"] * d["k"], total_tokens=total_tokens,
                          max_completion_len=d["t"], kept_rows=int(keep.sum())), keep


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo"])
def test_beta_keeps_the_kl_gradient_of_zero_advantage_rows(loss_type: str) -> None:
    d = _official_batch(seed=0)
    beta = 0.04  # the paper's GRPO baseline
    full = d["base"].clone().requires_grad_(True)
    _plain_official_loss(full, d["ref"], d["full_adv"], d["mask"], beta, loss_type).backward()
    ours = d["base"].clone().requires_grad_(True)
    loss, keep = _our_loss(ours, d, beta, loss_type)
    loss.backward()
    assert torch.allclose(full.grad, ours.grad, atol=1e-7)
    assert int(keep.sum()) == d["b"] * d["k"]  # with beta > 0 every row is in the update
    # the old rule (drop every rollout of advantage 0) loses the KL gradient of those rows
    dropped = d["base"].clone().requires_grad_(True)
    old_keep = d["full_adv"] != 0
    per_token = policy_loss(dropped[old_keep], dropped[old_keep].detach(), d["full_adv"][old_keep],
                            ref_logps=d["ref"][old_keep], beta=beta)
    aggregate_loss(per_token, d["mask"][old_keep], loss_type, d["b"] * d["k"], int(d["mask"].sum()), d["t"],
                   int(old_keep.sum())).backward()
    assert not torch.allclose(full.grad, dropped.grad, atol=1e-4)


def test_beta_zero_still_drops_every_zero_advantage_row() -> None:
    d = _official_batch(seed=1)
    keep = kept_rollouts(d["adv"], d["memorize"], beta=0.0)
    assert torch.equal(keep, d["adv"] != 0)  # only EXPLORE rollouts with a non-zero advantage
    full = d["base"].clone().requires_grad_(True)
    _plain_official_loss(full, d["ref"], d["full_adv"], d["mask"], 0.0, "grpo").backward()
    ours = d["base"].clone().requires_grad_(True)
    _our_loss(ours, d, 0.0, "grpo")[0].backward()
    assert torch.allclose(full.grad, ours.grad, atol=1e-7)


def test_bnpo_counts_the_memorised_targets_tokens_not_the_replaced_rollouts() -> None:
    d = _official_batch(seed=2)
    full = d["base"].clone().requires_grad_(True)
    _plain_official_loss(full, d["ref"], d["full_adv"], d["mask"], 0.0, "bnpo").backward()
    ours = d["base"].clone().requires_grad_(True)
    _our_loss(ours, d, 0.0, "bnpo")[0].backward()
    assert torch.allclose(full.grad, ours.grad, atol=1e-7)
    assert batch_token_count(d["lengths"], d["memorize"], d["target_lengths"]) == int(d["mask"].sum())
    # counting the replaced rollouts instead (the old denominator) gives another gradient
    stale = d["base"].clone().requires_grad_(True)
    _our_loss(stale, d, 0.0, "bnpo", total_tokens=int(d["lengths"].sum()))[0].backward()
    assert not torch.allclose(full.grad, stale.grad, atol=1e-6)


# ---------------------------------------------------------------- the trainer on a tiny model


def _cfg(tiny_setup: dict, out: Path, *extra: str):
    return load_config(None, [
        f"data.path={tiny_setup['data']}", f"model.name_or_path={tiny_setup['model']}",
        f"train.output_dir={out}", "train.refined=", "train.template_pool=",
        f"train.refine_cache_dir={out}/refine_cache", "train.max_steps=2", "train.batch_size=3",
        "train.num_generations=3", "train.max_new_tokens=6", "train.progress_bar=false",
        "train.learning_rate=1e-2", "train.report_to=[none]", *extra,
    ])


def _designed_accuracy(completions: list[str], samples: list, ctx: RewardContext) -> list[float]:
    """Group b of a batch (K completions each) is wrong, half right or right as b % 3 is 0, 1 or 2."""
    k = ctx.num_generations
    kinds = [[0.0] * k, [1.0] + [0.0] * (k - 1), [1.0] * k]
    return [kinds[(i // k) % 3][i % k] for i in range(len(completions))]


# Rewards chosen per group, so one batch has a MEMORIZE, an EXPLORE and a SKIP group (B=3, K=3); format
# alternates so that rewards differ inside every group. The trainer's reward table, as a user passes one.
DESIGNED = {"accuracy": _designed_accuracy,
            "format": lambda completions, samples, ctx: [float(i % 2) for i in range(len(completions))],
            "thinking": lambda completions, samples, ctx: [0.0] * len(completions)}


def DesignedRewards(cfg, dataset) -> DymeTrainer:  # noqa: N802 (reads as the trainer it makes)
    return DymeTrainer(cfg, dataset, rewards=DESIGNED)


def _rows_of_official_update(trainer: DymeTrainer, rows: list[Row], completions: list[torch.Tensor],
                             adv: torch.Tensor) -> list[Row]:
    """All B*K rows: each group's rollouts, the memorised target in the replaced rollout's place."""
    k = trainer.t.num_generations
    targets = {r.prompt: r for r in rows if r.memorized}
    out = []
    for b in range(adv.shape[0]):
        for j in range(k):
            if b in targets and j == REPLACED:
                out.append(targets[b])
            else:
                out.append(Row(b, completions[b * k + j], float(adv[b, j]), trainer.t.temperature))
    return out


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo"])
def test_trainer_update_equals_the_official_update_with_kl(tiny_setup: dict, tmp_path: Path,
                                                           loss_type: str) -> None:
    cfg = _cfg(tiny_setup, tmp_path, "train.beta=0.04", f"train.loss_type={loss_type}")
    trainer = DesignedRewards(cfg, tiny_setup["dataset"])
    generated = []
    generate = trainer._generate
    trainer._generate = lambda batch: generated.append(generate(batch)) or generated[-1]
    batch = trainer._prepare(trainer.samples[:3])
    plan = trainer._rl_rows(batch)
    rows, norm, m = plan.rows, plan.norm, plan.metrics
    assert m["mode/memorize"] == m["mode/explore"] == m["mode/skip"] == pytest.approx(1 / 3)
    assert len(rows) == 9  # B*K: the zero-advantage rollouts of the MEMORIZE and SKIP groups stay (KL)
    trainer.optimizer.zero_grad(set_to_none=True)
    with trainer._update_mode():
        trainer._backward(batch, rows, norm, beta=0.04)
    ours = [p.grad.clone() for p in trainer.params]

    # plain: every row, per-token -A * ratio + beta * k3, normalised over the whole batch
    rewards = trainer._score(batch.samples, [""] * 9)
    adv = dyme_advantages(rewards["total"], torch.tensor([MEMORIZE, EXPLORE, SKIP]))
    full = _rows_of_official_update(trainer, rows, generated[0], adv)
    trainer.optimizer.zero_grad(set_to_none=True)
    with trainer._update_mode():
        logps, mask = trainer._token_logps(trainer.model, batch, full)
        with torch.no_grad():
            ref, _ = trainer._token_logps(trainer.ref_model, batch, full)
    a = torch.tensor([r.advantage for r in full])
    _plain_official_loss(logps, ref, a, mask, 0.04, loss_type).backward()
    plain = [p.grad for p in trainer.params]
    assert all(torch.allclose(x, y, atol=1e-6, rtol=1e-4) for x, y in zip(ours, plain, strict=True))
    assert any(float(x.abs().max()) > 0 for x in ours)


def test_reused_generations_step_once_per_iteration_after_every_batch(tiny_setup: dict, tmp_path: Path) -> None:
    """num_iterations=2 x grad_accum_steps=2 equals a plain TRL-style loop: per iteration, accumulate both
    batches (PPO ratio to the generating policy), then one AdamW step; the schedule advances once."""
    cfg = _cfg(tiny_setup, tmp_path, "train.num_iterations=2", "train.grad_accum_steps=2", "train.batch_size=3",
               "train.weight_decay=0", "train.max_grad_norm=0", "train.lr_scheduler=linear", "train.max_steps=4",
               "train.clip_eps=0.05")
    trainer = DesignedRewards(cfg, tiny_setup["dataset"])
    plain_model = copy.deepcopy(trainer.model)
    captured: list[tuple] = []
    rl_rows = trainer._rl_rows

    def capture(batch):
        plan = rl_rows(batch)
        captured.append((batch, [copy.copy(r) for r in plan.rows], plan.norm))
        return plan

    trainer._rl_rows = capture
    events: list[str] = []
    backward = trainer._backward

    def which(batch) -> str:
        return f"batch{next(i for i, c in enumerate(captured) if c[0] is batch)}"

    trainer._backward = lambda batch, *a: events.append(which(batch)) or backward(batch, *a)
    trainer.optimizer.register_step_post_hook(lambda *_: events.append("step"))
    metrics = trainer.train_step()
    assert events == ["batch0", "batch1", "step", "batch0", "batch1", "step"]  # 2nd iteration replays both
    assert trainer.scheduler.last_epoch == 1  # once per train step, not per optimizer step
    assert metrics["learning_rate"] == pytest.approx(1e-2)  # the rate step 1 used (linear: 1.0 at step 0)

    params = [p for p in plain_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    plain_model.train()
    old = []
    with torch.no_grad():
        for batch, rows, _ in captured:
            old.append(trainer._token_logps(plain_model, batch, rows)[0])
    for _ in range(2):
        opt.zero_grad()
        for (batch, rows, norm), old_logps in zip(captured, old, strict=True):
            logps, mask = trainer._token_logps(plain_model, batch, rows)
            ratio = torch.exp(logps - old_logps)
            a = torch.tensor([r.advantage for r in rows]).unsqueeze(1)
            per_token = -torch.minimum(ratio * a, ratio.clamp(1 - 0.05, 1 + 0.05) * a)
            w = mask.float()
            loss = ((per_token * w).sum(1) / w.sum(1)).sum() / norm["total_rows"] / 2  # grpo, 2 accumulated
            loss.backward()
        opt.step()
    ours = dict(trainer.model.named_parameters())
    for name, p in plain_model.named_parameters():
        assert torch.allclose(p, ours[name], atol=1e-6, rtol=1e-4), name
    moved = [n for n, p in plain_model.named_parameters() if p.requires_grad]
    assert moved


def test_top_k_zero_samples_from_the_whole_vocabulary(tiny_setup: dict, tmp_path: Path) -> None:
    """The default top_k=0 reaches generate as "off" (transformers would otherwise apply its 50)."""
    assert load_config(None, []).train.top_k == 0
    firsts = {}
    for top_k in (0, 50):
        cfg = _cfg(tiny_setup, tmp_path, f"train.top_k={top_k}", "train.num_generations=200",
                   "train.max_new_tokens=1", "train.temperature=3.0")
        trainer = DymeTrainer(cfg, tiny_setup["dataset"])
        torch.manual_seed(0)
        completions = trainer._generate(trainer._prepare(trainer.samples[:1]))
        firsts[top_k] = {int(c[0]) for c in completions}
    assert len(firsts[50]) <= 50
    assert len(firsts[0]) > 50


def test_loss_figures_mean_what_they_say(tiny_setup: dict, tmp_path: Path) -> None:
    """A random model gets nothing right, so every group memorises: `loss/objective` (the optimised
    surrogate) is -(memorised rows)/(B*K), a constant, while `loss/sft`, the memorised traces' token-mean
    NLL, falls as the same targets are learnt; `loss`, what a user reads, is that NLL (+ the policy loss)."""
    cfg = _cfg(tiny_setup, tmp_path, "train.batch_size=8", "train.num_generations=2", "train.max_steps=4",
               "train.learning_rate=3e-3")
    trainer = DymeTrainer(cfg, tiny_setup["dataset"])
    history = [trainer.train_step() for _ in range(4)]
    for h in history:
        assert h["mode/memorize"] == 1.0
        assert h["loss/objective"] == pytest.approx(-8 / 16)  # 8 memorised rows among B*K = 16, -A * ratio = -1
        assert "loss/policy" not in h  # no rollout carried an advantage
        assert h["loss"] == h["loss/sft"] == h["loss/nll_memorized"] > 0
    assert history[-1]["loss/sft"] < history[0]["loss/sft"] - 0.1
    assert history[-1]["loss"] < history[0]["loss"] - 0.1  # the logged loss falls as the model learns


def test_loss_policy_is_the_surrogate_of_rollouts(tiny_setup: dict, tmp_path: Path) -> None:
    cfg = _cfg(tiny_setup, tmp_path, "train.beta=0.1")
    m = DesignedRewards(cfg, tiny_setup["dataset"]).train_step()
    assert m["loss/policy"] == pytest.approx(0.0, abs=1e-5)  # on-policy: -mean of group-centred advantages
    assert m["kl"] == pytest.approx(0.0, abs=1e-6)  # the first step's policy is the reference
    assert m["loss/sft"] > 0 and m["rows/kept"] == 9
    assert m["loss"] == pytest.approx(m["loss/sft"] + m["loss/policy"] + 0.1 * m["kl"])


def test_trainer_scores_with_the_reward_table_and_named_weights(tiny_setup: dict, tmp_path: Path) -> None:
    cfg = _cfg(tiny_setup, tmp_path, "train.reward_weights={accuracy: 2, format: 0.5}", "train.max_steps=1")
    trainer = DymeTrainer(cfg, tiny_setup["dataset"])
    samples = trainer.samples[:2]
    texts = [f"The chart gives {s.answer} here.\nAnswer: {s.answer}" if j == 0 else
             ("Answer: wrong" if j == 1 else "no flag at all") for s in samples for j in range(3)]
    rewards = trainer._score(samples, texts)
    assert set(rewards) == {"format", "accuracy", "total"}  # only the named rewards (accuracy always)
    assert rewards["accuracy"].tolist() == [[1.0, 0.0, 0.0]] * 2
    assert rewards["format"].tolist() == [[1.0, 0.0, 0.0]] * 2
    assert torch.equal(rewards["total"], 2 * rewards["accuracy"] + 0.5 * rewards["format"])
    m = trainer.train_step()
    assert {"reward/format", "reward/accuracy", "reward/total"} <= set(m) and "reward/thinking" not in m


# ---------------------------------------------------------------- data-parallel gradients


def _toy_rows(seed: int, n: int, t: int = 5, v: int = 7):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, t, 3, generator=g)
    targets = torch.randint(0, v, (n, t), generator=g)
    adv = torch.randn(n, generator=g)
    mask = torch.rand(n, t, generator=g) > 0.2
    mask[:, -1] = True
    return feats, targets, adv, mask


def _toy_model() -> torch.nn.Module:
    torch.manual_seed(0)  # identical weights on every process
    return torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 7)).double()


def _toy_grads(rows, total_rows: int) -> torch.nn.Module:
    model = _toy_model()
    feats, targets, adv, mask = rows
    logps = torch.log_softmax(model(feats.double()), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    per_token = policy_loss(logps, logps.detach(), adv.double())
    aggregate_loss(per_token, mask, "grpo", total_rows, int(mask.sum()), 5, len(adv)).backward()
    return model


def _worker(rank: int, world: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        feats, targets, adv, mask = _toy_rows(seed=0, n=8)
        half = slice(rank * 4, rank * 4 + 4)  # each process owns half of the rows
        model = _toy_grads((feats[half], targets[half], adv[half], mask[half]), total_rows=4)
        grads = [p.grad for p in model.parameters()]
        DymeTrainer._all_reduce_mean(grads, world, bucket_bytes=400)  # several buckets
        save_file({str(i): g.contiguous() for i, g in enumerate(grads)}, os.path.join(out, f"rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


def test_bucketed_all_reduce_equals_one_process_over_the_union(tmp_path: Path) -> None:
    mp.start_processes(_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    single = _toy_grads(_toy_rows(seed=0, n=8), total_rows=8)
    expected = [p.grad for p in single.parameters()]
    for rank in range(2):
        got = load_file(tmp_path / f"rank{rank}.safetensors")
        assert len(got) == len(expected)
        for i, g in enumerate(expected):
            assert torch.allclose(got[str(i)], g, atol=1e-12), (rank, i)


# ---------------------------------------------------------------- switching strategies on the tiny model


def test_anneal_puts_the_reference_at_full_weight_first_and_keeps_every_groups_advantages(
        tiny_setup: dict, tmp_path: Path) -> None:
    cfg = _cfg(tiny_setup, tmp_path, "train.switch=anneal", "train.max_steps=4")
    trainer = DymeTrainer(cfg, tiny_setup["dataset"], rewards=DESIGNED)
    batch = trainer._prepare(trainer.samples[:3])
    plan = trainer._rl_rows(batch)  # step 0
    references = [r for r in plan.rows if r.memorized]
    assert [r.prompt for r in references] == [0, 1, 2]  # one per group, the SKIP and EXPLORE groups too
    assert all(r.advantage == 1.0 for r in references)
    rewards = trainer._score(batch.samples, [""] * 9)
    expected = group_advantages(rewards["total"])  # every group keeps its GRPO advantages, MEMORIZE's too
    rollouts = {(r.prompt, float(r.advantage)) for r in plan.rows if not r.memorized}
    assert rollouts == {(b, float(expected[b, j])) for b in range(3) for j in range(3)
                        if j != REPLACED and expected[b, j] != 0}  # rows of advantage 0 are dropped, as always
    assert {b for b, _ in rollouts} == {0, 1, 2}
    trainer.step = 2  # halfway along the cosine
    assert [r.advantage for r in trainer._rl_rows(batch).rows if r.memorized] == [pytest.approx(0.5)] * 3
    # a whole run: the logged reference advantage follows 0.5 * (1 + cos(pi * step / max_steps))
    history = [trainer.train_step() for _ in range(2)]
    assert [h["switch/reference_advantage"] for h in history] == [
        pytest.approx(0.5), pytest.approx(0.5 * (1 + math.cos(3 * math.pi / 4)))]
    assert all(h["loss/sft"] > 0 and "loss/policy" in h for h in history)


def test_threshold_switches_on_the_soft_reward(tiny_setup: dict, tmp_path: Path) -> None:
    """Right answers with thinking the checker finds ungrounded: binary skips, threshold (mean 2/3 <= 0.9)
    memorises; at switch_threshold 0.5 the same rollouts count as correct and are skipped."""
    right_but_ungrounded = {"accuracy": lambda c, s, ctx: [1.0] * len(c), "format": lambda c, s, ctx: [1.0] * len(c),
                            "thinking": lambda c, s, ctx: [0.0] * len(c)}
    modes = {}
    for name, extra in (("binary", []), ("threshold", ["train.switch=threshold"]),
                        ("threshold_05", ["train.switch=threshold", "train.switch_threshold=0.5"])):
        cfg = _cfg(tiny_setup, tmp_path / name, *extra, "train.max_steps=1")
        m = DymeTrainer(cfg, tiny_setup["dataset"], rewards=right_but_ungrounded).train_step()
        modes[name] = (m["mode/memorize"], m["mode/skip"], m["rows/kept"])
    assert modes == {"binary": (0.0, 1.0, 0), "threshold": (1.0, 0.0, 3), "threshold_05": (0.0, 1.0, 0)}


def test_budget_takes_one_sft_step_exactly_when_the_buffer_fills_and_resumes_it(tiny_setup: dict,
                                                                                tmp_path: Path) -> None:
    """One failed group per batch (B=3), budget 1 x 3 prompts: GRPO steps buffer 1, 2, 3 references, the 4th
    step is pure SFT on those 3 prompts and empties the buffer; a run resumed from step 2's checkpoint resumes the
    buffer, and ends with the weights of the run that went straight through."""
    common = ["train.switch=budget", "train.switch_budget=1", "train.max_steps=5", "train.report_to=[jsonl]"]
    straight = DymeTrainer(_cfg(tiny_setup, tmp_path / "straight", *common), tiny_setup["dataset"], rewards=DESIGNED)
    failed = [straight._batch_indices(s, 0)[0] for s in range(4)]  # position 0 of each batch is the wrong group
    history = []
    for _ in range(5):
        if straight.step == 3:
            assert straight.buffer == failed[:3]
        history.append(straight.train_step())
    assert [h["phase_sft"] for h in history] == [0.0, 0.0, 0.0, 1.0, 0.0]
    assert [h["switch/buffered"] for h in history] == [1.0, 2.0, 3.0, 0.0, 1.0]
    sft = history[3]
    assert sft["rows/kept"] == 3 and sft["loss/sft"] > 0 and "loss/policy" not in sft
    assert sft["mode/memorize"] == 0.0 and sft["reward/accuracy"] == 0.0  # nothing was generated
    grpo = history[0]
    assert "loss/sft" not in grpo and grpo["rows/kept"] == 2  # the EXPLORE group's rollouts of advantage != 0
    # the step after the SFT step takes the batch of train step 4, as a run without a budget would
    assert straight.buffer == [straight._batch_indices(4, 0)[0]]

    def run(out: str, *extra: str) -> DymeTrainer:
        cfg = _cfg(tiny_setup, tmp_path / out, *common, f"train.checkpoint_dir={tmp_path / 'ckpt'}", *extra)
        trainer = DymeTrainer(cfg, tiny_setup["dataset"], rewards=DESIGNED)
        trainer.train()
        return trainer

    run("resumed", "train.max_steps=3", "train.save_steps=1")  # "killed" after step 3: its last checkpoint is 2
    saved = json.loads((tmp_path / "ckpt" / "checkpoint-2" / "trainer_state.json").read_text())
    state = dict(saved["state"]["__dict__"])
    assert state["switch_buffer"] == failed[:2]  # plain JSON in the checkpoint
    resumed = run("resumed", "train.resume_from=auto")
    assert resumed.buffer == straight.buffer
    for (name, a), b in zip(straight.model.named_parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_the_reward_table_must_hold_what_the_config_weighs(tiny_setup: dict, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"reward table has no \['thinking'\]"):
        DymeTrainer(_cfg(tiny_setup, tmp_path), tiny_setup["dataset"],
                    rewards={"accuracy": DESIGNED["accuracy"], "format": DESIGNED["format"]})


def test_ignore_eos_runs_every_rollout_to_max_new_tokens(tiny_setup: dict, tmp_path: Path) -> None:
    lengths = {}
    for ignore in (False, True):
        cfg = _cfg(tiny_setup, tmp_path / str(ignore), f"train.ignore_eos={ignore}", "train.max_new_tokens=12",
                   "train.temperature=3.0", "train.num_generations=200")
        trainer = DymeTrainer(cfg, tiny_setup["dataset"])
        torch.manual_seed(0)
        completions = trainer._generate(trainer._prepare(trainer.samples[:1]))
        lengths[ignore] = [len(c) for c in completions]
        assert all(int(c[-1]) != trainer.eos_id for c in completions) or not ignore
    assert set(lengths[True]) == {12}
    assert min(lengths[False]) < 12  # a random model at temperature 3 samples eos somewhere in 2,400 tokens


@pytest.mark.parametrize("min_chars, expected", [(10, 1.0), (40, 0.0)])
def test_evaluation_scores_format_as_training_does(tiny_setup: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   min_chars: int, expected: float) -> None:
    """Evaluation's format rate comes from the reward table with train.min_thinking_chars, as in training."""
    from dyme_core import evaluate

    answer = "The tallest bar reads 3.\nAnswer: 3"  # 24 characters of thinking
    monkeypatch.setattr(evaluate, "generate_answers", lambda model, processor, images, *a: [answer] * len(images))
    cfg = load_config(None, [f"data.path={tiny_setup['data']}", f"evaluate.model_path={tiny_setup['model']}",
                             f"evaluate.out_dir={tmp_path}", "evaluate.limit=2",
                             f"train.min_thinking_chars={min_chars}"])
    evaluate.evaluate(cfg, tiny_setup["dataset"])
    rows = [json.loads(x) for x in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [r["format"] for r in rows] == [expected] * 2
    assert [r["correct"] for r in rows] == [float(r["reference"] == "3") for r in rows]
