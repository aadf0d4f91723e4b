"""Mode rule, switching strategies, advantages and loss aggregation on seeded random tensors (CPU)."""

import math

import pytest
import torch

from dyme_core.algorithm import (
    EXPLORE,
    MEMORIZE,
    REPLACED,
    SKIP,
    aggregate_loss,
    anneal_advantages,
    anneal_weight,
    budget_full,
    budget_prompts,
    dyme_advantages,
    group_advantages,
    kept_rollouts,
    policy_loss,
    select_modes,
    soft_correct,
)


def test_mode_constants_are_public_and_stable() -> None:
    assert (MEMORIZE, EXPLORE, SKIP) == (0, 1, 2)


def test_select_modes_by_number_correct() -> None:
    g = torch.Generator().manual_seed(0)
    correct = torch.rand(64, 8, generator=g) < torch.rand(64, 1, generator=g)  # (B, K)
    correct[0] = False
    correct[1] = True
    modes = select_modes(correct)
    c = correct.sum(1)
    assert modes.dtype == torch.long and modes.shape == (64,)
    assert torch.equal(modes == MEMORIZE, c == 0)
    assert torch.equal(modes == SKIP, c == 8)
    assert torch.equal(modes == EXPLORE, (c > 0) & (c < 8))
    assert modes[0] == MEMORIZE and modes[1] == SKIP


def test_group_advantages_match_formula() -> None:
    g = torch.Generator().manual_seed(1)
    r = torch.rand(16, 4, generator=g)
    adv = group_advantages(r, eps=1e-4)
    for b in range(16):
        mean, std = r[b].mean(), r[b].std(unbiased=True)
        assert torch.allclose(adv[b], (r[b] - mean) / (std + 1e-4), atol=1e-6)
    assert torch.allclose(adv.sum(1), torch.zeros(16), atol=1e-5)  # centred per group
    assert torch.allclose(group_advantages(r, scale=False), r - r.mean(1, keepdim=True))


def test_equal_rewards_give_zero_advantage() -> None:
    assert torch.equal(group_advantages(torch.full((3, 4), 0.7)), torch.zeros(3, 4))


def test_dyme_advantages_zero_outside_explore() -> None:
    g = torch.Generator().manual_seed(2)
    r = torch.rand(32, 4, generator=g)
    modes = torch.randint(0, 3, (32,), generator=g)
    adv = dyme_advantages(r, modes)
    assert torch.all(adv[modes != EXPLORE] == 0)
    assert torch.allclose(adv[modes == EXPLORE], group_advantages(r)[modes == EXPLORE])


def _full_batch_loss(logps, adv, mask, loss_type, max_len):
    per_token = policy_loss(logps, logps.detach(), adv)
    n = logps.shape[0]
    return aggregate_loss(per_token, mask, loss_type, total_rows=n, total_tokens=int(mask.sum()),
                          max_completion_len=max_len, kept_rows=int((adv != 0).sum()))


def test_dropping_zero_weight_rows_keeps_the_gradient() -> None:
    """The official update over all rows == our update over the non-zero rows, for every aggregation."""
    g = torch.Generator().manual_seed(3)
    n, t = 12, 7
    base = torch.randn(n, t, generator=g)
    mask = torch.ones(n, t, dtype=torch.bool)
    for i in range(n):
        mask[i, : int(torch.randint(0, 4, (1,), generator=g))] = False  # ragged completions
    adv = torch.randn(n, generator=g)
    adv[::3] = 0.0  # a third of the rows carry no weight
    keep = adv != 0
    for loss_type in ("grpo", "bnpo", "dr_grpo"):
        full = base.clone().requires_grad_(True)
        _full_batch_loss(full, adv, mask, loss_type, t).backward()
        part = base.clone().requires_grad_(True)
        per_token = policy_loss(part[keep], part[keep].detach(), adv[keep])
        aggregate_loss(per_token, mask[keep], loss_type, total_rows=n, total_tokens=int(mask.sum()),
                       max_completion_len=t, kept_rows=int(keep.sum())).backward()
        assert torch.allclose(full.grad, part.grad, atol=1e-7), loss_type
        assert torch.all(part.grad[~keep] == 0)


