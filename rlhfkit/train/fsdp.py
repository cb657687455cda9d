"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for the stages that train with `fit` (pt, sft, dpo) and
the online stages (ppo, grpo, rloo; `rlhfkit.train.distributed.Optimization`).

rlhfkit applies FSDP2 itself, under `torchrun` or `accelerate launch` (configs/accelerate/fsdp2.yaml):
accelerate 1.15 never sets up FSDP on a machine without GPUs (it stays MULTI_CPU), and one path for
CPU and GPU is easier to trust than two. The launch asks for it (`ACCELERATE_USE_FSDP` +
`FSDP_VERSION=2`, set by accelerate from the config, or by hand under torchrun); accelerate's own
FSDP wrapping is not used (the model is never passed to `prepare`).

- Sharding: `fully_shard` on every decoder layer (the classes in the model's `_no_split_modules`),
  then on the whole model; each parameter becomes a DTensor sharded on dim 0 across ranks. Every
  rank builds the model with the same seed first (fully_shard does not broadcast).
- The optimizer is built after sharding (it holds the shards); gradients are reduce-scattered and
  averaged like DDP's, so `fit`'s loss scaling is unchanged; accumulation skips the reduction on
  all but the last micro-batch (`set_requires_gradient_sync`).
- Clipping: torch's `clip_grad_norm_` over the DTensor gradients (a global norm).
- Checkpoints and the final save gather full state dicts (`torch.distributed.checkpoint.state_dict`,
  collective); the main process writes them in the same files as a single-process run.
- A frozen reference (DPO / PPO / GRPO full fine-tuning) and a separate reward model stay a whole copy
  on every rank. Two trained models (full PPO: policy and critic) are two roots.
- Sampling (and the no-grad scoring passes of the online stages) runs with every FSDP module of the
  policy unsharded and kept so (`Optimization.whole`): the sampler's forward passes differ in number
  between ranks (lengths, prefill groups), so they must not be collectives.
"""

from __future__ import annotations

import torch


def decoder_layers(model) -> list[torch.nn.Module]:
    """The modules FSDP2 shards one by one: the model's `_no_split_modules` classes (decoder layers)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def shard_model(model, inner: list | tuple = ()) -> None:
    """Apply FSDP2 in place: layers, then the `inner` modules (submodules that are also called on
    their own, e.g. PPO's critic backbone inside the LoRA policy), then the root."""
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer)
    for module in inner:
        # a weight tied across the unit's border (the lm_head tied to the input embedding) must live in
        # one FSDP group: the modules outside `module` that hold it join its unit
        held = {id(p) for p in module.parameters()}
        inside = {id(m) for m in module.modules()}
        tied = [m for m in model.modules() if id(m) not in inside
                and any(id(p) in held for p in m.parameters(recurse=False))]
        fully_shard([module, *tied] if tied else module)
    fully_shard(model)


def is_fsdp(run) -> bool:
    engine = getattr(run, "engine", None)
    return engine is not None and engine.name == "fsdp2"


def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """Global gradient norm of DTensor gradients, clipped to `max_norm` (a plain tensor back)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def full_model_state(model) -> dict[str, torch.Tensor]:
    """The whole model's state dict on every rank, on CPU (collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(model, optimizer, model_state: dict, optimizer_state: dict) -> None:
    """Scatter full state dicts (every rank holds them) into the sharded model and optimizer."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optim_state_dict=optimizer_state, options=options)
