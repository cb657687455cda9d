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

    logits: (..., V) predicting `targets`: (...) (already shifted). Returns (...) float32.
    Computed as gather - logsumexp to avoid materialising the (B, T, V) log-softmax.
    """
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    picked = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def sampling_scores(logits: torch.Tensor, temperature: float = 1.0,
                    suppress_ids: list[int] | None = None) -> torch.Tensor:
    """The online stages' one sampling distribution, as float32 scores: logits / temperature with
    `suppress_ids` (tokens the sampler never emits, e.g. pad) removed. Both the trainer
    (`response_logps`) and the sampler's recorded log-probs (`rollout.generate.sampled_logps`) take
    their log-probs from it."""
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    if suppress_ids:
        ids = torch.tensor(suppress_ids, device=z.device)
        z = z.index_fill(-1, ids, torch.finfo(z.dtype).min)  # finite: 0 * min stays 0 in the entropy
    return z


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) along the last axis: logsumexp(z) - sum_v softmax(z)_v z_v.
    Pass temperature-scaled logits to get the entropy of the sampling distribution."""
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


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
    `response_mask`; optional `prefix_groups`, see `scored_token_logps`). Returns
    `(token_logps, mask)`, both (B, T-1): position t scores token t+1, `mask` is True where that
    token is a response token (and t a real token: a sequence's first token has nothing to be
    scored from). Sum with `masked_sum` for sequence log-probs (B,); count with `mask.sum(-1)` for
    averages. `padding_free`: the same values from a packed forward pass. Logits are only computed
    where `mask` is True."""
    ids, attention = batch["input_ids"], batch["attention_mask"].bool()
    mask = batch["response_mask"][:, 1:] & attention[:, :-1]
    logps = scored_token_logps(model, ids, attention, mask, temperature, padding_free, batch.get("prefix_groups"))
    return logps, mask


def scored_token_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, score_mask: torch.Tensor,
                       temperature: float = 1.0, padding_free: bool = False,
                       groups: list[int] | None = None) -> torch.Tensor:
    """(B, T-1) log p(input_ids[:, t+1] | prefix) where `score_mask` (B, T-1) is True, 0 elsewhere.

    The output embedding (the LM head, a V-wide matmul per position, plus the softmax over V) runs
    only at the scored positions (`logits_at`): a prompt's positions cost no head, which is most
    of the saving for a large vocabulary (SmolLM2's head is a fifth of its FLOPs). With
    `padding_free` the sequences are packed first (`pack_plan`), so no transformer layer computes a
    pad either, and rows with the same `groups` id (a pair's chosen and rejected, say) share one
    pass over their common prefix (`shared_prefix_attention`; models with SDPA or eager attention,
    others pack without sharing). The values equal the padded pass's up to float rounding (tested),
    as long as the model follows packed position ids and 4D masks (`padding_free_matches` checks)."""
    logits, rows, cols = scored_logits(model, input_ids, attention_mask, score_mask, padding_free, groups)
    values = token_logps(logits, input_ids[rows, cols + 1], temperature)
    out = torch.zeros(score_mask.shape, dtype=values.dtype, device=values.device)
    return out.index_put((rows, cols), values)


def scored_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, score_mask: torch.Tensor,
                  padding_free: bool = False, groups: list[int] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(K, V) logits at the K positions where `score_mask` (B, T-1) is True (position t predicts
    token t+1), and those positions' (rows, cols) in the padded batch; see `scored_token_logps`."""
    rows, cols = score_mask.nonzero(as_tuple=True)
    inputs, at_rows, at_cols = forward_inputs(model, input_ids, attention_mask, rows, cols, padding_free, groups)
    return logits_at(model, inputs, at_rows, at_cols), rows, cols


def hidden_at(backbone, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor,
              cols: torch.Tensor, padding_free: bool = False, groups: list[int] | None = None) -> torch.Tensor:
    """(K, H) last hidden states of a transformer backbone (no LM head, e.g. LlamaModel) at the
    padded-batch positions (rows[k], cols[k]), all real tokens; packed and prefix-shared like
    `scored_logits` with `padding_free`."""
    inputs, at_rows, at_cols = forward_inputs(backbone, input_ids, attention_mask, rows, cols, padding_free, groups)
    hidden = backbone(**inputs, use_cache=False).last_hidden_state
    return hidden[at_rows, at_cols]


def response_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, context_length: int,
                   temperature: float = 1.0, *, padding_free: bool = False, groups: list[int] | None = None,
                   suppress_ids: list[int] | None = None, with_entropy: bool = False,
                   entropy_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of the response tokens of a rollout batch laid out as left-padded prompt | right-
    padded response: `input_ids` (B, P + W), response token t at column P + t. Returns (B, W)
    log-probs under softmax(logits / temperature) with `suppress_ids` (tokens the sampler never
    emits, e.g. pad) removed from the distribution, 0 where the response has no token; and with
    `with_entropy` the (B, W) entropy of that same distribution (in the graph only with
    `entropy_grad`: a logged-only entropy costs no memory for backward).

    THE function for every online pass (rollout, old, reference, training, evaluation), so the
    sampler's distribution and every scored one are the same (the first ratio is exactly 1)."""
    P = context_length
    score_mask = torch.zeros_like(attention_mask[:, 1:], dtype=torch.bool)
    score_mask[:, P - 1:] = attention_mask[:, P:].bool()
    logits, rows, cols = scored_logits(model, input_ids, attention_mask, score_mask, padding_free, groups)
    z = sampling_scores(logits, temperature, suppress_ids)
    values = token_logps(z, input_ids[rows, cols + 1])
    B, W = input_ids.shape[0], input_ids.shape[1] - P
    logps = torch.zeros((B, W), dtype=values.dtype, device=values.device).index_put((rows, cols - P + 1), values)
    if not with_entropy:
        return logps, None
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        ent = entropy_from_logits(z if entropy_grad else z.detach())
        entropy = torch.zeros((B, W), dtype=ent.dtype, device=ent.device).index_put((rows, cols - P + 1), ent)
    return logps, entropy


def response_hidden(backbone, input_ids: torch.Tensor, attention_mask: torch.Tensor, context_length: int,
                    *, padding_free: bool = False, groups: list[int] | None = None) -> torch.Tensor:
    """(B, W, H) hidden states of `backbone` read *before* each response token t, at column P - 1 + t,
    wherever that column is a real token: t = 0 .. last + 1 (the state after the last token
    included); zeros elsewhere. What a critic's V(s_t) reads."""
    P = context_length
    real = attention_mask.bool()
    read = torch.zeros_like(real)
    read[:, P - 1:] = real[:, P - 1:]
    rows, cols = read.nonzero(as_tuple=True)
    hidden = hidden_at(backbone, input_ids, attention_mask, rows, cols, padding_free, groups)
    B, W = input_ids.shape[0], input_ids.shape[1] - P
    keep = cols - P + 1 < W
    out = torch.zeros((B, W, hidden.shape[-1]), dtype=hidden.dtype, device=hidden.device)
    return out.index_put((rows[keep], cols[keep] - P + 1), hidden[keep])


def forward_inputs(model, input_ids, attention_mask, rows, cols, padding_free, groups):
    """Model inputs for a padded (B, T) batch (packed with `padding_free`, see `pack_plan`), and where
    the padded positions (rows, cols) are in them."""
    if not padding_free:
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask.long(),
                      position_ids=position_ids_from_mask(attention_mask))
        return inputs, rows, cols
    mask_kind = _custom_mask_kind(model) if groups is not None else None
    plan = pack_plan(attention_mask, "auto", input_ids=input_ids, groups=groups if mask_kind else None)
    packed_ids, positions = packed_inputs(plan, input_ids)
    flat = torch.full(input_ids.shape, -1, dtype=torch.long, device=input_ids.device)
    flat[plan.src_row, plan.src_col] = plan.dst_row * plan.width + plan.dst_col
    at = flat[rows, cols]
    mask = None if plan.segment is None else shared_prefix_attention(plan)
    if mask is not None and mask_kind != "bool":  # eager attention adds its mask to the scores
        additive = torch.zeros(mask.shape, dtype=mask_kind, device=mask.device)
        mask = additive.masked_fill(~mask, torch.finfo(mask_kind).min)
    inputs = dict(input_ids=packed_ids, position_ids=positions, attention_mask=mask)
    return inputs, at // plan.width, at % plan.width


def _custom_mask_kind(model):
    """How this model takes a custom 4D attention mask: "bool" (SDPA: True = attend), a float dtype
    (eager attention adds the mask to the scores), or None (other kernels, e.g. flash attention)."""
    inner = getattr(model, "module", model)
    implementation = getattr(getattr(inner, "config", None), "_attn_implementation", None)
    if implementation == "sdpa":
        return "bool"
    if implementation == "eager":
        return next(inner.parameters()).dtype
    return None


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
    `offset` is the token's index in its sequence (its position id); `used` is the number of filled
    columns of each packed row, `width` the packed rows' width.

    With shared prefixes (`pack_plan(..., groups=)`), the common prefix of a group's sequences has
    one slot per token, shared by all of them (their entries have the same `dst`), and each
    sequence's remaining tokens follow as a branch of their own; `segment` (rows, width) numbers
    the groups (the unused tail of a row is a segment of its own) and `branch` (rows, width) is 0
    on a prefix and k on the k-th sequence's own tokens (`shared_prefix_attention`). None without
    groups: then every sequence is its own segment, which packed position ids already say."""

    src_row: torch.Tensor
    src_col: torch.Tensor
    dst_row: torch.Tensor
    dst_col: torch.Tensor
    offset: torch.Tensor
    used: torch.Tensor
    width: int
    segment: torch.Tensor | None = None
    branch: torch.Tensor | None = None


def common_prefix_units(input_ids: torch.Tensor, lengths: list[int], starts: list[int],
                        groups: list[int] | None) -> list[tuple[list[int], int]]:
    """[(batch rows, shared prefix length)]: rows with the same `groups` id form one unit, sharing
    the longest common prefix of their real tokens (a prompt, and any first response tokens they
    have in common); without groups every row is a unit of its own."""
    if groups is None:
        return [([i], n) for i, n in enumerate(lengths)]
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    units = []
    for rows in members.values():
        seqs = [input_ids[r, starts[r]:starts[r] + lengths[r]].tolist() for r in rows]
        shared = min(len(s) for s in seqs)
        for k in range(shared):
            if any(s[k] != seqs[0][k] for s in seqs[1:]):
                shared = k
                break
        units.append((rows, shared))
    return units


def pack_plan(attention_mask: torch.Tensor, width: int | str | None = None, *,
              input_ids: torch.Tensor | None = None, groups: list[int] | None = None) -> PackPlan:
    """Lay the sequences of a padded (B, T) batch (real tokens contiguous, either padding side)
    into rows of `width` (default T; "auto": `pack_width`), first-fit decreasing: longest first,
    each into the first row with room. No sequence is split; only the pads go. With `groups`
    (a group id per row; needs `input_ids`) a group's rows are one unit: their common prefix once,
    then each row's own tokens (`common_prefix_units`)."""
    lengths = attention_mask.sum(-1).tolist()
    starts = attention_mask.int().argmax(-1).tolist()
    units = common_prefix_units(input_ids, lengths, starts, groups)
    sizes = [shared + sum(lengths[r] - shared for r in rows) for rows, shared in units]
    width = pack_width(sizes) if width == "auto" else width or max(attention_mask.shape[1], *sizes)
    order = sorted(range(len(units)), key=lambda u: -sizes[u])
    unit_rows, used = _first_fit([sizes[u] for u in order], width)
    filled = [0] * len(used)
    src_row, src_col, dst_row, dst_col, offset = [], [], [], [], []
    slot_row, slot_col, slot_segment, slot_branch = [], [], [], []
    for u, row in zip(order, unit_rows):
        rows, shared = units[u]
        base = filled[row]
        cursor = base + shared
        slot_branch += [0] * shared
        for k, r in enumerate(rows):
            n, own = lengths[r], lengths[r] - shared
            src_row += [r] * n
            src_col += range(starts[r], starts[r] + n)
            dst_row += [row] * n
            dst_col += [*range(base, base + shared), *range(cursor, cursor + own)]
            offset += range(n)
            slot_branch += [k + 1] * own
            cursor += own
        slot_row += [row] * (cursor - base)
        slot_col += range(base, cursor)
        slot_segment += [u] * (cursor - base)
        filled[row] = cursor

    def tensor(values):
        return torch.tensor(values, dtype=torch.long, device=attention_mask.device)

    plan = PackPlan(tensor(src_row), tensor(src_col), tensor(dst_row), tensor(dst_col), tensor(offset),
                    tensor(used), width)
    if groups is not None:
        tails = -1 - torch.arange(len(used), device=attention_mask.device)  # each row's unused tail
        plan.segment = tails[:, None].repeat(1, width)
        plan.branch = torch.zeros((len(used), width), dtype=torch.long, device=attention_mask.device)
        plan.segment[tensor(slot_row), tensor(slot_col)] = tensor(slot_segment)
        plan.branch[tensor(slot_row), tensor(slot_col)] = tensor(slot_branch)
    return plan


def shared_prefix_attention(plan: PackPlan) -> torch.Tensor:
    """(rows, 1, width, width) bool, True where a query (dim 2) may attend to a key (dim 3): same
    segment, not later, and the key on the shared prefix or on the query's own branch."""
    columns = torch.arange(plan.width, device=plan.segment.device)
    causal = columns[:, None] >= columns[None, :]
    same = plan.segment[:, :, None] == plan.segment[:, None, :]
    visible = (plan.branch[:, None, :] == 0) | (plan.branch[:, :, None] == plan.branch[:, None, :])
    return (same & visible & causal).unsqueeze(1)


def packed_inputs(plan: PackPlan, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, width) packed token ids and position ids. Every sequence's positions count from 0, so a
    position that is not its left neighbour + 1 starts a new sequence, and transformers (given
    `attention_mask=None`) builds a block-diagonal causal mask from the position ids: no token
    attends across sequences. A row's unused tail holds token 0 at positions 0, 1, ...: a block
    of its own, after every real token, whose outputs are never read. (With shared prefixes a
    branch's positions continue from its prefix, and `shared_prefix_attention` is the mask.)"""
    rows, width = plan.used.numel(), plan.width
    ids = torch.zeros((rows, width), dtype=input_ids.dtype, device=input_ids.device)
    ids[plan.dst_row, plan.dst_col] = input_ids[plan.src_row, plan.src_col]
    columns = torch.arange(width, device=input_ids.device).expand(rows, width)
    positions = (columns - plan.used[:, None]).clamp(min=0)
    positions[plan.dst_row, plan.dst_col] = plan.offset
    return ids, positions


def packed_shifted_token_logps(model, input_ids, attention_mask, temperature: float = 1.0,
                               groups: list[int] | None = None) -> torch.Tensor:
    """`shifted_token_logps` without computing pads: (B, T-1), 0 where the padded version scores a
    pad or the token after a sequence's last one (`scored_token_logps` with `padding_free`)."""
    attention_mask = attention_mask.bool()
    real = attention_mask[:, 1:] & attention_mask[:, :-1]
    return scored_token_logps(model, input_ids, attention_mask, real, temperature, True, groups)


@torch.no_grad()
def padding_free_matches(model, input_ids, attention_mask, groups: list[int] | None = None,
                         atol: float = 1e-3) -> bool:
    """True when the packed forward (with shared prefixes for `groups`) gives the same log-probs as
    the padded one on this batch (a model whose attention ignores packed position ids or custom
    masks would let sequences see each other)."""
    attention_mask = attention_mask.bool()
    mask = attention_mask[:, 1:] & attention_mask[:, :-1]
    padded = shifted_token_logps(model, input_ids, attention_mask)
    packed = packed_shifted_token_logps(model, input_ids, attention_mask, groups=groups)
    return bool(torch.allclose(padded[mask], packed[mask], atol=atol, rtol=0))
