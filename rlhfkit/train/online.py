"""The parts every online stage (ppo, grpo, rloo, online_dpo) shares, called by
the stage loops in their numbered steps:

  start_online      validate data and reward functions, start the run, split the rollout batch
                    over processes, encode prompts, derive the steps; print it all once
  minibatch_plan    shuffled minibatches -> micro-batches of row indices (whole groups shuffled)
  run_updates       the epochs x minibatches x micro-batches driver: global token counts,
                    backward per micro-batch, summed gradients, one optimizer step per minibatch
  build_roles, start_updates, build_reference, build_scorer, score_rollout, rollout_logps
                    the roles (policy, reference, reward), the optimizer, and the passes every
                    critic-free loop (grpo, rloo, online_dpo) makes over a rollout
  start_loop        the optimizer, the per-step log (step 0 evaluated) and the progress bar
  start_log         the per-step log and the progress bar alone (PPO, with its own optimizer)
  rollouts_against  the policy's responses and an opponent's to the same prompts (xpo, nash_md)
  evaluate_policy   held-out prompts: proxy score, KL to the reference, gold reward / accuracy, judge score
  frozen_reward_model, judge_scorer   a separate frozen reward model; the evaluation's judge
  OnlineLog         per step: diagnostics, the logging window, samples.jsonl, evaluation
  save_policy, finish_online   final weights, the sampler stopped, summary, plots
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from rlhfkit.config import OnlineConfig
from rlhfkit.errors import ConfigError
from rlhfkit.eval.compare import mean_and_se, paired_differences, pairwise_outcomes
from rlhfkit.eval.generation import rollout_kl
from rlhfkit.rollout.generate import HFGenerator, SamplingParams
from rlhfkit.rollout.rewards import load_reward_funcs
from rlhfkit.rollout.rollout import Rollout, Scorer, concat_rollouts, encode_prompts, generate_rollout, source_metrics
from rlhfkit.train.common import (
    build_model,
    config_task,
    config_tokenizer,
    keep_padding_free,
    load_split,
    row_texts,
    save_final,
)
from rlhfkit.train.diagnostics import Monitor
from rlhfkit.train.distributed import Optimization, reduce_metrics
from rlhfkit.train.deepspeed import samples_on_this_rank
from rlhfkit.train.loop import BatchStream, Result, Run, start_run
from rlhfkit.train.tracking import progress, write_summary

ONLINE_FORMATS = ("prompt", "prompt_completion", "messages", "preference")
"""Row formats the online stages take prompts from (a preference pair's prompt is its shared
conversation; `chosen` / `rejected` go to reward functions as other columns)."""


# ---- set-up ----------------------------------------------------------------------------------------

@dataclass
class OnlineSetup:
    """What `start_online` prepared: the run, data, reward functions, sampler and step counts."""

    run: Run
    tokenizer: object
    task: object
    reward_funcs: list
    rows: list[dict]
    prompt_ids: list[list[int]]
    skipped: int
    eval_ids: list[list[int]]
    eval_rows: list[dict]
    steps: int
    local_prompts: int
    stream: BatchStream
    generator: HFGenerator  # or rollout.vllm_engine.VLLMGenerator (`use_vllm`)
    params: SamplingParams


SAMPLING_DTYPES = {"float32": None, "bfloat16": torch.bfloat16}  # None: the model's own weights


def online_steps(c: OnlineConfig, n_prompts: int) -> int:
    if c.max_steps > 0:
        return c.max_steps
    episodes = c.total_episodes if c.total_episodes is not None else c.num_train_epochs * n_prompts
    return max(1, math.ceil(episodes / c.rollout_batch_size))


def start_online(c: OnlineConfig, stage: str, formats: tuple[str, ...] = ONLINE_FORMATS,
                 iterations: int = 1) -> OnlineSetup:
    """# 0. validate data and reward functions before anything heavy loads, start the run, split the
    rollout batch over processes, encode the prompts (a conversation's prompt: everything before its
    last reply, `as_prompt_row`). `iterations` (spin): the steps derived from the data are those of
    one iteration, run this many times."""
    from rlhfkit.data.formats import as_prompt_row

    train_rows, eval_rows = load_split(c, formats)
    train_rows, eval_rows = [as_prompt_row(r) for r in train_rows], [as_prompt_row(r) for r in eval_rows]
    task = config_task(c.task)
    reward_funcs = load_reward_funcs(c.reward_funcs, task=task)
    run = start_run(c, stage)
    local_prompts = c.rollout_batch_size // run.world_size
    rows_local = local_prompts * c.train_group_size
    if c.rollout_batch_size % run.world_size or rows_local % (c.num_mini_batches * c.per_device_train_batch_size):
        raise ConfigError(f"rollout_batch_size {c.rollout_batch_size} must split into {run.world_size} process(es) "
                          f"(whole prompts each) with {c.train_group_size} trained response(s) per prompt, then into "
                          f"num_mini_batches {c.num_mini_batches} x per_device_train_batch_size "
                          f"{c.per_device_train_batch_size}")
    tokenizer = config_tokenizer(c, lambda: row_texts(train_rows))
    prompt_ids, train_rows, skipped = encode_prompts(tokenizer, train_rows, c.max_prompt_length)
    if not prompt_ids:
        raise ConfigError(f"dataset {c.dataset}: no non-empty prompts")
    if task is not None:
        ev_rows = task.make("prompt", c.eval_num_prompts, seed=c.seed, split="eval")
    else:
        ev_rows = eval_rows[:c.eval_num_prompts]
    eval_ids, ev_rows, _ = encode_prompts(tokenizer, ev_rows, c.max_prompt_length)
    steps = online_steps(c, len(prompt_ids)) * iterations
    run.print(f"[{stage}] {len(prompt_ids)} prompts ({skipped} empty skipped), {len(eval_ids)} held-out prompts | "
              f"{steps} steps" + (f" ({iterations} iterations of {steps // iterations})" if iterations > 1 else "")
              + f" x {c.rollout_batch_size} prompts x {c.group_size} response(s) "
              f"= {c.rollout_batch_size * c.group_size} per step over {run.world_size} process(es)")
    params = SamplingParams(max_new_tokens=c.max_new_tokens, temperature=c.temperature, top_k=c.top_k,
                            top_p=c.top_p, stop=tuple(c.stop))
    return OnlineSetup(run=run, tokenizer=tokenizer, task=task, reward_funcs=reward_funcs, rows=train_rows,
                       prompt_ids=prompt_ids, skipped=skipped, eval_ids=eval_ids, eval_rows=ev_rows, steps=steps,
                       local_prompts=local_prompts,
                       stream=BatchStream(len(prompt_ids), local_prompts, run.world_size, run.rank, seed=c.seed),
                       generator=build_generator(c, run, tokenizer, local_prompts), params=params)


def build_generator(c: OnlineConfig, run: Run, tokenizer, local_prompts: int):
    """The rollout sampler: rlhfkit's `HFGenerator`, or with `use_vllm` a `VLLMGenerator` (one process
    only; its interpreter checked here, before any model loads; the engine starts at the first rollout,
    its output in vllm.log)."""
    if not c.use_vllm:
        return HFGenerator(tokenizer, batch_size=c.generation_batch_size or local_prompts,
                           dtype=SAMPLING_DTYPES[c.sampling_dtype])
    from rlhfkit.rollout.vllm_engine import VLLMGenerator, check_vllm_python

    if run.world_size > 1:
        raise ConfigError(f"use_vllm runs one engine for one process; under {run.world_size} processes it is not "
                          "supported yet: launch one process, or use_vllm: false")
    python = check_vllm_python(c.vllm_python)
    run.print(f"[{run.stage}] rollouts by vLLM ({python}, {c.sampling_dtype}); its log: {run.output_dir / 'vllm.log'}")
    return VLLMGenerator(tokenizer, python=python, dtype=c.sampling_dtype, max_model_len=c.sampled_context,
                         record_logps=c._sampler_correction,
                         gpu_memory_utilization=c.vllm_gpu_memory_utilization,
                         log_path=str(run.output_dir / "vllm.log"), seed=c.seed)


def rollout_seed(c: OnlineConfig, step: int, rank: int, round_: int = 0) -> int:
    """The sampling seed of one generation call: a pure function of (seed, step, process, round),
    so a resumed run samples what the uninterrupted one would have."""
    return c.seed * 7919 + step + 104_729 * rank + 15_485_863 * round_


# ---- the update driver ----------------------------------------------------------------------------

def minibatch_plan(n: int, c: OnlineConfig, step: int, epoch: int, group_size: int = 1) -> list[list[torch.Tensor]]:
    """Shuffled minibatches -> micro-batches of row indices, a pure function of (seed, step, epoch).
    With groups (G consecutive rows per prompt) whole groups are shuffled, so a micro-batch that
    holds whole groups shares their prompts in packed passes."""
    g = torch.Generator().manual_seed(c.seed * 1_000_003 + step * 1_009 + epoch)
    if group_size == 1:
        perm = torch.randperm(n, generator=g)
    else:
        groups = torch.randperm(n // group_size, generator=g)
        perm = (groups[:, None] * group_size + torch.arange(group_size)).reshape(-1)
    mini = n // c.num_mini_batches
    micro = c.per_device_train_batch_size
    return [[perm[s + k:s + k + micro] for k in range(0, mini, micro)] for s in range(0, n, mini)]


MicroLoss = Callable[[torch.Tensor, list[float]], tuple[torch.Tensor, dict[str, float]]]


def run_updates(run: Run, opt: Optimization, plans: Iterable[list[list[torch.Tensor]]],
                micro_loss: MicroLoss, counts: Callable[[torch.Tensor], list[float]],
                ) -> tuple[dict[str, float], dict[str, float]]:
    """Epochs x minibatches x micro-batches: for each minibatch, `counts(rows)` gives this process's
    normalisers (token / sequence counts) of its rows, summed over processes here; each micro-batch's
    `micro_loss(idx, global_counts)` is a share of the minibatch loss (normalised by the global
    counts), backpropagated under the run's precision through the engine (`opt`, the run's
    `Optimization`: gradients summed over processes by hand under single/ddp, averaged by the engine
    with the loss scaled by world_size under ZeRO/FSDP2), then one clipped optimizer step. Every
    process runs as many micro-batches (the rollout batch splits evenly), which the sharded engines
    need. Returns (metric means over all updates, metrics of the first update), both over every
    process."""
    sums: dict[str, float] = {}
    first: dict[str, float] = {}
    n_updates = 0
    for plan in plans:
        for micro_batches in plan:
            totals = run.reduce_sum(counts(torch.cat(micro_batches))).clamp(min=1).tolist()
            step_sums: dict[str, float] = {}
            for i, mb in enumerate(micro_batches):
                with opt.micro_batch(last=i == len(micro_batches) - 1):
                    with run.precision():
                        loss, stats = micro_loss(mb, totals)
                    opt.backward(loss)
                for k, v in stats.items():
                    step_sums[k] = step_sums.get(k, 0.0) + v
            grad_norm = opt.step()
            for k, v in step_sums.items():
                sums[k] = sums.get(k, 0.0) + v
            sums["grad_norm"] = sums.get("grad_norm", 0.0) + grad_norm
            if n_updates == 0:
                first = dict(step_sums)
            n_updates += 1
    # the loss statistics are per-process shares of global means; grad_norm is already global
    grad = sums.pop("grad_norm")
    means = {k: v / n_updates for k, v in reduce_metrics(run, sums, mean=False).items()}
    means["grad_norm"] = grad / n_updates
    return means, reduce_metrics(run, first, mean=False)


def check_padding_free(run: Run, model, prompt_ids: list[list[int]], pad_id: int) -> bool:
    """At start: does this model's packed forward (prompts shared by the responses of a group) match
    its padded one? Checked on a few training prompts, each as a group of itself and itself + the
    start of the next prompt. A model that does not follow packed position ids or the shared-prompt
    mask trains padded for the whole run, with a warning. In float32 even under `bf16: true` (as the
    preference stages check): the question is the model's structure, which bf16 rounding would blur."""
    from rlhfkit.data.collate import pad_batch
    from rlhfkit.models.logprobs import padding_free_matches

    sample = prompt_ids[:4]
    seqs, groups = [], []
    for i, p in enumerate(sample):
        seqs += [p, p + sample[(i + 1) % len(sample)][:4]]
        groups += [i, i]
    batch = pad_batch(seqs, pad_id, side="right")

    def matches() -> bool:
        with torch.no_grad():
            return padding_free_matches(model, batch["input_ids"].to(run.device),
                                        batch["attention_mask"].to(run.device), groups)

    return keep_padding_free(run, matches)


