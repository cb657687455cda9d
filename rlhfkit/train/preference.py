"""Machinery shared by the offline preference stages (dpo, kto): items of several sequences scored
in one forward pass, sequence log-probs, the reference model (or its cached log-probs), the
evaluation + gold-reward hook, the falling-chosen diagnostic and the run from items to a saved
model. The losses themselves live in `rlhfkit.losses` (dpo.py, kto.py).

An `Item` is one training example made of K token sequences that share a prompt: DPO's
(chosen, rejected), KTO's (completion, mismatched completion for the KL estimate). A batch of B
items is laid out column-major: rows [0, B) are every item's sequence 0, rows [B, 2B) sequence 1,
and so on, so `logps[:B]` / `logps[B:]` are the chosen / rejected log-probs of the B pairs.

Truncation (see `rlhfkit.data.encode.truncate_prompt_response`): each sequence is prompt +
response (+ EOS); the prompt keeps its last `max_prompt_length` tokens, then the response keeps
its first `max_length - prompt tokens` tokens. A row any of whose responses keeps no token is
skipped and counted (`skipped_train` / `skipped_eval` in summary.json).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from rlhfkit.data.collate import pad_batch
from rlhfkit.data.encode import Encoded
from rlhfkit.errors import ConfigError
from rlhfkit.losses.masked import masked_sum
from rlhfkit.models.logprobs import padding_free_matches, response_token_logps
from rlhfkit.train.diagnostics import DIAGNOSTICS, Monitor, falling_chosen  # noqa: F401 (falling_chosen: API)
from rlhfkit.train.common import config_task, gold_eval, keep_padding_free, save_final, shard, skipped_note, to_device
from rlhfkit.train.loop import BatchStream, PrepareStep, Result, Run, describe_batches, fit, total_steps
from rlhfkit.train.tracking import progress, write_summary

log = logging.getLogger("rlhfkit")

REF_CACHE = "ref_logps.pt"
"""File in output_dir holding precomputed reference log-probs (with a fingerprint of the data)."""


@dataclass
class Item:
    """One example: K sequences sharing a prompt, its position in its split (for cached reference
    log-probs) and, for KTO, whether the completion is desirable."""

    sequences: list[Encoded]
    index: int
    label: bool | None = None


# ---- batches and log-probs ---------------------------------------------------------------------

def collate_columns(items: list[Item], columns: list[int], pad_id: int, *, side: str = "right",
                    ref_cache: torch.Tensor | None = None) -> dict:
    """Pad the sequences `columns` of `items` into one (len(columns) * B, T) batch, column-major.

    Adds `n_items` (B), `labels` ((B,) bool, when items carry them), with several columns
    `prefix_groups` (each row's item: an item's sequences share their prompt, which a padding-free
    pass then computes once) and, with `ref_cache` ((n, K) reference log-probs of the whole split),
    `ref_logps` ((len(columns) * B,) in the same order)."""
    seqs = [item.sequences[c] for c in columns for item in items]
    batch = pad_batch([s.input_ids for s in seqs], pad_id, side, [s.response_mask for s in seqs])
    batch["n_items"] = len(items)
    if len(columns) > 1:
        batch["prefix_groups"] = [i for _ in columns for i in range(len(items))]
    if items[0].label is not None:
        batch["labels"] = torch.tensor([bool(item.label) for item in items])
    if ref_cache is not None:
        idx = torch.tensor([item.index for item in items])
        batch["ref_logps"] = ref_cache[idx][:, columns].T.reshape(-1)
    return batch


def sequence_logps(model, batch: dict, padding_free: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) log-probs of each row's response, summed over response tokens, and (N,) response token
    counts (float). One forward pass over the whole batch (packed with `padding_free`)."""
    token_logps, mask = response_token_logps(model, batch, padding_free=padding_free)
    return masked_sum(token_logps, mask, dim=-1), mask.sum(-1).float()


# ---- the reference model -----------------------------------------------------------------------

