"""`rlhfkit grpo` / `rlhfkit rloo`: critic-free online RL (GRPO, Shao et al. 2024; Dr. GRPO, Liu et
al. 2025; DAPO, Yu et al. 2025; GSPO, Zheng et al. 2025; RLOO, Ahmadian et al. 2024; REINFORCE++,
Hu 2025), one explicit loop per step:

  # 1. generate       rollout_batch_size prompts x num_generations responses (a prompt's prefill
                      shared by its group); dynamic sampling refills flat groups (bounded)
  # 2. score          reward model and/or reward functions; EOS trick; overlong penalty
  # 3. logps          old log-probs (only when num_iterations > 1 or the KL goes to the reward) and
                      reference log-probs (only when beta > 0), in the training micro-batches
  # 4. advantages     the estimator named by `advantage_estimator` (losses/advantages.py), the KL
                      folded into the reward first when `kl_in_reward`
  # 5. updates        num_iterations x num_mini_batches clipped policy-gradient steps, the loss
                      aggregated per token / sequence / constant (losses/policy.py), + beta x KL
  # 6. log, evaluate, checkpoint, diagnostics

Everything around the loop is the shared online layer (rollout/, train/online.py,
train/distributed.py), the same PPO uses. A loss near 0 at the start is expected: advantages are
centred within each group and the ratio is 1, so the loss value is ~0 while its gradient is not.

Sampling in bfloat16 (`sampling_dtype`) or by vLLM (`use_vllm`): the samples come from other kernels
than the trainer's (a bf16 copy of the policy, vLLM's), so each token's policy-gradient loss is
weighted by min(pi_old / pi_sampler, sampling_is_cap) (truncated
importance sampling), pi_old being the trained policy at sampling time (its old log-probs, or the
training forward's own, detached, when there is no old pass).

Single update: when the KL goes to the reward (RLOO, REINFORCE++ with beta > 0) the advantages need
the old log-probs. When a step makes exactly one optimizer step over one micro-batch per process
(`num_iterations` 1, `num_mini_batches` 1, `per_device_train_batch_size` = the process's rows) the old
log-probs ARE the training forward's, so steps 3-4 read them from that forward (detached) instead of
a separate no-grad pass: the same numbers, one forward pass fewer per step (tested).
"""

from __future__ import annotations

import time

import torch

from rlhfkit.config import GRPOConfig
from rlhfkit.losses.advantages import ADVANTAGE_ESTIMATORS, flat_groups
from rlhfkit.losses.kl import KL_ESTIMATORS, kl_loss_term
from rlhfkit.losses.masked import masked_sum
from rlhfkit.losses.policy import (
    aggregate_loss,
    clipped_policy_loss,
    overlong_penalty,
    sampler_correction,
)
from rlhfkit.rollout.rollout import Rollout, Scorer, concat_rollouts, generate_rollout, select_rows, source_metrics
from rlhfkit.train.distributed import reduce_sum_fn
from rlhfkit.train.loop import Result
from rlhfkit.train.online import (
    build_roles,
    close_step,
    finish_policy,
    generation_metrics,
    minibatch_plan,
    rollout_logps,
    rollout_seed,
    run_updates,
    score_rollout,
    start_loop,
    start_online,
)

# ---- 1-2. sample and score a batch -------------------------------------------------------------------