# ---- roles: reference, reward; the passes over a rollout -------------------------------------------

def reference_kind(c: OnlineConfig) -> str:
    """`build_reference`'s choice: "adapters_disabled" (under LoRA without `ref_model`: the policy's
    base) or "model" (a model of its own); the diagnostics' `reference` context."""
    return "adapters_disabled" if c.finetuning_type == "lora" and c.ref_model is None else "model"


def describe_reference(c: OnlineConfig) -> str:
    """The reference, in the words a stage prints once."""
    if reference_kind(c) == "adapters_disabled":
        return "the base with adapters disabled"
    return c.ref_model or c.model_name_or_path


def build_reference(c: OnlineConfig, tokenizer, policy, device, needed: bool):
    """A context-manager factory yielding the reference model, or None when not `needed` (grpo/rloo
    with beta 0: nothing held in memory, no reference pass) under full fine-tuning. Under LoRA: the
    policy with adapters disabled (under ZeRO-3 / FSDP2 sharded together with the policy); with full
    fine-tuning a frozen copy of the initial model (`ref_model` to override), kept whole on every rank
    outside the engine under every engine (never trained: ZeRO-2 would save nothing on it, ZeRO-3
    would gather it at every pass)."""
    from rlhfkit.models.load import load_causal_lm

    if not needed and c.finetuning_type == "full":
        return None
    if reference_kind(c) == "adapters_disabled":
        return lambda: adapters_disabled(policy)
    ref = load_causal_lm(c.ref_model or c.model_name_or_path, tokenizer, trust_remote_code=c.trust_remote_code,
                         gguf_file=c.gguf_file if c.ref_model is None else None)
    # never trained, but with the policy's requires_grad flag: some CPUs (MKL on AVX-512) round a linear
    # layer differently when its weight requires grad, and the KL must be exactly 0 at the start
    ref.requires_grad_(c.finetuning_type == "full").eval().to(device)

    @contextmanager
    def frozen():
        yield ref

    return frozen


