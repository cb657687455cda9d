"""Forward passes and log-probabilities: the one place where logits become log-probs.

Conventions: `attention_mask` is True on real tokens; position ids follow the real tokens
(`cumsum(mask) - 1`), so left padding, right padding and no padding give the same logits at
real positions.
"""

from __future__ import annotations

import torch


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) positions counting real tokens only; pads get 0 (they are masked anyway)."""
    mask = attention_mask.long()
    return (mask.cumsum(-1) - 1).clamp(min=0)


def forward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs):
    """Model forward with position ids derived from the mask. Returns the model output."""
    return model(
        input_ids=input_ids,
        attention_mask=attention_mask.long(),
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
        **kwargs,
    )


def token_logps(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(targets) under softmax(logits / temperature).

    logits: (B, T, V) predicting `targets`: (B, T) (already shifted). Returns (B, T) float32.
    Computed as gather - logsumexp to avoid materialising the (B, T, V) log-softmax.
    """
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    picked = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def shifted_token_logps(model, input_ids, attention_mask, temperature: float = 1.0) -> torch.Tensor:
    """(B, T-1) log-probs of input_ids[:, 1:] given the prefix; position t predicts token t+1.

    Same values as `token_logps(logits[:, :-1], input_ids[:, 1:])`, computed with the fused
    cross-entropy kernel on the unsliced logits (targets rolled left by one, last column dropped):
    slicing the (B, T, V) logits first costs a copy of the largest tensor in the step.
    """
    logits = forward(model, input_ids, attention_mask).logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    targets = torch.roll(input_ids, shifts=-1, dims=1)
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return -nll[:, :-1]


def response_token_logps(model, batch: dict, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of the response tokens of a training batch (`input_ids`, `attention_mask`,
    `response_mask`). Returns `(token_logps, mask)`, both (B, T-1): position t scores token t+1,
    `mask` is True where that token is a response token. Sum with `masked_sum` for sequence
    log-probs (B,); count with `mask.sum(-1)` for averages."""
    logps = shifted_token_logps(model, batch["input_ids"], batch["attention_mask"], temperature)
    mask = batch["response_mask"][:, 1:]
    return logps.masked_fill(~mask, 0.0), mask
