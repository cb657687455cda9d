"""PPO for language models (RLHF step 3): the score position, EOS trick, KL-shaped rewards, value loss.

The rest of PPO lives by concept: KL estimators and controllers in losses/kl.py, GAE in
losses/advantages.py, the clipped policy loss and entropy in losses/policy.py, `whiten` in
losses/masked.py.

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


# ---- value loss --------------------------------------------------------------------------------------------


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
