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

One explicit loop; an iteration is `steps_per_iteration` online steps (`num_train_epochs` passes of
`rollout_batch_size` prompts over the data, or `max_steps`):

  at the first step of iteration t:
  # 1. generate    one response per prompt the iteration's steps will train on (this process's share),
                   sampled from p_theta_t
  # 2. pair        chosen = the data's response, encoded as the policy would sample it (`reply_ids`:
                   through the end of turn, cut to max_new_tokens); rejected = the sample. A sample
                   identical to the data's response trains nothing (weight 0, `pairs/identical`)
  # 3. reference   log p_theta_t of both responses, once, with the policy itself before the iteration's
                   first update: no reference model in memory under full fine-tuning or LoRA
     the pairs and their reference log-probs are written to output_dir/spin/ (jsonl to read, safetensors
     to resume mid-iteration exactly)
  every step:
  # 4. update      num_mini_batches DPO steps on the step's prompts' pairs (train/pairs.py, as online_dpo)
  # 5. log, evaluate, checkpoint

Log-probs, policy and reference, are taken at the sampling temperature, as in every online pass (the
paper samples at 1.0, the default). One optimizer and learning-rate schedule run over all iterations (the
paper restarts both at each iteration). Evaluation (`eval/`): the held-out prompts' length, EOS rate,
KL to the initial model (LoRA: the base with adapters off; full fine-tuning: with `ref_model`), gold
reward / accuracy with a task, scores and win rates when a reward model or functions are given (they
never enter training).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from rlhfkit.config import SPIN_FORMATS, SPINConfig
from rlhfkit.errors import ConfigError, DataError
from rlhfkit.rollout.rollout import Rollout, concat_rollouts, data_reply, data_rollout, generate_rollout, select_rows
from rlhfkit.train.loop import Result, Run
from rlhfkit.train.online import (
    OnlineLog,
    OnlineSetup,
    build_roles,
    close_step,
    finish_policy,
    generation_metrics,
    minibatch_plan,
    rollout_seed,
    start_online,
    start_updates,
)
from rlhfkit.train.pairs import pair_rollout, pair_updates, sequence_logps_of
from rlhfkit.train.tracking import progress


# ---- 2. pairs ---------------------------------------------------------------------------------------

def identical_pairs(pairs: Rollout) -> torch.Tensor:
    """(P,) whether pair i's two responses (rows 2i, 2i + 1) are the same token sequence."""
    same_mask = (pairs.response_mask[0::2] == pairs.response_mask[1::2]).all(-1)
    same_ids = ((pairs.responses[0::2] == pairs.responses[1::2]) | ~pairs.response_mask[0::2]).all(-1)
    return same_mask & same_ids


# ---- the iteration's pool: pairs + reference log-probs, kept on disk for an exact resume ---------------

