"""Padded batches. Training batches are right-padded, generation prompts left-padded; the
attention mask is True on real tokens, and pads are a dedicated token, never EOS."""

from __future__ import annotations

import torch


def pad_batch(sequences: list[list[int]], pad_id: int, side: str = "right",
              masks: list[list[bool]] | None = None) -> dict[str, torch.Tensor]:
    """Stack id lists into (B, T) tensors.

    Returns `input_ids`, `attention_mask` (True on real tokens) and, when `masks` is given,
    `response_mask` (the given per-token masks, False on pads).
    """
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), length), dtype=torch.bool)
    response = torch.zeros((len(sequences), length), dtype=torch.bool) if masks is not None else None
    for i, seq in enumerate(sequences):
        n = len(seq)
        sl = slice(length - n, length) if side == "left" else slice(0, n)
        ids[i, sl] = torch.tensor(seq, dtype=torch.long)
        attention[i, sl] = True
        if response is not None:
            response[i, sl] = torch.tensor(masks[i], dtype=torch.bool)
    batch = {"input_ids": ids, "attention_mask": attention}
    if response is not None:
        batch["response_mask"] = response
    return batch


def collate_encoded(examples, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded training batch from `Encoded` examples."""
    return pad_batch([e.input_ids for e in examples], pad_id, "right",
                     [e.response_mask for e in examples])
