"""`rlhfkit spin`: self-play fine-tuning (Chen et al. 2024, "Self-Play Fine-Tuning Converts Weak Language
Models to Strong Language Models"), from SFT data alone: no reward model, no preference labels.

At iteration t the policy at the iteration's start, p_theta_t, is the opponent: it answers every prompt
of the iteration, and the policy learns to tell the data's response y from the opponent's y' (the paper's
objective with the logistic loss):

    L(theta) = -log sigmoid( beta log p_theta(y|x) / p_theta_t(y|x) - beta log p_theta(y'|x) / p_theta_t(y'|x) )

which is the DPO loss with chosen = y, rejected = y' and the reference p_theta_t. The paper generates
the opponent's responses for the whole dataset and trains 2-3 epochs on them; the next iteration's
opponent and reference is the policy that comes out. Global optimum: p_theta = p_data (the paper's Section 5),
where the data's and the opponent's responses can no longer be told apart.

The loop is train/iterative.py's (an iteration is `num_train_epochs` passes of `rollout_batch_size`
prompts over the data, or `max_steps` steps); the pool of iteration t:

  # 1. generate    one response per prompt the iteration's steps will train on (this process's share),
                   sampled from p_theta_t
  # 2. pair        chosen = the data's response, encoded as the policy would sample it (`reply_ids`:
                   through the end of turn, cut to max_new_tokens); rejected = the sample. A sample
                   identical to the data's response trains nothing (weight 0, `pairs/identical`)
  # 3. reference   log p_theta_t of both responses, once (iterative.py)
     the pool file output_dir/spin/iteration-<t>-rank-<r>.jsonl shows each prompt's `chosen` (the data's)
     and `rejected` (the opponent's) response
  every step: DPO steps on the step's prompts' pairs; log, evaluate, checkpoint

Log-probs, policy and reference, are taken at the sampling temperature, as in every online pass (the
paper samples at 1.0, the default). One optimizer and learning-rate schedule run over all iterations (the
paper restarts both at each iteration). Evaluation (`eval/`): the held-out prompts' length, EOS rate,
KL to the initial model (LoRA: the base with adapters off; full fine-tuning: with `ref_model`), gold
reward / accuracy with a task, scores and win rates when a reward model or functions are given (they
never enter training).
"""

from __future__ import annotations

import torch

from rlhfkit.config import SPIN_FORMATS, SPINConfig
from rlhfkit.errors import DataError
from rlhfkit.rollout.rollout import Rollout, concat_rollouts, data_reply, data_rollout, generate_rollout, select_rows
from rlhfkit.train.iterative import PoolPairs, train_iterations
from rlhfkit.train.loop import Result
from rlhfkit.train.online import build_roles, prompt_generation_stats, start_online
from rlhfkit.train.pairs import identical_pairs, pair_rollout


# ---- 2. pairs ---------------------------------------------------------------------------------------

def spin_pairs(setup, policy, real: Rollout, prompts: list[int], seed: int) -> PoolPairs:
    """# 1-2. the opponent's (the current policy's) response to each prompt, paired with the data's
    (`real`: every row's, on the CPU)."""
    tok, device = setup.tokenizer, setup.run.device
    # 1. generate: one sample per prompt from p_theta_t
    gen = generate_rollout(policy, tok, setup.generator, [setup.prompt_ids[p] for p in prompts],
                           [setup.rows[p] for p in prompts], setup.params, seed, device)
    # 2. pairs: rows 2j the data's response, 2j + 1 the sample
    n = len(prompts)
    both = concat_rollouts([select_rows(real, torch.tensor(prompts)).to(device), gen], tok.pad_token_id)
    pairs = pair_rollout(both, torch.arange(n), torch.arange(n) + n)
    identical = identical_pairs(pairs)
    stats = {"pairs/identical": identical.float(), "real/length": pairs.response_mask[0::2].sum(-1).float(),
             **prompt_generation_stats(gen)}
    records = [{"generated_ended": bool(e), "identical": bool(i)} for e, i in zip(gen.ended.tolist(), identical.tolist())]
    return PoolPairs(pairs, ~identical, stats, records)


def check_replies(rows: list[dict]) -> None:
    """Every training row needs a response to imitate (before any model loads)."""
    for row in rows:
        if data_reply(row) is None:
            raise DataError("spin needs a response to imitate in every row (a completion, a conversation ending "
                            "with an assistant reply, or a preference pair's chosen)", source=row.get("_source"))


# ---- the stage ---------------------------------------------------------------------------------------

def train_spin(config: SPINConfig) -> Result:
    c = config
    stage = c._stage
    # 0. data (each row's response encoded before any model loads), run, prompts; policy, reference for
    #    the evaluation's KL (LoRA: the base with adapters off; full fine-tuning: only with ref_model)
    setup = start_online(c, stage, formats=SPIN_FORMATS, iterations=c.num_iterations)
    run, tokenizer = setup.run, setup.tokenizer
    check_replies(setup.rows)
    real = data_rollout(tokenizer, setup.prompt_ids, setup.rows, c.max_new_tokens, "cpu")  # each pool's to the device
    per_iteration = setup.steps // c.num_iterations  # start_online: num_iterations x the steps the data gives
    policy, reference, scorer = build_roles(setup, reference_needed=c.ref_model is not None)
    run.print(f"[{stage}] {c.num_iterations} iteration(s) x {per_iteration} steps | the data's response vs one "
              f"sample of the policy at the iteration's start (opponent and reference) | loss {c.loss_type} "
              f"(beta {c.beta}) | data responses: {int(real.truncated.sum())} of {len(setup.rows)} cut at "
              f"max_new_tokens={c.max_new_tokens}")

    def opponent_rows(pairs: Rollout, stats) -> tuple[Rollout, None]:  # samples.jsonl: the opponent's
        return select_rows(pairs, torch.arange(1, pairs.input_ids.shape[0], 2, device=pairs.input_ids.device)), None

    return train_iterations(
        setup, policy, reference, scorer, per_iteration=per_iteration,
        build=lambda prompts, seed: spin_pairs(setup, policy, real, prompts, seed), log_rows=opponent_rows,
        monitor_context={"beta": c.beta, "reference": "model"}, postfix="pairs/identical", extra={},
        plot_keys=["loss", "rewards/margins", "rewards/accuracies", "pairs/identical", "eval/gold_reward",
                   "eval/accuracy", "eval/kl", "gen/length"])
