"""DyME's mode rule, group advantages and loss aggregation (DESIGN.md section 2), as pure functions.

Per prompt group of K rollouts with c correct: c == 0 -> MEMORIZE (SFT on the refined reference,
advantage +1, the K rollouts weight 0), 0 < c < K -> EXPLORE (GRPO advantages), c == K -> SKIP.
On-policy (num_iterations == 1) the PPO ratio is exp(logp - logp.detach()) == 1, so the clipped
surrogate reduces to REINFORCE with group-normalised advantages, and a +1 row is exactly the
gradient of token-mean NLL. A MEMORIZE group's reference trace takes the place of one rollout
(`REPLACED`), as in the official update. Rows that carry no gradient (advantage 0 and no KL term,
beta == 0) are dropped before the forward pass; the aggregation below normalises by the counts of
the full batch (`batch_token_count`) so dropping them leaves the gradient unchanged. With beta > 0
every row carries the KL term's gradient, so only the replaced rollout leaves (`kept_rollouts`).

Switching strategies (DESIGN.md section 2, the paper's Table 1; `train.switch`): `binary` (DyME) memorises
a group iff no rollout is correct (`select_modes` on accuracy > 0.5); `threshold` judges "correct" on the
mean of the accuracy, format and thinking rewards (`soft_correct`); `anneal` keeps every group's GRPO
advantages and puts the reference trace in rollout `REPLACED`'s place with a cosine-annealed advantage
(`anneal_weight`); `budget` sends failed groups' references to a buffer and takes one pure-SFT step on them
when it holds `budget_prompts` of them (`budget_full`), GRPO otherwise.
Tests: tests/core/test_algorithm.py, tests/core/test_baselines.py (seeded random tensors, CPU).
"""

from __future__ import annotations

import math

import torch

MEMORIZE, EXPLORE, SKIP = 0, 1, 2
MODE_NAMES = {MEMORIZE: "memorize", EXPLORE: "explore", SKIP: "skip"}
REPLACED = 0  # the rollout whose place a MEMORIZE group's reference trace takes


def select_modes(correct: torch.Tensor) -> torch.Tensor:
    """correct: (B, K) bool -> (B,) long in {MEMORIZE, EXPLORE, SKIP}."""
    c = correct.bool().sum(dim=1)  # (B,)
    k = correct.shape[1]
    modes = torch.full_like(c, EXPLORE, dtype=torch.long)
    modes[c == 0] = MEMORIZE
    modes[c == k] = SKIP
    return modes


SWITCHES = ("binary", "threshold", "anneal", "budget")


def soft_correct(accuracy: torch.Tensor, fmt: torch.Tensor, thinking: torch.Tensor, threshold: float) -> torch.Tensor:
    """(B, K) bool: the `threshold` switch's "correct", mean(accuracy, format, thinking) > threshold.

    The official soft reward threshold (0.9); a rollout must be right, well formed and grounded at once.
    """
    return (accuracy + fmt + thinking) / 3 > threshold


def anneal_weight(step: int, steps: int) -> float:
    """The `anneal` switch's reference advantage at `step` (0-based): 0.5 * (1 + cos(pi * step / steps)),
    1.0 at the first step, falling on a cosine to 0 at `steps` (train.switch_anneal_steps, by default
    max_steps) and 0 after it."""
    return 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))


def budget_prompts(budget: int, batch_size: int, grad_accum_steps: int, world: int) -> int:
    """Failed prompts the `budget` switch's buffer holds before its SFT step: `budget` train steps' prompts,
    budget * batch_size * grad_accum_steps * world (the official 3 x 8 x 8 = 192: 3 steps of 8 prompts on each
    of 8 GPUs)."""
    return budget * batch_size * grad_accum_steps * world