@dataclass
class Reference:
    """Where reference log-probs come from.

    kind: `none` (reference-free losses: zeros), `adapters_disabled` (LoRA: the policy's base
    with its adapters switched off, no second copy), `model` (a frozen model: a copy of the
    initial policy, or `ref_model`), `precomputed` (computed once before training; `cache` holds
    (n, K) log-probs per split and batches carry them as `ref_logps`)."""

    kind: str
    model: object = None
    cache: dict[str, torch.Tensor] | None = None
    padding_free: bool = False

    @torch.no_grad()
    def logps(self, batch: dict) -> torch.Tensor:
        """(N,) reference sequence log-probs of `batch` (rows as in `sequence_logps`)."""
        if self.kind == "precomputed":
            return batch["ref_logps"].to(batch["input_ids"].device)
        if self.kind == "none":
            return torch.zeros(batch["input_ids"].shape[0], device=batch["input_ids"].device)
        context = self.model.disable_adapter() if self.kind == "adapters_disabled" else nullcontext()
        with context:
            return sequence_logps(self.model, batch, self.padding_free)[0]

    def split_cache(self, split: str) -> torch.Tensor | None:
        return self.cache.get(split) if self.cache else None


def prepare_reference(run: Run, policy, tokenizer, *, needed: bool, splits: dict[str, list[Item]]) -> Reference:
    """The reference for a run, set up before any training step.

    - not `needed` (reference-free losses): none;
    - LoRA without `ref_model`: the policy's base with adapters disabled;
    - full fine-tuning without `ref_model`: a frozen deep copy of the initial policy;
    - `ref_model`: that model, loaded frozen (it must share the policy's vocabulary);
    - `precompute_ref_log_probs`: any of the above is used once to fill the cache (the initial
      policy itself serves as the reference there, no copy), then dropped.
    """
    c = run.config
    if not needed:
        return Reference("none")
    pf = c.padding_free
    if c.ref_model is None or c.ref_model == c.model_name_or_path:
        if c.finetuning_type == "lora":
            reference = Reference("adapters_disabled", policy, padding_free=pf)
        elif c.precompute_ref_log_probs:
            reference = Reference("model", policy, padding_free=pf)  # still the initial weights: no copy needed
        else:
            ref = copy.deepcopy(policy).eval()
            ref.requires_grad_(False)
            reference = Reference("model", ref, padding_free=pf)
    else:
        reference = load_reference(c.ref_model, tokenizer, policy, device=run.device,
                                   trust_remote_code=c.trust_remote_code, padding_free=pf)
    if c.precompute_ref_log_probs:
        was_training = policy.training
        policy.eval()
        cache = precompute_reference(run, reference, splits, tokenizer.pad_token_id)
        policy.train(was_training)
        return Reference("precomputed", cache=cache)
    return reference


def load_reference(name: str, tokenizer, policy, *, device, trust_remote_code: bool = False,
                   gguf_file: str | None = None, padding_free: bool = False) -> Reference:
    """A frozen reference model loaded from `name` (path, hub id, .gguf) on `device`; a ConfigError
    when its vocabulary differs from the policy's (log-ratios need one tokenizer)."""
    from rlhfkit.models.load import load_causal_lm

    ref = load_causal_lm(name, tokenizer, gguf_file=gguf_file, trust_remote_code=trust_remote_code).to(device)
    n_ref, n_policy = ref.get_input_embeddings().num_embeddings, policy.get_input_embeddings().num_embeddings
    if n_ref != n_policy:
        raise ConfigError(f"ref_model {name} has a vocabulary of {n_ref} tokens and the policy "
                          f"{n_policy}: they must share a tokenizer")
    ref.eval()
    ref.requires_grad_(False)
    return Reference("model", ref, padding_free=padding_free)


def packed_pass_matches(model, items: list[Item], pad_id: int, device, n: int = 4) -> bool:
    """Whether the packed forward (a row's sequences sharing their prompt) gives the padded one's
    log-probs on the first `n` items (False for a model whose attention ignores packed position
    ids or the shared-prompt mask)."""
    sample = items[:n]
    batch = to_device(collate_columns(sample, list(range(len(sample[0].sequences))), pad_id), device)
    return padding_free_matches(model, batch["input_ids"], batch["attention_mask"], batch.get("prefix_groups"))


def resolve_padding_free(run: Run, model, items: list[Item], pad_id: int, n: int = 4) -> bool:
    """`padding_free` as asked, unless the packed forward disagrees with the padded one on the first
    `n` training items (`packed_pass_matches`): then a warning, and padding for the whole run
    (`run.config.padding_free` is set to False)."""
    if not items:
        return False
    return keep_padding_free(run, lambda: packed_pass_matches(model, items, pad_id, run.device, n))


