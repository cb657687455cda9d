"""Forward passes and log-probabilities: the one place where logits become log-probs.

Conventions: `attention_mask` is True on real tokens; position ids follow the real tokens
(`cumsum(mask) - 1`), so left padding, right padding and no padding give the same logits at
real positions.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    logits = forward(model, input_ids, attention_mask).logits
    return next_token_logps(logits, input_ids, temperature)[:, :-1]


def next_token_logps(logits: torch.Tensor, input_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(B, T) log p(input_ids[:, t+1]) under softmax(logits[:, t] / temperature), fused
    cross-entropy against the ids rolled left by one; the last column scores a wrapped-around
    token and is meaningless."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    targets = torch.roll(input_ids, shifts=-1, dims=1)
    return -torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")


def response_token_logps(model, batch: dict, temperature: float = 1.0,
                         padding_free: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of the response tokens of a training batch (`input_ids`, `attention_mask`,
    `response_mask`). Returns `(token_logps, mask)`, both (B, T-1): position t scores token t+1,
    `mask` is True where that token is a response token (and t a real token: a sequence's first
    token has nothing to be scored from). Sum with `masked_sum` for sequence log-probs (B,); count
    with `mask.sum(-1)` for averages. `padding_free`: the same values from a packed forward pass.
    Logits are only computed where `mask` is True (`scored_token_logps`)."""
    ids, attention = batch["input_ids"], batch["attention_mask"].bool()
    mask = batch["response_mask"][:, 1:] & attention[:, :-1]
    return scored_token_logps(model, ids, attention, mask, temperature, padding_free), mask


def scored_token_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, score_mask: torch.Tensor,
                       temperature: float = 1.0, padding_free: bool = False) -> torch.Tensor:
    """(B, T-1) log p(input_ids[:, t+1] | prefix) where `score_mask` (B, T-1) is True, 0 elsewhere.

    The output embedding (the LM head, a V-wide matmul per position, plus the softmax over V) runs
    only at the scored positions (`logits_at`): a prompt's positions cost no head, which is most
    of the saving for a large vocabulary (SmolLM2's head is a fifth of its FLOPs). With
    `padding_free` the sequences are packed first (`pack_plan`), so no transformer layer computes a
    pad either; the values equal the padded pass's up to float rounding (tested), as long as the
    model builds its attention mask from packed position ids (`padding_free_matches` checks)."""
    rows, cols = score_mask.nonzero(as_tuple=True)
    if padding_free:
        plan = pack_plan(attention_mask, pack_width(attention_mask.sum(-1).tolist()))
        packed_ids, positions = packed_inputs(plan, input_ids)
        flat = torch.full(input_ids.shape, -1, dtype=torch.long, device=input_ids.device)
        flat[plan.src_row, plan.src_col] = plan.dst_row * plan.width + plan.dst_col
        at = flat[rows, cols]
        inputs = dict(input_ids=packed_ids, position_ids=positions, attention_mask=None)
        logits = logits_at(model, inputs, at // plan.width, at % plan.width)
    else:
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask.long(),
                      position_ids=position_ids_from_mask(attention_mask))
        logits = logits_at(model, inputs, rows, cols)
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    values = -torch.nn.functional.cross_entropy(logits, input_ids[rows, cols + 1], reduction="none")
    out = torch.zeros(score_mask.shape, dtype=values.dtype, device=values.device)
    return out.index_put((rows, cols), values)


