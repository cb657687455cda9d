"""`rlhfkit self_reward`: self-rewarding language models (Yuan et al. 2024, "Self-Rewarding Language
Models"): iterative DPO on pairs the policy samples and judges itself, no reward model.

The loop is train/iterative.py's (an iteration is `num_train_epochs` passes of `rollout_batch_size`
prompts over the data, or `max_steps` steps); the pool of iteration t, made by the policy at its start,
M_t:

  # 1. generate    `num_generations` candidate responses to each prompt the iteration's steps will train
                   on (this process's share), sampled from M_t (the paper: 4, temperature 0.7, top_p 0.9)
  # 2. judge       M_t judges each candidate as an LLM judge (rollout/judge.py: `judge_template`,
                   `judge_samples` judgements, the mean of the scores read with `judge_score_pattern`)
  # 3. pair        each prompt's highest- (chosen) and lowest-scored (rejected) candidate; equal scores,
                   or fewer than two candidates scored, give no pair (weight 0, `pairs/tied`), as the
                   paper discards them
  # 4. reference   log M_t of both responses, once (iterative.py)
     the pool file output_dir/self_reward/iteration-<t>-rank-<r>.jsonl shows every candidate with its
     judgements and score
  every step: DPO steps on the step's prompts' pairs against M_t; log, evaluate, checkpoint

The paper's M_0 -> M_1 step (SFT on instruction data and judgement examples, EFT) is `rlhfkit sft`;
its self-instruction of new prompts is not done: the prompts are the dataset's. One optimizer and
learning-rate schedule run over all iterations (the paper starts each iteration's DPO afresh).

Metrics (each the mean over the step's pairs): `scores/chosen`, `scores/rejected`, `scores/mean` (all
the prompt's scored candidates), `pairs/tied`, `judge/unread` (share of judgements with no readable
score), `judge/prompt_length`, `gen/*` (over the candidates); with a built-in task `judge/gold_accuracy`:
among the pairs whose two responses differ in gold reward, the share where the judge chose the better
one (how good the self-judge is). Evaluation (`eval/`): as every online stage, with rewards only when a
reward model / functions are given (they never enter training).
"""

from __future__ import annotations

import math

import torch

from rlhfkit.config import SelfRewardConfig
from rlhfkit.rollout.generate import SamplingParams
from rlhfkit.rollout.judge import judge_responses
from rlhfkit.rollout.rollout import Rollout, generate_rollout
from rlhfkit.train.iterative import PoolPairs, nan_mean, train_iterations
from rlhfkit.train.loop import Result
from rlhfkit.train.online import build_roles, prompt_generation_stats, start_online
from rlhfkit.train.pairs import best_and_worst, pair_rollout


JUDGE_SEED_OFFSET = 15_485_863
"""The judgements' sampling seed: the candidates' + this (`rollout_seed`'s offset of a second round)."""


def gold_agreement(task, ro: Rollout, best: torch.Tensor, worst: torch.Tensor, decisive: torch.Tensor) -> torch.Tensor:
    """(P,) per pair: 1 when the chosen response's gold reward is higher than the rejected's, 0 when
    lower, NaN when they are equal or the pair does not train."""
    gold = torch.tensor(task.gold_reward([r["prompt"] for r in ro.rows], ro.texts, ro.ended.tolist()))
    gb, gw = gold[best], gold[worst]
    return torch.where(decisive & (gb != gw), (gb > gw).float(), torch.full_like(gb, math.nan))


def self_judged_pairs(setup, policy, prompts: list[int], seed: int) -> PoolPairs:
    """# 1-3. candidates from the policy, judged by the policy, paired best against worst."""
    run, c, tok = setup.run, setup.run.config, setup.tokenizer
    G = c.num_generations
    # 1. generate: G candidates per prompt from M_t
    cands = generate_rollout(policy, tok, setup.generator, [setup.prompt_ids[p] for p in prompts],
                             [setup.rows[p] for p in prompts], setup.params, seed, run.device, num_generations=G)
    # 2. judge: M_t scores each candidate (judge_samples judgements, the mean of the read scores)
    judged = judge_responses(
        policy, tok, setup.generator, [r["prompt"] for r in cands.rows], cands.texts, template=c.judge_template,
        samples=c.judge_samples, pattern=c.judge_score_pattern, max_score=c.judge_max_score,
        params=SamplingParams(max_new_tokens=c.judge_max_new_tokens, temperature=c.judge_temperature,
                              top_p=c.judge_top_p),
        seed=seed + JUDGE_SEED_OFFSET)
    scores = judged.scores.to(run.device)
    # 3. pairs: each prompt's highest- and lowest-scored candidate
    best, worst, decisive = best_and_worst(scores, G)
    pairs = pair_rollout(cands, best, worst)
    def groups(x: torch.Tensor) -> torch.Tensor:  # (P, G): each prompt's candidates
        return x.float().view(-1, G).cpu()

    stats = {"scores/chosen": scores[best].cpu(), "scores/rejected": scores[worst].cpu(),
             "scores/mean": nan_mean(groups(scores)), "pairs/tied": (~decisive).float().cpu(),
             "judge/unread": groups(judged.unread).mean(1),
             "judge/prompt_length": groups(torch.tensor(judged.prompt_lengths)).mean(1),
             **prompt_generation_stats(cands)}
    if setup.task is not None:
        stats["judge/gold_accuracy"] = gold_agreement(setup.task, cands, best.cpu(), worst.cpu(), decisive.cpu())
    records = [{"scores": [None if math.isnan(s) else s for s in judged.scores[j * G:(j + 1) * G].tolist()],
                "candidates": [{"response": cands.texts[i], "ended": bool(cands.ended[i]),
                                "judgements": judged.judgements[i], "judgement_scores": judged.judgement_scores[i]}
                               for i in range(j * G, (j + 1) * G)]}
               for j in range(len(prompts))]
    return PoolPairs(pairs, decisive, stats, records)


def train_self_reward(config: SelfRewardConfig) -> Result:
    c = config
    stage = c._stage
    # 0. data, run, prompts; policy, reference for the evaluation's KL (LoRA: the base with adapters
    #    off; full fine-tuning: only with ref_model), reward sources for the evaluation only
    setup = start_online(c, stage, iterations=c.num_iterations)
    run = setup.run
    per_iteration = setup.steps // c.num_iterations  # start_online: num_iterations x the steps the data gives
    policy, reference, scorer = build_roles(setup, reference_needed=c.ref_model is not None)
    run.print(f"[{stage}] {c.num_iterations} iteration(s) x {per_iteration} steps | {c.num_generations} candidates "
              f"per prompt, each judged {c.judge_samples}x by the policy at the iteration's start (also the "
              f"reference) | loss {c.loss_type} (beta {c.beta})")

    def pair_rows(pairs: Rollout, stats: dict) -> tuple[Rollout, torch.Tensor]:  # samples.jsonl: both, judged
        return pairs, torch.stack([stats["scores/chosen"], stats["scores/rejected"]], 1).reshape(-1)

    return train_iterations(
        setup, policy, reference, scorer, per_iteration=per_iteration,
        build=lambda prompts, seed: self_judged_pairs(setup, policy, prompts, seed), log_rows=pair_rows,
        monitor_context={"beta": c.beta, "reference": "model"}, postfix="pairs/tied",
        extra={"num_generations": c.num_generations, "judge_samples": c.judge_samples},
        plot_keys=["loss", "rewards/margins", "scores/chosen", "scores/rejected", "pairs/tied",
                   "judge/gold_accuracy", "eval/gold_reward", "eval/accuracy", "eval/kl", "gen/length"])
