"""Iterative DPO: the loop of the stages that train, iteration after iteration, on pairs the policy
made at the iteration's start (spin: the data's response against the policy's sample; self_reward:
the best and the worst of the policy's samples by its own judgement).

An iteration is `steps_per_iteration` online steps (`num_train_epochs` passes of `rollout_batch_size`
prompts over the data, or `max_steps`), `num_iterations` times:

  at the first step of iteration t:
  # 1-2. pool       the stage's `build(prompts, seed)`: one pair per prompt the iteration's steps will
                    train on (this process's share), made with the policy as it stands, p_theta_t; which
                    pairs train (a pair that prefers nothing has weight 0), per-pair statistics (logged
                    as the step's means), and what the pool file shows of each pair
  # 3. reference    log p_theta_t of both responses of every pair, once, with the policy itself before
                    the iteration's first update: no reference model in memory, LoRA or full
     the pool is written to output_dir/<stage>/iteration-<t>-rank-<r>: `.jsonl` to read, `.safetensors`
     to resume inside an iteration exactly (the pool is read back; a run resumed into another directory
     copies it there)
  every step:
  # 4. update       num_mini_batches DPO steps on the step's prompts' pairs (train/pairs.py)
  # 5. log, evaluate, checkpoint

One optimizer and learning-rate schedule run over all iterations.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rlhfkit.config import IterativeConfig
from rlhfkit.errors import ConfigError
from rlhfkit.rollout.rollout import Rollout, select_rows
from rlhfkit.train.loop import Result, Run
from rlhfkit.train.online import (
    OnlineSetup,
    close_step,
    finish_policy,
    minibatch_plan,
    rollout_seed,
    start_loop,
)
from rlhfkit.train.pairs import pair_updates, sequence_logps_of


@dataclass
class PoolPairs:
    """What a stage's `build` returns: `pairs` (rows 2j chosen, 2j + 1 rejected, for prompt `index[j]`),
    `trains` (P,) which pairs train, `stats` per-pair statistics (P,) each (NaN: not defined for that
    pair; a step logs the mean over its pairs), `records` per pair (the pool file's extra columns)."""

    pairs: Rollout
    trains: torch.Tensor
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)


class Pool:
    """One iteration's pairs on this process: `index` (prompt of pair j), `pairs`, their reference
    log-probs `ref_logps` (2P,), `trains` (P,), `stats` (name -> (P,)), `records`."""

    def __init__(self, index: list[int], built: PoolPairs, ref_logps: torch.Tensor):
        self.index, self.pairs, self.ref_logps = index, built.pairs, ref_logps
        self.trains, self.stats, self.records = built.trains, built.stats, built.records
        self.at = {p: j for j, p in enumerate(index)}

    def step(self, prompts: list[int]) -> tuple[Rollout, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """A step's prompts' pairs (in order; a prompt may repeat), their reference log-probs, whether
        each trains, and their statistics."""
        js = torch.tensor([self.at[p] for p in prompts])
        rows = torch.stack([2 * js, 2 * js + 1], 1).reshape(-1)
        return (select_rows(self.pairs, rows.to(self.pairs.input_ids.device)), self.ref_logps[rows],
                self.trains[js], {k: v[js] for k, v in self.stats.items()})

    # -- files: <stage>/iteration-<t>-rank-<r>.{safetensors,jsonl}
    TENSORS = ("input_ids", "attention_mask", "responses", "response_mask", "ended", "truncated")

    def save(self, path: Path, iteration: int) -> None:
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: getattr(self.pairs, k).contiguous().cpu() for k in self.TENSORS}
        tensors.update(ref_logps=self.ref_logps.cpu(), trains=self.trains.cpu(), index=torch.tensor(self.index),
                       **{f"stat.{k}": v.float().cpu() for k, v in self.stats.items()})
        save_file(tensors, str(path.with_suffix(".safetensors")))
        with path.with_suffix(".jsonl").open("w") as f:
            for j, p in enumerate(self.index):
                line = {"iteration": iteration, "prompt_index": p, "prompt": self.pairs.rows[2 * j]["prompt"],
                        "chosen": self.pairs.texts[2 * j], "rejected": self.pairs.texts[2 * j + 1],
                        "trains": bool(self.trains[j]),
                        "ref_logps": [self.ref_logps[2 * j].item(), self.ref_logps[2 * j + 1].item()],
                        **(self.records[j] if self.records else {})}
                f.write(json.dumps(line) + "\n")

    @classmethod
    def load(cls, path: Path, rows: list[dict], pad_id: int, device) -> "Pool":
        from safetensors.torch import load_file

        t = load_file(str(path.with_suffix(".safetensors")))
        lines = [json.loads(x) for x in path.with_suffix(".jsonl").read_text().splitlines()]
        index = t["index"].tolist()
        texts = [text for line in lines for text in (line["chosen"], line["rejected"])]
        pairs = Rollout(**{k: t[k].to(device) for k in cls.TENSORS},
                        context_length=t["input_ids"].shape[1] - t["responses"].shape[1], texts=texts,
                        rows=[rows[p] for p in index for _ in range(2)], group_size=2, pad_id=pad_id)
        skip = ("iteration", "prompt_index", "prompt", "chosen", "rejected", "trains", "ref_logps")
        records = [{k: v for k, v in line.items() if k not in skip} for line in lines]
        stats = {k[len("stat."):]: v.to(device) for k, v in t.items() if k.startswith("stat.")}
        return cls(index, PoolPairs(pairs, t["trains"].to(device), stats, records), t["ref_logps"].to(device))


