"""DeepSpeed ZeRO-2 / ZeRO-3 through accelerate for the stages that train with `fit` (pt, sft, dpo)
and the online stages (ppo, grpo, rloo), both through `rlhfkit.train.distributed.Optimization`.
Launch with `accelerate launch --config_file configs/accelerate/zero3.yaml -m rlhfkit ...`.

How rlhfkit drives the engine (so that a run under ZeRO equals one under DDP up to the engine's own
arithmetic):
- the DeepSpeed JSON's `auto` values are filled from the rlhfkit config before `prepare`:
  `train_micro_batch_size_per_gpu` = `per_device_train_batch_size`, `gradient_clipping` =
  `max_grad_norm` (DeepSpeed clips, not torch), `bf16.enabled` = `bf16`, and
  `gradient_accumulation_steps` = 1: `fit` marks the accumulation boundary itself (the last
  micro-batch of a step), so DeepSpeed never rescales the loss (`fit` already divides by the
  global token/pair count) and steps once per optimizer step;
- the optimizer is rlhfkit's AdamW (a client optimizer, `zero_allow_untested_optimizer`), the
  schedule rlhfkit's, stepped after the engine's step;
- checkpoints are the engine's own partitioned files (`checkpoint.py`), resumed under the same
  engine and process count;
- models are loaded whole and partitioned by `prepare` (`zero3_init_flag: false`); a frozen
  reference (DPO/KTO full fine-tuning) stays a whole copy on every rank, outside the engine: it
  runs no optimizer, so ZeRO-2 would save nothing on it, and ZeRO-3 would all-gather it at
  every forward (say `ref_model` / LoRA, where the reference is the base with adapters off);
- under ZeRO-3 every forward pass is collective: evaluation runs on every rank (it already does),
  sampling for the gold-reward evaluation runs on every rank with the same seed (only the main
  process writes), and the final save gathers the full weights on every rank
  (`deepspeed.zero.GatheredParameters`) before the main process writes a normal HF directory;
- the online stages: one engine over the trained models (the policy; PPO: policy, critic and value
  head in one `Trainable` container whose forward runs the micro-batch's passes, so that they go
  through the engine's forward); the frozen reference (full fine-tuning) and a separate reward
  model stay whole on every rank outside the engine; sampling (and the no-grad old/reference/value
  passes) runs inside `Optimization.whole`: the policy's parameters gathered
  (`GatheredParameters`) and ZeRO-3's hooks lifted, so ranks sample different lengths without a
  collective inside the sampler.
"""

from __future__ import annotations

from contextlib import nullcontext


def configure_deepspeed(accelerator, config, model=None) -> dict:
    """Fill the active DeepSpeed config from the rlhfkit config (see the module docstring);
    values the user set explicitly to something else than `auto` are overridden where rlhfkit
    depends on them (micro-batch, accumulation, clipping) and kept otherwise. A `model` without a
    `config` of its own (a container of several models, e.g. PPO's policy + critic) gets the
    hidden-size-derived `auto` values accelerate would fill (bucket sizes, persistence threshold)
    from the first model inside it that has one. Returns the config."""
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    if model is not None and getattr(model, "config", None) is None:
        hidden = next((m.config.hidden_size for m in model.modules()
                       if hasattr(getattr(m, "config", None), "hidden_size")), None)
        zero = ds.get("zero_optimization", {})
        derived = {"reduce_bucket_size": hidden * hidden if hidden else None,
                   "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden) if hidden else None,
                   "stage3_param_persistence_threshold": 10 * hidden if hidden else None}
        for key, value in derived.items():
            if zero.get(key) == "auto" and value is not None:
                zero[key] = value
    ds["train_micro_batch_size_per_gpu"] = config.per_device_train_batch_size
    ds["gradient_accumulation_steps"] = 1
    ds["train_batch_size"] = config.per_device_train_batch_size * accelerator.num_processes
    ds["gradient_clipping"] = float(config.max_grad_norm)
    if ds.get("bf16", {}).get("enabled") == "auto" or config.bf16:
        ds["bf16"] = {**ds.get("bf16", {}), "enabled": bool(config.bf16)}
    if ds.get("fp16", {}).get("enabled") == "auto":
        ds["fp16"] = {**ds["fp16"], "enabled": False}
    accelerator.gradient_accumulation_steps = 1
    return ds


def zero_stage(run) -> int:
    """0 outside DeepSpeed, else the ZeRO stage."""
    engine = getattr(run, "engine", None)
    return int(engine.name[-1]) if engine is not None and engine.is_deepspeed else 0


def shards_parameters(run) -> bool:
    """True under the engines where a forward pass is a collective (ZeRO-3, FSDP2)."""
    engine = getattr(run, "engine", None)
    return engine is not None and engine.name in ("zero3", "fsdp2")


def gathered_parameters(run, model):
    """Context in which every parameter of `model` is whole on every rank (ZeRO-3; a no-op
    otherwise). Collective: every rank must enter it."""
    if zero_stage(run) != 3:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)


def samples_on_this_rank(run) -> bool:
    """Whether this rank runs the forward passes of a main-process-only job (sampling for the
    gold-reward evaluation): the main process always, every rank under ZeRO-3 / FSDP2, where each forward
    pass is a collective (same seed on every rank, so every rank takes the same path)."""
    return run.is_main or shards_parameters(run)


def _local_numel(t) -> int:
    """Elements this rank holds: a ZeRO-3 partition (`ds_tensor`), an FSDP2 shard (DTensor), or all."""
    if hasattr(t, "ds_tensor"):
        return t.ds_tensor.numel()
    if hasattr(t, "to_local"):
        return t.to_local().numel()
    return t.numel()


def local_parameter_count(model) -> int:
    """Parameters held by this rank: ZeRO-3's partitions, FSDP2's shards, else the full count. Tied
    weights count once (FSDP2 may hand out the tied lm_head as another DTensor over the same shard)."""
    seen, total = set(), 0
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        key = (local.data_ptr(), local.numel()) if local.numel() else id(p)
        if key not in seen:
            seen.add(key)
            total += _local_numel(p)
    return total


def local_optimizer_state(optimizer) -> int:
    """Elements of Adam's first moment held by this rank (ZeRO-1/2/3: its partition; otherwise one
    per trainable parameter). Unwraps accelerate's and DeepSpeed's optimizer wrappers."""
    inner = optimizer
    while hasattr(inner, "optimizer"):
        inner = inner.optimizer
    return sum(_local_numel(s["exp_avg"]) for s in inner.state.values() if "exp_avg" in s)


def local_counts(run, n_parameters: int, optimizer) -> dict[str, list[int]]:
    """Per rank (a list, rank order): parameters held (`n_parameters`, counted by the caller right
    after sharding) and optimizer-state elements held; how a run shows that ZeRO-3 / FSDP2
    partitioned the parameters and ZeRO-2 the optimizer state. Collective."""
    mine = [n_parameters, local_optimizer_state(optimizer)]
    if run.world_size > 1:
        import torch

        gathered = [None] * run.world_size
        torch.distributed.all_gather_object(gathered, mine)
    else:
        gathered = [mine]
    return {"local_parameters": [g[0] for g in gathered], "local_optimizer_state": [g[1] for g in gathered]}
