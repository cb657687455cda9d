"""Policy-gradient losses shared by PPO and the critic-free methods: the clipped surrogate (token or
sequence ratio, symmetric or clip-higher), the aggregation of per-token losses into one scalar,
entropy, and DAPO's overlong length penalty.

Shapes are (B, T) over response positions; `response_mask` is True on real tokens.
"""

from __future__ import annotations

import torch

from rlhfkit.losses.masked import masked_mean, masked_sum

# ---- clipped surrogate --------------------------------------------------------------------------------


def _token_log_ratio(log_ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log rho_t = logp_t - old_logp_t (PPO, GRPO, DAPO)."""
    return log_ratio


def _sequence_log_ratio(log_ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log s_i = masked mean_t log rho_t, the same on every token of row i (GSPO, Zheng et al. 2025);
    the gradient flows through the mean."""
    return masked_mean(log_ratio, mask, dim=1)[:, None].expand(log_ratio.shape)


IMPORTANCE_SAMPLING_LEVELS = {"token": _token_log_ratio, "sequence": _sequence_log_ratio}


def clipped_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                        response_mask: torch.Tensor, *, epsilon: float = 0.2,
                        epsilon_high: float | None = None,
                        importance_sampling_level: str = "token") -> dict[str, torch.Tensor]:
    """Per-token clipped surrogate (Schulman et al. 2017, eq. 7), as a loss to minimise:

        ratio = exp(logp - old_logp)                              "token"
              = exp(masked mean_t (logp - old_logp)) per row      "sequence" (GSPO, Zheng et al. 2025)
        loss  = max(-A * ratio, -A * clip(ratio, 1 - epsilon, 1 + epsilon_high))

    epsilon_high None means epsilon; a larger one is DAPO's clip-higher (Yu et al. 2025: 0.2 / 0.28).
    logps, old_logps (B, T); advantages (B,) or (B, T). Returns per-token (B, T) tensors: `loss`,
    `ratio`, `clipped_low` / `clipped_high` (1.0 where the clipped term on that side was taken,
    i.e. strictly larger: ratio < 1 - epsilon with A < 0, ratio > 1 + epsilon_high with A > 0),
    `approxkl` (0.5 * log(ratio)^2). All but `ratio` are 0 outside `response_mask`; reduce them
    with `aggregate_loss` or a masked sum."""
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(f"importance_sampling_level must be one of {sorted(IMPORTANCE_SAMPLING_LEVELS)}, "
                         f"got {importance_sampling_level!r}")
    mask = response_mask.bool()
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand(mask.shape)
    # pads -> log ratio 0 and advantage 0, so garbage there (inf, nan) cannot reach the gradient
    advantages = advantages.masked_fill(~mask, 0.0)
    level_log_ratio = IMPORTANCE_SAMPLING_LEVELS[importance_sampling_level]
    log_ratio = level_log_ratio((logps - old_logps).masked_fill(~mask, 0.0), mask)
    ratio = torch.exp(log_ratio)
    high = epsilon if epsilon_high is None else epsilon_high
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - epsilon, 1.0 + high)
    took_clip = (clipped > unclipped) & mask
    return {
        "loss": torch.maximum(unclipped, clipped).masked_fill(~mask, 0.0),
        "ratio": ratio,
        "clipped_low": (took_clip & (ratio < 1.0)).to(ratio.dtype),
        "clipped_high": (took_clip & (ratio > 1.0)).to(ratio.dtype),
        "approxkl": (0.5 * log_ratio.pow(2)).masked_fill(~mask, 0.0),
    }