def test_memorize_row_is_token_mean_nll() -> None:
    """Advantage +1 on-policy: the gradient equals that of token-mean negative log-likelihood."""
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(1, 5, 11, generator=g, requires_grad=True)
    target = torch.randint(0, 11, (1, 5), generator=g)
    logps = torch.log_softmax(logits, -1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    mask = torch.ones(1, 5, dtype=torch.bool)
    loss = aggregate_loss(policy_loss(logps, logps.detach(), torch.ones(1)), mask, "grpo", 1, 5, 5, 1)
    (grad_pg,) = torch.autograd.grad(loss, logits)
    nll = torch.nn.functional.cross_entropy(logits.view(-1, 11), target.view(-1))
    (grad_nll,) = torch.autograd.grad(nll, logits)
    assert torch.allclose(grad_pg, grad_nll, atol=1e-7)


def test_ppo_clip_only_bites_off_policy() -> None:
    logps = torch.zeros(1, 3, requires_grad=True)
    old = torch.full((1, 3), -1.0)  # ratio e > 1 + 0.2: clipped for a positive advantage
    loss = policy_loss(logps, old, torch.ones(1), clip_eps=0.2).sum()
    (grad,) = torch.autograd.grad(loss, logps)
    assert torch.all(grad == 0)
    on_policy = policy_loss(logps, logps.detach(), torch.ones(1)).sum()
    (grad,) = torch.autograd.grad(on_policy, logps)
    assert torch.allclose(grad, -torch.ones(1, 3))


def test_kl_term_is_nonnegative_and_zero_at_reference() -> None:
    g = torch.Generator().manual_seed(5)
    logps = torch.randn(4, 6, generator=g)
    zero_adv = torch.zeros(4)
    assert torch.allclose(policy_loss(logps, logps, zero_adv, ref_logps=logps, beta=0.1), torch.zeros(4, 6))
    kl = policy_loss(logps, logps, zero_adv, ref_logps=torch.randn(4, 6, generator=g), beta=0.1)
    assert torch.all(kl >= 0)


# ---------------------------------------------------------------- switching strategies (DESIGN.md section 2)


def test_soft_correct_is_the_mean_of_three_rewards_above_the_threshold() -> None:
    g = torch.Generator().manual_seed(6)
    acc = (torch.rand(32, 8, generator=g) > 0.5).float()
    fmt = (torch.rand(32, 8, generator=g) > 0.3).float()
    think = torch.rand(32, 8, generator=g)
    got = soft_correct(acc, fmt, think, 0.9)
    for b in range(32):
        for j in range(8):
            assert bool(got[b, j]) == ((float(acc[b, j]) + float(fmt[b, j]) + float(think[b, j])) / 3 > 0.9)
    # right answers without grounding are not "correct" at 0.9; grounded wrong answers are at 0.5
    assert not soft_correct(torch.ones(1, 1), torch.ones(1, 1), torch.zeros(1, 1), 0.9).any()
    assert soft_correct(torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), 0.5).all()
    modes = select_modes(got)
    assert torch.equal(modes == MEMORIZE, got.sum(1) == 0)


def test_anneal_weight_is_a_cosine_from_one_to_zero() -> None:
    assert anneal_weight(0, 10) == 1.0
    assert anneal_weight(5, 10) == pytest.approx(0.5)
    assert anneal_weight(10, 10) == pytest.approx(0.0, abs=1e-12)
    assert anneal_weight(15, 10) == anneal_weight(10, 10)  # after the horizon it stays at 0
    weights = [anneal_weight(s, 20) for s in range(21)]
    assert all(a > b for a, b in zip(weights, weights[1:], strict=False))  # falls at every step
    for s in range(20):
        assert anneal_weight(s, 20) == pytest.approx(0.5 * (1 + math.cos(math.pi * s / 20)))


def test_anneal_keeps_every_groups_advantages_and_puts_the_reference_in_one_slot() -> None:
    g = torch.Generator().manual_seed(7)
    r = torch.rand(16, 4, generator=g)
    r[3] = 0.0  # a group with equal rewards: its rollouts carry nothing, its reference still does
    adv = anneal_advantages(r, 0.75)
    plain = group_advantages(r)
    assert torch.all(adv[:, REPLACED] == 0.75)
    others = [j for j in range(4) if j != REPLACED]
    assert torch.equal(adv[:, others], plain[:, others])  # computed over all K rewards, the replaced one too
    assert torch.all(adv[3, others] == 0)


def test_budget_capacity_scales_the_official_192_to_the_run() -> None:
    assert budget_prompts(3, 8, 1, 8) == 192  # the official 3 x 8 x 8
    assert budget_prompts(3, 4, 2, 1) == 24
    assert not budget_full(23, 24) and budget_full(24, 24) and budget_full(25, 24)


def test_anneal_update_over_kept_rows_equals_the_update_over_all_rows() -> None:
    """Dropping the zero-advantage rollouts under `anneal` keeps the gradient of the update over all B*K rows."""
    g = torch.Generator().manual_seed(8)
    b, k, t = 6, 4, 7
    r = torch.rand(b, k, generator=g)
    r[1] = 1.0  # equal rewards: only the reference row of this group carries a gradient
    full_adv = anneal_advantages(r, anneal_weight(3, 10))  # (B, K)
    base = torch.randn(b * k, t, generator=g)
    mask = torch.ones(b * k, t, dtype=torch.bool)
    flat = full_adv.reshape(-1)
    everything = base.clone().requires_grad_(True)
    aggregate_loss(policy_loss(everything, everything.detach(), flat), mask, "grpo", b * k, b * k * t, t,
                   b * k).backward()
    keep = kept_rollouts(group_advantages(r), torch.ones(b, dtype=torch.bool), beta=0.0)
    keep[:, REPLACED] = True  # the reference rows, in the replaced rollouts' slots
    keep = keep.reshape(-1)
    part = base.clone().requires_grad_(True)
    aggregate_loss(policy_loss(part[keep], part[keep].detach(), flat[keep]), mask[keep], "grpo", b * k, b * k * t,
                   t, int(keep.sum())).backward()
    assert torch.allclose(everything.grad, part.grad, atol=1e-7)
    assert int(keep.sum()) == b + int((group_advantages(r)[:, 1:] != 0).sum())
