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

The stage is a client of the shared online layer: sampling and scoring in `rlhfkit/rollout/`,
log-probs in `models/logprobs.response_logps`, the update driver, diagnostics, evaluation and saving
in `train/online.py`, data parallel in `train/distributed.py`; the roles in `train/ppo_roles.py`.

Exactness: old log-probs and values are computed in the very micro-batches (same rows, same
packing, same temperature scaling, same precision context, same code path) that the first
minibatch of the first epoch trains on, so the first ratio is exactly 1 and the first clip
fraction 0 (tested).

Sampling by other kernels than the trainer's (`sampling_dtype: bfloat16`, `use_vllm`): each token's
policy-gradient loss is weighted by min(pi_old / pi_sampler, sampling_is_cap) (truncated importance
sampling, as in grpo); the value loss is not (the critic fits the returns of the states sampled).

Single update: when a step makes exactly one optimizer step over one micro-batch per process
(`num_ppo_epochs` 1, `num_mini_batches` 1, `per_device_train_batch_size` = the process's rollout
rows), the old log-probs and values ARE the training forward's (nothing has moved yet), so steps
3-5 read them from that forward (detached) instead of a separate no-grad pass over the same rows:
two forward passes fewer per step (policy and critic), the same numbers (tested equal to the
accumulated path).
"""

from __future__ import annotations

import time

import torch

from rlhfkit.config import PPOConfig
from rlhfkit.errors import ConfigError
from rlhfkit.losses.advantages import gae
from rlhfkit.losses.kl import KL_ESTIMATORS, AdaptiveKLController, FixedKLController
from rlhfkit.losses.masked import masked_mean, masked_sum
from rlhfkit.losses.policy import clipped_policy_loss, sampler_correction
from rlhfkit.losses.ppo import clip_scores, eos_trick, kl_shaped_rewards, value_loss, value_mask
from rlhfkit.models.logprobs import response_logps
from rlhfkit.rollout.rollout import Rollout, Scorer, generate_rollout
from rlhfkit.train.common import save_final
from rlhfkit.train.distributed import Optimization, global_mean, global_whiten
from rlhfkit.train.loop import Result
from rlhfkit.train.online import (
    check_padding_free,
    close_step,
    finish_online,
    generation_metrics,
    minibatch_plan,
    rollout_seed,
    run_updates,
    start_log,
    start_online,
)
from rlhfkit.train.ppo_roles import CRITIC_DIR, POLICY, Roles, build_roles, fsdp_roots, save_critic

# ---- log-probs and values --------------------------------------------------------------------------


def policy_logps(model, ro: Rollout, idx: torch.Tensor, c: PPOConfig, with_entropy: bool = False):
    """(B, W) response log-probs (and entropy) of rows `idx` under `model`: `response_logps`, the
    one function of every pass, packed when `padding_free`."""
    return response_logps(model, ro.input_ids[idx], ro.attention_mask[idx], ro.context_length, c.temperature,
                          padding_free=c.padding_free, suppress_ids=[ro.pad_id], with_entropy=with_entropy,
                          entropy_grad=c.entropy_coef > 0)


def critic_values(roles: Roles, ro: Rollout, idx: torch.Tensor, c: PPOConfig) -> torch.Tensor:
    """(B, W) V(s_t) of rows `idx`, read from the critic's hidden state before response token t."""
    return roles.values(ro.input_ids[idx], ro.attention_mask[idx], ro.context_length, padding_free=c.padding_free)


@torch.no_grad()
def score_rollout(roles: Roles, ro: Rollout, c: PPOConfig, micro_batches: list[torch.Tensor],
                  old: bool = True) -> dict:
    """# 3. old log-probs and values in the first epoch's micro-batches (`old`; False: the single
    update reads them from its training forward); reference log-probs in the same micro-batches
    (the same batch shapes as the policy's, so the same kernels and rounding: the KL is exactly 0
    while policy = reference)."""
    B, W = ro.responses.shape
    m = ro.response_mask
    data = {}
    if old:
        logps = torch.zeros(B, W, device=ro.input_ids.device)
        values = torch.zeros(B, W, device=ro.input_ids.device)
        for idx in micro_batches:
            logps[idx] = policy_logps(roles.policy, ro, idx, c)[0]
            values[idx] = critic_values(roles, ro, idx, c)
        data.update(logps=logps.masked_fill(~m, 0.0), values=values)
    ref = torch.zeros(B, W, device=ro.input_ids.device)
    with roles.reference() as ref_model:
        for idx in micro_batches:
            ref[idx] = policy_logps(ref_model, ro, idx, c)[0]
    data["ref_logps"] = ref.masked_fill(~m, 0.0)
    return data