def score_batch(c: GRPOConfig, scorer: Scorer, ro: Rollout) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Scores with the EOS trick and the overlong penalty applied; the parts as scored."""
    scores, parts = score_rollout(c, scorer, ro)
    if c.overlong_buffer is not None:
        scores = scores + c.overlong_penalty * overlong_penalty(ro.lengths, c.max_new_tokens, c.overlong_buffer)
    return scores, parts


def sample_batch(c: GRPOConfig, setup, policy, scorer: Scorer, step: int) -> tuple[Rollout, torch.Tensor, dict, dict]:
    """# 1-2. This process's prompts of this step, `num_generations` responses each, scored. With
    `dynamic_sampling`, groups whose rewards are all equal are dropped and more prompts (a seeded
    draw, a pure function of (seed, step, process, round)) are sampled, at most `max_sampling_rounds`
    rounds; a batch still short after that is filled up with flat groups (zero advantage, so no
    gradient) to keep its size, and the count is logged."""
    run, G, n_prompts = setup.run, c.num_generations, setup.local_prompts
    idx = setup.stream.indices(step)
    kept: list[tuple[Rollout, torch.Tensor, dict]] = []
    spare: list[tuple[Rollout, torch.Tensor, dict]] = []
    n_kept, rounds, stats = 0, 0, {}
    while True:
        with run.precision():
            ro = generate_rollout(policy, setup.tokenizer, setup.generator, [setup.prompt_ids[i] for i in idx],
                                  [setup.rows[i] for i in idx], setup.params, rollout_seed(c, step, run.rank, rounds),
                                  run.device, num_generations=G)
            scores, parts = score_batch(c, scorer, ro)
        rounds += 1
        if not c.dynamic_sampling:
            return ro, scores, parts, stats
        flat = flat_groups(scores, G)
        for good, bucket in ((~flat, kept), (flat, spare)):
            rows = torch.nonzero(good.repeat_interleave(G), as_tuple=True)[0]
            if rows.numel():
                bucket.append((select_rows(ro, rows), scores[rows], {k: v[rows] for k, v in parts.items()}))
        n_kept = sum(len(r.texts) for r, _, _ in kept) // G
        if n_kept >= n_prompts or rounds >= c.max_sampling_rounds:
            break
        g = torch.Generator().manual_seed(rollout_seed(c, step, run.rank, rounds))
        idx = torch.randint(len(setup.prompt_ids), (n_prompts - n_kept,), generator=g).tolist()
    filled = max(0, n_prompts - n_kept)
    pieces = kept + spare
    ro = concat_rollouts([p[0] for p in pieces], setup.tokenizer.pad_token_id)
    rows = torch.arange(n_prompts * G, device=ro.input_ids.device)
    scores = torch.cat([p[1] for p in pieces])[rows]
    parts = {k: torch.cat([p[2][k] for p in pieces])[rows] for k in pieces[0][2]}
    stats = {"rollout/sampling_rounds": float(rounds), "rollout/filled_flat_groups": float(filled)}
    return select_rows(ro, rows), scores, parts, stats


# ---- 5. the loss of one micro-batch ------------------------------------------------------------------

def grpo_micro_loss(policy, ro: Rollout, data: dict, idx: torch.Tensor, c: GRPOConfig,
                    n_tokens: float, n_sequences: float,
                    forward: tuple | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped policy-gradient loss of rows `idx` (+ beta x KL to the reference inside the loss when
    the KL does not go to the reward), aggregated with the global minibatch's counts, so the
    micro-batches of a minibatch on every process add up to the minibatch loss. `forward`: the
    micro-batch's (logps, entropy) when the caller already ran the training forward."""
    m = data["loss_mask"][idx]
    logps, entropy = forward if forward is not None else rollout_logps(policy, ro, idx, c, with_entropy=True)
    old = data["old_logps"][idx] if "old_logps" in data else logps.detach()
    pg = clipped_policy_loss(logps, old, data["advantages"][idx], m, epsilon=c.epsilon,
                             epsilon_high=c.epsilon_high, importance_sampling_level=c.importance_sampling_level)
    per_token = pg["loss"]
    sampler = {}
    if ro.sampling_logps is not None:  # sampled by other kernels (`sampling_dtype`, vLLM): truncated IS per token
        weights, sampler = sampler_correction(old, ro.sampling_logps[idx], ro.response_mask[idx], c.sampling_is_cap)
        per_token = per_token * weights
    seq_kl = None
    if "ref_logps" in data and not c.kl_goes_to_reward:
        kl = kl_loss_term(logps, data["ref_logps"][idx], c.kl_estimator)
        per_token = per_token + c.beta * kl
        kl_share = (masked_sum(kl.detach(), m) / n_tokens).item()
        seq_kl = (masked_sum(logps.detach() - data["ref_logps"][idx], m) / n_sequences).item()
    loss = aggregate_loss(per_token, m, c.loss_aggregation, num_tokens=n_tokens, num_sequences=n_sequences,
                          max_length=c.max_new_tokens)

    def share(x: torch.Tensor) -> float:
        return (masked_sum(x.detach().float(), m) / n_tokens).item()

    stats = {"loss": loss.item(), "policy/clipfrac_low": share(pg["clipped_low"]),
             "policy/clipfrac_high": share(pg["clipped_high"]),
             "policy/clipfrac": share(pg["clipped_low"] + pg["clipped_high"]),
             "policy/approxkl": share(pg["approxkl"]), "policy/ratio": share(pg["ratio"]),
             "policy/ratio_dev": share((pg["ratio"] - 1).abs()),
             "policy/entropy": share(entropy)}
    stats.update({k: share(v) for k, v in sampler.items()})  # how far the sampler is from the trained policy
    if seq_kl is not None:  # k1 summed per response: the mean KL to the reference, over this pass
        stats["policy/kl_loss"] = kl_share
        stats["policy/kl"] = seq_kl
    return loss, stats


