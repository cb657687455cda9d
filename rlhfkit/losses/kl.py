"""KL to the reference policy: per-token estimators, the KL term of a loss, and beta controllers.

Notation: tokens y_t are sampled from pi, and log r = log pi_ref(y_t) - log pi(y_t) (Schulman,
"Approximating KL divergence", 2020; RLHF_NOTES "More of the family"). All functions are (B, T) ->
(B, T), element-wise; mask the result with the response mask before reducing it.
"""

from __future__ import annotations

import torch

# ---- per-token KL estimators ------------------------------------------------------------------


def kl_k1(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """k1 = log pi(y_t) - log pi_ref(y_t) = -log r: unbiased per-token estimate of KL(pi || pi_ref) for
    tokens sampled from pi; can be negative per token (Schulman, "Approximating KL", 2020)."""
    return logps - ref_logps


def kl_k2(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """k2 = (log r)^2 / 2: biased, never negative, low variance when pi is close to pi_ref."""
    return 0.5 * (ref_logps - logps).pow(2)


def kl_k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """k3 = exp(log r) - log r - 1 = (r - 1) - log r: unbiased, never negative, lower variance
    when pi is close to pi_ref."""
    r = ref_logps - logps
    return torch.expm1(r) - r


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_loss_term(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token (B, T) KL penalty used INSIDE a loss (GRPO, Shao et al. 2024 eq. 3, with beta outside):
    the estimator `KL_ESTIMATORS[estimator]` with the gradient flowing through `logps` (ref_logps is
    detached). For "k3" this is `exp(ref - logp) - (ref - logp) - 1`, the term TRL's GRPO adds.

    The estimators are unbiased for the KL *value*, not for its gradient. For on-policy samples
    (pi_old = pi) the expected gradient of the term is: k1 -> 0; k2 -> grad KL(pi || pi_ref);
    k3 -> -E_{pi_ref}[grad log pi] = grad KL(pi_ref || pi), the other direction, so the k3 loss is a
    biased gradient of KL(pi || pi_ref) (RLHF_NOTES; TRL multiplies it by the ratio, verl offers a
    straight-through variant)."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {sorted(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[estimator](logps, ref_logps.detach())


# ---- KL coefficient control -------------------------------------------------------------------------


class FixedKLController:
    """beta stays at its initial value."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value


class AdaptiveKLController:
    """Ziegler et al. 2019, section 2.2: proportional control of beta towards a target KL.

        e     = clip(KL / target - 1, -0.2, 0.2)
        beta <- beta * (1 + e * n / horizon)

    `n` is the number of samples since the last update (the rollout batch size). KL = target
    leaves beta unchanged; above target beta grows, below it shrinks."""

    def __init__(self, kl_coef: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target ({target}) and horizon ({horizon}) must be > 0")
        self.value = kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value = self.value * (1.0 + error * n_steps / self.horizon)
        return self.value