def budget_full(buffered: int, capacity: int) -> bool:
    """Whether the `budget` switch takes its pure-SFT step now: the buffer holds `capacity` failed prompts."""
    return buffered >= capacity


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4, scale: bool = True) -> torch.Tensor:
    """rewards: (B, K) -> (B, K): (r - mean) / (std + eps) per group, unbiased std; r - mean if not scale."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)  # (B, K)
    if not scale:
        return centred
    std = rewards.std(dim=1, keepdim=True, unbiased=True)  # (B, 1)
    return centred / (std + eps)


def dyme_advantages(
    rewards: torch.Tensor, modes: torch.Tensor, eps: float = 1e-4, scale: bool = True
) -> torch.Tensor:
    """(B, K) rollout advantages: GRPO advantages in EXPLORE groups, 0 in MEMORIZE and SKIP groups."""
    adv = group_advantages(rewards, eps=eps, scale=scale)
    return adv * (modes == EXPLORE).unsqueeze(1).to(adv.dtype)


def anneal_advantages(
    rewards: torch.Tensor, weight: float, eps: float = 1e-4, scale: bool = True
) -> torch.Tensor:
    """(B, K) advantages of the rows the `anneal` switch's update sees: every group's GRPO advantages
    (computed over all K rewards), with rollout `REPLACED` replaced by the reference trace of advantage
    `weight` (`anneal_weight`)."""
    adv = group_advantages(rewards, eps=eps, scale=scale)
    adv[:, REPLACED] = weight
    return adv


def kept_rollouts(advantages: torch.Tensor, memorize: torch.Tensor, beta: float) -> torch.Tensor:
    """(B, K) bool: the rollouts that enter the update.

    advantages: (B, K); memorize: (B,) bool, groups whose reference trace replaces rollout `REPLACED`.
    With beta == 0 a row of advantage 0 has no gradient and is dropped; with beta > 0 it still carries
    the KL term's gradient (TRL and the paper's GRPO baseline keep it), so every rollout but the
    replaced one is kept.
    """
    keep = advantages != 0 if beta == 0 else torch.ones_like(advantages, dtype=torch.bool)
    keep[memorize.bool(), REPLACED] = False
    return keep


def batch_token_count(lengths: torch.Tensor, memorize: torch.Tensor, target_lengths: torch.Tensor) -> int:
    """Completion tokens of the B*K rows the official update sees (the "bnpo" denominator).

    lengths: (B, K) rollout lengths; memorize: (B,) bool; target_lengths: (B,) reference-trace
    lengths (read only where memorize). A memorised target counts in place of the rollout it replaces.
    """
    memorize = memorize.bool()
    replaced = lengths[:, REPLACED]
    swapped = torch.where(memorize, target_lengths.to(lengths.dtype), replaced)
    return int(lengths.sum() - replaced.sum() + swapped.sum())


def kl_k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(policy || reference): exp(d) - d - 1 with d = ref - logp; >= 0."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


def policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    clip_eps: float = 0.2,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
) -> torch.Tensor:
    """Per-token clipped surrogate (+ k3 KL to the reference when beta > 0).

    logps, old_logps, ref_logps: (N, T) token log-probs; advantages: (N,). Returns (N, T).
    """
    ratio = torch.exp(logps - old_logps)  # (N, T); == 1 on-policy, but carries the gradient
    adv = advantages.unsqueeze(1)  # (N, 1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv
    loss = -torch.minimum(unclipped, clipped)
    if beta > 0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs reference log-probs")
        loss = loss + beta * kl_k3(logps, ref_logps)
    return loss


def aggregate_loss(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str,
    total_rows: int,
    total_tokens: int,
    max_completion_len: int,
    kept_rows: int,
) -> torch.Tensor:
    """Reduce (N, T) per-token losses of the kept rows to this micro-batch's share of the batch loss.

    The denominators are the counts of the whole batch, dropped rows included, so summing the shares
    of all micro-batches gives the loss of the full batch:
      grpo:          sum_i mean_t(loss_it) / total_rows            (TRL's "grpo"; the official update)
      bnpo:          sum_it loss_it / total_tokens
      dr_grpo:       sum_it loss_it / (total_rows * max_completion_len)
      weighted_mean: sum_i mean_t(loss_it) / kept_rows             (mean over weighted rows only)
    """
    mask = mask.to(per_token.dtype)
    masked = per_token * mask
    if loss_type in ("grpo", "weighted_mean"):
        row_means = masked.sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)  # (N,)
        return row_means.sum() / (total_rows if loss_type == "grpo" else max(kept_rows, 1))
    if loss_type == "bnpo":
        return masked.sum() / max(total_tokens, 1)
    if loss_type == "dr_grpo":
        return masked.sum() / (total_rows * max_completion_len)
    raise ValueError(f"unknown loss_type {loss_type!r}")


def mode_fractions(modes: torch.Tensor) -> dict[str, float]:
    n = max(modes.numel(), 1)
    return {f"mode/{name}": float((modes == m).sum()) / n for m, name in MODE_NAMES.items()}
