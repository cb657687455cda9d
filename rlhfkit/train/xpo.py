"""`rlhfkit xpo`: exploratory preference optimisation (Xie et al. 2024, "Exploratory Preference
Optimization: Harnessing Implicit Q*-Approximation for Sample-Efficient RLHF"): online DPO whose pair is
a response of the current policy against one of the reference, with an exploration term, one explicit
loop per step:

  # 1. generate    one response per prompt from the current policy (y) and one from the reference (y~:
                   the paper's sampling policy pi~ taken as pi_ref; under LoRA the base with adapters off)
  # 2. score       reward model and/or reward functions; EOS trick (`missing_eos_penalty`)
  # 3. pair        the higher-scored of (y, y~) is chosen, the other rejected; equal scores (or the same
                   token sequence twice) give no preference: the pair stays in the batch with DPO weight 0
                   (`pairs/tied`)
  # 4. reference   reference log-probs of both responses, in the training micro-batches (no grad)
  # 5. update      num_mini_batches steps on the loss

                     L = mean over untied pairs of the DPO loss (losses/dpo.py, as online_dpo)
                         + alpha x mean over all pairs of log pi(y~)     (log-prob summed over y~'s tokens)

                   The second term is XPO's one-line change to online DPO: minimising alpha x log pi(y~)
                   lowers the policy's likelihood of what the reference says, the optimism that drives
                   it to responses outside the reference's support (the paper's exploration bonus)
  # 6. log, evaluate, checkpoint, diagnostics

Log-probs, policy and reference, are taken at the sampling temperature, as in every online pass. At
step 0 policy = reference: every implicit reward is 0, the DPO term log 2 (tested).

Metrics: online_dpo's (`loss`, `rewards/*`, `logps/chosen|rejected`, `pairs/tied`, `pairs/logratio`,
`scores/chosen|rejected`, `scores/<source>` over both responses, `gen/*` of the policy's responses,
`eval/*`), and `loss/dpo`, `loss/exploration` (alpha x mean log pi(y~)), `logps/reference_response`
(mean log pi(y~)), `scores/policy`, `scores/reference` (the two responses' mean scores) and
`pairs/policy_won` (the share of prompts where the policy's response scored higher than the
reference's; with ties, e.g. both answers right, it stays below one half even for a policy that
never loses: compare it with `1 - pairs/tied - pairs/policy_won`, the reference's wins).
"""

from __future__ import annotations

import time

import torch

from rlhfkit.config import XPOConfig
from rlhfkit.rollout.rollout import source_metrics
from rlhfkit.train.loop import Result
from rlhfkit.train.online import (
    build_roles,
    close_step,
    describe_reference,
    finish_policy,
    generation_metrics,
    minibatch_plan,
    reference_kind,
    rollouts_against,
    start_loop,
    start_online,
)
from rlhfkit.train.pairs import identical_pairs, pair_rollout, pair_updates, sequence_logps_of


