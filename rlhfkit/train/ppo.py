"""`rlhfkit ppo`: RLHF with PPO (Ziegler et al. 2019; Stiennon et al. 2020; Ouyang et al. 2022),
with the implementation details of Huang et al. 2024 ("The N+ implementation details of RLHF with
PPO"), one explicit loop per PPO step:

  # 1. generate       sample responses to a batch of prompts (KV cache, left-padded prompts),
                      truncate after the first EOS, append one pad column (the score slot)
  # 2. score          reward model (normalised) and/or Python reward functions; EOS trick; clip
  # 3. logps, values  policy (old) log-probs and critic values, reference log-probs
  # 4. rewards        per-token -beta * KL, the score one past the last token (losses/ppo.py)
  # 5. GAE            advantages and returns; advantages whitened over real tokens
  # 6. PPO epochs     num_ppo_epochs x num_mini_batches optimizer steps over shuffled minibatches
  # 7. KL control     adaptive beta (when target_kl is set)
  # 8. log, evaluate, checkpoint, diagnostics

Exactness: old log-probs and values are computed in the very micro-batches (same rows, same
padding, same temperature scaling, same code path) that the first minibatch of the first epoch
trains on, so the first ratio is exactly 1 and the first clip fraction 0 (tested).
"""

from __future__ import annotations

import importlib
import json
import math
import time
from dataclasses import dataclass

import torch

from rlhfkit.config import PPOConfig
from rlhfkit.data.collate import pad_batch
from rlhfkit.data.encode import encode_prompt, encode_prompt_completion
from rlhfkit.errors import ConfigError
from rlhfkit.losses.advantages import gae
from rlhfkit.losses.kl import KL_ESTIMATORS, AdaptiveKLController, FixedKLController
from rlhfkit.losses.masked import masked_mean, masked_sum, whiten
from rlhfkit.losses.policy import clipped_policy_loss, entropy_from_logits
from rlhfkit.losses.ppo import clip_scores, eos_trick, kl_shaped_rewards, value_loss, value_mask
from rlhfkit.models.logprobs import forward, token_logps
from rlhfkit.rollout.generate import HFGenerator, SamplingParams
from rlhfkit.train.checkpoint import load_checkpoint, save_checkpoint
from rlhfkit.train.common import config_task, config_tokenizer, load_split, row_texts
from rlhfkit.train.loop import BatchStream, Result, Run, build_optimizer, build_scheduler, start_run
from rlhfkit.train.ppo_roles import CRITIC_DIR, POLICY, Roles, build_roles, save_critic
from rlhfkit.train.tracking import progress, write_summary

PPO_FORMATS = ("prompt", "prompt_completion", "messages")


# ---- data ------------------------------------------------------------------------------------------

def encode_prompts(tokenizer, rows: list[dict], max_prompt_length: int) -> tuple[list[list[int]], list[dict], int]:
    """Prompt ids (the last `max_prompt_length` tokens) for rows with a non-empty prompt."""
    ids, kept, skipped = [], [], 0
    for row in rows:
        p = encode_prompt(tokenizer, row["prompt"])[-max_prompt_length:]
        if p:
            ids.append(p)
            kept.append(row)
        else:
            skipped += 1
    return ids, kept, skipped


def load_reward_funcs(specs: list[str]):
    """Import `module:function` reward functions."""
    funcs = []
    for spec in specs:
        module, name = spec.split(":")
        try:
            fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"reward_funcs: cannot import {spec!r}: {e}") from None
        funcs.append(fn)
    return funcs


# ---- rollout ---------------------------------------------------------------------------------------