def build_roles(setup: OnlineSetup, *, reference_needed: bool) -> tuple[torch.nn.Module, Callable | None, Scorer]:
    """# 0. of the critic-free loops (grpo, rloo, online_dpo): the policy (LoRA / QLoRA applied,
    gradient checkpointing when asked: recomputed in the training passes only), the reference
    (`build_reference`), the scorer (`build_scorer`), and the check that the policy takes packed
    passes (`check_padding_free`)."""
    from rlhfkit.models.load import enable_gradient_checkpointing

    run, tokenizer, c = setup.run, setup.tokenizer, setup.run.config
    policy = build_model(run, tokenizer)
    if c.gradient_checkpointing:
        enable_gradient_checkpointing(policy)
    reference = build_reference(c, tokenizer, policy, run.device, needed=reference_needed)
    scorer = build_scorer(c, tokenizer, setup.reward_funcs, run.device)
    check_padding_free(run, policy, setup.prompt_ids, tokenizer.pad_token_id)
    return policy, reference, scorer


def start_updates(run: Run, policy, updates: int) -> Optimization:
    """The policy under the run's engine (FSDP2 shards it, DeepSpeed wraps it; the reference and a
    reward model stay whole on every rank outside it), its optimizer and schedule for `updates`
    optimizer steps, and the state of the checkpoint it resumes from (said once)."""
    opt = Optimization(run, policy, updates, prepare=False)
    if run.resume_from is not None:
        run.print(f"[{run.stage}] resumed from {run.resume_from} at step {opt.start_step}")
    return opt


