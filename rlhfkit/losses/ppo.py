"""PPO for language models (RLHF step 3): KL-shaped rewards, GAE, clipped losses, KL control.

Pure tensor functions; shapes are (B, T) over *response* positions: index t is the t-th
generated token. Masks are True on real entries. Sources: Ziegler et al. 2019 ("Fine-tuning LMs
from human preferences", lm-human-preferences), Stiennon et al. 2020, Ouyang et al. 2022 (eq. 2),
Schulman et al. 2017 (PPO, eq. 7), Schulman et al. 2016 (GAE, eq. 16), Huang et al. 2024 ("The N+
implementation details of RLHF with PPO", arXiv 2403.17031). See ../shared/RLHF_NOTES.md 11-24.

Convention for where the score goes (N+, RLHF_NOTES "A small example"):
  `last` = index of the last real response token (the EOS, or the final token of a response
  that never ended). Values are V(s_t) read from the hidden state *before* token t, so the value
  at `last + 1` reads the hidden state of the last token, exactly where the reward model reads
  its score. The score is therefore added at `min(last + 1, T - 1)` (`score_index`):
  - the KL part of the reward lives on real tokens (`response_mask`, t <= last);
  - values live on t <= last + 1 (`value_mask`), one step longer;
  - the policy loss uses `response_mask`, the value loss `value_mask`.
The trainer appends one pad column to every rollout, so `last + 1` always fits there and the
`min` only matters for hand-built inputs such as the worked example.
"""

from __future__ import annotations

import torch

from rlhfkit.losses.masked import masked_mean, masked_var

# ---- per-token KL ------------------------------------------------------------------------------


def kl_k1(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """k1 = log pi(y_t) - log pi_ref(y_t): unbiased per-token estimate of KL(pi || pi_ref) for
    tokens sampled from pi; can be negative per token (Schulman, "Approximating KL", 2020)."""
    return logps - ref_logps


def kl_k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """k3 = exp(r) - r - 1 with r = log pi_ref - log pi: unbiased, never negative, lower variance
    when pi is close to pi_ref."""
    r = ref_logps - logps
    return torch.expm1(r) - r


KL_ESTIMATORS = {"k1": kl_k1, "k3": kl_k3}


# ---- masks and the score position ---------------------------------------------------------------


def last_index(response_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last True of each row of a right-padded mask (-1 when a row is empty)."""
    t = torch.arange(response_mask.shape[1], device=response_mask.device)
    return torch.where(response_mask.bool(), t, -1).amax(-1)


def score_index(response_mask: torch.Tensor) -> torch.Tensor:
    """(B,) where the score is added: `min(last + 1, T - 1)` (see the module docstring)."""
    return (last_index(response_mask) + 1).clamp(max=response_mask.shape[1] - 1)


def value_mask(response_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) True on t <= last + 1: the states whose values are learned (one past the last token,
    where the score is placed)."""
    t = torch.arange(response_mask.shape[1], device=response_mask.device)
    return t[None, :] <= last_index(response_mask)[:, None] + 1


# ---- scores: EOS trick and clipping ---------------------------------------------------------------


def eos_trick(scores: torch.Tensor, ended: torch.Tensor, *, penalty: float | None = None,
              replace: float | None = None) -> torch.Tensor:
    """Penalise responses that never produced EOS (RLHF_NOTES 14).

    `replace`: their score becomes this value (N+ uses -1); `penalty`: this amount is subtracted
    (TRL's `missing_eos_penalty`). At most one may be given; with neither, scores pass through."""
    if penalty is not None and replace is not None:
        raise ValueError("give either penalty or replace, not both")
    ended = ended.bool()
    if replace is not None:
        return torch.where(ended, scores, torch.full_like(scores, replace))
    if penalty is not None:
        return torch.where(ended, scores, scores - penalty)
    return scores.clone()


def clip_scores(scores: torch.Tensor, clip: float | None) -> torch.Tensor:
    """clamp(score, -clip, clip) (DeepSpeed-Chat clips reward scores to +-5); None: unchanged."""
    return scores.clone() if clip is None else scores.clamp(-clip, clip)


# ---- KL-shaped rewards -------------------------------------------------------------------------------


def kl_shaped_rewards(scores: torch.Tensor, kl: torch.Tensor, response_mask: torch.Tensor,
                      kl_coef: float) -> torch.Tensor:
    """Per-token rewards r_t = -beta * kl_t on real tokens, plus the score at `score_index`.

        R(x, y) = r_phi(x, y) - beta * log(pi(y|x) / pi_ref(y|x))   (Ouyang et al. 2022, eq. 2)

    spread over tokens as in Ziegler et al. 2019. scores (B,), kl (B, T). Returns (B, T); zero
    outside `response_mask` except at the score position."""
    rewards = (-kl_coef * kl).masked_fill(~response_mask.bool(), 0.0)
    idx = score_index(response_mask)
    return rewards.scatter_add(1, idx[:, None], scores[:, None].to(rewards.dtype))


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
           eps: float = 1e-8, stats: tuple[float, float] | None = None) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over masked entries (biased variance; RLHF_NOTES 20). With
    `shift_mean=False` the mean is added back (how OpenAI whitens rewards). Entries outside the
    mask are returned as 0. `stats`: (mean, var) computed elsewhere (e.g. over several processes)
    instead of from `values`."""
    if stats is None:
        mean, var = masked_mean(values, mask), masked_var(values, mask)
    else:
        mean, var = (torch.tensor(float(s), dtype=values.dtype, device=values.device) for s in stats)
    out = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out.masked_fill(~mask.bool(), 0.0)


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


# ---- losses --------------------------------------------------------------------------------------------


def policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                cliprange: float) -> dict[str, torch.Tensor]:
    """Per-token clipped surrogate (Schulman et al. 2017, eq. 7), as a loss to minimise:

        ratio = exp(logp - logp_old)
        loss  = max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))

    Returns per-token (B, T) tensors: `loss`, `clipped` (1.0 where the clipped term was taken,
    i.e. strictly larger), `approxkl` (0.5 * (logp - logp_old)^2) and `ratio`. Reduce them with a
    masked mean over real tokens (`response_mask`)."""
    log_ratio = logps - old_logps
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - cliprange, 1.0 + cliprange)
    return {
        "loss": torch.maximum(unclipped, clipped),
        "clipped": (clipped > unclipped).float(),
        "approxkl": 0.5 * log_ratio.pow(2),
        "ratio": ratio,
    }


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               cliprange_value: float) -> dict[str, torch.Tensor]:
    """Per-token clipped value loss (PPO2 / lm-human-preferences):

        V_clip = clip(V, V_old - c, V_old + c)
        loss   = 0.5 * max((V - R)^2, (V_clip - R)^2)

    Returns per-token (B, T) `loss`, `clipped` (1.0 where the clipped error is larger) and
    `error` ((V - R)^2). Reduce with a masked mean over `value_mask`."""
    v_clip = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    err = (values - returns).pow(2)
    err_clip = (v_clip - returns).pow(2)
    return {"loss": 0.5 * torch.maximum(err, err_clip), "clipped": (err_clip > err).float(), "error": err}


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) along the last axis: logsumexp(z) - sum_v softmax(z)_v z_v.
    Pass temperature-scaled logits to get the entropy of the sampling distribution."""
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


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
