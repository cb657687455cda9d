"""`rlhfkit kto`: KTO from unpaired (prompt, completion, label) data; preference pairs are also
accepted and become one desirable (chosen) and one undesirable (rejected) example each.

The loss is `rlhfkit.losses.kto`. Its reference point z0 is a batch estimate of
KL(policy || reference) from mismatched pairs: every example i is given, once at encoding time,
the completion of another example j (a fixed, seeded pairing among rows whose prompts have the
same form, string or messages), so (prompt_i, completion_j) is a response the policy was not
conditioned to write. Fixing the pairing up front lets `precompute_ref_log_probs` cache the
reference log-probs of the mismatched pairs too. The policy scores them without gradient (z0 is
detached), in a forward pass of its own.

Metrics (train batches, and with an `eval/` prefix on held-out examples): `loss`,
`rewards/chosen` / `rewards/rejected` (mean implicit reward beta * rho of desirable / undesirable
examples), `rewards/margins` (their difference), `logps/chosen` / `logps/rejected` (mean policy
log-prob per class), `kl` (z0); `eval/gold_reward` on a built-in `task`. On training batches the
class means are taken per micro-batch and averaged over the micro-batches of a step (a
micro-batch without one class counts 0 for it); evaluation means are exact.
"""

from __future__ import annotations

import random
from functools import partial

import torch

from rlhfkit.config import KTOConfig
from rlhfkit.data.encode import encode_responses
from rlhfkit.losses.kto import kl_reference_point, kto_loss
from rlhfkit.train.common import load_split, row_texts, setup_model
from rlhfkit.train.loop import Result, start_run
from rlhfkit.train.preference import (
    Item,
    Reference,
    collate_columns,
    evaluate_batches,
    prepare_reference,
    resolve_padding_free,
    run_preference,
    sequence_logps,
)
from rlhfkit.train.tracking import progress

COMPLETION, MISMATCHED = 0, 1
BALANCE_RANGE = (2 / 3, 3 / 2)
"""Warn when w_D n_D / (w_U n_U) falls outside this range (the KTO paper recommends [1, 4/3])."""


def unpaired_examples(rows: list[dict]) -> list[dict]:
    """Canonical unpaired or preference rows -> `{prompt, completion, label, _source}` examples
    (a preference row gives its chosen as desirable and its rejected as undesirable)."""
    out = []
    for row in rows:
        if "chosen" in row:
            out.append({"prompt": row["prompt"], "completion": row["chosen"], "label": True, "_source": row.get("_source")})
            out.append({"prompt": row["prompt"], "completion": row["rejected"], "label": False,
                        "_source": row.get("_source")})
        else:
            out.append({"prompt": row["prompt"], "completion": row["completion"], "label": bool(row["label"]),
                        "_source": row.get("_source")})
    return out


def mismatched_partners(examples: list[dict], seed: int) -> list[int]:
    """For each example i an index j != i (when possible) whose completion is paired with prompt i
    for the KL estimate: a seeded shuffle of the examples with the same prompt form, each taking
    the completion of the next one in that order."""
    partner = list(range(len(examples)))
    groups: dict[bool, list[int]] = {}
    for i, ex in enumerate(examples):
        groups.setdefault(isinstance(ex["prompt"], str), []).append(i)
    rng = random.Random(seed)
    for idx in groups.values():
        order = list(idx)
        rng.shuffle(order)
        for a, b in zip(order, order[1:] + order[:1]):
            partner[a] = b
    return partner


def encode_unpaired(tokenizer, config: KTOConfig, examples: list[dict], seed: int, *, desc: str,
                    quiet) -> tuple[list[Item], int]:
    """Items [completion, mismatched completion] with labels; examples that do not fit are
    skipped and counted."""
    partner = mismatched_partners(examples, seed)
    items, skipped = [], 0
    for i, ex in enumerate(progress(examples, disable=quiet, desc=desc)):
        seqs = encode_responses(tokenizer, ex["prompt"], [ex["completion"], examples[partner[i]]["completion"]],
                                config.max_length, config.max_prompt_length, ex.get("_source"))
        if seqs is None:
            skipped += 1
        else:
            items.append(Item(seqs, index=len(items), label=ex["label"]))
    return items, skipped


def class_balance(items: list[Item], config: KTOConfig) -> dict:
    """Counts per class and the weighted ratio w_D n_D / (w_U n_U)."""
    n_d = sum(1 for it in items if it.label)
    n_u = len(items) - n_d
    ratio = (config.desirable_weight * n_d) / (config.undesirable_weight * n_u) if n_u else float("inf")
    return {"desirable_examples": n_d, "undesirable_examples": n_u, "weighted_balance": ratio}


def make_kto_batch(pad_id: int, items: list[Item], ref_cache: torch.Tensor | None, side: str = "right") -> dict:
    """Rows [0, B): the completions, rows [B, 2B): the mismatched completions; `labels` (B,)."""
    return collate_columns(items, [COMPLETION, MISMATCHED], pad_id, side=side, ref_cache=ref_cache)


def take_rows(batch: dict, start: int, stop: int) -> dict:
    """Rows [start, stop) of a batch's per-row tensors (ids, masks, cached reference log-probs)."""
    keys = ("input_ids", "attention_mask", "response_mask", "ref_logps")
    return {k: batch[k][start:stop] for k in keys if k in batch}