def start_log(run: Run, setup: OnlineSetup, opt: Optimization, policy, reference, scorer: Scorer, **log_options):
    """The per-step `OnlineLog` of an online loop (`log_options`: its `latest`, `monitor_context`),
    which evaluates the initial policy unless the run resumes, and the progress bar from the step the
    run starts at (`opt.start_step`). PPO calls it with its own optimization (policy and critic)."""
    log = OnlineLog(run, setup, policy, reference, scorer, whole=opt.whole, **log_options)
    log.start(opt.start_step)
    bar = progress(total=setup.steps, initial=opt.start_step, disable=run.quiet, desc=run.stage)
    return log, bar


def start_loop(run: Run, setup: OnlineSetup, policy, reference, scorer: Scorer, updates: int, **log_options):
    """The start of every critic-free loop: `start_updates`' optimization, then `start_log`."""
    opt = start_updates(run, policy, updates)
    return (opt, *start_log(run, setup, opt, policy, reference, scorer, **log_options))


def build_scorer(c: OnlineConfig, tokenizer, reward_funcs, device) -> Scorer:
    """Reward functions and/or a reward model (a separate frozen model, scored with its stored
    normalisation; texts re-encoded when its tokenizer differs from the policy's)."""
    reward_model = rm_tokenizer = None
    if c.reward_model is not None:
        reward_model, rm_tokenizer = frozen_reward_model(c.reward_model, tokenizer, device, c.padding_free)
    return Scorer(tokenizer, reward_funcs, c.reward_weights, reward_model=reward_model, rm_tokenizer=rm_tokenizer,
                  batch_size=c.per_device_eval_batch_size)


