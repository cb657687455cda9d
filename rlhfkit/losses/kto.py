"""KTO: Kahneman-Tversky Optimisation for unpaired (prompt, completion, desirable?) data.

Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", eq. 8:

    rho   = logp(y | x) - logp_ref(y | x)           summed over response tokens
    z0    = max(0, mean_j [logp(y_j' | x_j) - logp_ref(y_j' | x_j)])   detached
            (a batch estimate of KL(pi || pi_ref) from *mismatched* prompt/response pairs
             (x_j, y_j'), y_j' a completion written for another prompt; the mean runs over
             the whole global batch of an optimizer step, which may be split across
             micro-batches and processes: sum the log-ratios and count them there, then
             `reference_point_from_sums`)
    loss  = w_D (1 - sigmoid(beta (rho - z0)))      desirable y
            w_U (1 - sigmoid(beta (z0 - rho)))      undesirable y

The implicit reward of each completion is beta * rho (logged as `rewards/chosen` for desirable
and `rewards/rejected` for undesirable examples). At initialisation (rho = 0, z0 = 0) every
example's loss is w / 2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def reference_point_from_sums(log_ratio_sum: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """z0 = max(0, log_ratio_sum / count), detached (a scalar tensor): the mean log-ratio of
    mismatched pairs given as its sum and count, so that a mean over a batch split into pieces
    (micro-batches, processes) is one division after summing both over the pieces."""
    return (log_ratio_sum / count.clamp(min=1)).clamp(min=0).detach()


def kl_reference_point(kl_logps: torch.Tensor, kl_ref_logps: torch.Tensor) -> torch.Tensor:
    """z0 = max(0, mean(kl_logps - kl_ref_logps)), detached (a scalar tensor), over one batch.

    kl_logps, kl_ref_logps: (M,) policy / reference sequence log-probs of mismatched pairs."""
    ratios = kl_logps - kl_ref_logps
    return reference_point_from_sums(ratios.sum(), torch.tensor(float(ratios.numel()), device=ratios.device))


@dataclass(frozen=True)
class KTOLoss:
    losses: torch.Tensor
    """(B,) per-example loss (already weighted by w_D / w_U)."""
    rewards: torch.Tensor
    """(B,) implicit reward beta * rho (detached)."""


def kto_loss(logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, z0: torch.Tensor, *,
             beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> KTOLoss:
    """Per-example KTO loss (module docstring). logps, ref_logps: (B,) sequence log-probs;
    desirable: (B,) bool; z0: scalar reference point from `kl_reference_point`.

    Worked: rho = [1, 1], desirable = [True, False], z0 = 0.5, beta 0.1, w_D 1, w_U 1.5 ->
    [1 - sigmoid(0.05), 1.5 (1 - sigmoid(-0.05))] = [0.487503, 0.768746].
    """
    rho = logps - ref_logps
    z0 = z0.detach()
    desirable_losses = desirable_weight * (1 - torch.sigmoid(beta * (rho - z0)))
    undesirable_losses = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - rho)))
    losses = torch.where(desirable, desirable_losses, undesirable_losses)
    return KTOLoss(losses, (beta * rho).detach())
