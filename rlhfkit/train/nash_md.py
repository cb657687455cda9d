"""`rlhfkit nash_md`: Nash mirror descent in its policy-gradient form (Nash-MD-PG; Munos et al. 2023, "Nash
Learning from Human Feedback"): the policy plays against a regularised copy of itself under a preference
model, one explicit loop per step:

  # 1. generate    one response y per prompt from the current policy, and one y' from the geometric
                   mixture pi^(1 - mixture_coef) x ref^mixture_coef, token by token (rollout/mixture.py:
                   both models on one KV cache; under LoRA the reference is the base with adapters off)
  # 2. prefer      reward model and/or reward functions score both (EOS trick applied); the preference
                   P(y > y') = sigmoid(score(y) - score(y')) (Bradley-Terry; an unscored pair: 1/2)
  # 3. logps       the sampling policy's (old) and the reference's log-probs of y, in the training
                   micro-batches (no grad; grpo's pass)
  # 4. advantages  per-token rewards -beta x KL_t (k1 of old vs reference), plus P - 1/2 at
                   the last token; A_t = the reward-to-go (losses/advantages.py `kl_shaped_returns`):
                   A_t = (P(y > y') - 1/2) - beta x sum_{s >= t} KL_s
  # 5. update      num_mini_batches policy-gradient steps on y: the clipped surrogate (losses/policy.py,
                   ratio 1 on the first minibatch) summed over each response's tokens, the mean over
                   responses, so the gradient is the policy gradient of
                   E_y [P(y > y')] - beta x KL(pi || ref)
                   (the 1/2 is the baseline: it lowers the variance and leaves the gradient's mean alone)
  # 6. log, evaluate, checkpoint, diagnostics

The opponent is fixed within a step (the mixture of the policy at the step's start): the gradient does not
flow through y'. At step 0 the policy is the reference and the mixture is the policy itself, so the
preference is a coin toss on average (`preference/mean` ~ 1/2) and rises as the policy beats its own
regularised copy.

Metrics: `loss`, `preference/mean` (mean P(y > y')), `preference/won` (the share of prompts where y scored
higher than y'), `scores/policy`, `scores/mixture`, `scores/<source>` (over both), `objective/kl` (the sampling
policy's summed KL to the reference, `kl_estimator`), `advantages/abs_mean`, `policy/*` (ratio, clip
fractions, entropy), `gen/*` (the policy's responses), `gen/mixture_length`, and the online layer's
held-out `eval/`.
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch

from rlhfkit.config import NashMDConfig
from rlhfkit.losses.advantages import kl_shaped_returns
from rlhfkit.losses.kl import KL_ESTIMATORS
from rlhfkit.losses.masked import masked_mean, masked_sum
from rlhfkit.losses.policy import clipped_policy_loss
from rlhfkit.rollout.mixture import GeometricMixture
from rlhfkit.rollout.rollout import Rollout, source_metrics
from rlhfkit.train.grpo import old_and_reference_logps
from rlhfkit.train.loop import Result
from rlhfkit.train.online import (
    build_roles,
    close_step,
    describe_reference,
    finish_policy,
    generation_metrics,
    minibatch_plan,
    rollout_logps,
    rollouts_against,
    run_updates,
    start_loop,
    start_online,
)


def preference_against(scores: torch.Tensor) -> torch.Tensor:
    """Scores (2P,) of P policy responses then the P opponent responses to the same prompts -> (P,)
    P(policy's > opponent's) = sigmoid(difference) (Bradley-Terry), 1/2 where either is unscored (NaN).
    Worked: [1, 0, 0, 0] -> [sigmoid(1) = 0.731, 0.5]."""
    P = scores.shape[0] // 2
    return torch.sigmoid(scores[:P] - scores[P:]).nan_to_num(0.5)


def nash_md_micro_loss(policy, ro: Rollout, data: dict, idx: torch.Tensor, c: NashMDConfig,
                       n_sequences: float) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped policy-gradient loss of rows `idx`, summed over each response's tokens and divided by
    the responses of the global minibatch (`n_sequences`), so the micro-batches of a minibatch on every
    process add up to its mean over responses."""
    m = ro.response_mask[idx]
    logps, entropy = rollout_logps(policy, ro, idx, c, with_entropy=True)
    pg = clipped_policy_loss(logps, data["old_logps"][idx], data["advantages"][idx], m, epsilon=c.epsilon)
    loss = masked_sum(pg["loss"], m) / n_sequences

    def share(x: torch.Tensor) -> float:  # this micro-batch's share of the mean over responses of their token means
        return (masked_mean(x.detach().float(), m, dim=1).sum() / n_sequences).item()

    return loss, {"loss": loss.item(), "policy/ratio": share(pg["ratio"]),
                  "policy/clipfrac": share(pg["clipped_low"] + pg["clipped_high"]),
                  "policy/approxkl": share(pg["approxkl"]), "policy/entropy": share(entropy)}