def pool_path(run: Run, iteration: int, written_by_checkpoint_run: bool = False) -> Path:
    """Where iteration `iteration`'s pool of this process is written (this run's output_dir), or read
    back from when resuming inside it (the output_dir of the run the checkpoint belongs to)."""
    base = run.output_dir
    if written_by_checkpoint_run and run.resume_from is not None:
        base = run.resume_from.parent.parent  # <output_dir>/checkpoints/step-N
    return base / run.stage / f"iteration-{iteration}-rank-{run.rank}"


def step_means(stats: dict[str, torch.Tensor]) -> dict[str, float]:
    """Each statistic's mean over a step's pairs, NaN entries (undefined for that pair) left out; a
    statistic undefined for all of them is not logged."""
    means = {k: nan_mean(v.float(), dim=0).item() for k, v in stats.items()}
    return {k: v for k, v in means.items() if not math.isnan(v)}


Build = Callable[[list[int], int], PoolPairs]
"""(the iteration's prompts on this process, a sampling seed) -> its pairs; called with the policy in
eval mode, its parameters whole on this rank, under the run's precision, gradients off."""
LogRows = Callable[[Rollout, dict[str, torch.Tensor]], tuple[Rollout, torch.Tensor | None]]
"""(a step's pairs, their statistics) -> the rows samples.jsonl shows and their scores (or None)."""