@dataclass
class Rollout:
    """One batch of episodes. Response axis W = generated width + 1 (the score slot).

    input_ids, attention_mask: (B, P + W)  left-padded prompt | right-padded response
    responses, response_mask:  (B, W)      True on real response tokens (EOS included)
    context_length: P.  ended: (B,) finished with EOS or a stop string."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    responses: torch.Tensor
    response_mask: torch.Tensor
    context_length: int
    ended: torch.Tensor
    texts: list[str]
    rows: list[dict]


def generate_rollout(roles: Roles, tokenizer, generator: HFGenerator, prompt_ids: list[list[int]],
                     rows: list[dict], params: SamplingParams, seed: int, device) -> Rollout:
    """# 1. generate with the policy, then lay out prompt | response | score slot."""
    gen = generator.generate(roles.policy, prompt_ids, params, generator_seed=seed)
    pad = tokenizer.pad_token_id
    queries = pad_batch(prompt_ids, pad, side="left")
    responses = torch.nn.functional.pad(gen.response_ids, (0, 1), value=pad)
    rmask = torch.nn.functional.pad(gen.response_mask, (0, 1), value=False)
    stopped = torch.tensor([any(s in t for s in params.stop) for t in gen.texts], dtype=torch.bool)
    return Rollout(
        input_ids=torch.cat([queries["input_ids"], responses], 1).to(device),
        attention_mask=torch.cat([queries["attention_mask"], rmask], 1).to(device),
        responses=responses.to(device), response_mask=rmask.to(device),
        context_length=queries["input_ids"].shape[1], ended=(gen.ended | stopped).to(device),
        texts=gen.texts, rows=rows)


def policy_logps(model, input_ids, attention_mask, context_length: int, temperature: float,
                 with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, W) log-probs of the response tokens under softmax(logits / T) (and their entropy).
    The ONE function used at rollout, for the reference and in training (ratio exactness)."""
    width = input_ids.shape[1] - context_length
    out = forward(model, input_ids, attention_mask, logits_to_keep=width + 1)
    logits = out.logits[:, :-1]  # position P-1+t predicts response token t
    logps = token_logps(logits, input_ids[:, context_length:], temperature)
    entropy = entropy_from_logits(logits.float() / temperature) if with_entropy else None
    return logps, entropy


def critic_values(roles: Roles, input_ids, attention_mask, context_length: int) -> torch.Tensor:
    """(B, W) V(s_t), read from the hidden state before response token t."""
    return roles.values(input_ids, attention_mask, context_length - 1, input_ids.shape[1] - 1)


def compute_scores(roles: Roles, ro: Rollout, tokenizer, reward_funcs, weights: list[float],
                   batch_size: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """# 2. score: weighted sum of [reward model] + reward functions, (B,). Also the parts."""
    parts: dict[str, torch.Tensor] = {}
    device = ro.input_ids.device
    if roles.has_reward_model:
        if roles.reward_same_vocab:
            ids, mask = ro.input_ids, ro.attention_mask
        else:  # the RM has its own tokenizer: re-encode the texts
            rm_tok = roles.reward_scorer.tokenizer
            enc = [encode_prompt_completion(rm_tok, r["prompt"], t) for r, t in zip(ro.rows, ro.texts)]
            seqs = [e.input_ids if ended else e.input_ids[:-1] for e, ended in zip(enc, ro.ended.tolist())]
            batch = pad_batch(seqs, rm_tok.pad_token_id, side="right")
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        parts["reward_model"] = torch.cat([roles.reward(ids[i:i + batch_size], mask[i:i + batch_size])
                                           for i in range(0, ids.shape[0], batch_size)]).float()
    if reward_funcs:
        prompts = [r["prompt"] for r in ro.rows]
        extra_keys = [k for k in ro.rows[0] if k != "prompt" and not k.startswith("_")]
        columns = {k: [r.get(k) for r in ro.rows] for k in extra_keys}
        for fn in reward_funcs:
            values = fn(prompts=prompts, completions=ro.texts, ended=ro.ended.tolist(), **columns)
            if len(values) != len(prompts):
                raise ConfigError(f"reward function {fn.__name__} returned {len(values)} values for "
                                  f"{len(prompts)} completions")
            parts[f"func/{fn.__name__}"] = torch.tensor([float(v) for v in values], device=device)
    total = sum(w * s for w, s in zip(weights, parts.values()))
    return total, parts


