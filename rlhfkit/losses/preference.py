"""Reward-model losses: Bradley-Terry pairs, Plackett-Luce rankings, reward centering.

Pure functions of reward tensors. Each returns PER-EXAMPLE losses; the stage sums them and
divides by the number of pairs in the global batch (see `train/loop.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry(r_chosen: torch.Tensor, r_rejected: torch.Tensor,
                  margin: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) Bradley-Terry negative log-likelihood of the preferences:

        loss_i = -log sigmoid(r_chosen_i - r_rejected_i - margin_i)

    Ouyang et al. 2022 (InstructGPT), eq. 1; the optional per-pair `margin` is Llama 2's
    (Touvron et al. 2023, eq. 2): a pair rated "much better" must be separated by more.
    Equal rewards (and no margin) give log 2. Computed as softplus(-(d)) for stability."""
    d = r_chosen - r_rejected
    if margin is not None:
        d = d - margin.to(d.dtype)
    return F.softplus(-d)


def plackett_luce(rewards: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) Plackett-Luce negative log-likelihood of rankings, responses best first:

        loss_i = -sum_{k=1}^{K-1} [ r_ik - logsumexp(r_ik, ..., r_iK) ]

    rewards: (B, K) with column 0 the best. mask: (B, K) True on responses that exist (rows with
    fewer than K responses put theirs first); masked entries take no part. Plackett 1975, Luce
    1959; Zhu et al. 2023 ("Principled RLHF ... K-wise comparisons") for reward learning. The
    last term (k = K) is always 0 and is left out. For K = 2 this is exactly Bradley-Terry:
    -[r_1 - log(e^r_1 + e^r_2)] = -log sigmoid(r_1 - r_2)."""
    if mask is None:
        mask = torch.ones_like(rewards, dtype=torch.bool)
    masked = rewards.masked_fill(~mask, float("-inf"))
    # logsumexp over positions k..K for every k: a reversed cumulative logsumexp
    tail = torch.logcumsumexp(masked.flip(-1), dim=-1).flip(-1)
    terms = (rewards - tail).masked_fill(~mask, 0.0)
    # the last real response of each row contributes r_K - r_K = 0; nothing to remove
    return -terms.sum(-1)


def centering_penalty(rewards: torch.Tensor, coef: float) -> torch.Tensor:
    """(B,) auxiliary loss that keeps rewards near 0 (Eisenstein et al. 2023, "Helping or
    herding?", the auxiliary centering loss; TRL's `center_rewards_coefficient`):

        penalty_i = coef * (sum_k r_ik)^2

    rewards: (B, K), e.g. (B, 2) = [r_chosen, r_rejected], which gives coef * (r_c + r_r)^2.
    Bradley-Terry only sees differences, so without it the mean reward drifts freely."""
    return coef * rewards.sum(-1) ** 2


def length_decorrelation_penalty(rewards: torch.Tensor, lengths: torch.Tensor, coef: float,
                                 eps: float = 1e-8) -> torch.Tensor:
    """Scalar coef * rho^2, rho the Pearson correlation of the rewards and the lengths (tokens) of a
    batch's responses (N,): pushes the reward to carry no linear length signal. The correlation
    term of ODIN (Chen et al. 2024, "ODIN: Disentangled Reward Mitigates Hacking in RLHF") for a
    single head; a batch estimate, so over n responses it is noisy (E[rho^2] ~ 1/(n-1) without any
    true correlation). 0 when the lengths (or rewards) do not vary."""
    r = rewards - rewards.mean()
    n = lengths.to(rewards.dtype)
    n = n - n.mean()
    rho = (r * n).sum() / (torch.sqrt((r * r).sum() * (n * n).sum()) + eps)
    return coef * rho ** 2


# ---- per-format losses over a (B, K) reward matrix, best first -------------------------------

def pair_loss(rewards: torch.Tensor, mask: torch.Tensor, margin: torch.Tensor | None = None) -> torch.Tensor:
    """Preference pairs: Bradley-Terry on columns 0 (chosen) and 1 (rejected)."""
    return bradley_terry(rewards[:, 0], rewards[:, 1], margin)


def ranking_loss(rewards: torch.Tensor, mask: torch.Tensor, margin: torch.Tensor | None = None) -> torch.Tensor:
    """Rankings: Plackett-Luce over the responses present (`margin` does not apply)."""
    return plackett_luce(rewards, mask)


RM_LOSSES = {"preference": pair_loss, "ranking": ranking_loss}
"""Dataset format -> loss(rewards (B, K), mask (B, K), margin (B,) | None) -> (B,)."""
