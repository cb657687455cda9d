"""`rlhfkit kto`: KTO from unpaired (prompt, completion, label) data; preference pairs are also
accepted and become one desirable (chosen) and one undesirable (rejected) example each.

The loss is `rlhfkit.losses.kto`. Its reference point z0 is a batch estimate of
KL(policy || reference) from mismatched pairs: every example i is given, once at encoding time,
the completion of another example j (a fixed, seeded pairing among rows whose prompts have the
same form, string or messages), so (prompt_i, completion_j) is a response the policy was not
conditioned to write. Fixing the pairing up front lets `precompute_ref_log_probs` cache the
reference log-probs of the mismatched pairs too.

z0 is taken over the GLOBAL batch: the mean log-ratio of the mismatched pairs of every
micro-batch of the optimizer step on every process (detached, clamped at 0), so batch 8 x
accumulation 1, batch 1 x accumulation 8 and 2 processes x batch 4 give the same z0, losses and
updates. `fit` runs `prepare_kto_batches` as its `prepare_step`: a no-grad pre-pass over the
step's micro-batches (policy on the mismatched pairs, reference on both columns), the sums
reduced across processes, before any backward pass; the loss passes then run the policy on the
completions only. Evaluation takes z0 over the whole evaluation set the same way.

Metrics (train batches, and with an `eval/` prefix on held-out examples): `loss`,
`rewards/chosen` / `rewards/rejected` (mean implicit reward beta * rho of desirable / undesirable
examples), `rewards/margins` (their difference), `logps/chosen` / `logps/rejected` (mean policy
log-prob per class), `kl` (z0); `eval/gold_reward` on a built-in `task`. Class means are exact
over the global batch (a class absent from it counts 0) and over the evaluation set.
"""

from __future__ import annotations

import random
from functools import partial

import torch

from rlhfkit.config import KTOConfig
from rlhfkit.data.encode import encode_responses
from rlhfkit.losses.kto import kto_loss, reference_point_from_sums
from rlhfkit.train.common import load_split, row_texts, setup_model
from rlhfkit.train.loop import Result, Run, start_run
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


def mismatched_log_ratios(config: KTOConfig, reference: Reference, model,
                          batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """No gradient: (B,) policy - reference log-probs of the mismatched pairs (for z0) and (B,)
    reference log-probs of the completions. The reference scores both columns in one pass (an
    item's two sequences share their prompt there)."""
    b = batch["n_items"]
    with torch.no_grad():
        kl_logps, _ = sequence_logps(model, take_rows(batch, b, 2 * b), config.padding_free)
        ref = reference.logps(batch)
    return kl_logps - ref[b:], ref[:b]


def prepare_kto_batches(run: Run, config: KTOConfig, reference: Reference, model,
                        batches: list[dict]) -> list[dict]:
    """The pre-pass over a GLOBAL batch (fit's `prepare_step`: every micro-batch of an optimizer
    step on every process; in evaluation every evaluation batch on every process): z0 is the mean
    log-ratio of ALL its mismatched pairs, so it does not depend on how the global batch is split
    into micro-batches and processes. Also counts the global desirable / undesirable examples (for
    exact class means) and keeps each batch's reference log-probs of the completions (the loss
    pass then runs the policy alone).

    Returns per batch `{"z0": scalar, "ref_completion_logps": (B,), "global_counts": (N, N_D, N_U)}`."""
    extras, local = [], torch.zeros(4, dtype=torch.float64)  # log-ratio sum, examples, desirable, undesirable
    for batch in batches:
        ratios, ref_completions = mismatched_log_ratios(config, reference, model, batch)
        labels = batch["labels"]
        local += torch.tensor([ratios.double().sum().item(), labels.numel(), labels.sum().item(),
                               (~labels).sum().item()], dtype=torch.float64)
        extras.append({"ref_completion_logps": ref_completions})
    totals = run.reduce_sum(local)
    z0 = reference_point_from_sums(totals[0], totals[1]).float()
    counts = tuple(totals[1:].tolist())
    return [{**e, "z0": z0, "global_counts": counts} for e in extras]


def kto_outputs(config: KTOConfig, model, batch: dict):
    """Per-example KTO losses, rewards and policy log-probs of one batch, given the z0 and the
    reference log-probs of `prepare_kto_batches` in the batch."""
    b = batch["n_items"]
    # 1. policy log-probs of the completions (with gradient)
    logps, _ = sequence_logps(model, take_rows(batch, 0, b), config.padding_free)
    # 2. the loss against the reference log-probs of the completions and the global z0
    out = kto_loss(logps, batch["ref_completion_logps"], batch["labels"], batch["z0"], beta=config.beta,
                   desirable_weight=config.desirable_weight, undesirable_weight=config.undesirable_weight)
    return out, logps.detach()


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


def kto_loss_fn(config: KTOConfig, model, batch: dict):
    """(sum of per-example losses, metric sums) for `fit`, which divides by the global example
    count N: each class sum is scaled by N / (that class's count in the global batch), so that the
    division returns the exact class mean over the global batch."""
    out, logps = kto_outputs(config, model, batch)
    sums = class_sums(out, logps, batch["labels"], batch["z0"])
    n, n_desirable, n_undesirable = batch["global_counts"]
    class_count = {"chosen": n_desirable, "rejected": n_undesirable}
    metrics = {k: s * (n / max(class_count.get(k.rsplit("/", 1)[-1], n), 1.0))
               for k, (s, _) in sums.items() if k != "loss"}
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
    # z0 over the global batch: a no-grad pre-pass over each step's micro-batches (and over the
    # whole evaluation set when evaluating), then the loss passes
    prepare = partial(prepare_kto_batches, run, config, reference)

    def eval_sums(m, batch) -> dict:
        out, logps = kto_outputs(config, m, batch)
        return class_sums(out, logps, batch["labels"], batch["z0"])

    def evaluate_items(m, items, cache) -> dict:
        metrics = evaluate_batches(run, m, items, cache, partial(make_kto_batch, pad), eval_sums,
                                   prepare=prepare)
        metrics["rewards/margins"] = metrics.get("rewards/chosen", 0.0) - metrics.get("rewards/rejected", 0.0)
        return metrics

    # 5. train, evaluate, save
    return run_preference(run, model, tokenizer, train=train, evaluation=evaluation,
                          make_batch=partial(make_kto_batch, pad), loss_fn=partial(kto_loss_fn, config),
                          prepare_step=prepare, evaluate_items=evaluate_items, reference=reference,
                          skipped={"train": skipped_train, "eval": skipped_eval},
                          extra_summary={"beta": config.beta, "padding_free": config.padding_free, **balance})
