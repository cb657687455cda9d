"""Reward modelling: a scalar head on the SFT backbone, trained on preference pairs
(Bradley-Terry) or rankings (Plackett-Luce), then normalised on reference responses.

Every response of a micro-batch (chosen + rejected, or all K of a ranking) goes through one
concatenated forward pass; the reward is read at each sequence's last real token (its EOS). With
`padding_free` (the default) that pass is packed as dpo's is: no pads, and a row's responses share
one pass over their common prompt (the conversation once, each reply a branch of it).

Truncation (`truncate_group`): every response of a row keeps the same END of the prompt; with
`max_response_length` the responses are cut first and the prompt takes the room the longest one
leaves. Rows whose prompt or response was cut are counted (`truncation` in summary.json), and rows
with no room for a response are skipped and counted, never dropped silently.
"""

from __future__ import annotations

import random
from functools import partial

import torch

from rlhfkit.config import RMConfig
from rlhfkit.data.encode import Encoded, encode_responses
from rlhfkit.data.formats import to_canonical
from rlhfkit.data.groups import (
    ResponseGroup,
    collate_groups,
    describe_truncation,
    encode_group,
    group_responses,
    truncation_counts,
    ungroup,
)
from rlhfkit.data.sources import load_rows
from rlhfkit.errors import ConfigError
from rlhfkit.eval.reward import evaluate_rewards, format_metrics, score_examples
from rlhfkit.losses.preference import RM_LOSSES, centering_penalty, length_decorrelation_penalty
from rlhfkit.models.load import base_reference, count_parameters, disable_dropout, prepare_4bit
from rlhfkit.models.presets import preset_name
from rlhfkit.models.reward import (
    Normalization,
    apply_reward_lora,
    build_reward_model,
    padding_free_rewards_match,
    save_normalization,
    sequence_rewards,
)
from rlhfkit.train.common import (
    config_task,
    config_tokenizer,
    encode_all,
    keep_padding_free,
    load_split,
    row_format,
    row_texts,
    save_final,
    to_device,
)
from rlhfkit.train.deepspeed import samples_on_this_rank, shards_parameters
from rlhfkit.train.loop import BatchStream, Result, Run, describe_batches, fit, start_run, total_steps
from rlhfkit.train.tracking import write_summary

RM_FORMATS = ("preference", "ranking")
REFERENCE_FORMATS = ("prompt_completion", "messages", "preference", "ranking")


# ---- the loss --------------------------------------------------------------------------------