class Pool:
    """One iteration's pairs on this process: `pairs` (rows 2j data, 2j + 1 sample, for prompt
    `index[j]`), their reference log-probs `ref_logps` (2P,), `identical` (P,), and `at` (prompt -> j)."""

    def __init__(self, index: list[int], pairs: Rollout, ref_logps: torch.Tensor, identical: torch.Tensor):
        self.index, self.pairs, self.ref_logps, self.identical = index, pairs, ref_logps, identical
        self.at = {p: j for j, p in enumerate(index)}

    def step(self, prompts: list[int]) -> tuple[Rollout, torch.Tensor, torch.Tensor]:
        """The pairs of a step's prompts (in order; a prompt may repeat), their reference log-probs and
        whether each pair trains (not identical)."""
        js = torch.tensor([self.at[p] for p in prompts])
        rows = torch.stack([2 * js, 2 * js + 1], 1).reshape(-1)
        return select_rows(self.pairs, rows.to(self.pairs.input_ids.device)), self.ref_logps[rows], \
            ~self.identical[js]

    # -- files: spin/iteration-<t>-rank-<r>.{safetensors,jsonl}
    TENSORS = ("input_ids", "attention_mask", "responses", "response_mask", "ended", "truncated")

    def save(self, path: Path, iteration: int) -> None:
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: getattr(self.pairs, k).contiguous().cpu() for k in self.TENSORS}
        tensors.update(ref_logps=self.ref_logps.cpu(), identical=self.identical.cpu(),
                       index=torch.tensor(self.index))
        save_file(tensors, str(path.with_suffix(".safetensors")))
        with path.with_suffix(".jsonl").open("w") as f:
            for j, p in enumerate(self.index):
                row = self.pairs.rows[2 * j]
                f.write(json.dumps({"iteration": iteration, "prompt_index": p, "prompt": row["prompt"],
                                    "real": self.pairs.texts[2 * j], "generated": self.pairs.texts[2 * j + 1],
                                    "generated_ended": bool(self.pairs.ended[2 * j + 1]),
                                    "identical": bool(self.identical[j]),
                                    "ref_logps": [self.ref_logps[2 * j].item(), self.ref_logps[2 * j + 1].item()]})
                        + "\n")

    @classmethod
    def load(cls, path: Path, rows: list[dict], pad_id: int, device) -> "Pool":
        from safetensors.torch import load_file

        t = load_file(str(path.with_suffix(".safetensors")))
        lines = [json.loads(x) for x in path.with_suffix(".jsonl").read_text().splitlines()]
        index = t["index"].tolist()
        texts = [text for line in lines for text in (line["real"], line["generated"])]
        pairs = Rollout(**{k: t[k].to(device) for k in cls.TENSORS},
                        context_length=t["input_ids"].shape[1] - t["responses"].shape[1], texts=texts,
                        rows=[rows[p] for p in index for _ in range(2)], group_size=2, pad_id=pad_id)
        return cls(index, pairs, t["ref_logps"].to(device), t["identical"].to(device))


def pool_path(run: Run, iteration: int, written_by_checkpoint_run: bool = False) -> Path:
    """Where iteration `iteration`'s pool of this process is written (this run's output_dir), or read
    back from when resuming inside it (the output_dir of the run the checkpoint belongs to)."""
    base = run.output_dir
    if written_by_checkpoint_run and run.resume_from is not None:
        base = run.resume_from.parent.parent  # <output_dir>/checkpoints/step-N
    return base / "spin" / f"iteration-{iteration}-rank-{run.rank}"