@torch.no_grad()
def old_and_reference_logps(c: GRPOConfig, policy, reference, ro: Rollout, micro_batches: list[torch.Tensor],
                            need_old: bool) -> dict:
    """# 3. Old log-probs (`need_old`) and reference log-probs (a reference exists and beta > 0), in the
    micro-batches the first pass trains on (same packing and kernels: the first ratio is exactly 1)."""
    out = {}
    B, W = ro.responses.shape

    def logps_of(model) -> torch.Tensor:
        t = torch.zeros(B, W, device=ro.input_ids.device)
        for idx in micro_batches:
            t[idx] = rollout_logps(model, ro, idx, c)[0]
        return t.masked_fill(~ro.response_mask, 0.0)

    if need_old:
        out["old_logps"] = logps_of(policy)
    if reference is not None and c.beta > 0:
        with reference() as ref:
            out["ref_logps"] = logps_of(ref)
    return out


def loss_mask_of(c: GRPOConfig, ro: Rollout) -> torch.Tensor:
    """(B, W) the tokens the loss covers: the responses, without the truncated ones when
    `mask_truncated_completions`."""
    m = ro.response_mask
    return m & ~ro.truncated[:, None] if c.mask_truncated_completions else m


def advantages(c: GRPOConfig, ro: Rollout, data: dict, scores: torch.Tensor, reduce_sum) -> None:
    """# 4. advantages by `advantage_estimator` (the KL folded into the reward first when it goes
    there: needs data's `old_logps`); adds `advantages` and `loss_mask` to `data`."""
    m = ro.response_mask
    kl_to_reward = c.beta > 0 and c.kl_goes_to_reward
    token_kl = None
    adv_scores = scores
    if kl_to_reward:
        token_kl = KL_ESTIMATORS[c.kl_estimator](data["old_logps"], data["ref_logps"]).masked_fill(~m, 0.0)
        if c.advantage_estimator not in ("reinforce_pp", "reinforce_pp_baseline"):
            adv_scores = scores - c.beta * masked_sum(token_kl, m, dim=1)
    data["advantages"] = ADVANTAGE_ESTIMATORS[c.advantage_estimator](
        adv_scores, m, c.num_generations, token_kl=token_kl if c.advantage_estimator.startswith("reinforce") else None,
        kl_coef=c.beta if kl_to_reward else 0.0, scale_rewards=c.scale_rewards, reduce_sum=reduce_sum)
    data["loss_mask"] = loss_mask_of(c, ro)


def single_update_loss(policy, ro: Rollout, data: dict, idx: torch.Tensor, c: GRPOConfig, counts: list[float],
                       scores: torch.Tensor, reduce_sum):
    """# 3-5 of a single update (module docstring): the training forward of all of this process's
    rows gives the old log-probs (detached), then the advantages, then the loss of that forward."""
    logps, entropy = rollout_logps(policy, ro, idx, c, with_entropy=True)
    old = torch.zeros_like(ro.response_mask, dtype=logps.dtype)
    old[idx] = logps.detach()
    data["old_logps"] = old.masked_fill(~ro.response_mask, 0.0)
    advantages(c, ro, data, scores, reduce_sum)
    return grpo_micro_loss(policy, ro, data, idx, c, counts[0], counts[1], forward=(logps, entropy))


# ---- the stage ---------------------------------------------------------------------------------------