def advantages(run, c: PPOConfig, ro: Rollout, data: dict, scores: torch.Tensor, beta: float) -> None:
    """# 4. KL-shaped rewards; 5. GAE over the value mask, advantages whitened over real tokens (over
    every process). Reads data's `logps`, `ref_logps`, `values`; adds `kl`, `advantages`, `returns`,
    `value_mask` and the masked `values`."""
    m = ro.response_mask
    vmask = value_mask(m)
    kl = KL_ESTIMATORS[c.kl_estimator](data["logps"], data["ref_logps"]).masked_fill(~m, 0.0)
    rewards = kl_shaped_rewards(scores, kl, m, beta)
    if c.whiten_rewards:
        rewards = global_whiten(run, rewards, vmask, shift_mean=False)
    values = data["values"].masked_fill(~vmask, 0.0)
    adv, returns = gae(rewards, values, c.gamma, c.lam)
    if c.whiten_advantages:
        adv = global_whiten(run, adv, m)
    data.update(kl=kl, values=values, advantages=adv, returns=returns, value_mask=vmask)


def reward_packing_matches(run, roles: Roles) -> bool:
    """At start: does the reward model score packed batches as it scores padded ones (`packing_probe`,
    in the reward model's vocabulary)? A model that does not follow packed position ids is scored
    padded for the whole run, with a note. In float32 even under `bf16: true`: the question is the
    model's structure, which bf16 rounding (different shapes, different sums) would blur."""
    from rlhfkit.models.reward import packing_probe

    ok = roles.packed_rewards_match(*packing_probe(roles.reward_vocab_size, run.device))
    if not ok:
        run.print("[ppo] note: the reward model's packed scores differ from its padded ones: it scores padded")
    return ok


def roles_scorer(c: PPOConfig, roles: Roles, tokenizer, reward_funcs) -> Scorer:
    """# 2. the scorer: the roles' reward model (normalised; on its own tokenizer's re-encoding of the
    texts when its vocabulary differs) and the reward functions, weighted."""
    return Scorer(tokenizer, reward_funcs, c.reward_weights,
                  reward_model=roles.reward if roles.has_reward_model else None,
                  rm_tokenizer=None if roles.reward_same_vocab else roles.reward_scorer.tokenizer,
                  batch_size=c.per_device_eval_batch_size)


# ---- training ------------------------------------------------------------------------------------

def ppo_micro_loss(roles: Roles, ro: Rollout, data: dict, idx: torch.Tensor, c: PPOConfig,
                   n_tokens: float, n_values: float,
                   forward: tuple | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one micro-batch, normalised by the whole minibatch's token counts (so accumulation
    over micro-batches gives the minibatch mean), plus metric sums. `forward`: the micro-batch's
    (logps, entropy, values) when the caller already ran the training forward (single update)."""
    m, vm = ro.response_mask[idx], data["value_mask"][idx]
    if forward is None:
        forward = (*policy_logps(roles.policy, ro, idx, c, with_entropy=True), critic_values(roles, ro, idx, c))
    logps, entropy, values = forward
    pg = clipped_policy_loss(logps, data["logps"][idx], data["advantages"][idx], m, epsilon=c.cliprange)
    per_token, sampler = pg["loss"], {}
    if ro.sampling_logps is not None:  # sampled by other kernels (`sampling_dtype`, vLLM): truncated IS per token
        weights, sampler = sampler_correction(data["logps"][idx], ro.sampling_logps[idx], m, c.sampling_is_cap)
        per_token = per_token * weights
    vf = value_loss(values, data["values"][idx], data["returns"][idx], c.cliprange_value)
    pg_loss = masked_sum(per_token, m) / n_tokens
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
        **{k: (masked_sum(v.detach().float(), m) / n_tokens).item() for k, v in sampler.items()},
    }
    return loss, stats


def single_update_loss(run, roles: Roles, ro: Rollout, data: dict, idx: torch.Tensor, c: PPOConfig,
                       counts: list[float], scores: torch.Tensor, beta: float):
    """# 3-6 of a single update (module docstring): the training forward of all of this process's
    rows gives the old log-probs and values (detached), then steps 4-5, then the loss of that same
    forward. `idx` is the one micro-batch: every local row, in the plan's order."""
    logps, entropy = policy_logps(roles.policy, ro, idx, c, with_entropy=True)
    values = critic_values(roles, ro, idx, c)
    old = torch.zeros_like(data["ref_logps"])
    old[idx] = logps.detach()
    data["logps"] = old.masked_fill(~ro.response_mask, 0.0)
    data["values"] = torch.zeros_like(old)
    data["values"][idx] = values.detach()
    advantages(run, c, ro, data, scores, beta)
    return ppo_micro_loss(roles, ro, data, idx, c, counts[0], counts[1], forward=(logps, entropy, values))


