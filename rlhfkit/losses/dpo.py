"""Direct preference losses: DPO and its family. Pure functions of sequence log-probs.

Notation (RLHF_NOTES.md, "Direct preference losses"): for a pair (x, y_c, y_r)
    logp_c = sum_t log pi(y_c,t | x, y_c,<t)       summed over response tokens only
    rho_c  = logp_c - logp_ref_c                     log-ratio to the reference (same for rho_r)
    h      = rho_c - rho_r
    n_c    = number of response tokens of y_c        (for length-normalised losses)

Every loss takes a `PairLogps` (all fields (B,)) and keyword hyper-parameters, and returns a
`PairLoss`: per-pair losses (B,) and the implicit rewards (B,) of chosen and rejected that the
stage logs as `rewards/chosen`, `rewards/rejected` (accuracy = mean(reward_c > reward_r)).
Reference-free training passes zero reference log-probs (`PairLogps.reference_free`), which makes
h = logp_c - logp_r. `DPO_LOSSES` maps a config's `loss_type` to its function, and
`combined_loss` sums several with weights. At initialisation (policy = reference, h = 0):
sigmoid = log 2, hinge = 1, IPO = 1 / (4 beta^2).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PairLogps:
    """Sequence log-probs of a batch of pairs; every field is (B,)."""

    chosen: torch.Tensor
    """Policy log p(y_c | x), summed over the response tokens."""
    rejected: torch.Tensor
    """Policy log p(y_r | x), summed over the response tokens."""
    ref_chosen: torch.Tensor
    """Reference log p(y_c | x) (zeros when reference-free)."""
    ref_rejected: torch.Tensor
    """Reference log p(y_r | x) (zeros when reference-free)."""
    n_chosen: torch.Tensor
    """Response tokens of y_c (float)."""
    n_rejected: torch.Tensor
    """Response tokens of y_r (float)."""

    @property
    def chosen_logratios(self) -> torch.Tensor:
        return self.chosen - self.ref_chosen

    @property
    def rejected_logratios(self) -> torch.Tensor:
        return self.rejected - self.ref_rejected

    def reference_free(self) -> "PairLogps":
        """The same pairs with zero reference log-probs (h = logp_c - logp_r)."""
        zero = torch.zeros_like(self.chosen)
        return PairLogps(self.chosen, self.rejected, zero, zero, self.n_chosen, self.n_rejected)


@dataclass(frozen=True)
class PairLoss:
    losses: torch.Tensor
    """(B,) per-pair loss."""
    chosen_rewards: torch.Tensor
    """(B,) implicit reward of the chosen response (detached)."""
    rejected_rewards: torch.Tensor
    """(B,) implicit reward of the rejected response (detached)."""


def _ratio_rewards(p: PairLogps, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO's implicit rewards beta * rho (Rafailov et al. 2023, eq. 5)."""
    return (beta * p.chosen_logratios).detach(), (beta * p.rejected_logratios).detach()


def sigmoid_loss(p: PairLogps, *, beta: float, label_smoothing: float = 0.0, **_) -> PairLoss:
    """DPO (Rafailov et al. 2023, "Direct Preference Optimization", eq. 7), with conservative
    label smoothing e (cDPO, Mitchell 2023, "A note on DPO with noisy preferences"):

        loss = -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)

    e = 0 is plain DPO. Worked: h = 2, beta 0.1 -> 0.598139; e 0.1 -> 0.618139.
    """
    z = beta * (p.chosen_logratios - p.rejected_logratios)
    losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return PairLoss(losses, *_ratio_rewards(p, beta))


def robust_loss(p: PairLogps, *, beta: float, label_smoothing: float = 0.0, **_) -> PairLoss:
    """Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO", eq. 9): an unbiased loss when a
    share e of the labels is flipped (needs e < 0.5):

        loss = [-(1 - e) log sigmoid(beta h) + e log sigmoid(-beta h)] / (1 - 2e)

    Worked: h = 2, beta 0.1, e 0.1 -> 0.573139.
    """
    z = beta * (p.chosen_logratios - p.rejected_logratios)
    losses = (-(1 - label_smoothing) * F.logsigmoid(z) + label_smoothing * F.logsigmoid(-z)) \
        / (1 - 2 * label_smoothing)
    return PairLoss(losses, *_ratio_rewards(p, beta))


def hinge_loss(p: PairLogps, *, beta: float, **_) -> PairLoss:
    """Hinge loss of SLiC-HF (Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with
    Human Feedback", eq. 1's calibration term max(0, delta - logp_c + logp_r)) on log-ratios,
    with margin delta = 1 / beta and scaled by beta:

        loss = max(0, 1 - beta h)

    Worked: h = 2, beta 0.1 -> 0.8. At h = 0 it is 1.
    """
    h = p.chosen_logratios - p.rejected_logratios
    return PairLoss(torch.relu(1 - beta * h), *_ratio_rewards(p, beta))