def pairwise_stats(rewards: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row accuracy and margin over the ordered pairs (i above j) of a (B, K) reward matrix:
    mean(r_i > r_j) and mean(r_i - r_j). For pairs: (r_c > r_r, r_c - r_r)."""
    d = rewards.unsqueeze(2) - rewards.unsqueeze(1)                     # (B, K, K): r_i - r_j
    upper = torch.ones(mask.shape[1], mask.shape[1], dtype=torch.bool, device=mask.device).triu(1)
    valid = (mask.unsqueeze(2) & mask.unsqueeze(1) & upper).to(rewards.dtype)
    n = valid.sum((1, 2)).clamp(min=1)
    return ((d > 0).to(rewards.dtype) * valid).sum((1, 2)) / n, (d * valid).sum((1, 2)) / n


def rm_loss(model, batch: dict, *, dataset_format: str, center_coef: float | None,
            padding_free: bool = False, length_coef: float | None = None) -> tuple[torch.Tensor, dict]:
    """Summed per-row loss of a micro-batch of groups and summed metrics (divided by rows later);
    `length_coef`: + the micro-batch's length-decorrelation penalty, counted once per row."""
    # 1. one forward over every response of every group (packed: a group's prompt once)
    flat = sequence_rewards(model, batch["input_ids"], batch["attention_mask"], padding_free=padding_free,
                            groups=batch.get("prefix_groups"))                   # (N,)
    mask = batch["group_mask"]
    rewards = ungroup(flat, mask)                                                 # (B, K)
    # 2. Bradley-Terry (pairs) or Plackett-Luce (rankings), + optional centering
    losses = RM_LOSSES[dataset_format](rewards, mask, batch.get("margin"))
    if center_coef:
        losses = losses + centering_penalty(rewards, center_coef)
    total = losses.sum()
    if length_coef:  # a batch-level term: rows x penalty, so that the mean over rows is the penalty
        lengths = batch["response_mask"].sum(-1)
        total = total + mask.shape[0] * length_decorrelation_penalty(flat, lengths, length_coef)
    # 3. metrics
    with torch.no_grad():
        accuracy, margin = pairwise_stats(rewards.detach(), mask)
        mean = (rewards.detach() * mask).sum(-1) / mask.sum(-1)
    return total, {"rm/accuracy": accuracy.sum(), "rm/margin": margin.sum(), "rm/reward_mean": mean.sum()}


def rows_in_batch(batch: dict) -> float:
    return float(batch["group_mask"].shape[0])


# ---- model set-up ----------------------------------------------------------------------------

def setup_reward_model(run: Run, texts):
    """Tokenizer + reward model from the config (LoRA applied when asked); dropout off, LoRA's too."""
    c = run.config
    tokenizer = config_tokenizer(c, texts)
    torch.manual_seed(c.seed)
    model = build_reward_model(c.model_name_or_path, tokenizer, gguf_file=c.gguf_file,
                               trust_remote_code=c.trust_remote_code, load_in_4bit=c.load_in_4bit)
    model = prepare_4bit(model, gradient_checkpointing=c.gradient_checkpointing)  # QLoRA (no-op otherwise)
    if c.finetuning_type == "lora":
        if preset_name(c.model_name_or_path) is not None:
            # A preset has no weights on disk: save the initial model so the adapter has a base.
            base = run.output_dir / "base"
            if run.is_main:
                model.save_pretrained(base, safe_serialization=True)
                tokenizer.save_pretrained(base)
            run.accelerator.wait_for_everyone()
            base_path = str(base.resolve())
        elif c.gguf_file:
            raise ConfigError("a LoRA reward model records its base as one path: give the GGUF file as "
                              "model_name_or_path (.../NAME.gguf or pkg:PACKAGE/NAME.gguf), not gguf_file")
        else:
            base_path = base_reference(c.model_name_or_path)  # what save_final records too
        model = apply_reward_lora(model, base_model_name_or_path=base_path, rank=c.lora_rank,
                                  alpha=c.lora_alpha, dropout=c.lora_dropout, target=c.lora_target,
                                  last_layers=c.lora_layers)
        disable_dropout(model)  # LoRA's own dropout modules: a reward must not vary between passes
    if not c.load_in_4bit:  # a 4-bit model is placed at load time and cannot be moved
        model.to(run.device)
    trainable, total = count_parameters(model)
    run.print(f"[{run.stage}] reward model from {c.model_name_or_path}: {total / 1e6:.2f}M parameters, "
              f"{trainable / 1e6:.2f}M trainable ({c.finetuning_type})")
    return model, tokenizer


def resolve_rm_padding_free(run: Run, model, groups: list[ResponseGroup], pad_id: int, n: int = 4) -> bool:
    """`padding_free` as asked, unless the packed pass disagrees with the padded one on the first
    `n` training rows: then a warning, and padding for the whole run (`padding_free` set False)."""
    batch = to_device(collate_groups(groups[:n], pad_id), run.device)
    return keep_padding_free(run, lambda: padding_free_rewards_match(model, batch["input_ids"], batch["attention_mask"],
                                                                     batch["prefix_groups"]))


# ---- normalisation ---------------------------------------------------------------------------

def load_reference_rows(config: RMConfig) -> list[dict] | None:
    """Validated rows of `normalization_dataset` (None when not set)."""
    if config.normalization_dataset is None:
        return None
    rows = to_canonical(load_rows(config.normalization_dataset))
    fmt = row_format(rows[0])
    if fmt not in REFERENCE_FORMATS:
        raise ConfigError(f"normalization_dataset {config.normalization_dataset}: rows are in '{fmt}' format; "
                          f"reference responses come from {', '.join(REFERENCE_FORMATS)} rows")
    return rows


def reference_pair(row: dict) -> tuple:
    """(prompt, response) of a reference row: the completion, the final assistant reply, or the
    chosen/best response."""
    if "completion" in row:
        return row["prompt"], row["completion"]
    if "messages" in row:
        messages = row["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return messages[:last], [messages[last]]
    return row["prompt"], group_responses(row)[0]


def reference_examples(config: RMConfig, tokenizer, train_groups, reference_rows) -> tuple[list[Encoded], str]:
    """Encoded reference responses (at most `normalization_samples`, seeded) and a description."""
    if reference_rows is None:
        examples = [g.responses[0] for g in train_groups]
        what = "best (chosen) responses of the training data"
    else:
        examples = []
        for row in reference_rows:
            prompt, response = reference_pair(row)
            enc = encode_responses(tokenizer, prompt, [response], config.max_length, config.max_prompt_length)
            if enc is not None:
                examples.append(enc[0])
        what = f"responses of {config.normalization_dataset}"
    if not examples:
        raise ConfigError("no reference responses left for the normalisation after encoding")
    if config.normalization_samples is not None and len(examples) > config.normalization_samples:
        examples = random.Random(config.seed).sample(examples, config.normalization_samples)
    return examples, f"{len(examples)} {what}"


@torch.no_grad()
def compute_normalization(run: Run, model, examples: list[Encoded], pad_id: int, what: str) -> Normalization:
    """Mean and std of the raw reward over `examples` (split across processes, summed).

    Under ZeRO-3 / FSDP2 each forward pass is collective, so every rank must run as many: a rank
    whose share is one short scores a repeat of its first example too and drops its reward (the
    reference set is the run's own choice, so it need not split evenly)."""
    c = run.config
    mine = examples[run.rank::run.world_size]
    real = len(mine)
    if shards_parameters(run):
        per_rank = -(-len(examples) // run.world_size)
        mine = mine + [examples[0]] * (per_rank - real)
    rewards = score_examples(lambda ids, m: sequence_rewards(model, ids, m, padding_free=c.padding_free), mine, pad_id,
                             batch_size=c.per_device_eval_batch_size, device=run.device, quiet=run.quiet,
                             desc="normalisation").double()[:real]
    s, s2, n = run.reduce_sum([rewards.sum().item(), (rewards ** 2).sum().item(), rewards.numel()]).tolist()
    mean = s / n
    std = max(s2 / n - mean ** 2, 0.0) ** 0.5
    return Normalization(mean=mean, std=std, divide_by_std=c.normalize_std, reference=what, count=int(n))


# ---- the stage -------------------------------------------------------------------------------

def train_rm(config: RMConfig) -> Result:
    # 1. validate every row (train, eval, reference set) before loading anything heavy
    train_rows, eval_rows = load_split(config, RM_FORMATS)
    fmt = row_format(train_rows[0])
    if eval_rows and row_format(eval_rows[0]) != fmt:
        raise ConfigError(f"eval data is in '{row_format(eval_rows[0])}' format but the training data "
                          f"in '{fmt}'; give both as preference pairs or both as rankings")
    reference_rows = load_reference_rows(config)
    task = config_task(config.task)
    run = start_run(config, "rm")
    c = config

    # 2. tokenizer and reward model (SFT backbone + fresh head; LoRA keeps the head trainable)
    model, tokenizer = setup_reward_model(run, lambda: row_texts(train_rows))
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id

    # 3. encode: prompt + each response (+ EOS); rows whose response does not fit are skipped
    def encode(item):
        index, row = item
        return encode_group(tokenizer, row, c.max_length, c.max_prompt_length, index, c.max_response_length)

    train, skipped_train = encode_all(list(enumerate(train_rows)), encode, desc="tokenize train", quiet=run.quiet)
    evaluation, skipped_eval = encode_all(list(enumerate(eval_rows)), encode, desc="tokenize eval",
                                          quiet=run.quiet)
    truncation = {"train": truncation_counts(train, skipped_train), "eval": truncation_counts(evaluation, skipped_eval)}
    for name, groups in (("train", train), ("eval", evaluation)):
        if groups or truncation[name]["skipped"]:
            run.print(f"[rm] {describe_truncation(name, len(groups), truncation[name], c.max_length)}")
    if not train:
        raise ConfigError(f"no training row fits max_length={c.max_length}")
    padding_free = resolve_rm_padding_free(run, model, train, pad)

    # 4. train with evaluation every eval_steps and at the end (main process)
    stream = BatchStream(len(train), c.per_device_train_batch_size, run.world_size, run.rank, c.seed)
    steps = total_steps(c, stream.per_epoch)
    describe_batches(run, len(train), steps, stream.per_epoch)
    plot_path = run.output_dir / "plots" / "reliability.png"

    def evaluate(m) -> dict:
        # the main process evaluates; under ZeRO-3 / FSDP2 every forward pass is collective, so every
        # rank scores the same evaluation set with it (only the main process keeps the metrics and plots)
        if not samples_on_this_rank(run):
            return {}
        def score(ids, mask, groups=None):
            return sequence_rewards(m, ids, mask, padding_free=padding_free, groups=groups)

        metrics = evaluate_rewards(score, evaluation, pad_id=pad, eos_id=eos, dataset_format=fmt,
                                   rows=eval_rows, task=task, batch_size=c.per_device_eval_batch_size,
                                   device=run.device, bins=c.calibration_bins,
                                   plot_path=plot_path if run.is_main else None, quiet=run.quiet,
                                   share_prompts=padding_free)
        return metrics if run.is_main else {}

    model, history = fit(
        run, model, stream=stream,
        make_batch=lambda idx: to_device(collate_groups([train[i] for i in idx], pad), run.device),
        batch_weight=rows_in_batch,
        loss_fn=partial(rm_loss, dataset_format=fmt, center_coef=c.center_rewards_coefficient,
                        padding_free=padding_free, length_coef=c.length_decorrelation_coefficient),
        steps=steps, evaluate=evaluate if evaluation else None,
    )

    # 5. normalisation on the reference responses (before saving: a LoRA merge changes the model)
    examples, what = reference_examples(c, tokenizer, train, reference_rows)
    norm = compute_normalization(run, model, examples, pad, what)
    run.print(f"[rm] normalisation over {what}: mean {norm.mean:+.4f}, std {norm.std:.4f}"
              f"{' (divided by std)' if norm.divide_by_std else ''}")

    # 6. save: HF directory (or LoRA adapter with the head) + tokenizer + normalisation
    save_final(run, model, tokenizer)
    if run.is_main:
        save_normalization(run.output_dir, norm)
        if (run.output_dir / "merged").is_dir():  # merge_lora, or LoRA on a preset
            save_normalization(run.output_dir / "merged", norm)
    run.accelerator.wait_for_everyone()

    final = history[-1] if history else {}
    summary = {"stage": run.stage, **run.engine.summary(), "steps": steps, "dataset_format": fmt, "train_rows": len(train),
               "eval_rows": len(evaluation), "skipped_train": skipped_train, "skipped_eval": skipped_eval,
               "truncation": truncation, "padding_free": padding_free,
               "normalization": {"mean": norm.mean, "std": norm.std, "divide_by_std": norm.divide_by_std,
                                 "reference": norm.reference},
               **{k: v for k, v in final.items() if k != "step"}}
    if run.is_main:
        write_summary(run.output_dir, summary)
        evals = {k.removeprefix("eval/"): v for k, v in final.items() if k.startswith("eval/")}
        if evals:
            run.print(format_metrics(evals, title=f"[rm] held-out evaluation ({len(evaluation)} rows, raw rewards)"))
        run.logger.plot(keys=[k for k in ("eval/accuracy", "rm/accuracy") if any(k in r for r in history)])
        run.logger.close()
    return Result(run.output_dir, summary, model, tokenizer, history)