# ---- the stage -----------------------------------------------------------------------------------

def train_ppo(config: PPOConfig) -> Result:
    c = config
    # 0. data, reward functions, run, prompts (validated before any model loads); roles
    setup = start_online(c, "ppo")
    run, tokenizer = setup.run, setup.tokenizer
    roles = build_roles(c, tokenizer, run.device, printer=run.print)
    if c.gradient_checkpointing:  # policy and critic: recomputed in the training passes only
        if roles.critic_peft is roles.policy:
            raise ConfigError(
                "gradient_checkpointing: true with LoRA where the critic is adapter 'critic' on the policy's own "
                "base (reward functions only, or a LoRA reward model over the same base) is not supported: the "
                "backward pass would recompute the policy's layers under whichever adapter is active then. Set "
                "gradient_checkpointing: false, or train the critic on its own base (a full reward model, or one "
                "over another base)")
        roles.enable_gradient_checkpointing()
    scorer = roles_scorer(c, roles, tokenizer, setup.reward_funcs)
    check_padding_free(run, roles.policy, setup.prompt_ids, tokenizer.pad_token_id)
    if c.padding_free and roles.has_reward_model:  # the reward model's passes packed too, once checked
        roles.pack_rewards(reward_packing_matches(run, roles))

    # derived sizes, printed once
    steps = setup.steps
    mini = c.rollout_batch_size // c.num_mini_batches
    accum = mini // c.per_device_train_batch_size
    updates = steps * c.num_ppo_epochs * c.num_mini_batches
    mem_total, mem_roles = roles.unique_parameters()
    trainable = sum(p.numel() for p in roles.trainable.parameters() if p.requires_grad)
    run.print(f"[ppo] {c.num_ppo_epochs} epochs x {c.num_mini_batches} minibatches of {mini} = "
              f"{c.per_device_train_batch_size} per micro-batch x {accum} accumulation -> {updates} optimizer steps")
    run.print(f"[ppo] parameters in memory {mem_total / 1e6:.2f}M (roles: "
              + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in mem_roles.items())
              + f"), trainable {trainable / 1e6:.2f}M")

    # the trained roles under the run's engine: one DeepSpeed engine over `roles.trainable` (policy and
    # critic in one container), or under FSDP2 each trained model its own root (`fsdp_roots`); the frozen
    # reference and reward model stay whole on every rank outside it (ppo_roles.py)
    roots, units = fsdp_roots(roles)
    opt = Optimization(run, roles.trainable, updates, prepare=False, roots=roots, units=units)
    kl_ctl = (AdaptiveKLController(c.kl_coef, c.target_kl, c.kl_horizon) if c.target_kl is not None
              else FixedKLController(c.kl_coef))
    start_step = opt.start_step
    if run.resume_from is not None:
        kl_ctl.value = opt.state.get("kl_coef", kl_ctl.value)
        run.print(f"[ppo] resumed from {run.resume_from} at step {start_step} (kl_coef {kl_ctl.value:.4g})")

    log, bar = start_log(run, setup, opt, roles.policy, roles.reference, scorer, latest=("lr", "objective/kl_coef"))
    for step in range(start_step, steps):
        t0 = time.perf_counter()
        roles.train(False)
        idx = setup.stream.indices(step)
        # 1. generate (one pad column appended: the score slot); ZeRO-3 / FSDP2: with the policy's
        #    parameters whole on this rank, so ranks may sample different lengths (no collective inside)
        with opt.whole(roles.policy), run.precision():
            ro = generate_rollout(roles.policy, tokenizer, setup.generator, [setup.prompt_ids[i] for i in idx],
                                  [setup.rows[i] for i in idx], setup.params, rollout_seed(c, step, run.rank),
                                  run.device, score_slot=True)
            t_gen = time.perf_counter()
            # 2. score (under LoRA the reward adapter runs on the policy's base)
            raw_scores, parts = scorer(ro)
        scores = eos_trick(raw_scores, ro.ended, penalty=c.missing_eos_penalty, replace=c.missing_eos_score)
        scores = clip_scores(scores, c.reward_clip)
        # 3. old log-probs + values (in epoch 0's micro-batches; a single update reads them from its
        #    training forward in 6), reference log-probs
        plan0 = minibatch_plan(len(idx), c, step, 0)
        single = c.num_ppo_epochs == 1 and len(plan0) == 1 and len(plan0[0]) == 1
        with opt.whole(roles.trainable), run.precision():
            data = score_rollout(roles, ro, c, [mb for mini_b in plan0 for mb in mini_b], old=not single)
        m = ro.response_mask
        vmask = value_mask(m)
        beta = kl_ctl.value
        # 4. KL-shaped rewards, 5. GAE and whitening (a single update: inside 6, after its forward)
        if not single:
            advantages(run, c, ro, data, scores, beta)
        t_prep = time.perf_counter()
        # 6. PPO epochs over shuffled minibatches (gradient accumulation over micro-batches)
        roles.train()
        plans = (plan0 if e == 0 else minibatch_plan(len(idx), c, step, e) for e in range(c.num_ppo_epochs))
        if single:
            def loss_of(mb, n):
                return single_update_loss(run, roles, ro, data, mb, c, n, scores, beta)
        else:
            def loss_of(mb, n):
                return ppo_micro_loss(roles, ro, data, mb, c, n[0], n[1])
        means, first = run_updates(
            run, opt, plans,  # through the engine's forward (`Trainable`: the roles' passes of a micro-batch)
            micro_loss=lambda mb, n: opt.wrapped(lambda: loss_of(mb, n)),
            counts=lambda rows: [m[rows].sum().item(), vmask[rows].sum().item()])
        roles.train(False)
        t_train = time.perf_counter()
        kl, values, returns = data["kl"], data["values"], data["returns"]
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
            **generation_metrics(ro),
            "val/mean": masked_mean(values, vmask).item(),
            "val/returns": masked_mean(returns, vmask).item(),
            **{f"objective/score_{k}": v.nanmean().item() for k, v in parts.items() if len(parts) > 1},
            **means,
            "policy/first_ratio": first["policy/ratio"], "policy/first_clipfrac": first["policy/clipfrac"],
        }
        metrics = close_step(run, setup, log, opt, step, metrics, ro, scores, episodes=c.rollout_batch_size,
                             times={"generation": t_gen - t0, "scoring": t_prep - t_gen, "training": t_train - t_prep},
                             extra_state={"kl_coef": kl_ctl.value})
        bar.update(1)
        bar.set_postfix(score=f"{metrics['objective/scores']:.3f}", kl=f"{metrics['objective/kl']:.3f}")
    bar.close()
    if run.engine is not None:  # what each rank held (summary.json)
        run.engine.local = opt.local_counts()

    # final: the policy (HF format; LoRA: the policy adapter only), the critic (a reward-model
    # directory under output_dir/critic), summary, plots
    save_final(run, roles.policy, tokenizer, adapter=POLICY)
    # ZeRO-3 / FSDP2: the critic's weights whole while the main process writes; FSDP2's own state dicts
    # are shards, so its full state dicts are gathered first (collective)
    state_of = None
    if opt.fsdp:
        from rlhfkit.train.fsdp import full_model_state

        states = {id(m): full_model_state(m) for m in roots if m is not roles.value_head}
        state_of = lambda module: states[id(module)]  # noqa: E731
    with opt.whole(roles.trainable):
        if run.is_main:
            critic_dir = save_critic(run.output_dir / CRITIC_DIR, roles, c, tokenizer, state_of=state_of)
    if run.is_main:
        run.print(f"[ppo] critic saved to {critic_dir} (reward-model format: "
                  "rlhfkit.models.reward.load_reward_model loads it; score = value at the last token)")
    summary = {"stage": "ppo", "steps": steps, "episodes": steps * c.rollout_batch_size,
               "optimizer_steps": updates, "prompts": len(setup.prompt_ids), "skipped_prompts": setup.skipped,
               "parameters_in_memory": mem_total, "trainable_parameters": trainable,
               **log.summary("objective/kl")}
    finish_online(run, setup, summary, ["objective/scores", "objective/kl", "eval/gold_reward", "gen/length"])
    return Result(run.output_dir, summary, roles.policy, tokenizer, run.logger.history)
