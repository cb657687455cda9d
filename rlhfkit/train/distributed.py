"""Data parallel for the hand-written loops, and the optimizer step every loop takes (`Optimization`:
the one engine-aware backward / step / checkpoint of `fit` and of the online loops).

Each process holds its share of a batch; statistics that span the batch (whitening, the token
counts that normalise losses, controller inputs, logged metrics) are reduced over every process,
and gradients are summed across processes (one flat all-reduce) before clipping, so N processes x
B/N rows make the same update as one process x B rows (tested for sft, ppo and grpo). With one
process nothing here communicates.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch

from rlhfkit.losses.masked import masked_sum, whiten
from rlhfkit.train.loop import Run


def reduce_sum_fn(run: Run):
    """A `reduce_sum(tensor) -> tensor` summing element-wise over processes (None with one), the
    form the pure advantage functions take."""
    if run.world_size == 1:
        return None

    def reduce_sum(t: torch.Tensor) -> torch.Tensor:
        out = t.detach().to(torch.float64).clone()
        torch.distributed.all_reduce(out)
        return out.to(t.dtype)

    return reduce_sum


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


def optimizer_step(params: list[torch.nn.Parameter], optimizer, scheduler, max_grad_norm: float,
                   clip=torch.nn.utils.clip_grad_norm_) -> float:
    """Clip the global gradient norm (0: no clipping, norm still measured), step, schedule, zero.
    Gradients must already be summed over processes (`sum_gradients`, or DDP's hooks in `fit`,
    which passes the accelerator's `clip_grad_norm_`). Returns the norm before clipping."""
    if max_grad_norm > 0:
        grad_norm = clip(params, max_grad_norm)
    else:
        grads = [p.grad.norm() for p in params if p.grad is not None]
        grad_norm = torch.linalg.vector_norm(torch.stack(grads)) if grads else torch.zeros(())
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(grad_norm)


# ---- the optimizer side of a run, under its engine ------------------------------------------------

class Optimization:
    """The optimizer side of one run under its engine (`run.engine`), made once per run and used by
    `fit` and by the online loops (`run_updates`): sharding, optimizer and schedule, resume, the
    backward pass of a micro-batch, the optimizer step, checkpoints, and the context in which a
    model's parameters are whole on this rank (sampling).

    Gradients across processes, per engine:
    - single / ddp with `prepare=True` (`fit`): accelerate prepares model and optimizer (DDP hooks
      average the gradients; the loss is scaled by world_size), accumulation under `no_sync`;
    - single / ddp with `prepare=False` (the online loops): no wrapping; gradients are summed by
      hand (`sum_gradients`, one flat all-reduce) before the step, the loss is not scaled;
    - zero2 / zero3: accelerate prepares `model` (one DeepSpeed engine; two trained models, e.g.
      PPO's policy and critic, go in one container module such as a ModuleDict) with rlhfkit's
      AdamW; DeepSpeed averages, clips (`gradient_clipping` = max_grad_norm) and steps at the last
      micro-batch of a step (`rlhfkit.train.deepspeed`); the loss is scaled by world_size;
    - fsdp2: each of `roots` (default: `model`) is sharded as its own FSDP2 root before the
      optimizer is built (calling a child of a sharded root directly would leave the root's own
      parameters sharded; `units`: submodules that are called on their own, sharded as units of
      their own inside their root); reduce-scatter averages on the last micro-batch only, torch
      clips the global norm of the DTensor gradients; the loss is scaled by world_size.
    With one process and `prepare=True` the numbers are those `fit` always produced; with
    `prepare=False` those the online loops always produced (bit-identical: same calls, same order).
    """

    def __init__(self, run: Run, model, steps: int, *, prepare: bool, roots: list | None = None,
                 units: list | None = None):
        from rlhfkit.train.checkpoint import load_checkpoint
        from rlhfkit.train.deepspeed import local_parameter_count
        from rlhfkit.train.loop import build_optimizer, build_scheduler

        c = run.config
        self.run, self.model = run, model
        self.deepspeed = run.engine is not None and run.engine.is_deepspeed
        self.zero3 = self.deepspeed and run.engine.name == "zero3"
        self.fsdp = run.engine is not None and run.engine.name == "fsdp2"
        self.prepared = prepare or self.deepspeed  # through accelerate's prepare (not under FSDP2)
        self.prepared = self.prepared and not self.fsdp
        # the engine averages the gradients over processes: scale the loss so that they are summed
        self.averaged = (self.prepared or self.fsdp) and run.world_size > 1
        self.roots = list(roots) if roots is not None else [model]
        if self.fsdp:  # before the optimizer, which must hold the shards (rlhfkit.train.fsdp)
            from rlhfkit.train.fsdp import shard_model

            for root in self.roots:  # `units`: submodules called on their own, FSDP units of their own
                inside = {id(m) for m in root.modules()}
                shard_model(root, inner=[u for u in units or [] if id(u) in inside])
        self.optimizer = build_optimizer(model, c)
        self.scheduler = build_scheduler(self.optimizer, c, steps)
        self.state: dict = {}
        if run.resume_from is not None and not self.deepspeed:
            self.state = load_checkpoint(run.resume_from, model, self.optimizer, self.scheduler,
                                         rank=run.rank, fsdp=self.fsdp)
        if self.deepspeed:
            from rlhfkit.train.deepspeed import configure_deepspeed

            configure_deepspeed(run.accelerator, c, model)
        self.wrapped = model
        if self.prepared:
            self.wrapped, self.optimizer = run.accelerator.prepare(model, self.optimizer)
        if run.resume_from is not None and self.deepspeed:  # the engine restores its partitions after prepare
            self.state = load_checkpoint(run.resume_from, model, self.optimizer, self.scheduler,
                                         rank=run.rank, deepspeed_engine=self.wrapped)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.held = local_parameter_count(model)  # after sharding: what this rank holds

    @property
    def start_step(self) -> int:
        """The step a resumed run continues from (0 for a fresh run)."""
        return int(self.state.get("step", 0))

    @contextmanager
    def micro_batch(self, last: bool):
        """Around the forward and backward pass of one micro-batch: gradients are reduced across
        processes on the `last` micro-batch of an optimizer step only."""
        acc = self.run.accelerator
        if self.deepspeed:  # the engine reduces, clips and steps inside backward at the boundary only
            acc.gradient_state._set_sync_gradients(last)
        if self.fsdp:  # reduce-scatter on the last micro-batch only
            for root in self.roots:
                root.set_requires_gradient_sync(last)
        ddp = self.prepared and not self.deepspeed and not last and self.run.world_size > 1
        with acc.no_sync(self.wrapped) if ddp else nullcontext():
            yield

    def backward(self, loss: torch.Tensor, weight: float = 1.0) -> None:
        """Backpropagate `loss / weight`, times world_size where the engine averages gradients."""
        factor = (self.run.world_size if self.averaged else 1) / weight
        scaled = loss * factor if factor != 1 else loss
        if self.prepared:
            self.run.accelerator.backward(scaled)
        else:
            scaled.backward()

    def step(self) -> float:
        """Clip (max_grad_norm), step, schedule, zero the gradients; the global gradient norm before
        clipping (nan where DeepSpeed does not report it)."""
        c, acc = self.run.config, self.run.accelerator
        if self.deepspeed:  # already clipped and stepped in backward (DeepSpeed's `gradient_clipping`)
            grad_norm = acc.clip_grad_norm_(self.params, c.max_grad_norm)
            self.scheduler.step()
            return float("nan") if grad_norm is None else float(grad_norm)
        if self.fsdp:
            from rlhfkit.train.fsdp import clip_grad_norm

            return optimizer_step(self.params, self.optimizer, self.scheduler, c.max_grad_norm,
                                  clip=clip_grad_norm)
        if self.prepared:  # DDP's hooks already averaged the gradients
            return optimizer_step(self.params, self.optimizer, self.scheduler, c.max_grad_norm,
                                  clip=acc.clip_grad_norm_)
        sum_gradients(self.run, self.params)
        return optimizer_step(self.params, self.optimizer, self.scheduler, c.max_grad_norm)

    def save_checkpoint(self, step: int, extra_state: dict | None = None, save=None):
        """A resumable checkpoint at `step` (collective): the engine's own files under DeepSpeed,
        gathered full state under FSDP2. `save`: the writer (`rlhfkit.train.checkpoint.save_checkpoint`
        unless given; `fit` passes the one its module imported, which tests replace to simulate a
        kill)."""
        from rlhfkit.train.checkpoint import save_checkpoint

        run = self.run
        return (save or save_checkpoint)(run.output_dir, step, self.model, self.optimizer, self.scheduler,
                                         rank=run.rank, is_main=run.is_main,
                                         barrier=run.accelerator.wait_for_everyone,
                               keep=run.config.save_total_limit, extra_state=extra_state,
                               deepspeed_engine=self.wrapped if self.deepspeed else None, fsdp=self.fsdp)

    def local_counts(self) -> dict:
        """Per rank: parameters and optimizer state held (summary.json; collective)."""
        from rlhfkit.train.deepspeed import local_counts

        return local_counts(self.run, self.held, self.optimizer)

    @contextmanager
    def whole(self, module):
        """Every parameter of `module` whole on this rank, and its forward passes free of collectives,
        for passes whose number differs between ranks (sampling: lengths, prefill groups and dynamic
        sampling rounds depend on the rank's prompts). Entering and leaving are collective (every
        rank enters once). ZeRO-3: `deepspeed.zero.GatheredParameters` over `module`'s parameters,
        with the engine's per-module fetch/release hooks lifted meanwhile (they would release and
        re-gather); FSDP2: every FSDP module in `module` unsharded, kept unsharded after each
        forward, resharded at the end (as it was). Elsewhere: nothing to do."""
        if self.zero3:
            import deepspeed

            offload = self.wrapped.optimizer.parameter_offload
            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                _zero3_hooks(offload, on=False)
                try:
                    yield module
                finally:
                    _zero3_hooks(offload, on=True)
        elif self.fsdp:
            from torch.distributed.fsdp import FSDPModule

            units = [m for m in module.modules() if isinstance(m, FSDPModule)]
            groups = [m._get_fsdp_state()._fsdp_param_group for m in units]
            kept = [g.post_forward_mesh_info if g is not None else None for g in groups]
            for m, g in zip(units, groups):
                m.unshard()
                if g is not None:
                    g.post_forward_mesh_info = None  # no reshard after each forward
            try:
                yield module
            finally:
                for m, g, info in zip(units, groups, kept):
                    if g is not None:
                        g.post_forward_mesh_info = info
                    m.reshard()
        else:
            yield module


def _zero3_hooks(offload, on: bool) -> None:
    """Lift (`on=False`) or put back (`on=True`) DeepSpeed ZeRO-3's hooks on the engine's module
    (`DeepSpeedZeRoOffload`): the per-submodule fetch/release hooks, and the root's start-of-forward
    hook, whose trace bookkeeping compares the recorded module order across ranks (a collective) while
    no trace is complete. Lifted, with the parameters gathered, a forward pass runs like a plain
    module's and needs no other rank. Putting them back starts a new trace."""
    if on:
        from deepspeed.runtime.zero import parameter_offload

        offload.setup_zero_stage3_hooks()
        stack = parameter_offload.FWD_MODULE_STACK  # set-up pushes the module again: keep one entry
        if len(stack) > 1 and stack[-1] is offload.module and any(m is stack[-1] for m in stack[:-1]):
            stack.pop()
        return
    offload._remove_module_hooks()
    offload.forward_hooks, offload.backward_hooks = [], []
    for p in offload.module.parameters():
        p.ds_active_sub_modules.clear()