@torch.no_grad()
def build_pool(run: Run, setup: OnlineSetup, opt, policy, real: Rollout, prompts: list[int], seed: int) -> Pool:
    """# 1-3. at an iteration's start: the opponent's (the current policy's) response to each prompt,
    paired with the data's (`real`: every row's, on the CPU), and both responses' log-probs under it
    (the reference of the iteration)."""
    c, tok = run.config, setup.tokenizer
    policy.eval()
    with opt.whole(policy), run.precision():
        # 1. generate: one sample per prompt from p_theta_t
        gen = generate_rollout(policy, tok, setup.generator, [setup.prompt_ids[p] for p in prompts],
                               [setup.rows[p] for p in prompts], setup.params, seed, run.device)
        # 2. pairs: rows 2j the data's response, 2j + 1 the sample
        n = len(prompts)
        both = concat_rollouts([select_rows(real, torch.tensor(prompts)).to(run.device), gen], tok.pad_token_id)
        pairs = pair_rollout(both, torch.arange(n), torch.arange(n) + n)
        # 3. reference log-probs under p_theta_t, in micro-batches of whole pairs
        mb = c.per_device_train_batch_size
        chunks = [torch.arange(k, min(k + mb, 2 * n)) for k in range(0, 2 * n, mb)]
        ref_logps = sequence_logps_of(policy, pairs, chunks, c)
    return Pool(prompts, pairs, ref_logps, identical_pairs(pairs))


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
    rows = setup.local_prompts * 2
    updates = setup.steps * c.num_mini_batches
    run.print(f"[{stage}] {c.num_iterations} iteration(s) x {per_iteration} steps | the data's response vs one "
              f"sample of the policy at the iteration's start (opponent and reference) | loss {c.loss_type} "
              f"(beta {c.beta}) | data responses: {int(real.truncated.sum())} of {len(setup.rows)} cut at "
              f"max_new_tokens={c.max_new_tokens}")
    run.print(f"[{stage}] each process: {setup.local_prompts} pairs ({rows} responses) per step -> "
              f"{c.num_mini_batches} minibatch(es) in micro-batches of {c.per_device_train_batch_size} -> "
              f"{updates} optimizer steps")

    opt = start_updates(run, policy, updates)
    scheduler = opt.scheduler
    start_step = opt.start_step
    log = OnlineLog(run, setup, policy, reference, scorer, whole=opt.whole, latest=("lr", "spin/iteration"),
                    monitor_context={"beta": c.beta, "reference": "model"})
    log.start(start_step)

    pool, pool_iteration = None, -1
    bar = progress(total=setup.steps, initial=start_step, disable=run.quiet, desc=stage)
    for step in range(start_step, setup.steps):
        t0 = time.perf_counter()
        iteration, first = step // per_iteration, step - step % per_iteration
        if pool_iteration != iteration:
            if step == first:  # 1-3. the opponent p_theta_t = the policy now
                prompts = sorted({p for s in range(first, first + per_iteration) for p in setup.stream.indices(s)})
                run.print(f"[{stage}] iteration {iteration + 1}/{c.num_iterations}: sampling the opponent's "
                          f"responses to {len(prompts)} prompts")
                pool = build_pool(run, setup, opt, policy, real, prompts, rollout_seed(c, step, run.rank))
                pool.save(pool_path(run, iteration), iteration)
            else:  # resumed inside an iteration: its opponent is gone, its pool is on disk
                path = pool_path(run, iteration, written_by_checkpoint_run=True)
                if not path.with_suffix(".safetensors").is_file():
                    raise ConfigError(f"resuming spin at step {step} (inside iteration {iteration + 1}) needs that "
                                      f"iteration's pairs, {path}.safetensors, which is missing")
                pool = Pool.load(path, setup.rows, tokenizer.pad_token_id, run.device)
                own = pool_path(run, iteration)
                if own != path:  # resumed into another directory: a later resume reads it here
                    pool.save(own, iteration)
            pool_iteration = iteration
        t_gen = time.perf_counter()
        pairs, ref_logps, decisive = pool.step(setup.stream.indices(step))
        # 4. updates: num_mini_batches DPO steps (micro-batches accumulated)
        plan = minibatch_plan(rows, c, step, 0, group_size=2)
        means = pair_updates(run, opt, policy, pairs, ref_logps, decisive, plan, c)
        t_train = time.perf_counter()
        # 5. metrics, samples (the opponent's), evaluation, checkpoint
        samples = select_rows(pairs, torch.arange(1, rows, 2, device=pairs.input_ids.device))
        metrics = {
            **means,
            "pairs/identical": 1.0 - decisive.float().mean().item(),
            **generation_metrics(samples),
            "real/length": pairs.response_mask[0::2].sum(-1).float().mean().item(),
            "spin/iteration": iteration + 1,
            "lr": scheduler.get_last_lr()[0], "episodes": (step + 1) * c.rollout_batch_size,
            "time/generation": t_gen - t0, "time/training": t_train - t_gen,
        }
        metrics = close_step(run, setup, log, opt, step, metrics, samples, None)
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", identical=f"{metrics['pairs/identical']:.2f}")
    bar.close()
    return finish_policy(run, setup, log, opt, policy, updates=updates, train_key="loss",
                         plot_keys=["loss", "rewards/margins", "rewards/accuracies", "pairs/identical",
                                    "eval/gold_reward", "eval/accuracy", "eval/kl", "gen/length"],
                         extra={"loss_type": c.loss_type, "beta": c.beta, "iterations": c.num_iterations,
                                "steps_per_iteration": per_iteration})