def ipo_loss(p: PairLogps, *, beta: float, **_) -> PairLoss:
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences", eq. 17), with length-normalised log-ratios (average over response tokens):

        loss = (rho_c / n_c - rho_r / n_r - 1 / (2 beta))^2

    beta plays the role of IPO's tau (regularisation). Worked: rho_c 1, rho_r -1, n_c 4, n_r 5,
    beta 0.1 -> (0.25 + 0.2 - 5)^2 = 20.7025. At h = 0 it is 1 / (4 beta^2).
    """
    h = p.chosen_logratios / p.n_chosen.clamp(min=1) - p.rejected_logratios / p.n_rejected.clamp(min=1)
    return PairLoss((h - 1 / (2 * beta)) ** 2, *_ratio_rewards(p, beta))


def _average_logps(p: PairLogps) -> tuple[torch.Tensor, torch.Tensor]:
    return p.chosen / p.n_chosen.clamp(min=1), p.rejected / p.n_rejected.clamp(min=1)


def simpo_loss(p: PairLogps, *, beta: float, simpo_gamma: float = 0.5, **_) -> PairLoss:
    """SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free
    Reward", eq. 6): average token log-probs as the reward, a target margin gamma, no reference:

        loss = -log sigmoid(beta (avg_c - avg_r) - gamma),   avg = logp / n

    Implicit rewards are beta * avg (the paper's reward, eq. 4). The paper uses beta 2-10 and
    gamma 0.5-1.5 with this loss; gamma is the margin itself, not a ratio to beta.
    """
    avg_c, avg_r = _average_logps(p)
    losses = -F.logsigmoid(beta * (avg_c - avg_r) - simpo_gamma)
    return PairLoss(losses, (beta * avg_c).detach(), (beta * avg_r).detach())


def chosen_nll(p: PairLogps) -> torch.Tensor:
    """(B,) mean token negative log-likelihood of the chosen response: -logp_c / n_c."""
    return -p.chosen / p.n_chosen.clamp(min=1)


def orpo_loss(p: PairLogps, *, beta: float, orpo_lambda: float = 0.1, **_) -> PairLoss:
    """ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference
    Model", eqs. 6-7): SFT loss plus an odds-ratio term, no reference:

        odds(y)  = P / (1 - P),  P = exp(avg logp)   (mean token probability, geometric)
        log odds = avg - log(1 - exp(avg))
        loss     = NLL(chosen) - lambda * log sigmoid(log odds_c - log odds_r)

    NLL(chosen) = -avg_c. Implicit rewards are beta * avg (as SimPO) so they compare across
    losses. log(1 - exp(a)) is computed with log(-expm1(a)) for a < 0 (a is clamped to < 0).
    """
    avg_c, avg_r = _average_logps(p)
    tiny = -1e-6  # avg < 0 always holds for real log-probs; keep log(1 - P) finite

    def log_odds(avg: torch.Tensor) -> torch.Tensor:
        avg = avg.clamp(max=tiny)
        return avg - torch.log(-torch.expm1(avg))

    ratio_term = F.logsigmoid(log_odds(avg_c) - log_odds(avg_r))
    losses = chosen_nll(p) - orpo_lambda * ratio_term
    return PairLoss(losses, (beta * avg_c).detach(), (beta * avg_r).detach())


DPO_LOSSES: dict[str, Callable[..., PairLoss]] = {
    "sigmoid": sigmoid_loss,
    "robust": robust_loss,
    "hinge": hinge_loss,
    "ipo": ipo_loss,
    "simpo": simpo_loss,
    "orpo": orpo_loss,
}
"""loss_type -> function. All take (PairLogps, beta=..., label_smoothing=..., simpo_gamma=...,
orpo_lambda=...) and ignore the keywords they do not use."""

REFERENCE_FREE_LOSSES = frozenset({"simpo", "orpo"})
"""Losses that never look at a reference model."""


def needs_reference(loss_types: list[str], reference_free: bool) -> bool:
    """True when some loss in `loss_types` reads reference log-probs."""
    return not reference_free and any(t not in REFERENCE_FREE_LOSSES for t in loss_types)


def combined_loss(p: PairLogps, loss_types: list[str], weights: list[float] | None = None, *,
                  sft_weight: float = 0.0, **params) -> PairLoss:
    """sum_k w_k * loss_k(p) (+ sft_weight * NLL(chosen), RPO: Pang et al. 2024, "Iterative
    Reasoning Preference Optimization", eq. 1 with NLL normalised by the response length).

    Weights default to 1 each. The implicit rewards reported are those of the first loss type.
    """
    weights = [1.0] * len(loss_types) if weights is None else list(weights)
    if len(weights) != len(loss_types):
        raise ValueError(f"{len(loss_types)} loss types but {len(weights)} weights")
    total, first = None, None
    for name, w in zip(loss_types, weights):
        out = DPO_LOSSES[name](p, **params)
        first = first or out
        total = w * out.losses if total is None else total + w * out.losses
    if sft_weight:
        total = total + sft_weight * chosen_nll(p)
    return PairLoss(total, first.chosen_rewards, first.rejected_rewards)