@torch.no_grad()
def score_rollout(roles: Roles, ro: Rollout, c: PPOConfig, micro_batches: list[torch.Tensor]) -> dict:
    """# 3. old log-probs and values in the first epoch's micro-batches; reference log-probs in the
    same micro-batches (the same batch shapes as the policy's, so the same kernels and rounding:
    the KL is exactly 0 while policy = reference)."""
    B, W = ro.responses.shape
    logps = torch.zeros(B, W, device=ro.input_ids.device)
    values = torch.zeros(B, W, device=ro.input_ids.device)
    P, T = ro.context_length, c.temperature
    for idx in micro_batches:
        ids, mask = ro.input_ids[idx], ro.attention_mask[idx]
        logps[idx] = policy_logps(roles.policy, ids, mask, P, T)[0]
        values[idx] = critic_values(roles, ids, mask, P)
    ref = torch.zeros_like(logps)
    with roles.reference() as ref_model:
        for idx in micro_batches:
            ref[idx] = policy_logps(ref_model, ro.input_ids[idx], ro.attention_mask[idx], P, T)[0]
    m = ro.response_mask
    return {"logps": logps.masked_fill(~m, 0.0), "ref_logps": ref.masked_fill(~m, 0.0), "values": values}


def minibatch_plan(n: int, c: PPOConfig, step: int, epoch: int) -> list[list[torch.Tensor]]:
    """Shuffled minibatches -> micro-batches of row indices, a pure function of (seed, step, epoch)."""
    g = torch.Generator().manual_seed(c.seed * 1_000_003 + step * 1_009 + epoch)
    perm = torch.randperm(n, generator=g)
    mini = n // c.num_mini_batches
    micro = c.per_device_train_batch_size
    return [[perm[s + k:s + k + micro] for k in range(0, mini, micro)] for s in range(0, n, mini)]


# ---- training ------------------------------------------------------------------------------------