def score_rollout(c: OnlineConfig, scorer: Scorer, ro: Rollout) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(scores with the EOS trick applied (`missing_eos_penalty` / `missing_eos_score`), the parts as scored)."""
    from rlhfkit.losses.ppo import eos_trick

    raw, parts = scorer(ro)
    return eos_trick(raw, ro.ended, penalty=c.missing_eos_penalty, replace=c.missing_eos_score), parts


def rollouts_against(c: OnlineConfig, setup: OnlineSetup, scorer: Scorer, policy, opponent: Callable,
                     step: int) -> tuple[Rollout, Rollout, Rollout, torch.Tensor, dict[str, torch.Tensor]]:
    """# 1-2. of xpo and nash_md: one response to each of this process's prompts of step `step` from the
    policy (sampling round 0) and one from the opponent (`opponent()`: a context manager yielding the
    model: the reference, or the policy's mixture with it; round 1), scored together (`score_rollout`).
    Returns (the policy's rollout, the opponent's, both laid out together with the policy's rows first,
    scores (2P,), parts). Called with the policy whole on this rank and in the run's precision."""
    run, tok = setup.run, setup.tokenizer
    idx = setup.stream.indices(step)
    prompt_ids, rows = [setup.prompt_ids[i] for i in idx], [setup.rows[i] for i in idx]
    mine = generate_rollout(policy, tok, setup.generator, prompt_ids, rows, setup.params,
                            rollout_seed(c, step, run.rank), run.device)
    with opponent() as model:
        theirs = generate_rollout(model, tok, setup.generator, prompt_ids, rows, setup.params,
                                  rollout_seed(c, step, run.rank, round_=1), run.device)
    both = concat_rollouts([mine, theirs], tok.pad_token_id)
    scores, parts = score_rollout(c, scorer, both)
    return mine, theirs, both, scores, parts


def rollout_logps(policy, ro: Rollout, idx: torch.Tensor, c: OnlineConfig, with_entropy: bool = False):
    """(B, W) response log-probs (and entropy) of rows `idx`: `response_logps` at the sampling
    temperature, packed with each group's prompt shared when `padding_free`."""
    from rlhfkit.models.logprobs import response_logps

    return response_logps(policy, ro.input_ids[idx], ro.attention_mask[idx], ro.context_length, c.temperature,
                          padding_free=c.padding_free, groups=ro.group_ids_of(idx), suppress_ids=[ro.pad_id],
                          with_entropy=with_entropy)


@contextmanager
def adapters_disabled(model):
    """The base of a peft model with its adapters switched off (the reference under LoRA), with every
    parameter's requires_grad restored afterwards (peft rewrites it when re-enabling)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    with model.disable_adapter():
        yield model
    for p, flag in flags:
        p.requires_grad_(flag)


# ---- evaluation ----------------------------------------------------------------------------------

def frozen_reward_model(path: str, tokenizer, device, padding_free: bool) -> tuple[Callable, object]:
    """A reward model of its own (not sharing the policy's base), frozen: (its normalised score function
    on the policy's token ids, its tokenizer when the vocabularies differ (texts are then re-encoded),
    else None). `padding_free`: scored packed once the model is seen to follow packed positions."""
    from rlhfkit.models.reward import load_reward_model

    rm = load_reward_model(path, device=device)
    rm.model.requires_grad_(False).eval()
    if padding_free:
        from rlhfkit.models.reward import packing_probe, padding_free_rewards_match

        rm.padding_free = padding_free_rewards_match(rm.model, *packing_probe(rm.model.config.vocab_size, device))
    return rm.score, (rm.tokenizer if rm.tokenizer.get_vocab() != tokenizer.get_vocab() else None)


def judge_scorer(c: OnlineConfig, tokenizer, device) -> Scorer | None:
    """The held-out evaluation's judge (`judge_reward_model`), or None."""
    if c.judge_reward_model is None:
        return None
    score, rm_tokenizer = frozen_reward_model(c.judge_reward_model, tokenizer, device, c.padding_free)
    return Scorer(tokenizer, [], None, reward_model=score, rm_tokenizer=rm_tokenizer,
                  batch_size=c.per_device_eval_batch_size)


def win_rate_and_se(scores: list[float], baseline: list[float]) -> tuple[float, float]:
    """The share of prompts where `scores` beats `baseline` (ties half; `eval.compare.pairwise_outcomes`)
    and its standard error sqrt(var / n) over prompts."""
    return mean_and_se(pairwise_outcomes(scores, baseline))


@torch.no_grad()
def evaluate_policy(run: Run, setup: OnlineSetup, policy, reference, scorer: Scorer, seed: int,
                    batch_size: int, whole=None, judge: Scorer | None = None) -> tuple[dict, list[dict]]:
    """One response per held-out prompt from `policy` (the training sampling settings): the proxy
    score (`scores`; with several reward sources also each one's mean and std, `rewards/<source>`), the KL to the reference summed over response tokens (k1, the same log-probs as
    training; when `reference` (a context manager factory yielding the reference model) is given),
    length, EOS rate, and with a built-in task the gold reward and, where the task defines it,
    accuracy; with a `judge` scorer its mean score (`judge_score`; each sample's under `judge`).
    `whole(policy)`: the context in which the policy's parameters are whole on this rank
    (`Optimization.whole`; ZeRO-3 / FSDP2), entered by every rank."""
    c, tok = run.config, setup.tokenizer
    was_training = policy.training
    policy.eval()
    with (whole(policy) if whole is not None else nullcontext()), run.precision():
        ro = generate_rollout(policy, tok, setup.generator, setup.eval_ids, setup.eval_rows, setup.params, seed,
                              run.device)
        metrics = {"length": ro.lengths.float().mean().item(), "eos_rate": ro.ended.float().mean().item()}
        scores = None
        if scorer.has_sources:  # spin trains on no reward: without one, nothing to score
            scores, parts = scorer(ro)
            metrics.update(scores=scores.mean().item(), **(source_metrics(parts) if len(parts) > 1 else {}))
        if reference is not None:
            metrics["kl"] = rollout_kl(policy, reference, ro, c.temperature, batch_size).mean().item()
        judged = judge(ro)[0] if judge is not None else None
        if judged is not None:
            metrics["judge_score"] = judged.mean().item()
    policy.train(was_training)
    gold = correct = None
    prompts = [r["prompt"] for r in ro.rows]
    if setup.task is not None:
        gold = setup.task.gold_reward(prompts, ro.texts, ro.ended.tolist())
        metrics["gold_reward"] = sum(gold) / len(gold)
        correct = [setup.task.correct(p, t, e) for p, t, e in zip(prompts, ro.texts, ro.ended.tolist())]
        if all(x is not None for x in correct):
            metrics["accuracy"] = sum(correct) / len(correct)
    samples = [{"prompt": p, "response": t, **({"score": scores[i].item()} if scores is not None else {}), "ended": e,
                **({"gold": gold[i]} if gold else {}), **({"judge": judged[i].item()} if judged is not None else {})}
               for i, (p, t, e) in enumerate(zip(prompts, ro.texts, ro.ended.tolist()))]
    return metrics, samples


class OnlineLog:
    """Per-step bookkeeping of an online stage: diagnostics (the shared registry), the logging window
    (means over the steps since the last log; `latest` keys keep their last value), samples.jsonl,
    and held-out evaluation at step 0, every `eval_steps` and at the end: on the main process, and on
    every rank under ZeRO-3 / FSDP2 (`samples_on_this_rank`: the same prompts and seed everywhere, the
    policy's parameters whole through `whole`, `Optimization.whole`; only the main process writes)."""

    def __init__(self, run: Run, setup: OnlineSetup, policy, reference, scorer: Scorer,
                 latest: tuple[str, ...] = ("lr",), whole=None, monitor_context: dict | None = None):
        c = run.config
        self.run, self.setup, self.latest = run, setup, latest
        self.monitor = Monitor(run.print, run.stage, max_new_tokens=c.max_new_tokens, **(monitor_context or {}))
        self.samples = SampleLog(run)
        self.do_eval = bool(setup.eval_ids) and samples_on_this_rank(run)
        self.window: list[dict] = []
        self.first_eval: dict | None = None
        judge = judge_scorer(c, setup.tokenizer, run.device) if self.do_eval else None
        self._evaluate = lambda: evaluate_policy(run, setup, policy, reference, scorer, c.seed + 7,
                                                 c.per_device_eval_batch_size, whole, judge=judge)
        self.baseline_path = run.output_dir / "eval_initial_scores.json"
        """Step 0's held-out scores (training reward, judge), the baseline of the win rates; kept on disk
        so that a resumed run compares with the same responses."""

    def evaluate(self, step: int) -> dict:
        metrics, samples = self._evaluate()
        self.samples.write(step, "eval", samples[:self.run.config.num_sample_generations])
        metrics.update(self.win_rates(step, samples))
        out = {f"eval/{k}": v for k, v in metrics.items()}
        out.update(self.monitor.evaluation(step, out))
        return out

    def win_rates(self, step: int, samples: list[dict]) -> dict:
        """Against the step-0 policy's responses to the same held-out prompts: `win_rate` by the
        training reward and, with a judge, `judge_win_rate`, each with `_se`; and the mean paired
        score difference from step 0 (`score_diff`, `judge_score_diff`, each with `_se`)."""
        current = {}
        if "score" in samples[0]:
            current["score"] = [s["score"] for s in samples]
        if "judge" in samples[0]:
            current["judge"] = [s["judge"] for s in samples]
        if step == 0:
            if self.run.is_main:
                self.baseline_path.write_text(json.dumps(current) + "\n")
            return {}
        if not self.baseline_path.is_file():
            return {}
        baseline = json.loads(self.baseline_path.read_text())
        out = {}
        for key, name in (("score", "win_rate"), ("judge", "judge_win_rate")):
            if key in current and len(baseline.get(key, [])) == len(current[key]):
                out[name], out[f"{name}_se"] = win_rate_and_se(current[key], baseline[key])
                diff = f"{key}_score_diff" if key == "judge" else "score_diff"
                out[diff], out[f"{diff}_se"] = mean_and_se(paired_differences(current[key], baseline[key]))
        return out

    def start(self, start_step: int) -> None:
        """Evaluate the initial policy (step 0) unless the run resumes."""
        if self.do_eval and start_step == 0:
            self.first_eval = self.evaluate(0)
            self.run.logger.log(0, self.first_eval)
            self.run.print(f"[{self.run.stage}] step 0 (before training): " + ", ".join(
                f"{k} {v:.3f}" for k, v in self.first_eval.items() if not k.startswith("diag")))

    def step(self, done: int, metrics: dict, ro: Rollout, scores: torch.Tensor) -> dict:
        """After step `done` (metrics already reduced over processes): diagnostics, and at logging
        steps the window's means + samples, at evaluation steps the evaluation; logged together."""
        c = self.run.config
        metrics.update(self.monitor.step(done, metrics))
        self.window.append(metrics)
        record: dict = {}
        if done % c.logging_steps == 0 or done == self.setup.steps:
            keys = dict.fromkeys(k for w in self.window for k in w)
            record = {k: sum(w[k] for w in self.window if k in w) / sum(k in w for w in self.window) for k in keys}
            record.update({k: metrics[k] for k in self.latest if k in metrics})
            self.window = []
            self.samples.write(done, "train", rollout_samples(ro, scores, c.num_sample_generations))
        if self.do_eval and (done == self.setup.steps or (c.eval_steps and done % c.eval_steps == 0)):
            record.update(self.evaluate(done))
        if record:
            self.run.logger.log(done, record)
        return record

    def summary(self, train_key: str) -> dict:
        """summary.json's metrics: the last training record, the last and the first evaluation, and the
        diagnostics that fired."""
        return {**summary_metrics(self.run.logger.history, self.first_eval, train_key),
                "diagnostics": self.monitor.summary()}


class SampleLog:
    """samples.jsonl: rollout samples at logging steps and evaluation samples (main process only)."""

    def __init__(self, run: Run):
        self.path = run.output_dir / "samples.jsonl"
        self.enabled = run.is_main
        if self.enabled and run.resume_from is None and self.path.exists():
            self.path.unlink()

    def write(self, step: int, split: str, samples: list[dict]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            for s in samples:
                f.write(json.dumps({"step": step, "split": split, **s}) + "\n")


def rollout_samples(ro: Rollout, scores: torch.Tensor | None, n: int) -> list[dict]:
    """samples.jsonl rows of a rollout's first `n` responses (a NaN score, e.g. a response self_reward's
    judge could not score, is written as null: JSON has no NaN)."""
    def score(i: int) -> dict:
        if scores is None:
            return {}
        v = scores[i].item()
        return {"score": None if math.isnan(v) else v}

    return [{"prompt": ro.rows[i]["prompt"], "response": ro.texts[i], **score(i), "ended": bool(ro.ended[i])}
            for i in range(min(n, len(ro.texts)))]


def generation_metrics(ro: Rollout) -> dict[str, float]:
    """`gen/length` (mean response tokens), `gen/eos_rate` (finished), `gen/truncated_rate` (cut by
    max_new_tokens) of a rollout batch."""
    return {"gen/length": ro.response_mask.sum(-1).float().mean().item(),
            "gen/eos_rate": ro.ended.float().mean().item(), "gen/truncated_rate": ro.truncated.float().mean().item()}


def prompt_generation_stats(ro: Rollout) -> dict[str, torch.Tensor]:
    """`generation_metrics`' three rates per prompt (the mean over each group of `ro.group_size`
    responses), (P,) each on the CPU: the per-pair statistics of the iterative stages' pools."""
    def per_prompt(x: torch.Tensor) -> torch.Tensor:
        return x.float().view(-1, ro.group_size).mean(1).cpu()

    return {"gen/length": per_prompt(ro.response_mask.sum(-1)), "gen/eos_rate": per_prompt(ro.ended),
            "gen/truncated_rate": per_prompt(ro.truncated)}


def close_step(run: Run, setup: OnlineSetup, log: OnlineLog, opt: Optimization, step: int, metrics: dict,
               ro: Rollout, scores: torch.Tensor, *, episodes: int, times: dict[str, float],
               extra_state: dict | None = None) -> dict:
    """# 6. of every online loop, after step `step` (0-based): the keys every loop logs added to its own
    `metrics` (`lr` after this step's updates, `episodes`: the responses sampled so far, given
    `episodes` responses a step, `time/<phase>` for each of `times`), the metrics reduced over processes, logged
    (`OnlineLog.step`: diagnostics, the logging window, samples, evaluation), a checkpoint every
    `save_steps` (with `extra_state`; not at the last step: the final save follows). Returns the
    reduced metrics."""
    c = run.config
    done = step + 1
    metrics = {**metrics, "lr": opt.scheduler.get_last_lr()[0], "episodes": done * episodes,
               **{f"time/{k}": v for k, v in times.items()}}
    metrics = reduce_metrics(run, metrics)
    log.step(done, metrics, ro, scores)
    if c.save_steps and done % c.save_steps == 0 and done < setup.steps:
        opt.save_checkpoint(done, extra_state=extra_state)
    return metrics


def finish_policy(run: Run, setup: OnlineSetup, log: OnlineLog, opt: Optimization, policy, *, updates: int,
                  train_key: str, plot_keys: list[str], extra: dict | None = None) -> Result:
    """The end of the critic-free loops: what each rank held (summary.json), the final policy saved,
    summary.json (steps, episodes, optimizer steps, prompts, `extra`, `OnlineLog.summary`) and plots."""
    c = run.config
    if run.engine is not None:
        run.engine.local = opt.local_counts()
    save_final(run, policy, setup.tokenizer)
    summary = {"stage": run.stage, "steps": setup.steps, "episodes": setup.steps * c.rollout_batch_size * c.group_size,
               "optimizer_steps": updates, "prompts": len(setup.prompt_ids), "skipped_prompts": setup.skipped,
               **(extra or {}), **log.summary(train_key)}
    finish_online(run, setup, summary, plot_keys)
    return Result(run.output_dir, summary, policy, setup.tokenizer, run.logger.history)


# ---- the end -------------------------------------------------------------------------------------

def finish_online(run: Run, setup: OnlineSetup, summary: dict, plot_keys: list[str]) -> dict:
    """Stop the sampler (a vLLM engine; nothing for rlhfkit's), write summary.json (with the run's
    engine and the sampler's report) and plots (main process), close the logger, wait for every
    process. With a judge, its held-out score and win rate are plotted next to the training reward's
    (`eval/scores`): the proxy-vs-judge curves of over-optimisation."""
    setup.generator.close()
    summary.update(run.engine.summary())
    summary.update(setup.generator.summary())
    if run.is_main:
        write_summary(run.output_dir, summary)
        history = run.logger.history
        if any("eval/judge_score" in r for r in history):
            plot_keys = [*plot_keys, "eval/scores", "eval/judge_score", "eval/judge_win_rate", "eval/kl"]
        run.logger.plot(keys=[k for k in dict.fromkeys(plot_keys) if any(k in r for r in history)])
        run.logger.close()
    run.accelerator.wait_for_everyone()
    return summary


def summary_metrics(history: list[dict], first_eval: dict | None, train_key: str) -> dict:
    """The last logged training metrics, the last evaluation, and the evaluation at step 0
    (prefixed `initial_`)."""
    final = next((r for r in reversed(history) if train_key in r), {})
    last_eval = next((r for r in reversed(history) if any(k.startswith("eval/") for k in r)), {})
    return {**{k: v for k, v in final.items() if k != "step" and not k.startswith("eval/")},
            **{k: v for k, v in last_eval.items() if k.startswith("eval/")},
            **({f"initial_{k}": v for k, v in first_eval.items() if k.startswith("eval/")} if first_eval else {})}