def _fingerprint(run: Run, splits: dict[str, list[Item]]) -> str:
    c = run.config
    h = hashlib.sha256(json.dumps([c.ref_model or c.model_name_or_path, c.finetuning_type, c.bf16,
                                   c.max_length, c.max_prompt_length]).encode())
    for name, items in splits.items():
        h.update(name.encode())
        for item in items:
            for s in item.sequences:
                h.update(json.dumps([s.input_ids, s.response_mask]).encode())
    return h.hexdigest()


def precompute_reference(run: Run, reference: Reference, splits: dict[str, list[Item]],
                         pad_id: int) -> dict[str, torch.Tensor]:
    """Reference log-probs of every sequence of every item, (n, K) per split, computed once in
    batches of `per_device_eval_batch_size` and cached in `output_dir/ref_logps.pt` with a
    fingerprint of the data and the reference; a later run on the same data (e.g. a resumed one)
    loads the cache instead of recomputing."""
    path = run.output_dir / REF_CACHE
    fingerprint = _fingerprint(run, splits)
    if path.exists():
        cached = torch.load(path, weights_only=True)
        if cached.get("fingerprint") == fingerprint:
            run.print(f"[{run.stage}] reusing cached reference log-probs from {path}")
            return {k: v for k, v in cached.items() if k != "fingerprint"}
        run.print(f"[{run.stage}] {path} was computed for other data or another reference: recomputing")
    out: dict[str, torch.Tensor] = {}
    if run.is_main:
        bs = run.config.per_device_eval_batch_size
        for name, items in splits.items():
            if not items:
                continue
            k = len(items[0].sequences)
            values = torch.empty(len(items), k)
            for i in progress(range(0, len(items), bs), disable=run.quiet, desc=f"reference log-probs ({name})"):
                chunk = items[i:i + bs]
                batch = to_device(collate_columns(chunk, list(range(k)), pad_id), run.device)
                with run.accelerator.autocast():
                    logps = reference.logps(batch).float().cpu()
                values[i:i + len(chunk)] = logps.reshape(k, len(chunk)).T
            out[name] = values
        tmp = path.with_suffix(".tmp")
        torch.save({"fingerprint": fingerprint, **out}, tmp)
        os.replace(tmp, path)
    run.accelerator.wait_for_everyone()
    if not run.is_main:
        out = {k: v for k, v in torch.load(path, weights_only=True).items() if k != "fingerprint"}
    return out


# ---- metrics and diagnostics -------------------------------------------------------------------

def pair_metric_sums(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps) -> dict[str, torch.Tensor]:
    """Sums over pairs (divided by the pair count by the caller): implicit rewards, margins,
    accuracy (reward_c > reward_r) and policy log-probs of chosen / rejected."""
    return {
        "rewards/chosen": chosen_rewards.sum(),
        "rewards/rejected": rejected_rewards.sum(),
        "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),
        "logps/chosen": chosen_logps.detach().sum(),
        "logps/rejected": rejected_logps.detach().sum(),
    }


FALLING_CHOSEN_EXPLANATION = DIAGNOSTICS["falling_chosen_logps"].explanation


# ---- the run -----------------------------------------------------------------------------------

