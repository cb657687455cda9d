"""Advantage estimators: GAE (PPO, with a critic) and the critic-free ones (GRPO, Dr. GRPO, RLOO,
REINFORCE++; nash_md's KL-shaped returns), RLHF_NOTES "Critic-free online RL" and "More of the family".

Critic-free layout: N = num_prompts x G rows grouped contiguously, rows p*G .. p*G+G-1 are the G
samples of prompt p; `scores` is (N,) (one reward per sample), `response_mask` (N, T) is True on
real response tokens. A group is never split across data-parallel processes, so group statistics
are local; statistics over the whole batch go through `reduce_sum`, a callable that takes a 1-D
float64 tensor and returns its element-wise sum over all processes (None: this process only), so
N processes give the same numbers as one.
"""

from __future__ import annotations

from typing import Callable

import torch

from rlhfkit.losses.masked import masked_sum, whiten
from rlhfkit.losses.ppo import last_index

ReduceSum = Callable[[torch.Tensor], torch.Tensor]

# ---- GAE ----------------------------------------------------------------------------------------------


def gae_loop(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16), written as the textbook loop:

        delta_t = r_t + gamma * V_{t+1} - V_t        (V_T = 0)
        A_t     = delta_t + gamma * lam * A_{t+1}    (A_T = 0)
        returns = A + V

    `rewards` and `values` must already be zero outside their masks (the trainer zeroes values
    outside `value_mask`, so a finished sequence bootstraps from 0). Returns (advantages, returns)."""
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    return advantages, advantages + values


def gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Vectorised GAE, same result as `gae_loop`: A_t = sum_{s >= t} (gamma*lam)^(s-t) delta_s, as one
    (B, T) x (T, T) product with the upper-triangular discount matrix D[s, t] = (gamma*lam)^(s-t)."""
    T = rewards.shape[1]
    next_values = torch.nn.functional.pad(values[:, 1:], (0, 1))
    deltas = rewards + gamma * next_values - values
    idx = torch.arange(T, device=rewards.device)
    power = (idx[:, None] - idx[None, :]).to(rewards.dtype)  # s - t
    discount = torch.where(power >= 0, (gamma * lam) ** power.clamp(min=0), torch.zeros_like(power))
    advantages = deltas @ discount
    return advantages, advantages + values


# ---- groups ---------------------------------------------------------------------------------------------


def _grouped(scores: torch.Tensor, group_size: int, min_size: int = 1) -> torch.Tensor:
    """(N,) -> (num_groups, G) view, with the checks every group estimator needs."""
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D (N,), got shape {tuple(scores.shape)}")
    if group_size < min_size:
        raise ValueError(f"group_size must be >= {min_size} here, got {group_size}")
    if scores.shape[0] % group_size:
        raise ValueError(f"{scores.shape[0]} scores are not a whole number of groups of {group_size}")
    return scores.view(-1, group_size)


def flat_groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """(num_groups,) bool: True where all G rewards of the group are equal (zero advantage: such a
    group teaches nothing; RLHF_NOTES says to report their share)."""
    groups = _grouped(scores, group_size)
    return (groups == groups[:, :1]).all(dim=1)