def truncated_importance_weights(old_logps: torch.Tensor, sampling_logps: torch.Tensor,
                                 response_mask: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance sampling (TIS; Yao et al. 2025, "Your efficient RL framework secretly
    brings you off-policy RL training") for samples drawn by a sampler whose distribution differs
    from the trained policy's at sampling time (another dtype or engine):

        w_t = min(exp(old_logp_t - sampling_logp_t), cap)

    per token, detached: multiply the per-token policy-gradient loss by it. `old_logps` are the
    trained policy's log-probs at sampling time, `sampling_logps` the sampler's, both (B, T).
    Returns (B, T), 1 outside `response_mask`."""
    if cap < 1:
        raise ValueError(f"the importance-weight cap must be >= 1, got {cap}")
    mask = response_mask.bool()
    log_w = (old_logps.detach() - sampling_logps).masked_fill(~mask, 0.0)
    return torch.exp(log_w).clamp(max=cap)


def sampler_correction(old_logps: torch.Tensor, sampling_logps: torch.Tensor, response_mask: torch.Tensor,
                       cap: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The per-token weights of `truncated_importance_weights` and what they say about the sampler,
    per token (for the stages to average over their tokens): `sampling/is_weight`, the share of
    capped weights `sampling/is_capped`, and `sampling/logp_gap` = |old_logp - sampling_logp|."""
    weights = truncated_importance_weights(old_logps, sampling_logps, response_mask, cap)
    return weights, {"sampling/is_weight": weights, "sampling/is_capped": (weights >= cap).float(),
                     "sampling/logp_gap": (old_logps.detach() - sampling_logps).abs()}


# ---- aggregation ----------------------------------------------------------------------------------------


def _token_sum(per_token, mask, *, num_tokens, num_sequences, max_length):
    """DAPO (Yu et al. 2025): sum over real tokens / num_tokens of the global batch."""
    return masked_sum(per_token, mask) / num_tokens


def _sequence_mean(per_token, mask, *, num_tokens, num_sequences, max_length):
    """Original GRPO (Shao et al. 2024, eq. 3): each row's mean over its real tokens, summed,
    / num_sequences."""
    return masked_mean(per_token, mask, dim=1).sum() / num_sequences


def _constant(per_token, mask, *, num_tokens, num_sequences, max_length):
    """Dr. GRPO (Liu et al. 2025): sum over real tokens / (num_sequences * max_length)."""
    if max_length is None:
        raise ValueError("loss aggregation 'constant' needs max_length (the maximum completion length)")
    return masked_sum(per_token, mask) / (num_sequences * max_length)


LOSS_AGGREGATIONS = {"token": _token_sum, "sequence": _sequence_mean, "constant": _constant}


def aggregate_loss(per_token: torch.Tensor, response_mask: torch.Tensor, mode: str, *, num_tokens: float,
                   num_sequences: float, max_length: int | None = None) -> torch.Tensor:
    """Scalar loss from a per-token (B, T) loss, `LOSS_AGGREGATIONS[mode]`:

        "token"     sum_{i,t} l_it / num_tokens                          (DAPO)
        "sequence"  sum_i (sum_t l_it / |o_i|) / num_sequences           (GRPO)
        "constant"  sum_{i,t} l_it / (num_sequences * max_length)        (Dr. GRPO)

    num_tokens / num_sequences are the counts of real tokens / rows in the whole (global) batch of
    one optimizer step, not of this micro-batch, so the values of its micro-batches and processes
    add up exactly to the full-batch loss."""
    if mode not in LOSS_AGGREGATIONS:
        raise ValueError(f"loss aggregation must be one of {sorted(LOSS_AGGREGATIONS)}, got {mode!r}")
    if num_tokens <= 0 or num_sequences <= 0:
        raise ValueError(f"num_tokens ({num_tokens}) and num_sequences ({num_sequences}) must be > 0")
    return LOSS_AGGREGATIONS[mode](per_token, response_mask.bool(), num_tokens=num_tokens,
                                   num_sequences=num_sequences, max_length=max_length)


# ---- entropy and length penalty -------------------------------------------------------------------------


def overlong_penalty(lengths: torch.Tensor, max_length: int, buffer: int) -> torch.Tensor:
    """(B,) DAPO's soft overlong punishment (Yu et al. 2025), added to the score:

        0                                    if L <= max_length - buffer
        ((max_length - buffer) - L) / buffer if max_length - buffer < L <= max_length
        -1                                   if L > max_length"""
    if not 0 < buffer <= max_length:
        raise ValueError(f"overlong buffer must be in (0, max_length={max_length}], got {buffer}")
    return ((max_length - buffer - lengths.to(torch.get_default_dtype())) / buffer).clamp(-1.0, 0.0)