def ppo_micro_loss(roles: Roles, ro: Rollout, data: dict, idx: torch.Tensor, c: PPOConfig,
                   n_tokens: float, n_values: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one micro-batch, normalised by the whole minibatch's token counts (so accumulation
    over micro-batches gives the minibatch mean), plus metric sums."""
    ids, mask = ro.input_ids[idx], ro.attention_mask[idx]
    m, vm = ro.response_mask[idx], data["value_mask"][idx]
    logps, entropy = policy_logps(roles.policy, ids, mask, ro.context_length, c.temperature, with_entropy=True)
    values = critic_values(roles, ids, mask, ro.context_length)
    pg = clipped_policy_loss(logps, data["logps"][idx], data["advantages"][idx], m, epsilon=c.cliprange)
    vf = value_loss(values, data["values"][idx], data["returns"][idx], c.cliprange_value)
    pg_loss = masked_sum(pg["loss"], m) / n_tokens
    vf_loss = masked_sum(vf["loss"], vm) / n_values
    ent = masked_sum(entropy, m) / n_tokens
    loss = pg_loss + c.vf_coef * vf_loss - c.entropy_coef * ent
    stats = {
        "policy/loss": pg_loss.item(), "val/loss": vf_loss.item(), "policy/entropy": ent.item(),
        "policy/clipfrac": (masked_sum(pg["clipped_low"] + pg["clipped_high"], m) / n_tokens).item(),
        "policy/approxkl": (masked_sum(pg["approxkl"], m) / n_tokens).item(),
        "policy/ratio": (masked_sum(pg["ratio"], m) / n_tokens).item(),
        "val/clipfrac": (masked_sum(vf["clipped"], vm) / n_values).item(),
        "val/error": (masked_sum(vf["error"], vm) / n_values).item(),
        "loss": loss.item(),
    }
    return loss, stats


# ---- diagnostics ---------------------------------------------------------------------------------

class Diagnostics:
    """Warnings that explain a run going wrong, printed once each and logged as `diag/*` flags."""

    EXPLAIN = {
        "negative_kl": "mean KL to the reference is negative: sampling and scoring disagree (temperature "
                       "not applied the same way, pads attended, or tokens forced/suppressed at "
                       "generation); the KL penalty then rewards drifting away",
        "high_clipfrac": "policy clip fraction stayed above 0.3: updates are too large for the trust "
                         "region; lower learning_rate or num_ppo_epochs, or raise cliprange",
        "length_runaway": "responses are getting longer and EOS rarer: the policy is learning to not "
                          "finish (check the EOS trick: missing_eos_penalty / missing_eos_score)",
        "reward_hacking": "the proxy score rises while the gold reward falls: the policy is exploiting "
                          "the reward model; raise kl_coef / lower target_kl, or stop earlier",
    }

    def __init__(self, run: Run, max_new_tokens: int):
        self.run = run
        self.max_new_tokens = max_new_tokens
        self.kl: list[float] = []
        self.clip: list[float] = []
        self.first_eos: float | None = None
        self.first_length: float | None = None
        self.evals: list[tuple[float, float]] = []  # (proxy score, gold)
        self.fired: dict[str, int] = {}

    def _flag(self, name: str, step: int) -> None:
        if name not in self.fired:
            self.fired[name] = step
            self.run.print(f"[ppo] WARNING (step {step}): {self.EXPLAIN[name]}")

    def step(self, step: int, m: dict) -> dict:
        self.kl.append(m["objective/kl"])
        self.clip.append(m["policy/clipfrac"])
        if self.first_eos is None:
            self.first_eos, self.first_length = m["gen/eos_rate"], m["gen/length"]
        flags = {}
        recent = self.kl[-5:]
        flags["negative_kl"] = len(recent) >= 3 and sum(recent) / len(recent) < -0.01
        flags["high_clipfrac"] = len(self.clip) >= 3 and min(self.clip[-3:]) > 0.3
        flags["length_runaway"] = (m["gen/eos_rate"] < 0.5 * self.first_eos
                                   and m["gen/length"] > max(1.5 * self.first_length, 0.8 * self.max_new_tokens))
        for name, on in flags.items():
            if on:
                self._flag(name, step)
        return {f"diag/{k}": float(v) for k, v in flags.items()}

    def evaluation(self, step: int, proxy: float, gold: float | None) -> dict:
        if gold is None:
            return {}
        self.evals.append((proxy, gold))
        hacking = (len(self.evals) >= 3 and self.evals[-1][0] > self.evals[-3][0]
                   and self.evals[-1][1] < self.evals[-2][1] < self.evals[-3][1])
        if hacking:
            self._flag("reward_hacking", step)
        return {"diag/reward_hacking": float(hacking)}

    def summary(self) -> list[dict]:
        return [{"diagnostic": k, "first_step": s, "explanation": self.EXPLAIN[k]} for k, s in self.fired.items()]


# ---- evaluation ----------------------------------------------------------------------------------

def eval_prompts(c: PPOConfig, tokenizer, eval_rows: list[dict], task) -> tuple[list[list[int]], list[dict]]:
    """A fixed held-out prompt set: the task's eval split, else the eval dataset."""
    if task is not None:
        rows = task.make("prompt", c.eval_num_prompts, seed=c.seed, split="eval")
    else:
        rows = eval_rows[:c.eval_num_prompts]
    ids, rows, _ = encode_prompts(tokenizer, rows, c.max_prompt_length)
    return ids, rows


@torch.no_grad()
def evaluate(roles: Roles, c: PPOConfig, tokenizer, generator, params, prompt_ids, rows, task,
             reward_funcs, weights, device) -> tuple[dict, list[dict]]:
    """Held-out prompts: proxy score, KL to the reference (summed over tokens), gold reward."""
    roles.policy.eval()
    ro = generate_rollout(roles, tokenizer, generator, prompt_ids, rows, params, c.seed + 7, device)
    scores, _ = compute_scores(roles, ro, tokenizer, reward_funcs, weights, c.per_device_eval_batch_size)
    chunks = [torch.arange(i, min(i + c.per_device_eval_batch_size, len(rows)))
              for i in range(0, len(rows), c.per_device_eval_batch_size)]
    data = score_rollout(roles, ro, c, chunks)
    kl = masked_sum(KL_ESTIMATORS["k1"](data["logps"], data["ref_logps"]), ro.response_mask, dim=1)
    metrics = {"scores": scores.mean().item(), "kl": kl.mean().item(),
               "length": ro.response_mask.sum(-1).float().mean().item(),
               "eos_rate": ro.ended.float().mean().item()}
    gold = None
    if task is not None:
        gold = task.gold_reward([r["prompt"] for r in rows], ro.texts, ro.ended.tolist())
        metrics["gold_reward"] = sum(gold) / len(gold)
    samples = [{"prompt": r["prompt"], "response": t, "score": s, "ended": e,
                **({"gold": gold[i]} if gold is not None else {})}
               for i, (r, t, s, e) in enumerate(zip(rows, ro.texts, scores.tolist(), ro.ended.tolist()))]
    return metrics, samples


