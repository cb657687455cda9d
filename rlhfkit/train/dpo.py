"""`rlhfkit dpo`: direct preference optimisation from preference pairs, no reward model and no
sampling. The loss family (sigmoid/cDPO, robust, hinge, IPO, SimPO, ORPO, combinations, RPO's
NLL term) is in `rlhfkit.losses.dpo`; the shared preference machinery (one concatenated forward
pass for chosen + rejected, reference log-probs, evaluation) in `rlhfkit.train.preference`.

Metrics (train batches, and with an `eval/` prefix on held-out pairs every `eval_steps` and at the
end): `loss`, `rewards/chosen`, `rewards/rejected`, `rewards/margins`, `rewards/accuracies`
(share of pairs with reward_c > reward_r), `logps/chosen`, `logps/rejected` (policy, summed over
response tokens); `eval/gold_reward` of sampled responses on a built-in `task`.
"""

from __future__ import annotations

from functools import partial

import torch

from rlhfkit.config import DPOConfig
from rlhfkit.data.encode import encode_responses
from rlhfkit.losses.dpo import PairLogps, PairLoss, combined_loss, needs_reference
from rlhfkit.train.common import encode_all, load_split, row_texts, setup_model
from rlhfkit.train.loop import Result, start_run
from rlhfkit.train.preference import (
    Item,
    Reference,
    collate_columns,
    evaluate_batches,
    pair_metric_sums,
    prepare_reference,
    resolve_padding_free,
    run_preference,
    sequence_logps,
)

CHOSEN, REJECTED = 0, 1


def encode_pair(tokenizer, max_length: int, max_prompt_length: int | None, row: dict) -> Item | None:
    """A preference row -> Item([chosen, rejected]); None when either response keeps no token."""
    seqs = encode_responses(tokenizer, row["prompt"], [row["chosen"], row["rejected"]], max_length,
                            max_prompt_length, row.get("_source"))
    return None if seqs is None else Item(seqs, index=-1)


def make_pair_batch(pad_id: int, items: list[Item], ref_cache: torch.Tensor | None, side: str = "right") -> dict:
    """Chosen rows [0, B) then rejected rows [B, 2B): one forward pass scores both."""
    return collate_columns(items, [CHOSEN, REJECTED], pad_id, side=side, ref_cache=ref_cache)


def pair_logps(model, batch: dict, reference: Reference, padding_free: bool = False) -> PairLogps:
    """Policy (one concatenated forward) and reference sequence log-probs of a pair batch."""
    b = batch["n_items"]
    logps, n_tokens = sequence_logps(model, batch, padding_free)
    ref = reference.logps(batch)
    return PairLogps(logps[:b], logps[b:], ref[:b], ref[b:], n_tokens[:b], n_tokens[b:])


def dpo_pair_loss(config: DPOConfig, reference: Reference, model, batch: dict) -> tuple[PairLogps, PairLoss]:
    """The pairs' log-probs and the config's (combined) loss: per-pair losses and implicit rewards."""
    p = pair_logps(model, batch, reference, config.padding_free)
    return p, combined_loss(p, config.loss_types, config.loss_weights, sft_weight=config.sft_weight,
                            beta=config.beta, label_smoothing=config.label_smoothing,
                            simpo_gamma=config.simpo_gamma, orpo_lambda=config.orpo_lambda)


def dpo_loss_fn(config: DPOConfig, reference: Reference, model, batch: dict):
    """(sum of per-pair losses, metric sums) for `fit`, which divides by the global pair count."""
    p, out = dpo_pair_loss(config, reference, model, batch)
    return out.losses.sum(), pair_metric_sums(out.chosen_rewards, out.rejected_rewards, p.chosen, p.rejected)


def train_dpo(config: DPOConfig) -> Result:
    # 1. validate every row before loading anything heavy
    train_rows, eval_rows = load_split(config, ("preference",))
    run = start_run(config, "dpo")
    # 2. policy and tokenizer (LoRA applied when asked)
    model, tokenizer = setup_model(run, lambda: row_texts(train_rows))
    pad = tokenizer.pad_token_id
    # 3. encode pairs: keep the end of the prompt and the start of each response; rows that do
    #    not fit are skipped and counted
    encode = partial(encode_pair, tokenizer, config.max_length, config.max_prompt_length)
    train, skipped_train = encode_all(train_rows, encode, desc="tokenize train", quiet=run.quiet)
    evaluation, skipped_eval = encode_all(eval_rows, encode, desc="tokenize eval", quiet=run.quiet)
    for items in (train, evaluation):
        for i, item in enumerate(items):
            item.index = i
    # 4. packed forward passes unless this model cannot take them; the reference: none, adapters
    #    disabled (LoRA), a frozen copy / ref_model, or precomputed
    resolve_padding_free(run, model, train, pad)
    reference = prepare_reference(run, model, tokenizer, needed=needs_reference(config.loss_types, config.reference_free),
                                  splits={"train": train, "eval": evaluation})
    loss_fn = partial(dpo_loss_fn, config, reference)

    def eval_sums(m, batch) -> dict:
        loss_sum, sums = loss_fn(m, batch)
        n = batch["n_items"]
        return {"loss": (loss_sum, n), **{k: (v, n) for k, v in sums.items()}}

    def evaluate_items(m, items, cache) -> dict:
        return evaluate_batches(run, m, items, cache, partial(make_pair_batch, pad), eval_sums)

    # 5. train, evaluate, save
    return run_preference(run, model, tokenizer, train=train, evaluation=evaluation,
                          make_batch=partial(make_pair_batch, pad), loss_fn=loss_fn,
                          evaluate_items=evaluate_items, reference=reference,
                          skipped={"train": skipped_train, "eval": skipped_eval},
                          extra_summary={"loss_type": config.loss_types, "beta": config.beta,
                                         "padding_free": config.padding_free})
