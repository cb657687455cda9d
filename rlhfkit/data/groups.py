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
from rlhfkit.data.encode import Encoded, encode_response_group


@dataclass
class ResponseGroup:
    responses: list[Encoded]
    """Each is prompt + response (+ EOS), truncated by `truncate_prompt_response`; best first."""
    margin: float | None = None
    """Preference rows' optional `margin` column (Bradley-Terry with margin)."""
    index: int = 0
    """Position of the source row (to find its gold columns in evaluation)."""
    prompt_cut: bool = False
    """Truncation cut the start of the prompt (`GroupFit`)."""
    response_cut: bool = False
    """Truncation cut the end of a response (its EOS: the reward is read before it)."""


def group_responses(row: dict) -> list:
    """The responses of a canonical preference or ranking row, best first."""
    return [row["chosen"], row["rejected"]] if "chosen" in row else list(row["responses"])


def encode_group(tokenizer, row: dict, max_length: int, max_prompt_length: int | None = None,
                 index: int = 0, max_response_length: int | None = None) -> ResponseGroup | None:
    """Encode a canonical preference/ranking row (`truncate_group`: the responses share the same
    end of the prompt); None when a response leaves no token."""
    fit = encode_response_group(tokenizer, row["prompt"], group_responses(row), max_length, max_prompt_length,
                                max_response_length, row.get("_source"))
    if fit.sequences is None:
        return None
    return ResponseGroup(fit.sequences, row.get("margin"), index, fit.prompt_cut, fit.response_cut)


def truncation_counts(groups: list[ResponseGroup], skipped: int) -> dict[str, int]:
    """How many rows truncation touched: `prompt_cut` (conversation start cut), `response_cut`
    (a reply's end cut), `skipped` (no room for a reply: not used)."""
    return {"prompt_cut": sum(g.prompt_cut for g in groups), "response_cut": sum(g.response_cut for g in groups),
            "skipped": skipped}


def describe_truncation(name: str, kept: int, counts: dict[str, int], max_length: int) -> str:
    """One line for the log: rows kept, cut (which part) and skipped; nothing dropped silently."""
    return (f"{name}: {kept} row(s) within max_length={max_length}: {counts['prompt_cut']} with the start of the "
            f"prompt cut, {counts['response_cut']} with a response cut before its end (reward read there); "
            f"{counts['skipped']} skipped (no room for a response)")


def collate_groups(groups: list[ResponseGroup], pad_id: int) -> dict[str, torch.Tensor]:
    """`input_ids`, `attention_mask`, `response_mask`: (N, T) over all responses, group by group;
    `group_mask`: (B, K_max); `prefix_groups`: N ints, each row's group (its responses share the
    prompt, which a padding-free pass computes once); `margin`: (B,) (0 where a row has none)
    when any group has one."""
    flat = [e for g in groups for e in g.responses]
    batch = pad_batch([e.input_ids for e in flat], pad_id, "right", [e.response_mask for e in flat])
    k_max = max(len(g.responses) for g in groups)
    group_mask = torch.zeros((len(groups), k_max), dtype=torch.bool)
    for b, g in enumerate(groups):
        group_mask[b, :len(g.responses)] = True
    batch["group_mask"] = group_mask
    batch["prefix_groups"] = [b for b, g in enumerate(groups) for _ in g.responses]
    if any(g.margin is not None for g in groups):
        batch["margin"] = torch.tensor([g.margin or 0.0 for g in groups], dtype=torch.float32)
    return batch


def ungroup(flat: torch.Tensor, group_mask: torch.Tensor) -> torch.Tensor:
    """(N,) values in `collate_groups` order -> (B, K_max); 0 where `group_mask` is False.
    Differentiable in `flat`."""
    return flat.new_zeros(group_mask.shape).masked_scatter(group_mask, flat)