def train_nash_md(config: NashMDConfig) -> Result:
    c = config
    stage = c._stage
    # 0. data, reward functions, run, prompts (validated before any model loads); policy, reference, and
    #    the opponent: their geometric mixture
    setup = start_online(c, stage)
    run = setup.run
    policy, reference, scorer = build_roles(setup, reference_needed=True)
    mixture = GeometricMixture(policy, reference, c.mixture_coef).eval()
    rows = setup.local_prompts
    updates = setup.steps * c.num_mini_batches
    run.print(f"[{stage}] opponent: pi^{1 - c.mixture_coef:g} x ref^{c.mixture_coef:g} per token | preference "
              f"sigmoid(score difference) | reward P - 1/2 - beta {c.beta} x {c.kl_estimator} KL (reward-to-go) | "
              f"reference: {describe_reference(c)}")
    run.print(f"[{stage}] each process: {setup.local_prompts} prompts x (1 policy + 1 opponent response) -> "
              f"{c.num_mini_batches} minibatch(es) of {rows // c.num_mini_batches} policy responses in "
              f"micro-batches of {c.per_device_train_batch_size} -> {updates} optimizer steps")

    opt, log, bar = start_loop(run, setup, policy, reference, scorer, updates)
    for step in range(opt.start_step, setup.steps):
        t0 = time.perf_counter()
        policy.eval()
        # 1-2. the policy's responses and the mixture's, scored (ZeRO-3 / FSDP2: the policy's
        #      parameters whole on this rank)
        with opt.whole(policy), run.precision():
            ro, opponent, _, scores, parts = rollouts_against(c, setup, scorer, policy, lambda: nullcontext(mixture),
                                                              step)
        preference = preference_against(scores)
        t_gen = time.perf_counter()
        # 3. old and reference log-probs of the policy's responses, in the micro-batches of the update
        plan = minibatch_plan(rows, c, step, 0)
        with opt.whole(policy), run.precision():
            data = old_and_reference_logps(c, policy, reference, ro, [mb for mini in plan for mb in mini],
                                           need_old=True)
        # 4. advantages: P - 1/2 at the last token, -beta x KL per token, reward-to-go
        m = ro.response_mask
        token_kl = None
        if "ref_logps" in data:
            token_kl = KL_ESTIMATORS[c.kl_estimator](data["old_logps"], data["ref_logps"]).masked_fill(~m, 0.0)
        data["advantages"] = kl_shaped_returns(preference - 0.5, m, token_kl, c.beta if token_kl is not None else 0.0)
        t_prep = time.perf_counter()
        # 5. updates: num_mini_batches policy-gradient steps (micro-batches accumulated)
        policy.train()
        means, first = run_updates(run, opt, [plan],
                                   micro_loss=lambda mb, n: nash_md_micro_loss(opt.wrapped, ro, data, mb, c, n[0]),
                                   counts=lambda r: [float(r.numel())])
        policy.eval()
        t_train = time.perf_counter()
        # 6. metrics, samples, evaluation, checkpoint
        P = setup.local_prompts
        adv = data["advantages"]
        metrics = {
            **means, "policy/first_ratio": first["policy/ratio"],
            "preference/mean": preference.mean().item(),
            "preference/won": (scores[:P] > scores[P:]).float().mean().item(),
            "scores/policy": scores[:P].mean().item(), "scores/mixture": scores[P:].mean().item(),
            **source_metrics(parts, prefix="scores/"),
            **({"objective/kl": masked_sum(token_kl, m, dim=1).mean().item()} if token_kl is not None else {}),
            "advantages/abs_mean": masked_sum(adv.abs(), m).item() / max(m.sum().item(), 1),
            **generation_metrics(ro), "gen/mixture_length": opponent.lengths.float().mean().item(),
        }
        metrics = close_step(run, setup, log, opt, step, metrics, ro, scores[:P], episodes=c.rollout_batch_size * 2,
                             times={"generation": t_gen - t0, "logps": t_prep - t_gen, "training": t_train - t_prep})
        bar.update(1)
        bar.set_postfix(preference=f"{metrics['preference/mean']:.3f}", score=f"{metrics['scores/policy']:.3f}")
    bar.close()
    return finish_policy(run, setup, log, opt, policy, updates=updates, train_key="preference/mean",
                         plot_keys=["preference/mean", "scores/policy", "scores/mixture", "objective/kl",
                                    "eval/gold_reward", "eval/accuracy", "gen/length"],
                         extra={"beta": c.beta, "mixture_coef": c.mixture_coef})