def kto_outputs(config: KTOConfig, reference: Reference, model, batch: dict):
    """Per-example KTO losses, rewards, policy log-probs and z0 of one batch."""
    b, pf = batch["n_items"], config.padding_free
    # 1. policy log-probs of the completions (with gradient)
    logps, _ = sequence_logps(model, take_rows(batch, 0, b), pf)
    # 2. policy log-probs of the mismatched pairs without gradient (z0 is detached); the reference
    #    scores completions and mismatched pairs in one forward pass
    with torch.no_grad():
        kl_logps, _ = sequence_logps(model, take_rows(batch, b, 2 * b), pf)
    ref = reference.logps(batch)
    z0 = kl_reference_point(kl_logps, ref[b:])
    # 3. the loss against the reference log-probs of the completions
    out = kto_loss(logps, ref[:b], batch["labels"], z0, beta=config.beta,
                   desirable_weight=config.desirable_weight, undesirable_weight=config.undesirable_weight)
    return out, logps.detach(), z0


def class_sums(out, logps, labels, z0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{metric: (sum, count)}: per-class rewards and log-probs, loss, z0."""
    d, u = labels, ~labels
    n = torch.tensor(float(labels.numel()))
    return {
        "loss": (out.losses.sum(), n),
        "rewards/chosen": (out.rewards[d].sum(), d.sum()),
        "rewards/rejected": (out.rewards[u].sum(), u.sum()),
        "logps/chosen": (logps[d].sum(), d.sum()),
        "logps/rejected": (logps[u].sum(), u.sum()),
        "kl": (z0 * n, n),
    }


def kto_loss_fn(config: KTOConfig, reference: Reference, model, batch: dict):
    """(sum of per-example losses, metric sums) for `fit` (which divides by the example count):
    each class mean is scaled by the micro-batch size so that the division returns it."""
    out, logps, z0 = kto_outputs(config, reference, model, batch)
    sums = class_sums(out, logps, batch["labels"], z0)
    n = batch["n_items"]
    metrics = {k: s / max(float(c), 1.0) * n for k, (s, c) in sums.items() if k != "loss"}
    metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return out.losses.sum(), metrics


def train_kto(config: KTOConfig) -> Result:
    # 1. validate every row before loading anything heavy; pairs -> desirable + undesirable
    train_rows, eval_rows = load_split(config, ("unpaired", "preference"))
    train_examples, eval_examples = unpaired_examples(train_rows), unpaired_examples(eval_rows)
    run = start_run(config, "kto")
    # 2. policy and tokenizer (LoRA applied when asked)
    model, tokenizer = setup_model(run, lambda: row_texts(train_rows))
    pad = tokenizer.pad_token_id
    # 3. encode each example with a mismatched completion for the KL estimate
    train, skipped_train = encode_unpaired(tokenizer, config, train_examples, config.seed, desc="tokenize train",
                                           quiet=run.quiet)
    evaluation, skipped_eval = encode_unpaired(tokenizer, config, eval_examples, config.seed,
                                               desc="tokenize eval", quiet=run.quiet)
    balance = class_balance(train, config)
    run.print(f"[kto] {balance['desirable_examples']} desirable, {balance['undesirable_examples']} undesirable "
              f"training examples; weighted balance w_D n_D / (w_U n_U) = {balance['weighted_balance']:.3f}")
    lo, hi = BALANCE_RANGE
    if not lo <= balance["weighted_balance"] <= hi:
        n_d, n_u = balance["desirable_examples"], balance["undesirable_examples"]
        hint = (f"; desirable_weight={config.undesirable_weight * n_u / n_d:.3f} would make it 1:1"
                if n_d and n_u else "; KTO needs examples of both classes")
        run.print(f"[kto] WARNING: the weighted class balance {balance['weighted_balance']:.3f} is far from 1:1 "
                  f"(KTO's paper recommends [1, 4/3]): one class dominates the loss{hint}")
    # 4. packed forward passes unless this model cannot take them; the reference: adapters disabled
    #    (LoRA), a frozen copy / ref_model, or precomputed
    resolve_padding_free(run, model, train, pad)
    reference = prepare_reference(run, model, tokenizer, needed=True, splits={"train": train, "eval": evaluation})
    loss_fn = partial(kto_loss_fn, config, reference)

    def eval_sums(m, batch) -> dict:
        out, logps, z0 = kto_outputs(config, reference, m, batch)
        return class_sums(out, logps, batch["labels"], z0)

    def evaluate_items(m, items, cache) -> dict:
        metrics = evaluate_batches(run, m, items, cache, partial(make_kto_batch, pad), eval_sums)
        metrics["rewards/margins"] = metrics.get("rewards/chosen", 0.0) - metrics.get("rewards/rejected", 0.0)
        return metrics

    # 5. train, evaluate, save
    return run_preference(run, model, tokenizer, train=train, evaluation=evaluation,
                          make_batch=partial(make_kto_batch, pad), loss_fn=loss_fn,
                          evaluate_items=evaluate_items, reference=reference,
                          skipped={"train": skipped_train, "eval": skipped_eval},
                          extra_summary={"beta": config.beta, "padding_free": config.padding_free, **balance})
