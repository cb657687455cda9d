"""Which distributed engine a run uses, decided once at start and never changed silently.

A launcher says what it wants through the environment: `accelerate launch --config_file` with
`distributed_type: DEEPSPEED` sets `ACCELERATE_USE_DEEPSPEED` (ZeRO stage in its DeepSpeed JSON or
`ACCELERATE_DEEPSPEED_ZERO_STAGE`), with FSDP `ACCELERATE_USE_FSDP` (+ `FSDP_VERSION`); `torchrun`
or a plain multi-process `accelerate launch` only sets `WORLD_SIZE`. `requested_engine` reads that,
`build_accelerator` builds the Accelerator that honours it, and `check_engine` compares what
accelerate actually set up against the request: any difference is a ConfigError (accelerate itself
drops DeepSpeed and FSDP without a word under `Accelerator(cpu=True)`, which is how a ZeRO-3 launch
on a CPU machine used to train plain DDP).

Engines (`Engine.name`): `single` (one process), `ddp` (data parallel: one full copy per process),
`zero2` / `zero3` (DeepSpeed ZeRO stage 2: optimizer state and gradients partitioned; stage 3:
parameters too), `fsdp2` (torch FSDP2 `fully_shard`, applied by rlhfkit: `rlhfkit.train.fsdp`).
Every stage (pt, sft, rm, dpo, kto and the online stages ppo, grpo, rloo, online_dpo, xpo, nash_md, spin, self_reward) runs under
every engine (`SHARDED_STAGES`). The engine-specific backward / step / checkpoint of every stage is `rlhfkit.train.distributed.Optimization`. Placement of the roles under
ZeRO-2/3 and FSDP2: the trained models (policy; PPO's critic and value head) in the engine; frozen
models (the full fine-tuning reference, a separate reward model) whole on every rank outside it;
under LoRA the reference (and PPO's shared-base reward adapter) is the policy's base, sharded with
it. Sampling gathers the policy's parameters on every rank (`Optimization.whole`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from rlhfkit.errors import ConfigError

ENGINES = ("single", "ddp", "zero2", "zero3", "fsdp2")
SHARDED_STAGES = ("pt", "sft", "rm", "dpo", "kto", "ppo", "grpo", "rloo", "online_dpo", "xpo", "nash_md", "spin", "self_reward")
"""Stages that run under the sharded engines (every stage today): pt, sft, rm, dpo, kto train in
`rlhfkit.train.loop.fit`, ppo, grpo, rloo, online_dpo, xpo, nash_md, spin, self_reward in the online loops (`rlhfkit.train.online.run_updates`),
both through `rlhfkit.train.distributed.Optimization`, where the DeepSpeed and FSDP2 paths live.
Tested in tests/test_scaleout.py (sft, dpo; pt is sft's code path), tests/test_scaleout_fit.py (rm:
its evaluation and normalisation passes run on every rank under ZeRO-3/FSDP2; kto: its z0 pre-pass
is fit's `prepare_step`), tests/test_scaleout_online.py (ppo, grpo, rloo) and tests/test_online_dpo.py
(online_dpo, each engine against ddp), tests/test_xpo.py, tests/test_nash_md.py and tests/test_spin.py (xpo, nash_md,
spin, likewise), tests/test_self_reward.py (self_reward under ZeRO-3 and FSDP2 against ddp; under ZeRO-2 its parameters
stay whole and its loop is spin's, tested there). A stage added later
is refused under them until it is tested there."""

SUPPORTED: dict[str, tuple[str, ...] | None] = {
    "single": None,  # None: every stage
    "ddp": None,
    "zero2": SHARDED_STAGES,
    "zero3": SHARDED_STAGES,
    "fsdp2": SHARDED_STAGES,
}
"""Engine -> the stages that run under it (None: all)."""


@dataclass
class Engine:
    """The engine of a run: `name` (one of ENGINES), accelerate's `distributed_type`, the number
    of processes and, once `fit` has trained, what each rank held (`local`: `local_parameters`,
    `local_optimizer_state`, one count per rank; see `rlhfkit.train.deepspeed.local_counts`)."""

    name: str
    distributed_type: str
    world_size: int
    local: dict = field(default_factory=dict)

    @property
    def is_deepspeed(self) -> bool:
        return self.name in ("zero2", "zero3")

    def describe(self) -> str:
        what = {"single": "one process", "ddp": "data parallel (full copy per process)",
                "zero2": "DeepSpeed ZeRO-2 (optimizer state + gradients partitioned)",
                "zero3": "DeepSpeed ZeRO-3 (parameters, gradients, optimizer state partitioned)",
                "fsdp2": "FSDP2 (parameters sharded)"}[self.name]
        return f"engine {self.name}: {what}, {self.world_size} process(es), accelerate {self.distributed_type}"

    def summary(self) -> dict:
        """What summary.json records."""
        return {"engine": self.name, "distributed_type": self.distributed_type, "world_size": self.world_size,
                **self.local}


def _true(env, key: str) -> bool:
    return str(env.get(key, "false")).lower() in ("1", "true", "yes")


def deepspeed_stage(env=None) -> int | None:
    """The ZeRO stage a DeepSpeed launch asks for: `zero_optimization.stage` of
    `ACCELERATE_DEEPSPEED_CONFIG_FILE`, else `ACCELERATE_DEEPSPEED_ZERO_STAGE`, else None."""
    env = os.environ if env is None else env
    path = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if path and path != "none":
        try:
            config = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"DeepSpeed config {path} (ACCELERATE_DEEPSPEED_CONFIG_FILE) cannot be read: {e}") from None
        stage = config.get("zero_optimization", {}).get("stage")
        if stage is not None:
            return int(stage)
    stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    return int(stage) if stage not in (None, "", "none") else None


def requested_engine(env=None) -> str:
    """The engine the launch environment asks for (a name; `zero1`/`fsdp1` too, which
    `check_supported` rejects)."""
    env = os.environ if env is None else env
    if _true(env, "ACCELERATE_USE_DEEPSPEED"):
        stage = deepspeed_stage(env)
        if stage is None:
            raise ConfigError("a DeepSpeed launch (ACCELERATE_USE_DEEPSPEED) without a ZeRO stage: set "
                              "zero_optimization.stage in the DeepSpeed config (see configs/accelerate/)")
        return f"zero{stage}"
    if _true(env, "ACCELERATE_USE_FSDP"):
        return f"fsdp{env.get('FSDP_VERSION', '1')}"
    return "ddp" if int(env.get("WORLD_SIZE", "1")) > 1 else "single"


def check_supported(engine: str, stage: str) -> None:
    """ConfigError unless `stage` runs under `engine`."""
    if engine not in SUPPORTED:
        raise ConfigError(f"the launch asks for engine '{engine}', which rlhfkit does not support; supported: "
                          f"{', '.join(ENGINES[:-1])} (DeepSpeed ZeRO stage 2 or 3; configs/accelerate/ has "
                          "ready launch configs)")
    stages = SUPPORTED[engine]
    if stages is not None and stage not in stages:
        runs = f"only {', '.join(stages)}" if stages else "no stage yet"
        raise ConfigError(f"stage '{stage}' cannot run under engine '{engine}' ({runs} can); launch it with "
                          "torchrun or a DDP accelerate config (configs/accelerate/ddp.yaml) instead")


def check_config(engine: str, config) -> None:
    """ConfigError for settings not (yet) supported under a sharded engine: a merged LoRA model
    (`merge_lora`, or LoRA on a preset base, which always saves `merged/`) under ZeRO-3 / FSDP2,
    where merging would run on partitioned weights. The adapter itself saves fine (tested)."""
    if engine in ("zero2", "zero3", "fsdp2") and getattr(config, "load_in_4bit", False):
        raise ConfigError(f"load_in_4bit (QLoRA) under engine '{engine}' is not supported yet: use single or ddp")
    if engine in ("zero3", "fsdp2") and getattr(config, "sampling_dtype", "float32") != "float32":
        raise ConfigError(f"sampling_dtype: {config.sampling_dtype} under engine '{engine}' is not supported yet "
                          "(not tested on gathered weights): use sampling_dtype: float32, or zero2 / ddp")
    if engine not in ("single", "ddp") and getattr(config, "use_vllm", False):
        raise ConfigError(f"use_vllm under engine '{engine}' is not supported yet (one vLLM engine for one "
                          "process): use one process, or use_vllm: false")
    if engine not in ("zero3", "fsdp2") or getattr(config, "finetuning_type", "full") != "lora":
        return
    from rlhfkit.models.presets import preset_name

    if config.merge_lora or preset_name(config.model_name_or_path) is not None:
        raise ConfigError(f"LoRA with a merged save (merge_lora: true, or a preset base) under engine '{engine}' "
                          "is not supported yet: train the adapter on a saved base with merge_lora: false and "
                          "merge afterwards on one process, or use zero2 / ddp")


def check_gpu_count(on_cpu: bool) -> None:
    """With GPUs, each process of a machine takes one (cuda:LOCAL_RANK): more processes than visible
    GPUs would fail deep in the launch with 'invalid device ordinal'; say so before anything starts."""
    if on_cpu:
        return
    import torch

    local, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", "1")), torch.cuda.device_count()
    if local > gpus:
        raise ConfigError(f"{local} processes on this machine but {gpus} GPU(s) visible: each process needs its own "
                          f"GPU; launch at most {gpus} per machine (torchrun --nproc_per_node {gpus}), or hide the "
                          "GPUs (CUDA_VISIBLE_DEVICES=) to run CPU processes (gloo)")


def build_accelerator(engine: str, precision: str, on_cpu: bool):
    """An Accelerator that sets up `engine`. On a CPU machine DeepSpeed needs a process group
    backend named (gloo), not `cpu=True`, which would drop the DeepSpeed plugin."""
    from accelerate import Accelerator

    check_gpu_count(on_cpu)

    if engine.startswith("zero"):
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise ConfigError(f"the launch asks for DeepSpeed ({engine}) but deepspeed is not installed: "
                              "pip install 'rlhfkit[deepspeed]'") from None
        kwargs = {}
        if on_cpu:
            from accelerate.utils import InitProcessGroupKwargs

            kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
        accelerator = Accelerator(mixed_precision=precision, **kwargs)
        plugin = accelerator.state.deepspeed_plugin
        if plugin is not None and plugin.zero3_init_flag:
            # models would load already partitioned; rlhfkit's loaders and the reference copy expect whole ones
            raise ConfigError("zero3_init_flag: true is not supported: set zero3_init_flag: false in the accelerate "
                              "config (rlhfkit loads each model whole, then DeepSpeed partitions it)")
        # accelerate registers its DeepSpeed config with transformers whatever zero3_init_flag says, and
        # from_pretrained then builds ZeRO-3 models already partitioned (outside any engine): unregister it
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        return accelerator
    return Accelerator(mixed_precision=precision, cpu=on_cpu)


def end_distributed() -> None:
    """Tear down the process group of a launched run once its stage has finished (every rank waits for
    the others first). Left to the interpreter's exit, the gloo / DeepSpeed communicator threads are
    destroyed still running and a rank can abort ("terminate called without an active exception",
    SIGABRT) after the run has saved everything, failing the launch."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def actual_engine(accelerator, requested: str | None = None) -> Engine:
    """The engine the run will use: what accelerate set up, except that FSDP2 is applied by rlhfkit
    itself (`rlhfkit.train.fsdp`) over accelerate's data-parallel process group (MULTI_CPU /
    MULTI_GPU, or FSDP where accelerate set that up on GPUs), with more than one process."""
    from accelerate.utils import DistributedType

    dtype = accelerator.distributed_type
    n = accelerator.num_processes
    parallel = (DistributedType.MULTI_CPU, DistributedType.MULTI_GPU, DistributedType.FSDP)
    if requested == "fsdp2" and dtype in parallel and n > 1:
        name = "fsdp2"
    elif dtype == DistributedType.DEEPSPEED:
        stage = accelerator.state.deepspeed_plugin.zero_stage
        name = f"zero{stage}"
    elif dtype == DistributedType.FSDP:
        name = f"fsdp{getattr(accelerator.state.fsdp_plugin, 'fsdp_version', 1)}"
    elif n > 1:
        name = "ddp"
    else:
        name = "single"
    return Engine(name, str(dtype.value if hasattr(dtype, "value") else dtype), n)


def check_engine(requested: str, engine: Engine) -> None:
    """ConfigError when accelerate set up another engine than the launch asked for."""
    if engine.name != requested:
        raise ConfigError(f"the launch asks for engine '{requested}' but accelerate set up '{engine.name}' "
                          f"({engine.distributed_type}, {engine.world_size} process(es)); refusing to train on an "
                          "engine that was not asked for")