# ---- data parallel: what crosses processes ----------------------------------------------------------
# Each process generates, scores and trains on its share of the rollout batch; whitening, the token
# counts that normalise the losses, the KL controller's input and the logged metrics are global, and
# the gradients are summed across processes before clipping, so N processes x B/N episodes follow
# the same update as one process x B (tested). With one process nothing below communicates.

def global_whiten(run: Run, values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """`whiten` with the masked mean and (biased) variance taken over every process's batch."""
    if run.world_size == 1:
        return whiten(values, mask, shift_mean)
    count, total = run.reduce_sum([mask.sum().item(), masked_sum(values, mask).item()]).tolist()
    mean = total / max(count, 1.0)
    var = run.reduce_sum([masked_sum((values - mean) ** 2, mask).item()]).item() / max(count, 1.0)
    return whiten(values, mask, shift_mean, stats=(mean, var))


def global_mean(run: Run, values: torch.Tensor) -> float:
    """Mean of a (B,) tensor over every process's rows."""
    if run.world_size == 1:
        return values.mean().item()
    total, n = run.reduce_sum([values.sum().item(), values.numel()]).tolist()
    return total / n


def sum_gradients(run: Run, params: list[torch.nn.Parameter]) -> None:
    """Sum the gradients of `params` across processes (one flat all-reduce)."""
    if run.world_size == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def reduce_metrics(run: Run, metrics: dict[str, float], mean: bool = True) -> dict[str, float]:
    """Metrics over every process: the mean of per-process values (`mean`), or their sum (for
    partial sums of global means, like the losses normalised by global token counts)."""
    if run.world_size == 1:
        return metrics
    keys = sorted(metrics)
    values = run.reduce_sum([metrics[k] for k in keys]) / (run.world_size if mean else 1)
    return dict(zip(keys, values.tolist()))


# ---- the stage -----------------------------------------------------------------------------------

def ppo_steps(c: PPOConfig, n_prompts: int) -> int:
    if c.max_steps > 0:
        return c.max_steps
    episodes = c.total_episodes if c.total_episodes is not None else c.num_train_epochs * n_prompts
    return max(1, math.ceil(episodes / c.rollout_batch_size))


def train_ppo(config: PPOConfig) -> Result:
    c = config
    # 0. validate data and reward functions before loading anything heavy
    train_rows, eval_rows = load_split(c, PPO_FORMATS)
    reward_funcs = load_reward_funcs(c.reward_funcs)
    task = config_task(c.task)
    run = start_run(c, "ppo")
    local_batch = c.rollout_batch_size // run.world_size
    if c.rollout_batch_size % run.world_size or local_batch % (c.num_mini_batches * c.per_device_train_batch_size):
        raise ConfigError(f"rollout_batch_size {c.rollout_batch_size} must split into {run.world_size} process(es) x "
                          f"num_mini_batches {c.num_mini_batches} x per_device_train_batch_size "
                          f"{c.per_device_train_batch_size}")
    device = run.device
    tokenizer = config_tokenizer(c, lambda: row_texts(train_rows))
    prompt_ids, train_rows, skipped = encode_prompts(tokenizer, train_rows, c.max_prompt_length)
    if not prompt_ids:
        raise ConfigError(f"dataset {c.dataset}: no non-empty prompts")
    roles = build_roles(c, tokenizer, device, printer=run.print)
    n_sources = len(reward_funcs) + roles.has_reward_model
    weights = c.reward_weights or [1.0] * n_sources

    # derived sizes, printed once
    steps = ppo_steps(c, len(prompt_ids))
    mini = c.rollout_batch_size // c.num_mini_batches
    accum = mini // c.per_device_train_batch_size
    updates = steps * c.num_ppo_epochs * c.num_mini_batches
    mem_total, mem_roles = roles.unique_parameters()
    trainable = sum(p.numel() for p in roles.trainable.parameters() if p.requires_grad)
    run.print(f"[ppo] {len(prompt_ids)} prompts ({skipped} empty skipped) | {steps} PPO steps x "
              f"{c.rollout_batch_size} episodes | {c.num_ppo_epochs} epochs x {c.num_mini_batches} minibatches "
              f"of {mini} = {c.per_device_train_batch_size} per micro-batch x {accum} accumulation -> "
              f"{updates} optimizer steps")
    run.print(f"[ppo] parameters in memory {mem_total / 1e6:.2f}M (roles: "
              + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in mem_roles.items())
              + f"), trainable {trainable / 1e6:.2f}M")

    optimizer = build_optimizer(roles.trainable, c)
    scheduler = build_scheduler(optimizer, c, updates)
    kl_ctl = (AdaptiveKLController(c.kl_coef, c.target_kl, c.kl_horizon) if c.target_kl is not None
              else FixedKLController(c.kl_coef))
    start_step = 0
    if run.resume_from is not None:
        state = load_checkpoint(run.resume_from, roles.trainable, optimizer, scheduler, rank=run.rank)
        start_step = state["step"]
        kl_ctl.value = state.get("kl_coef", kl_ctl.value)
        run.print(f"[ppo] resumed from {run.resume_from} at step {start_step} (kl_coef {kl_ctl.value:.4g})")

    generator = HFGenerator(tokenizer, batch_size=c.generation_batch_size or local_batch)
    params = SamplingParams(max_new_tokens=c.max_new_tokens, temperature=c.temperature, top_k=c.top_k,
                            top_p=c.top_p, stop=tuple(c.stop))
    stream = BatchStream(len(prompt_ids), local_batch, run.world_size, run.rank, seed=c.seed)
    ev_ids, ev_rows = eval_prompts(c, tokenizer, eval_rows, task)
    do_eval = bool(ev_ids)
    diag = Diagnostics(run, c.max_new_tokens)
    params_list = [p for p in roles.trainable.parameters() if p.requires_grad]
    samples_path = run.output_dir / "samples.jsonl"
    if run.is_main and run.resume_from is None and samples_path.exists():
        samples_path.unlink()

    def run_eval(step: int) -> dict:
        metrics, samples = evaluate(roles, c, tokenizer, generator, params, ev_ids, ev_rows, task,
                                    reward_funcs, weights, device)
        with samples_path.open("a") as f:
            for s in samples[:c.num_sample_generations]:
                f.write(json.dumps({"step": step, "split": "eval", **s}) + "\n")
        out = {f"eval/{k}": v for k, v in metrics.items()}
        out.update(diag.evaluation(step, metrics["scores"], metrics.get("gold_reward")))
        return out

    first_eval = None
    do_eval = do_eval and run.is_main  # evaluation (no collectives inside) runs on the main process
    if do_eval and start_step == 0:
        first_eval = run_eval(0)
        run.logger.log(0, first_eval)
        run.print("[ppo] step 0 (before training): " + ", ".join(f"{k} {v:.3f}" for k, v in first_eval.items()
                                                                if not k.startswith("diag")))

    bar = progress(total=steps, initial=start_step, disable=run.quiet, desc="ppo")
    window: list[dict] = []
    for step in range(start_step, steps):
        t0 = time.perf_counter()
        roles.policy.eval()
        idx = stream.indices(step)
        # 1. generate
        ro = generate_rollout(roles, tokenizer, generator, [prompt_ids[i] for i in idx],
                              [train_rows[i] for i in idx], params, c.seed * 7919 + step + 104_729 * run.rank,
                              device)
        t_gen = time.perf_counter()
        # 2. score
        raw_scores, parts = compute_scores(roles, ro, tokenizer, reward_funcs, weights, c.per_device_eval_batch_size)
        scores = eos_trick(raw_scores, ro.ended, penalty=c.missing_eos_penalty, replace=c.missing_eos_score)
        scores = clip_scores(scores, c.reward_clip)
        t_score = time.perf_counter()
        # 3. old log-probs + values (in epoch 0's micro-batches), reference log-probs
        plan0 = minibatch_plan(len(idx), c, step, 0)
        data = score_rollout(roles, ro, c, [mb for mini_b in plan0 for mb in mini_b])
        m = ro.response_mask
        vmask = value_mask(m)
        beta = kl_ctl.value
        # 4. KL-shaped rewards
        kl = KL_ESTIMATORS[c.kl_estimator](data["logps"], data["ref_logps"]).masked_fill(~m, 0.0)
        rewards = kl_shaped_rewards(scores, kl, m, beta)
        if c.whiten_rewards:
            rewards = global_whiten(run, rewards, vmask, shift_mean=False)
        # 5. GAE over the value mask; advantages whitened over real tokens
        values = data["values"].masked_fill(~vmask, 0.0)
        advantages, returns = gae(rewards, values, c.gamma, c.lam)
        if c.whiten_advantages:
            advantages = global_whiten(run, advantages, m)
        data.update(values=values, advantages=advantages, returns=returns, value_mask=vmask)
        t_prep = time.perf_counter()
        # 6. PPO epochs over shuffled minibatches (gradient accumulation over micro-batches)
        roles.policy.train()
        sums: dict[str, float] = {}
        n_updates = 0
        for epoch in range(c.num_ppo_epochs):
            plan = plan0 if epoch == 0 else minibatch_plan(len(idx), c, step, epoch)
            for micro_batches in plan:
                rows_mb = torch.cat(micro_batches)  # token counts of the whole (global) minibatch
                n_tok, n_val = run.reduce_sum([m[rows_mb].sum().item(), vmask[rows_mb].sum().item()]).clamp(min=1).tolist()
                for mb in micro_batches:
                    with run.accelerator.autocast():
                        loss, stats = ppo_micro_loss(roles, ro, data, mb, c, n_tok, n_val)
                    loss.backward()
                    for k, v in stats.items():
                        sums[k] = sums.get(k, 0.0) + v
                sum_gradients(run, params_list)
                grad_norm = (torch.nn.utils.clip_grad_norm_(params_list, c.max_grad_norm) if c.max_grad_norm > 0
                             else torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params_list
                                                                        if p.grad is not None])))
                sums["grad_norm"] = sums.get("grad_norm", 0.0) + float(grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                n_updates += 1
                if epoch == 0 and n_updates == 1:
                    first = {k: sums[k] for k in ("policy/ratio", "policy/clipfrac", "policy/approxkl")}
        roles.policy.eval()
        # the loss statistics are per-process shares of global means; grad_norm is already global
        sums = {**reduce_metrics(run, {k: v for k, v in sums.items() if k != "grad_norm"}, mean=False),
                "grad_norm": sums["grad_norm"]}
        first = reduce_metrics(run, first, mean=False)
        t_train = time.perf_counter()
        # 7. KL control (on the mean sequence KL of this batch)
        seq_kl = masked_sum(kl, m, dim=1)
        kl_ctl.update(global_mean(run, seq_kl), c.rollout_batch_size)
        # 8. metrics, samples, evaluation, checkpoint
        non_score = masked_sum(-beta * kl, m, dim=1)
        metrics = {
            "objective/kl": seq_kl.mean().item(),
            "objective/scores": scores.mean().item(),
            "objective/raw_scores": raw_scores.mean().item(),
            "objective/non_score_reward": non_score.mean().item(),
            "objective/rlhf_reward": (scores + non_score).mean().item(),
            "objective/entropy": masked_sum(-data["logps"], m, dim=1).mean().item(),
            "objective/kl_coef": beta,
            "gen/length": m.sum(-1).float().mean().item(),
            "gen/eos_rate": ro.ended.float().mean().item(),
            "val/mean": masked_mean(values, vmask).item(),
            "val/returns": masked_mean(returns, vmask).item(),
            **{f"objective/score_{k}": v.mean().item() for k, v in parts.items() if len(parts) > 1},
            **{k: v / n_updates for k, v in sums.items()},
            "policy/first_ratio": first["policy/ratio"], "policy/first_clipfrac": first["policy/clipfrac"],
            "lr": scheduler.get_last_lr()[0],
            "episodes": (step + 1) * c.rollout_batch_size,
            "time/generation": t_gen - t0, "time/scoring": t_score - t_gen + t_prep - t_score,
            "time/training": t_train - t_prep,
        }
        metrics = reduce_metrics(run, metrics)
        metrics.update(diag.step(step + 1, metrics))
        window.append(metrics)
        done = step + 1
        bar.update(1)
        bar.set_postfix(score=f"{metrics['objective/scores']:.3f}", kl=f"{metrics['objective/kl']:.3f}")
        record: dict = {}
        if done % c.logging_steps == 0 or done == steps:
            record = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
            record["lr"] = metrics["lr"]
            record["objective/kl_coef"] = metrics["objective/kl_coef"]
            window = []
            if run.is_main:  # the main process's own samples
                with samples_path.open("a") as f:
                    for i in range(min(c.num_sample_generations, len(ro.texts))):
                        f.write(json.dumps({"step": done, "split": "train", "prompt": ro.rows[i]["prompt"],
                                            "response": ro.texts[i], "score": scores[i].item(),
                                            "ended": bool(ro.ended[i])}) + "\n")
        if do_eval and (done == steps or (c.eval_steps and done % c.eval_steps == 0)):
            record.update(run_eval(done))
        if record:
            run.logger.log(done, record)
        if c.save_steps and done % c.save_steps == 0 and done < steps:
            save_checkpoint(run.output_dir, done, roles.trainable, optimizer, scheduler, rank=run.rank,
                            is_main=run.is_main, barrier=run.accelerator.wait_for_everyone,
                            keep=c.save_total_limit, extra_state={"kl_coef": kl_ctl.value})
    bar.close()

    # final: the policy (HF format; LoRA: the policy adapter only), the critic (a reward-model
    # directory under output_dir/critic), summary, plots
    save_policy(run, roles, tokenizer)
    if run.is_main:
        critic_dir = save_critic(run.output_dir / CRITIC_DIR, roles, c, tokenizer)
        run.print(f"[ppo] critic saved to {critic_dir} (reward-model format: "
                  "rlhfkit.models.reward.load_reward_model loads it; score = value at the last token)")
    history = run.logger.history
    final = next((r for r in reversed(history) if "objective/kl" in r), {})
    last_eval = next((r for r in reversed(history) if "eval/kl" in r), {})
    summary = {"stage": "ppo", "steps": steps, "episodes": steps * c.rollout_batch_size,
               "optimizer_steps": updates, "prompts": len(prompt_ids), "skipped_prompts": skipped,
               "parameters_in_memory": mem_total, "trainable_parameters": trainable,
               **{k: v for k, v in final.items() if k != "step" and not k.startswith("eval/")},
               **{k: v for k, v in last_eval.items() if k.startswith("eval/")},
               **({f"initial_{k}": v for k, v in first_eval.items() if k.startswith("eval/")} if first_eval else {}),
               "diagnostics": diag.summary()}
    if run.is_main:
        write_summary(run.output_dir, summary)
        run.logger.plot(keys=[k for k in ("objective/scores", "objective/kl", "eval/gold_reward", "gen/length")
                              if any(k in r for r in history)])
        run.logger.close()
    run.accelerator.wait_for_everyone()
    return Result(run.output_dir, summary, roles.policy, tokenizer, history)


def save_policy(run: Run, roles: Roles, tokenizer) -> None:
    """The trained policy in Hugging Face format; under LoRA only the policy adapter (and the
    merged model with `merge_lora`)."""
    c = run.config
    out = run.output_dir
    policy = roles.policy
    if not run.is_main:
        return
    if c.finetuning_type == "lora":
        policy.save_pretrained(out, selected_adapters=[POLICY], safe_serialization=True)
        if c.merge_lora:
            import copy

            merged = copy.deepcopy(policy)
            for name in list(merged.peft_config):
                if name != POLICY:
                    merged.delete_adapter(name)
            merged = merged.merge_and_unload()
            merged.save_pretrained(out / "merged", safe_serialization=True)
            tokenizer.save_pretrained(out / "merged")
    else:
        policy.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