StepFn = Callable[[object, dict], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def run_preference(run: Run, model, tokenizer, *, train: list[Item], evaluation: list[Item],
                   make_batch: Callable[[list[Item], torch.Tensor | None], dict],
                   loss_fn: StepFn, evaluate_items: Callable[[object, list[Item], torch.Tensor | None], dict],
                   reference: Reference, skipped: dict[str, int], extra_summary: dict | None = None,
                   prepare_step: PrepareStep | None = None) -> Result:
    """Train on items with `fit`, evaluate (`evaluate_items` + gold reward on built-in tasks)
    every `eval_steps` and at the end, save the model and write summary.json.

    `make_batch(items, ref_cache)` builds a (CPU) batch; `loss_fn(model, batch)` returns sums
    over the batch's items (fit divides by the item count of the global batch); `prepare_step`
    is fit's no-grad pre-pass over a step's micro-batches (KTO: z0 of the global batch)."""
    c = run.config
    train_cache, eval_cache = reference.split_cache("train"), reference.split_cache("eval")

    # 1. batches, steps
    stream = BatchStream(len(train), c.per_device_train_batch_size, run.world_size, run.rank, c.seed)
    steps = total_steps(c, stream.per_epoch)
    describe_batches(run, len(train), steps, stream.per_epoch)
    skipped_note(run, skipped, f"row(s) whose responses keep no token (max_prompt_length={c.max_prompt_length})")

    # 2. evaluation: preference metrics on held-out items + gold reward of samples on a task
    task = config_task(c.task)

    def evaluate(m) -> dict:
        metrics = evaluate_items(m, evaluation, eval_cache) if evaluation else {}
        return {**metrics, **gold_eval(run, m, tokenizer, task)}

    # 3. diagnostics of known failure modes (the shared registry), checked at every log
    monitor = Monitor(run.print, run.stage, beta=c.beta, reference=reference.kind)

    def on_log(step: int, record: dict) -> None:
        fired = set(monitor.fired)
        flags = monitor.step(step, record)
        for name in set(monitor.fired) - fired:
            log.warning("%s at step %d", name, step)
            run.logger.log(step, {f"diag/{name}": flags[f"diag/{name}"]})

    # 4. optimise
    has_eval = bool(evaluation) or task is not None
    model, history = fit(
        run, model, stream=stream,
        make_batch=lambda idx: to_device(make_batch([train[i] for i in idx], train_cache), run.device),
        batch_weight=lambda b: float(b["n_items"]), loss_fn=loss_fn, steps=steps,
        evaluate=evaluate if has_eval else None, on_log=on_log, prepare_step=prepare_step,
    )

    # 5. save, summarise
    save_final(run, model, tokenizer)
    final: dict = {}
    for record in history:  # the last value of every metric (the final eval included)
        final.update({k: v for k, v in record.items() if k != "step" and not k.startswith("diag")})
    summary = {"stage": run.stage, **run.engine.summary(), "steps": steps, "train_examples": len(train),
               "eval_examples": len(evaluation), "reference": reference.kind,
               **{f"skipped_{k}": v for k, v in skipped.items()}, **(extra_summary or {}),
               **final, "diagnostics": monitor.summary()}
    if run.is_main:
        write_summary(run.output_dir, summary)
        run.logger.plot(keys=[k for k in ("rewards/margins", "rewards/accuracies", "eval/rewards/accuracies",
                                          "eval/gold_reward") if k in final])
        run.logger.close()
    return Result(run.output_dir, summary, model, tokenizer, history)


@torch.no_grad()
def evaluate_batches(run: Run, model, items: list[Item], ref_cache, make_batch, batch_sums,
                     prepare: PrepareStep | None = None) -> dict[str, float]:
    """Sum `batch_sums(model, batch) -> {name: (sum, count)}` over this process's share of `items`
    (batches of `per_device_eval_batch_size`), reduce across processes, return sum / count.

    `prepare(model, batches) -> extras` (as fit's `prepare_step`, here over every evaluation batch
    of every process: the whole evaluation set is one "global batch") runs first; its dicts are
    merged into the batches."""
    mine = shard(items, run)
    bs = run.config.per_device_eval_batch_size
    batches = [make_batch(mine[i:i + bs], ref_cache) for i in range(0, len(mine), bs)]
    extras: list[dict] = [{} for _ in batches]
    if prepare is not None:
        with run.accelerator.autocast():
            extras = prepare(model, [to_device(b, run.device) for b in batches])
    sums: dict[str, list[float]] = {}
    for cpu_batch, extra in progress(list(zip(batches, extras, strict=True)), disable=run.quiet, desc="eval",
                                     leave=False):
        batch = {**to_device(cpu_batch, run.device), **extra}
        with run.accelerator.autocast():
            for k, (s, n) in batch_sums(model, batch).items():
                acc = sums.setdefault(k, [0.0, 0.0])
                acc[0] += float(s)
                acc[1] += float(n)
    keys = sorted(sums)
    totals = run.reduce_sum([v for k in keys for v in sums[k]]).tolist() if keys else []
    return {k: totals[2 * j] / max(totals[2 * j + 1], 1e-12) for j, k in enumerate(keys)}
