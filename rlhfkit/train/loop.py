"""The shared training machinery every stage uses: run set-up, optimizer and schedule, the
deterministic batch stream, and `fit`, the optimisation loop with gradient accumulation,
clipping, logging, evaluation and checkpoints.

Losses are normalised by the *global* batch: a stage's `loss_fn` returns a sum and the caller
divides by the total weight (tokens or pairs) of all micro-batches of the step on all processes.
So batch 8 x accumulation 1, batch 1 x accumulation 8 and 2 processes x batch 4 give the same
gradient. A loss that needs a statistic of the whole global batch (KTO's reference point z0)
gets it from `prepare_step`, a no-grad pre-pass over the step's micro-batches.
"""

from __future__ import annotations

import logging
import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rlhfkit.config import BaseConfig, dump_config
from rlhfkit.errors import ConfigError
from rlhfkit.train.checkpoint import resolve_resume, save_checkpoint
from rlhfkit.train.engine import Engine
from rlhfkit.train.tracking import MetricsLogger, progress

log = logging.getLogger("rlhfkit")


@dataclass
class Run:
    """Everything a stage needs about the running job (one per process)."""

    config: BaseConfig
    stage: str
    accelerator: object
    output_dir: Path
    logger: MetricsLogger
    resume_from: Path | None
    engine: Engine | None = None

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def quiet(self) -> bool | None:
        return True if not self.is_main else self.config.disable_tqdm

    def print(self, *args) -> None:
        if self.is_main:
            print(*args, flush=True)

    def precision(self):
        """The one precision context of every forward pass of the run (bf16 autocast with
        `bf16: true`): sampling, old/reference log-probs, training and evaluation agree."""
        return self.accelerator.autocast()

    def reduce_sum(self, values: list[float] | torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(values, dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            torch.distributed.all_reduce(t)
        return t


@dataclass
class Result:
    """What a stage returns: where it wrote, the final metrics, the trained model."""

    output_dir: Path
    summary: dict
    model: object = None
    tokenizer: object = None
    history: list[dict] = field(default_factory=list)


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


def tune_cpu_allocator() -> bool:
    """Tell glibc malloc to keep freed memory instead of returning it to the OS after every step.

    A CPU training step frees and re-allocates the same large activation/gradient buffers each
    time; with glibc's defaults every big buffer is a fresh mmap whose pages fault in again
    (measured 1.15-1.45x slower steps on the 135M model, for ~400 MB more resident memory).
    M_MMAP_MAX=0 serves large blocks from the heap, M_TRIM_THRESHOLD=max stops trimming it.
    Returns False where this is not glibc (then nothing changes)."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bfloat16 instructions (x86 AVX512-BF16 / AMX, Arm BF16)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        pass
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16", " bf16"))


def bf16_is_native() -> bool:
    """True when this process's device computes bfloat16 natively: the GPU when CUDA is visible
    (`torch.cuda.is_bf16_supported`), else the CPU (`cpu_has_native_bf16`). What `bf16: auto` becomes."""
    if torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    return cpu_has_native_bf16()


def bf16_slowdown(size: int = 256, repeats: int = 3) -> float:
    """How many times slower a size x size x size matmul runs in bfloat16 than in float32 on this
    CPU, on one thread (best of `repeats` each; ~0.1 s where bf16 is emulated). Measured on a 2-core
    AVX2 CPU (AMD EPYC, torch 2.13): 69x at 256, 64x at 512, 75x for a 512-token x 576 x 1536
    SmolLM2 MLP matmul, 15-32x for the 1-8 rows of a decoding step."""
    import time

    a, b = torch.randn(size, size), torch.randn(size, size)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: less exposed to the scheduler on a busy machine

    def best(x, y) -> float:
        x @ y  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            x @ y
            times.append(time.perf_counter() - start)
        return min(times)

    try:
        return best(a.bfloat16(), b.bfloat16()) / max(best(a, b), 1e-9)
    finally:
        torch.set_num_threads(threads)


def start_run(config: BaseConfig, stage: str) -> Run:
    """Create the accelerator for the engine the launch asks for (an error when accelerate sets up
    another one, or when the stage cannot run under it; see `rlhfkit.train.engine`), print the
    engine, check and prepare `output_dir`, write the resolved config."""
    from rlhfkit.train.engine import (
        actual_engine,
        build_accelerator,
        check_config,
        check_engine,
        check_supported,
        requested_engine,
    )

    requested = requested_engine()
    check_supported(requested, stage)
    check_config(requested, config)
    on_cpu = not torch.cuda.is_available()
    if config.fp16:
        if not on_cpu:
            raise ConfigError("fp16: true: float16 mixed precision (with loss scaling) is not implemented in "
                              "rlhfkit; use bf16: true (GPUs since Ampere) or fp16: false")
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"[{stage}] fp16: true cannot be honoured on a CPU (no float16 mixed-precision training "
                  "there): training in fp32 (bf16: true gives bfloat16 autocast)", flush=True)
    if on_cpu:
        tune_cpu_allocator()
        bf16_sampling = getattr(config, "sampling_dtype", "float32") == "bfloat16"
        if (config.bf16 or bf16_sampling) and not cpu_has_native_bf16():
            key = "bf16: true" if config.bf16 else "sampling_dtype: bfloat16"
            fix = "bf16: auto (or false)" if config.bf16 else "sampling_dtype: float32"
            log.warning(f"{key} on a CPU without native bfloat16 instructions (AVX512-BF16 / AMX): torch "
                        f"emulates it, a bfloat16 matmul measured {bf16_slowdown():.0f}x slower than float32 "
                        f"on this CPU; set {fix} to run in float32")
    precision = "bf16" if config.bf16 else "no"
    from accelerate.state import AcceleratorState

    if (AcceleratorState._shared_state and not torch.distributed.is_initialized()
            and AcceleratorState._shared_state.get("_mixed_precision") != precision):
        # one process running several stages (the Python API, a pipeline) with different precision:
        # accelerate keeps one state per process, so start it again
        AcceleratorState._reset_state()
    accelerator = build_accelerator(requested, precision, on_cpu)
    engine = actual_engine(accelerator, requested)
    check_engine(requested, engine)
    if accelerator.is_main_process:
        print(f"[{stage}] {engine.describe()}", flush=True)
    out = Path(config.output_dir)
    resume_from = resolve_resume(out, config.resume_from_checkpoint)
    finished = (out / "summary.json").exists()
    if finished and resume_from is None and not config.overwrite_output_dir:
        raise ConfigError(f"output_dir {out} already holds a finished run; set overwrite_output_dir: true "
                          "or choose another output_dir")
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if finished and resume_from is None:
            (out / "summary.json").unlink()
        dump_config(config, out / "config.yaml")
    accelerator.wait_for_everyone()
    set_seed(config.seed)
    resume_step = None
    if resume_from is not None:
        import json

        resume_step = json.loads((resume_from / "trainer_state.json").read_text())["step"]
    logger = MetricsLogger(out, enabled=accelerator.is_main_process, trackers=config.trackers,
                           resume_step=resume_step, config={"stage": stage, **config.model_dump(mode="json")},
                           run_name=config.run_name)
    return Run(config, stage, accelerator, out, logger, resume_from, engine)


# ---- optimisation ------------------------------------------------------------------------------

def build_optimizer(model, config: BaseConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms and embeddings of size 1-D."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel over all parameters (measured 5-10% of a CPU step vs. foreach)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.learning_rate,
                             betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon,
                             fused=True)


def build_scheduler(optimizer, config: BaseConfig, total_steps: int):
    from transformers import get_scheduler

    warmup = config.warmup_steps or math.ceil(config.warmup_ratio * total_steps)
    return get_scheduler(config.lr_scheduler_type, optimizer, num_warmup_steps=warmup,
                         num_training_steps=total_steps)


class BatchStream:
    """Deterministic micro-batches over `n` examples, as a pure function of (seed, index).

    Epoch e is a permutation of range(n) drawn from seed + e, padded by wrapping to a multiple
    of `batch_size * world_size` (as DistributedSampler does) so every process gets full,
    equally many micro-batches. Micro-batch k of the whole run is epoch k // per_epoch; on rank
    r it holds positions [(j * world + r) * bs, ... + bs) of that epoch, j = k % per_epoch.
    The step alone therefore fixes the data position, which makes resume exact.
    """

    def __init__(self, n: int, batch_size: int, world_size: int = 1, rank: int = 0, seed: int = 0,
                 shuffle: bool = True):
        if n == 0:
            raise ConfigError("no training examples left after encoding")
        self.n, self.bs, self.world, self.rank, self.seed, self.shuffle = n, batch_size, world_size, rank, seed, shuffle
        self.per_epoch = math.ceil(n / (batch_size * world_size))
        self._cache: tuple[int, list[int]] | None = None

    def _epoch(self, e: int) -> list[int]:
        if self._cache is None or self._cache[0] != e:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + e)
                order = torch.randperm(self.n, generator=g).tolist()
            else:
                order = list(range(self.n))
            total = self.per_epoch * self.bs * self.world
            order = (order * math.ceil(total / self.n))[:total]
            self._cache = (e, order)
        return self._cache[1]

    def indices(self, k: int) -> list[int]:
        order = self._epoch(k // self.per_epoch)
        j = k % self.per_epoch
        start = (j * self.world + self.rank) * self.bs
        return order[start:start + self.bs]


def total_steps(config: BaseConfig, micro_batches_per_epoch: int) -> int:
    if config.max_steps > 0:
        return config.max_steps
    return max(1, math.ceil(config.num_train_epochs * micro_batches_per_epoch
                            / config.gradient_accumulation_steps))


def describe_batches(run: Run, n_train: int, steps: int, per_epoch: int) -> None:
    c = run.config
    global_batch = c.per_device_train_batch_size * c.gradient_accumulation_steps * run.world_size
    run.print(f"[{run.stage}] {n_train} training examples | global batch {global_batch} = "
              f"{c.per_device_train_batch_size} per device x {c.gradient_accumulation_steps} accumulation x "
              f"{run.world_size} process(es) | {steps} optimizer steps "
              f"(~{steps * c.gradient_accumulation_steps / per_epoch:.2f} epochs)")


# ---- the loop ----------------------------------------------------------------------------------

LossFn = Callable[[object, dict], tuple[torch.Tensor, dict[str, torch.Tensor]]]
PrepareStep = Callable[[object, list[dict]], list[dict]]


def fit(
    run: Run,
    model,
    *,
    stream: BatchStream,
    make_batch: Callable[[list[int]], dict],
    batch_weight: Callable[[dict], float],
    loss_fn: LossFn,
    steps: int,
    evaluate: Callable[[object], dict] | None = None,
    on_log: Callable[[int, dict], None] | None = None,
    prepare_step: PrepareStep | None = None,
) -> tuple[object, list[dict]]:
    """Optimise `model` for `steps` optimizer steps.

    `loss_fn(model, batch)` returns `(loss_sum, metric_sums)`: sums over the micro-batch that are
    divided by the global weight of the step (`batch_weight` summed over the step's micro-batches
    on every process). Returns the unwrapped model and the logged history.

    `prepare_step(model, micro_batches) -> extras`, when given, runs once per step before any
    backward pass, under no_grad and autocast, with the (wrapped) model in the state the step's
    forward passes see. It returns one dict per micro-batch, merged into that micro-batch before
    `loss_fn` sees it. It is how a loss gets a statistic of the whole GLOBAL batch that a
    micro-batch alone cannot give (KTO's z0: a mean over every micro-batch of the step on every
    process), keeping the gradient independent of how the global batch is split. Every process
    calls it once per step, so it may reduce across processes (`run.reduce_sum`).
    """
    from rlhfkit.train.distributed import Optimization

    c = run.config
    acc = run.accelerator
    if c.gradient_checkpointing:
        from rlhfkit.models.load import enable_gradient_checkpointing

        enable_gradient_checkpointing(model)
    model.train()
    # the engine's side (rlhfkit.train.distributed.Optimization): FSDP2 sharding, optimizer, schedule,
    # resume, accelerate's prepare (DDP / DeepSpeed)
    opt = Optimization(run, model, steps, prepare=True)
    wrapped, scheduler = opt.wrapped, opt.scheduler
    start_step = opt.start_step
    if run.resume_from is not None:
        run.print(f"[{run.stage}] resumed from {run.resume_from} at step {start_step}")
    accum = c.gradient_accumulation_steps
    window: list[dict] = []
    bar = progress(total=steps, initial=start_step, disable=run.quiet, desc=f"{run.stage} train")

    for step in range(start_step, steps):
        # 1. fetch this step's micro-batches and the global normaliser
        micro = [make_batch(stream.indices(step * accum + i)) for i in range(accum)]
        weight = run.reduce_sum([sum(batch_weight(b) for b in micro)]).item()
        if prepare_step is not None:  # statistics of the global batch, before any weight moves
            with torch.no_grad(), acc.autocast():
                extras = prepare_step(wrapped, micro)
            micro = [{**b, **e} for b, e in zip(micro, extras, strict=True)]
        # 2. forward/backward each micro-batch; gradients sync on the last one only
        sums: dict[str, float] = {}
        for i, batch in enumerate(micro):
            with opt.micro_batch(last=i == accum - 1), acc.autocast():
                loss_sum, metric_sums = loss_fn(wrapped, batch)
                opt.backward(loss_sum, max(weight, 1e-12))
            for k, v in {"loss": loss_sum, **metric_sums}.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v)
        # 3. clip, step, schedule (the engine's way: Optimization.step)
        grad_norm = opt.step()
        # 4. metrics: global sums / global weight
        keys = sorted(sums)
        totals = run.reduce_sum([sums[k] for k in keys]).tolist()
        metrics = {k: v / max(weight, 1e-12) for k, v in zip(keys, totals)}
        metrics["grad_norm"] = grad_norm
        metrics["lr"] = scheduler.get_last_lr()[0]
        window.append(metrics)
        done = step + 1
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}")
        # 5. log, evaluate, checkpoint
        record: dict = {}
        if done % c.logging_steps == 0 or done == steps:
            record = {k: sum(m[k] for m in window) / len(window) for k in window[0]}
            record["lr"] = metrics["lr"]
            record["epoch"] = done * accum / stream.per_epoch
            window = []
        epoch_end = (done * accum) // stream.per_epoch > (step * accum) // stream.per_epoch
        if evaluate is not None and (done == steps or (c.eval_steps and done % c.eval_steps == 0)
                                     or (c.eval_strategy == "epoch" and epoch_end)):
            model.eval()
            record.update({f"eval/{k}": v for k, v in evaluate(model).items()})
            model.train()
        if record:
            run.logger.log(done, record)
            if on_log is not None:
                on_log(done, record)
        if c.save_steps and done % c.save_steps == 0 and done < steps:
            opt.save_checkpoint(done, save=save_checkpoint)
    bar.close()
    model.eval()
    if run.engine is not None:  # what each rank held: the evidence that ZeRO partitioned (summary.json)
        run.engine.local = opt.local_counts()
        run.print(f"[{run.stage}] held per rank: {run.engine.local}")
    return (model if opt.fsdp else acc.unwrap_model(wrapped)), run.logger.history