def train_iterations(setup: OnlineSetup, policy, reference, scorer, *, per_iteration: int, build: Build,
                     log_rows: LogRows, monitor_context: dict, plot_keys: list[str], extra: dict,
                     postfix: str) -> Result:
    """The loop of the module docstring, from after the roles are built to the final save.
    `postfix`: the statistic shown on the progress bar beside the loss."""
    run, c = setup.run, setup.run.config
    assert isinstance(c, IterativeConfig)
    stage = run.stage
    rows = setup.local_prompts * 2
    updates = setup.steps * c.num_mini_batches
    run.print(f"[{stage}] each process: {setup.local_prompts} pairs ({rows} responses) per step -> "
              f"{c.num_mini_batches} minibatch(es) in micro-batches of {c.per_device_train_batch_size} -> "
              f"{updates} optimizer steps")
    opt, log, bar = start_loop(run, setup, policy, reference, scorer, updates, latest=("lr", f"{stage}/iteration"),
                               monitor_context=monitor_context)
    pool, pool_iteration = None, -1
    for step in range(opt.start_step, setup.steps):
        t0 = time.perf_counter()
        iteration, first = step // per_iteration, step - step % per_iteration
        if pool_iteration != iteration:
            if step == first:  # 1-3. the pool of the policy now, p_theta_t
                prompts = sorted({p for s in range(first, first + per_iteration) for p in setup.stream.indices(s)})
                run.print(f"[{stage}] iteration {iteration + 1}/{c.num_iterations}: building the pairs of "
                          f"{len(prompts)} prompts")
                pool = build_pool(run, opt, policy, prompts, build, rollout_seed(c, step, run.rank))
                pool.save(pool_path(run, iteration), iteration)
                run.print(f"[{stage}] iteration {iteration + 1}: {int(pool.trains.sum())} of {len(prompts)} pairs "
                          "train | " + ", ".join(f"{k} {v:.3f}" for k, v in step_means(pool.stats).items()))
            else:  # resumed inside an iteration: its policy at the start is gone, its pool is on disk
                path = pool_path(run, iteration, written_by_checkpoint_run=True)
                if not path.with_suffix(".safetensors").is_file():
                    raise ConfigError(f"resuming {stage} at step {step} (inside iteration {iteration + 1}) needs "
                                      f"that iteration's pairs, {path}.safetensors, which is missing")
                pool = Pool.load(path, setup.rows, setup.tokenizer.pad_token_id, run.device)
                own = pool_path(run, iteration)
                if own != path:  # resumed into another directory: a later resume reads it here
                    pool.save(own, iteration)
            pool_iteration = iteration
        t_gen = time.perf_counter()
        pairs, ref_logps, trains, stats = pool.step(setup.stream.indices(step))
        # 4. updates: num_mini_batches DPO steps (micro-batches accumulated)
        plan = minibatch_plan(rows, c, step, 0, group_size=2)
        means = pair_updates(run, opt, policy, pairs, ref_logps, trains, plan, c)
        t_train = time.perf_counter()
        # 5. metrics, samples, evaluation, checkpoint
        shown, scores = log_rows(pairs, stats)
        metrics = {**means, **step_means(stats), f"{stage}/iteration": iteration + 1}
        metrics = close_step(run, setup, log, opt, step, metrics, shown, scores, episodes=c.rollout_batch_size,
                             times={"generation": t_gen - t0, "training": t_train - t_gen})
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}",
                        **({postfix.split("/")[-1]: f"{metrics[postfix]:.2f}"} if postfix in metrics else {}))
    bar.close()
    return finish_policy(run, setup, log, opt, policy, updates=updates, train_key="loss", plot_keys=plot_keys,
                         extra={"loss_type": c.loss_type, "beta": c.beta, "iterations": c.num_iterations,
                                "steps_per_iteration": per_iteration, **extra})


@torch.no_grad()
def build_pool(run: Run, opt, policy, prompts: list[int], build: Build, seed: int) -> Pool:
    """# 1-3. the stage's pairs, made with the policy as it stands, and both responses' log-probs
    under it (the iteration's reference), in micro-batches of whole pairs."""
    c = run.config
    policy.eval()
    with opt.whole(policy), run.precision():
        built = build(prompts, seed)
        n = 2 * len(prompts)
        mb = c.per_device_train_batch_size
        ref_logps = sequence_logps_of(policy, built.pairs, [torch.arange(k, min(k + mb, n)) for k in range(0, n, mb)],
                                      c)
    return Pool(prompts, built, ref_logps)


def nan_mean(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The mean over `dim` of the entries that are not NaN (NaN where all are)."""
    kept = ~torch.isnan(x)
    total = torch.where(kept, x, torch.zeros_like(x)).sum(dim)
    count = kept.sum(dim)
    return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, math.nan))
