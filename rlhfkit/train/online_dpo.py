"""`rlhfkit online_dpo`: online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI
Feedback"; Calandriello et al. 2024, "Human Alignment of Large Language Models through Online
Preference Optimisation"): the DPO loss on pairs the current policy samples and a reward model
(and/or reward functions) ranks, one explicit loop per step:

  # 1. generate    rollout_batch_size prompts x num_generations responses from the current policy
                   (a prompt's prefill shared by its group)
  # 2. score       reward model and/or reward functions; EOS trick (`missing_eos_penalty`)
  # 3. pair        each prompt's best- and worst-scored response -> (chosen, rejected); a prompt whose
                   responses all score the same, or whose two are the same token sequence, gives no
                   preference: its pair stays in the batch with weight 0 (every process keeps its
                   micro-batch count) and is counted (`pairs/tied`)
  # 4. reference   reference log-probs of both responses, in the training micro-batches (no grad):
                   the base with adapters disabled (LoRA) or a frozen copy of the initial model
  # 5. update      num_mini_batches DPO steps over the pairs (the loss family of losses/dpo.py), each
                   the mean over the minibatch's untied pairs on every process
  # 6. log, evaluate, checkpoint, diagnostics

Both log-probs of a pair are taken at the sampling temperature (`rollout_logps`, the one function of
every online pass), so the DPO loss is that of the tempered policy that sampled the pair. At step 0
policy = reference: every implicit reward is exactly 0 and the sigmoid loss is log 2 (tested).

Everything around the loop is the shared online layer (rollout/, train/online.py,
train/distributed.py), the same grpo, rloo and ppo use.

Metrics: `loss`, the implicit rewards of the untied pairs (`rewards/chosen`, `rewards/rejected`,
`rewards/margins`, `rewards/accuracies`: beta x log-ratio to the reference, as `dpo` logs them),
`logps/chosen`, `logps/rejected`, the scores that made the pairs (`scores/mean` over every sampled
response, `scores/chosen`, `scores/rejected`, `scores/<source>` per reward source), `pairs/tied`,
`pairs/logratio` (the pairs' mean log-ratio to the reference, summed over tokens: the best and the
worst of a group are not a sample of the policy, so this is no KL estimate; `eval/kl` is), `gen/*`, and the
held-out evaluation (`eval/`: training score, KL, gold reward / accuracy, judge) of the online layer.
"""

from __future__ import annotations

import time

from rlhfkit.config import OnlineDPOConfig
from rlhfkit.rollout.rollout import generate_rollout, source_metrics
from rlhfkit.train.loop import Result
from rlhfkit.train.online import (
    build_roles,
    close_step,
    describe_reference,
    finish_policy,
    generation_metrics,
    minibatch_plan,
    reference_kind,
    rollout_seed,
    score_rollout,
    start_loop,
    start_online,
)
from rlhfkit.train.pairs import best_and_worst, identical_pairs, pair_rollout, pair_updates, sequence_logps_of


# ---- the stage ---------------------------------------------------------------------------------------

def train_online_dpo(config: OnlineDPOConfig) -> Result:
    c = config
    stage = c._stage
    G = c.num_generations
    # 0. data, reward functions, run, prompts (validated before any model loads); policy, reference
    setup = start_online(c, stage)
    run, tokenizer = setup.run, setup.tokenizer
    policy, reference, scorer = build_roles(setup, reference_needed=True)
    rows = setup.local_prompts * 2
    updates = setup.steps * c.num_mini_batches
    run.print(f"[{stage}] loss {c.loss_type} (beta {c.beta}"
              + (f", label_smoothing {c.label_smoothing}" if c.label_smoothing else "")
              + f") | pairs: the best and the worst of {G} responses per prompt, ties weighted 0 | reference: "
              + describe_reference(c))
    run.print(f"[{stage}] each process: {setup.local_prompts} prompts x {G} sampled -> {setup.local_prompts} pairs "
              f"({rows} responses) per step -> {c.num_mini_batches} minibatch(es) of {rows // c.num_mini_batches} "
              f"in micro-batches of {c.per_device_train_batch_size} -> {updates} optimizer steps")

    opt, log, bar = start_loop(run, setup, policy, reference, scorer, updates,
                               monitor_context={"beta": c.beta, "reference": reference_kind(c)})
    for step in range(opt.start_step, setup.steps):
        t0 = time.perf_counter()
        policy.eval()
        # 1-2. generate and score (ZeRO-3 / FSDP2: with the policy's parameters whole on this rank)
        idx = setup.stream.indices(step)
        with opt.whole(policy), run.precision():
            ro = generate_rollout(policy, tokenizer, setup.generator, [setup.prompt_ids[i] for i in idx],
                                  [setup.rows[i] for i in idx], setup.params, rollout_seed(c, step, run.rank),
                                  run.device, num_generations=G)
            scores, parts = score_rollout(c, scorer, ro)
        t_gen = time.perf_counter()
        # 3. pairs: each prompt's best and worst response
        best, worst, decisive = best_and_worst(scores, G)
        pairs = pair_rollout(ro, best, worst)
        decisive = decisive & ~identical_pairs(pairs)  # the same response twice: no preference, whatever the scores
        # 4. reference log-probs in the micro-batches of the updates
        plan = minibatch_plan(rows, c, step, 0, group_size=2)
        with opt.whole(policy), run.precision(), reference() as ref:
            ref_logps = sequence_logps_of(ref, pairs, [mb for mini in plan for mb in mini], c)
        t_prep = time.perf_counter()
        # 5. updates: num_mini_batches DPO steps (micro-batches accumulated)
        means = pair_updates(run, opt, policy, pairs, ref_logps, decisive, plan, c)
        t_train = time.perf_counter()
        # 6. metrics, samples, evaluation, checkpoint
        kept = decisive.float()
        n_kept = max(kept.sum().item(), 1.0)
        metrics = {
            **means,
            "scores/mean": scores.mean().item(),
            "scores/chosen": (scores[best] * kept).sum().item() / n_kept,
            "scores/rejected": (scores[worst] * kept).sum().item() / n_kept,
            "pairs/tied": 1.0 - kept.mean().item(),
            **source_metrics(parts, prefix="scores/"),
            **generation_metrics(ro),
        }
        metrics = close_step(run, setup, log, opt, step, metrics, ro, scores, episodes=c.rollout_batch_size * G,
                             times={"generation": t_gen - t0, "reference": t_prep - t_gen,
                                    "training": t_train - t_prep})
        bar.update(1)
        bar.set_postfix(score=f"{metrics['scores/mean']:.3f}", tied=f"{metrics['pairs/tied']:.2f}")
    bar.close()
    return finish_policy(run, setup, log, opt, policy, updates=updates, train_key="scores/mean",
                         plot_keys=["scores/mean", "rewards/margins", "rewards/accuracies", "pairs/tied",
                                    "eval/gold_reward", "eval/accuracy", "gen/length"],
                         extra={"loss_type": c.loss_type, "beta": c.beta})
