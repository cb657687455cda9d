"""Causal-LM training shared by `pt` and `sft`: the masked next-token loss, its evaluation, and
the run from encoded examples to a saved model. The two stages differ only in how they encode
data (which tokens count), so this is one function, not two copies."""

from __future__ import annotations

import math

import torch

from rlhfkit.data.collate import collate_encoded
from rlhfkit.data.encode import Encoded
from rlhfkit.losses.nll import nll_sum
from rlhfkit.models.logprobs import response_token_logps
from rlhfkit.train.common import config_task, gold_eval, save_final, shard, skipped_note, to_device
from rlhfkit.train.loop import BatchStream, Result, Run, describe_batches, fit, total_steps
from rlhfkit.train.tracking import progress, write_summary


def lm_loss(model, batch: dict) -> tuple[torch.Tensor, dict]:
    """Summed next-token NLL over target tokens (`response_mask[:, 1:]`); the LM head only runs at
    the positions that predict one (an SFT prompt costs no head)."""
    logps, mask = response_token_logps(model, batch)
    loss_sum, _ = nll_sum(logps, mask)
    return loss_sum, {}


def target_tokens(batch: dict) -> float:
    return batch["response_mask"][:, 1:].sum().item()


@torch.no_grad()
def lm_eval(run: Run, model, examples: list[Encoded], pad_id: int) -> dict:
    """Token-mean NLL (`loss`) and perplexity over `examples`, summed across processes."""
    mine = shard(examples, run)
    bs = run.config.per_device_eval_batch_size
    total, count = 0.0, 0.0
    for i in progress(range(0, len(mine), bs), disable=run.quiet, desc="eval", leave=False):
        batch = to_device(collate_encoded(mine[i:i + bs], pad_id), run.device)
        loss_sum, _ = lm_loss(model, batch)
        total += loss_sum.item()
        count += target_tokens(batch)
    total, count = run.reduce_sum([total, count]).tolist()
    loss = total / max(count, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50))}


def run_causal_lm(run: Run, model, tokenizer, train: list[Encoded], evaluation: list[Encoded],
                  skipped: dict[str, int]) -> Result:
    """Train on encoded examples, evaluate, save the model and write summary.json."""
    c = run.config
    pad = tokenizer.pad_token_id
    stream = BatchStream(len(train), c.per_device_train_batch_size, run.world_size, run.rank, c.seed)
    steps = total_steps(c, stream.per_epoch)
    describe_batches(run, len(train), steps, stream.per_epoch)
    skipped_note(run, skipped, "example(s) that leave no response token")
    task = config_task(c.task)

    def evaluate(m) -> dict:
        metrics = lm_eval(run, m, evaluation, pad) if evaluation else {}
        return {**metrics, **gold_eval(run, m, tokenizer, task)}

    has_eval = bool(evaluation) or task is not None
    model, history = fit(
        run, model, stream=stream,
        make_batch=lambda idx: to_device(collate_encoded([train[i] for i in idx], pad), run.device),
        batch_weight=target_tokens, loss_fn=lm_loss, steps=steps,
        evaluate=evaluate if has_eval else None,
    )
    save_final(run, model, tokenizer)
    final = history[-1] if history else {}
    summary = {"stage": run.stage, **run.engine.summary(), "steps": steps, "train_examples": len(train),
               "eval_examples": len(evaluation),
               **{f"skipped_{k}": v for k, v in skipped.items()},
               **{k: v for k, v in final.items() if k != "step"}}
    if run.is_main:
        write_summary(run.output_dir, summary)
        run.logger.plot(keys=[k for k in ("eval/gold_reward", "eval/eos_rate") if k in final])
        run.logger.close()
    return Result(run.output_dir, summary, model, tokenizer, history)
