"""Held-out likelihood of responses: the same number for any model on the same examples, so
models from different stages (pt, sft, dpo, ...) can be compared on one set."""

from __future__ import annotations

import math

import torch

from rlhfkit.data.collate import collate_encoded
from rlhfkit.data.encode import Encoded
from rlhfkit.models.logprobs import response_token_logps


@torch.no_grad()
def response_nll(model, examples: list[Encoded], pad_id: int, batch_size: int = 32) -> dict:
    """Token-mean negative log-likelihood (`loss`) and perplexity of the response tokens."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate_encoded(examples[i:i + batch_size], pad_id).items()}
        logps, mask = response_token_logps(model, batch)
        total -= logps.sum().item()
        count += int(mask.sum())
    model.train(was_training)
    loss = total / max(count, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50))}