def logits_at(model, inputs: dict, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(K, V) logits of a forward pass at positions (rows[k], cols[k]) only: a forward pre-hook on
    the model's output embedding hands it those K hidden states instead of all (B, T), so whatever
    the model does after its head (logit scaling, soft-capping) still applies. A model that does not
    call its output-embedding module gets full logits, indexed afterwards (same values)."""
    find = getattr(getattr(model, "module", model), "get_output_embeddings", None)  # DDP wraps in .module
    head = find() if find is not None else None
    called = []

    def pick(module, args):
        called.append(True)
        return (args[0][rows, cols].unsqueeze(0), *args[1:])

    handle = head.register_forward_pre_hook(pick) if head is not None else None
    try:
        logits = model(**inputs, use_cache=False).logits
    finally:
        if handle is not None:
            handle.remove()
    if called and logits.shape[:2] == (1, rows.numel()):
        return logits[0]
    return logits[rows, cols]


# ---- padding-free (packed) forward ---------------------------------------------------------------

def pack_width(lengths: list[int], candidates: int = 32) -> int:
    """Packed row width for sequences of these lengths: the width in [longest, 2 x longest] (and no
    more than 256 beyond the longest: attention cost per token grows with the width) whose
    first-fit-decreasing packing has the fewest slots (rows x width), the narrower on a tie; at
    most `candidates` widths are tried, evenly spaced. On `sentiment` batches of 16-32 sequences
    this fills 96% of the slots; a fixed width of 2 x longest fills 87%, the longest alone 79-84%."""
    longest = max(lengths)
    top = max(longest, min(2 * longest, longest + 256))
    step = max(1, (top - longest + candidates - 1) // candidates)
    ordered = sorted(lengths, reverse=True)
    return min(range(longest, top + 1, step), key=lambda w: (len(_first_fit(ordered, w)[1]) * w, w))


def _first_fit(lengths: list[int], width: int) -> tuple[list[int], list[int]]:
    """Put sequences of `lengths`, in this order, each into the first row of `width` with room:
    (the row of each sequence, the filled columns of each row)."""
    used: list[int] = []
    rows = []
    for n in lengths:
        row = next((r for r, u in enumerate(used) if u + n <= width), len(used))
        if row == len(used):
            used.append(0)
        used[row] += n
        rows.append(row)
    return rows, used


@dataclass
class PackPlan:
    """Where each real token of a padded (B, T) batch goes in a packed (rows, width) batch: one entry
    per real token in `src_row`/`src_col` (padded batch) and `dst_row`/`dst_col` (packed batch);
    `offset` is the token's index in its sequence; `used` is the number of filled columns of each
    packed row, `width` the packed rows' width."""

    src_row: torch.Tensor
    src_col: torch.Tensor
    dst_row: torch.Tensor
    dst_col: torch.Tensor
    offset: torch.Tensor
    used: torch.Tensor
    width: int


def pack_plan(attention_mask: torch.Tensor, width: int | None = None) -> PackPlan:
    """Lay the sequences of a padded (B, T) batch (real tokens contiguous, either padding side)
    into rows of `width` (default T), first-fit decreasing: longest first, each into the first row
    with room. No sequence is split; only the pads go."""
    lengths = attention_mask.sum(-1).tolist()
    starts = attention_mask.int().argmax(-1).tolist()
    width = width or attention_mask.shape[1]
    order = sorted(range(len(lengths)), key=lambda k: -lengths[k])
    rows, used = _first_fit([lengths[i] for i in order], width)
    filled = [0] * len(used)
    src_row, src_col, dst_row, dst_col, offset = [], [], [], [], []
    for i, row in zip(order, rows):
        n = lengths[i]
        src_row += [i] * n
        src_col += range(starts[i], starts[i] + n)
        dst_row += [row] * n
        dst_col += range(filled[row], filled[row] + n)
        offset += range(n)
        filled[row] += n

    def tensor(values):
        return torch.tensor(values, dtype=torch.long, device=attention_mask.device)

    return PackPlan(tensor(src_row), tensor(src_col), tensor(dst_row), tensor(dst_col), tensor(offset),
                    tensor(used), width)


def packed_inputs(plan: PackPlan, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, width) packed token ids and position ids. Every sequence's positions count from 0, so a
    position that is not its left neighbour + 1 starts a new sequence, and transformers (given
    `attention_mask=None`) builds a block-diagonal causal mask from the position ids: no token
    attends across sequences. A row's unused tail holds token 0 at positions 0, 1, ...: a block
    of its own, after every real token, whose outputs are never read."""
    rows, width = plan.used.numel(), plan.width
    ids = torch.zeros((rows, width), dtype=input_ids.dtype, device=input_ids.device)
    ids[plan.dst_row, plan.dst_col] = input_ids[plan.src_row, plan.src_col]
    columns = torch.arange(width, device=input_ids.device).expand(rows, width)
    positions = (columns - plan.used[:, None]).clamp(min=0)
    positions[plan.dst_row, plan.dst_col] = plan.offset
    return ids, positions


def packed_shifted_token_logps(model, input_ids, attention_mask, temperature: float = 1.0) -> torch.Tensor:
    """`shifted_token_logps` without computing pads: (B, T-1), 0 where the padded version scores a
    pad or the token after a sequence's last one (`scored_token_logps` with `padding_free`)."""
    attention_mask = attention_mask.bool()
    real = attention_mask[:, 1:] & attention_mask[:, :-1]
    return scored_token_logps(model, input_ids, attention_mask, real, temperature, padding_free=True)


@torch.no_grad()
def padding_free_matches(model, input_ids, attention_mask, atol: float = 1e-3) -> bool:
    """True when the packed and the padded forward give the same log-probs on this batch (a
    model whose attention ignores packed position ids would let sequences see each other)."""
    mask = attention_mask[:, 1:] & attention_mask[:, :-1]
    padded = shifted_token_logps(model, input_ids, attention_mask)
    packed = packed_shifted_token_logps(model, input_ids, attention_mask)
    return bool(torch.allclose(padded[mask], packed[mask], atol=atol, rtol=0))
