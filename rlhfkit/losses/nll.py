"""Next-token negative log-likelihood for pretraining and SFT."""

from __future__ import annotations

import torch

from rlhfkit.losses.masked import masked_sum


def nll_sum(token_logps: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL over the tokens that count, and how many there are.

        loss = - sum_t mask_t * log p(x_{t+1} | x_{<=t})

    token_logps: (B, T-1) log-probs of the next token; loss_mask: (B, T-1), True where the target
    is a response token (SFT) or any real token (pretraining). Returning the sum and the count,
    rather than a mean, lets the caller divide by the token count of the whole global batch, so
    gradient accumulation and data parallelism give the same gradient as one big batch.
    """
    return -masked_sum(token_logps, loss_mask), loss_mask.sum()