def group_mean_std(scores: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (N,) mean and standard deviation (Bessel's correction, / (G - 1)) of its group."""
    groups = _grouped(scores, group_size, min_size=2)
    return (groups.mean(dim=1).repeat_interleave(group_size),
            groups.std(dim=1).repeat_interleave(group_size))


def _centred(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N,) r - mean(group), exactly 0 on flat groups (a float mean of equal values can miss them
    by an ulp, which the GRPO division by a near-0 std would blow up)."""
    groups = _grouped(scores, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    return centred.masked_fill(flat_groups(scores, group_size)[:, None], 0.0).reshape(-1)


def _global_sum(values: list[torch.Tensor], reduce_sum: ReduceSum | None) -> torch.Tensor:
    """1-D float64 tensor of the given scalars, summed over processes by `reduce_sum` (if any)."""
    stats = torch.stack([v.to(torch.float64) for v in values])
    if reduce_sum is None:
        return stats
    summed = reduce_sum(stats)
    if summed.shape != stats.shape:
        raise ValueError(f"reduce_sum returned shape {tuple(summed.shape)} for input {tuple(stats.shape)}")
    return summed


# ---- sequence-level advantages (N,) -----------------------------------------------------------------


SCALE_REWARDS = ("group", "batch", "none")


def grpo_advantages(scores: torch.Tensor, group_size: int, scale_rewards: str = "group", eps: float = 1e-4,
                    reduce_sum: ReduceSum | None = None) -> torch.Tensor:
    """(N,) GRPO outcome advantages (Shao et al. 2024, section 4.1.2):

        A_i = (r_i - mean(group)) / (std + eps)

    std: "group" the group's std (Bessel); "batch" the std (Bessel) of all scores of the global
    batch, still centred per group; "none" no division (Dr. GRPO, Liu et al. 2025). eps 1e-4 as TRL
    (verl uses 1e-6). Flat groups get exactly 0."""
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    _grouped(scores, group_size, min_size=2)
    centred = _centred(scores, group_size)
    if scale_rewards == "none":
        return centred
    if scale_rewards == "group":
        std = group_mean_std(scores, group_size)[1]
    else:
        count, total = _global_sum([scores.new_tensor(float(scores.shape[0])), scores.sum()], reduce_sum)
        mean = total / count
        (squares,) = _global_sum([(scores.to(torch.float64) - mean).pow(2).sum()], reduce_sum)
        std = (squares / (count - 1)).sqrt().to(scores.dtype)
    return centred / (std + eps)


def rloo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N,) REINFORCE leave-one-out (Ahmadian et al. 2024, RLOO):

        A_i = r_i - mean_{j != i} r_j = G / (G - 1) * (r_i - mean(group))

    Any KL penalty is folded into the scores beforehand (TRL RLOO: k1 summed per sequence)."""
    _grouped(scores, group_size, min_size=2)
    return _centred(scores, group_size) * (group_size / (group_size - 1))


# ---- token-level advantages (N, T) --------------------------------------------------------------------


def reinforce_pp_advantages(scores: torch.Tensor, response_mask: torch.Tensor, group_size: int,
                            token_kl: torch.Tensor | None = None, kl_coef: float = 0.0,
                            baseline: bool = False, reduce_sum: ReduceSum | None = None,
                            eps: float = 1e-8) -> torch.Tensor:
    """(N, T) REINFORCE++ advantages (Hu 2025), gamma = 1:

        r_t = -kl_coef * kl_t on real tokens, + score at the last real token
        A_t = sum_{s >= t} r_s = score - kl_coef * sum_{s >= t} kl_s
        A   = (A - mean) / sqrt(var + eps)   over all real tokens of the global batch (biased var)

    `baseline=True` (REINFORCE++-baseline) first replaces each score by score - mean(group).
    token_kl (N, T): per-token KL (e.g. k1 of losses/kl.py), ignored on pads. 0 outside the mask."""
    mask = _check_mask(scores, response_mask)
    if baseline:
        scores = _centred(scores, group_size)
    returns = kl_shaped_returns(scores, mask, token_kl, kl_coef)
    count, total = _global_sum([mask.sum(), masked_sum(returns, mask)], reduce_sum)
    mean = total / count
    (squares,) = _global_sum([masked_sum((returns.to(torch.float64) - mean).pow(2), mask)], reduce_sum)
    return whiten(returns, mask, eps=eps, stats=(mean, squares / count))


def kl_shaped_returns(scores: torch.Tensor, response_mask: torch.Tensor, token_kl: torch.Tensor | None = None,
                      kl_coef: float = 0.0) -> torch.Tensor:
    """(N, T) reward-to-go, gamma = 1, of the per-token rewards

        r_t = -kl_coef * kl_t on real tokens, + score at the last real token
        A_t = sum_{s >= t} r_s = score - kl_coef * sum_{s >= t} kl_s

    0 outside the mask: REINFORCE++'s returns before whitening, and nash_md's advantages (the score its
    preference reward). Worked: score 1, kl [0.5, 0.25, 0 (pad)], kl_coef 0.1 -> [0.925, 0.975, 0]."""
    mask = _check_mask(scores, response_mask)
    if token_kl is not None and token_kl.shape != mask.shape:
        raise ValueError(f"token_kl shape {tuple(token_kl.shape)} differs from response_mask "
                         f"{tuple(mask.shape)}")
    if token_kl is None and kl_coef != 0:
        raise ValueError(f"kl_coef={kl_coef} needs token_kl")
    rewards = torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device)
    if token_kl is not None:
        rewards = (-kl_coef * token_kl).to(scores.dtype).masked_fill(~mask, 0.0)
    rewards = rewards.scatter_add(1, last_index(mask)[:, None], scores[:, None])
    return rewards.flip(1).cumsum(1).flip(1)


def _check_mask(scores: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Bool (N, T) mask with one row per score and at least one real token per row."""
    if scores.dim() != 1 or response_mask.dim() != 2 or response_mask.shape[0] != scores.shape[0]:
        raise ValueError(f"scores (N,) and response_mask (N, T) disagree: {tuple(scores.shape)} vs "
                         f"{tuple(response_mask.shape)}")
    mask = response_mask.bool()
    empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"response_mask rows {empty} have no real token")
    return mask


# ---- one table, one signature ----------------------------------------------------------------------


def _per_token(seq_advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N,) -> (N, T): the sequence advantage on every real token, 0 on pads."""
    return seq_advantages[:, None].expand(mask.shape).masked_fill(~mask, 0.0)


def _no_token_kl(name: str, token_kl: torch.Tensor | None, kl_coef: float) -> None:
    if token_kl is not None and kl_coef != 0:
        raise ValueError(f"{name} takes no token_kl: fold the KL penalty into scores, or put it in the loss")


def _grpo(scores, response_mask, group_size, *, token_kl=None, kl_coef=0.0, scale_rewards="group", eps=1e-4,
          reduce_sum=None):
    _no_token_kl("grpo", token_kl, kl_coef)
    mask = _check_mask(scores, response_mask)
    return _per_token(grpo_advantages(scores, group_size, scale_rewards, eps, reduce_sum), mask)


def _dr_grpo(scores, response_mask, group_size, *, token_kl=None, kl_coef=0.0, scale_rewards="group",
             eps=1e-4, reduce_sum=None):
    _no_token_kl("dr_grpo", token_kl, kl_coef)
    mask = _check_mask(scores, response_mask)
    return _per_token(grpo_advantages(scores, group_size, "none"), mask)


def _rloo(scores, response_mask, group_size, *, token_kl=None, kl_coef=0.0, scale_rewards="group", eps=1e-4,
          reduce_sum=None):
    _no_token_kl("rloo", token_kl, kl_coef)
    mask = _check_mask(scores, response_mask)
    return _per_token(rloo_advantages(scores, group_size), mask)


def _reinforce_pp(scores, response_mask, group_size, *, token_kl=None, kl_coef=0.0, scale_rewards="group",
                  eps=1e-4, reduce_sum=None):
    return reinforce_pp_advantages(scores, response_mask, group_size, token_kl, kl_coef,
                                   reduce_sum=reduce_sum)


def _reinforce_pp_baseline(scores, response_mask, group_size, *, token_kl=None, kl_coef=0.0,
                           scale_rewards="group", eps=1e-4, reduce_sum=None):
    return reinforce_pp_advantages(scores, response_mask, group_size, token_kl, kl_coef, baseline=True,
                                   reduce_sum=reduce_sum)


# name -> fn(scores (N,), response_mask (N, T), group_size, *, token_kl=None, kl_coef=0.0,
#            scale_rewards="group", eps=1e-4, reduce_sum=None) -> (N, T) advantages, 0 on pads.
# grpo uses scale_rewards and eps; dr_grpo is grpo with scale_rewards "none"; rloo/grpo/dr_grpo take
# the KL folded into `scores` by the caller (token_kl with kl_coef != 0 is an error); the reinforce_pp
# ones take token_kl and whiten with their own eps (1e-8), ignoring scale_rewards and eps.
ADVANTAGE_ESTIMATORS = {
    "grpo": _grpo,
    "dr_grpo": _dr_grpo,
    "rloo": _rloo,
    "reinforce_pp": _reinforce_pp,
    "reinforce_pp_baseline": _reinforce_pp_baseline,
}