def policy_against_reference(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores (2P,) of P policy responses (rows 0..P-1) then the P reference responses to the same prompts
    (rows P..2P-1) -> (chosen rows, rejected rows, decisive, policy_won), each (P,): the higher-scored
    response is chosen; equal (or unscored, NaN) is not decisive, the policy's then listed first.
    Worked: scores [1, 2, 2, 0] (P = 2) -> chosen [2, 1], rejected [0, 3], decisive [True, True],
    policy_won [False, True]."""
    P = scores.shape[0] // 2
    mine, theirs = scores[:P], scores[P:]
    won = mine > theirs
    decisive = won | (mine < theirs)
    rows = torch.arange(P, device=scores.device)
    lost = decisive & ~won
    return torch.where(lost, rows + P, rows), torch.where(lost, rows, rows + P), decisive, won


def train_xpo(config: XPOConfig) -> Result:
    c = config
    stage = c._stage
    # 0. data, reward functions, run, prompts (validated before any model loads); policy, reference
    setup = start_online(c, stage)
    run = setup.run
    policy, reference, scorer = build_roles(setup, reference_needed=True)
    rows = setup.local_prompts * 2
    updates = setup.steps * c.num_mini_batches
    run.print(f"[{stage}] loss {c.loss_type} (beta {c.beta}"
              + (f", label_smoothing {c.label_smoothing}" if c.label_smoothing else "")
              + f") + alpha {c.alpha} x log pi(reference's response) | pairs: the policy's response against the "
              "reference's, ties weighted 0 | reference: "
              + describe_reference(c))
    run.print(f"[{stage}] each process: {setup.local_prompts} prompts x (1 policy + 1 reference response) -> "
              f"{setup.local_prompts} pairs per step -> {c.num_mini_batches} minibatch(es) of "
              f"{rows // c.num_mini_batches} in micro-batches of {c.per_device_train_batch_size} -> {updates} "
              "optimizer steps")

    opt, log, bar = start_loop(run, setup, policy, reference, scorer, updates,
                               monitor_context={"beta": c.beta, "reference": reference_kind(c)})
    for step in range(opt.start_step, setup.steps):
        t0 = time.perf_counter()
        policy.eval()
        # 1-2. generate from the policy and from the reference, score both (ZeRO-3 / FSDP2: with the
        #      policy's parameters whole on this rank)
        with opt.whole(policy), run.precision():
            mine, _, both, scores, parts = rollouts_against(c, setup, scorer, policy, reference, step)
        t_gen = time.perf_counter()
        # 3. pairs: the higher-scored of the two is chosen; the reference's response is row 2i (chosen)
        #    or 2i + 1 (rejected: it lost, or tied) of pair i: the row of the exploration term
        chosen, rejected, decisive, won = policy_against_reference(scores)
        pairs = pair_rollout(both, chosen, rejected)
        decisive = decisive & ~identical_pairs(pairs)  # the same answer twice: no preference, whatever the scores
        explore = torch.zeros(rows, dtype=torch.bool, device=run.device)
        reference_rejected = (chosen < setup.local_prompts).long()  # the chosen row is the policy's
        explore[2 * torch.arange(setup.local_prompts, device=run.device) + reference_rejected] = True
        # 4. reference log-probs in the micro-batches of the updates
        plan = minibatch_plan(rows, c, step, 0, group_size=2)
        with opt.whole(policy), run.precision(), reference() as ref:
            ref_logps = sequence_logps_of(ref, pairs, [mb for mini in plan for mb in mini], c)
        t_prep = time.perf_counter()
        # 5. updates: num_mini_batches steps on DPO + exploration (micro-batches accumulated)
        means = pair_updates(run, opt, policy, pairs, ref_logps, decisive, plan, c, explore=explore, alpha=c.alpha)
        t_train = time.perf_counter()
        # 6. metrics, samples, evaluation, checkpoint
        kept = decisive.float()
        n_kept = max(kept.sum().item(), 1.0)
        P = setup.local_prompts
        metrics = {
            **means,
            "scores/policy": scores[:P].mean().item(), "scores/reference": scores[P:].mean().item(),
            "scores/chosen": (scores[chosen] * kept).nan_to_num().sum().item() / n_kept,
            "scores/rejected": (scores[rejected] * kept).nan_to_num().sum().item() / n_kept,
            "pairs/tied": 1.0 - kept.mean().item(), "pairs/policy_won": won.float().mean().item(),
            **source_metrics(parts, prefix="scores/"),
            **generation_metrics(mine),
        }
        metrics = close_step(run, setup, log, opt, step, metrics, mine, scores[:P], episodes=c.rollout_batch_size * 2,
                             times={"generation": t_gen - t0, "reference": t_prep - t_gen,
                                    "training": t_train - t_prep})
        bar.update(1)
        bar.set_postfix(score=f"{metrics['scores/policy']:.3f}", won=f"{metrics['pairs/policy_won']:.2f}")
    bar.close()
    return finish_policy(run, setup, log, opt, policy, updates=updates, train_key="scores/policy",
                         plot_keys=["scores/policy", "scores/reference", "pairs/policy_won", "rewards/margins",
                                    "loss/exploration", "pairs/tied", "eval/gold_reward", "eval/accuracy",
                                    "gen/length"],
                         extra={"loss_type": c.loss_type, "beta": c.beta, "alpha": c.alpha})
