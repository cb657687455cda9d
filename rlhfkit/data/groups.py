"""Response groups for reward modelling: one prompt with K >= 2 responses, best first.

A preference pair is a group of K = 2 (chosen, rejected); a ranking row is a group of its K
responses. All responses of a batch of groups go through ONE forward pass: `collate_groups`
flattens them into N = sum K_b rows (right-padded) and returns `group_mask` (B, K_max), True where
group b has a k-th response; `ungroup` puts the N rewards back into (B, K_max) in that order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhfkit.data.collate import pad_batch
from rlhfkit.data.encode import Encoded, encode_responses


@dataclass
class ResponseGroup:
    responses: list[Encoded]
    """Each is prompt + response (+ EOS), truncated by `truncate_prompt_response`; best first."""
    margin: float | None = None
    """Preference rows' optional `margin` column (Bradley-Terry with margin)."""
    index: int = 0
    """Position of the source row (to find its gold columns in evaluation)."""


def group_responses(row: dict) -> list:
    """The responses of a canonical preference or ranking row, best first."""
    return [row["chosen"], row["rejected"]] if "chosen" in row else list(row["responses"])


def encode_group(tokenizer, row: dict, max_length: int, max_prompt_length: int | None = None,
                 index: int = 0) -> ResponseGroup | None:
    """Encode a canonical preference/ranking row; None when a response leaves no token."""
    encoded = encode_responses(tokenizer, row["prompt"], group_responses(row), max_length,
                               max_prompt_length, row.get("_source"))
    if encoded is None:
        return None
    return ResponseGroup(encoded, row.get("margin"), index)


def collate_groups(groups: list[ResponseGroup], pad_id: int) -> dict[str, torch.Tensor]:
    """`input_ids`, `attention_mask`, `response_mask`: (N, T) over all responses, group by group;
    `group_mask`: (B, K_max); `margin`: (B,) (0 where a row has none) when any group has one."""
    flat = [e for g in groups for e in g.responses]
    batch = pad_batch([e.input_ids for e in flat], pad_id, "right", [e.response_mask for e in flat])
    k_max = max(len(g.responses) for g in groups)
    group_mask = torch.zeros((len(groups), k_max), dtype=torch.bool)
    for b, g in enumerate(groups):
        group_mask[b, :len(g.responses)] = True
    batch["group_mask"] = group_mask
    if any(g.margin is not None for g in groups):
        batch["margin"] = torch.tensor([g.margin or 0.0 for g in groups], dtype=torch.float32)
    return batch


def ungroup(flat: torch.Tensor, group_mask: torch.Tensor) -> torch.Tensor:
    """(N,) values in `collate_groups` order -> (B, K_max); 0 where `group_mask` is False.
    Differentiable in `flat`."""
    return flat.new_zeros(group_mask.shape).masked_scatter(group_mask, flat)