def train_grpo(config: GRPOConfig) -> Result:
    c = config
    stage = c._stage
    G = c.num_generations
    # 0. data, reward functions, run, prompts (validated before any model loads); policy, reference
    setup = start_online(c, stage)
    run = setup.run
    policy, reference, scorer = build_roles(setup, reference_needed=c.beta > 0)
    kl_to_reward = c.beta > 0 and c.kl_goes_to_reward
    need_old = c.num_iterations > 1 or kl_to_reward
    rows = setup.local_prompts * G
    updates = setup.steps * c.num_iterations * c.num_mini_batches
    run.print(f"[{stage}] advantages {c.advantage_estimator}"
              + (f" (scale_rewards {c.scale_rewards})" if c.advantage_estimator == "grpo" else "")
              + f" | KL: beta {c.beta}" + (f" {c.kl_estimator} in the {'reward' if kl_to_reward else 'loss'}"
                                           if c.beta > 0 else " (no reference pass)")
              + f" | loss per {c.loss_aggregation}, importance sampling per {c.importance_sampling_level}, clip "
              f"[1-{c.epsilon}, 1+{c.epsilon_high or c.epsilon}]")
    run.print(f"[{stage}] each process: {setup.local_prompts} prompts x {G} = {rows} responses per step -> "
              f"{c.num_iterations} pass(es) x {c.num_mini_batches} minibatch(es) of {rows // c.num_mini_batches} "
              f"in micro-batches of {c.per_device_train_batch_size} -> {updates} optimizer steps")
    run.print(f"[{stage}] note: a loss near 0 is expected here (group-centred advantages, ratio 1); the "
              "gradient is not 0. Watch rewards/mean, eval/ and rewards/flat_groups instead.")

    # the policy under the run's engine, its optimizer, schedule and resumed state; the log; the bar
    opt, log, bar = start_loop(run, setup, policy, reference, scorer, updates)
    reduce_sum = reduce_sum_fn(run)
    for step in range(opt.start_step, setup.steps):
        t0 = time.perf_counter()
        policy.eval()
        # 1-2. generate and score (dynamic sampling refills flat groups)
        #      (ZeRO-3 / FSDP2: with the policy's parameters whole on this rank, so that ranks may
        #      sample different lengths and rounds without a collective inside)
        with opt.whole(policy):
            ro, scores, parts, sampling_stats = sample_batch(c, setup, policy, scorer, step)
        t_gen = time.perf_counter()
        # 3. old and reference log-probs, in the micro-batches of the first pass (a single update
        #    reads the old ones from its training forward in 5)
        plan0 = minibatch_plan(rows, c, step, 0, group_size=G)
        single = c.num_iterations == 1 and len(plan0) == 1 and len(plan0[0]) == 1
        with opt.whole(policy), run.precision():
            data = old_and_reference_logps(c, policy, reference, ro, [mb for mini in plan0 for mb in mini],
                                           need_old and not single)
        m = ro.response_mask
        # 4. advantages (the KL into the reward first, when it goes there; a single update: inside 5)
        if not (single and need_old):
            advantages(c, ro, data, scores, reduce_sum)
        t_prep = time.perf_counter()
        # 5. updates: num_iterations passes x num_mini_batches minibatches (micro-batches accumulated)
        policy.train()
        plans = (plan0 if e == 0 else minibatch_plan(rows, c, step, e, group_size=G) for e in range(c.num_iterations))
        if single and need_old:
            def loss_of(mb, n):
                return single_update_loss(opt.wrapped, ro, data, mb, c, n, scores, reduce_sum)
        else:
            def loss_of(mb, n):
                return grpo_micro_loss(opt.wrapped, ro, data, mb, c, n[0], n[1])
        loss_mask = loss_mask_of(c, ro)
        means, first = run_updates(
            # the policy through the engine's forward (DeepSpeed: its per-forward bookkeeping, which
            # ZeRO-3's gradient reduction relies on; elsewhere `opt.wrapped` is the policy itself)
            run, opt, plans, micro_loss=loss_of,
            counts=lambda r: [loss_mask[r].sum().item(), loss_mask[r].any(-1).sum().item()])
        policy.eval()
        t_train = time.perf_counter()
        adv = data["advantages"]
        # the sampling policy's KL to the reference (when the old log-probs were taken)
        seq_kl = (masked_sum(KL_ESTIMATORS["k1"](data["old_logps"], data["ref_logps"]), m, dim=1)
                  if "ref_logps" in data and "old_logps" in data else None)
        # 6. metrics, samples, evaluation, checkpoint
        flat = flat_groups(scores, G).float()
        metrics = {
            "rewards/mean": scores.mean().item(), "rewards/std": scores.std().item() if scores.numel() > 1 else 0.0,
            "rewards/flat_groups": flat.mean().item(),
            **source_metrics(parts),
            "advantages/abs_mean": masked_sum(adv.abs(), m).item() / max(m.sum().item(), 1),
            **generation_metrics(ro), **sampling_stats, **means,
            # the sampling policy's KL to the reference; without an old pass, the trained policy's
            **({"objective/kl": seq_kl.mean().item()} if seq_kl is not None
               else {"objective/kl": means["policy/kl"]} if "policy/kl" in means else {}),
            "policy/first_ratio": first["policy/ratio"], "policy/first_ratio_dev": first["policy/ratio_dev"],
        }
        metrics = close_step(run, setup, log, opt, step, metrics, ro, scores, episodes=c.rollout_batch_size * G,
                             times={"generation": t_gen - t0, "scoring": t_prep - t_gen, "training": t_train - t_prep})
        bar.update(1)
        bar.set_postfix(reward=f"{metrics['rewards/mean']:.3f}", flat=f"{metrics['rewards/flat_groups']:.2f}")
    bar.close()
    return finish_policy(run, setup, log, opt, policy, updates=updates, train_key="rewards/mean",
                         plot_keys=["rewards/mean", "rewards/flat_groups", "eval/gold_reward", "eval/accuracy",
                                    "gen/length"])
