"""The engine matrix on 2 CPU processes (gloo, OMP_NUM_THREADS=1): `accelerate launch --config_file
configs/accelerate/{ddp,zero2,zero3,fsdp2}.yaml` for sft (ddp, zero3, fsdp2) and dpo (zero2, zero3,
fsdp2), each checked against one process with the same global batch.

Each launched run: 4 optimizer steps of 2 per device x 2 accumulation x 2 processes (global 8;
the single-process run: 8 x 1 x 1), a linear schedule with one warmup step, clipping at 1.0 (which
fires: the gradient norms are 2-7), a checkpoint at step 2. Checked:
- summary.json names the engine asked for and accelerate's distributed type;
- what each rank held: ZeRO-3 and FSDP2 about half of the parameters (`ds_tensor`, the DTensor's local
  shard), ZeRO-2 all parameters but half of the optimizer state, DDP all of both;
- the loss curve (and DPO's metrics, and sft's gold reward of samples drawn at the end, on every rank
  under ZeRO-3/FSDP2) equal the single process's within rel 1e-4 / abs 1e-5 (measured: ~1e-6;
  DeepSpeed clips and reduces in another order than torch, so not bit-identical);
- the saved directory loads with plain transformers on one process and gives the single process's
  logits within 1e-4;
- (the resume from a step-2 checkpoint under each engine: zero3 rm, zero3 ppo and fsdp2 grpo in the
  other two modules, with `interrupted_copy` below).

A launch is ~10 s of imports per process before any work, more than one of these tiny runs costs,
so all runs under one engine share ONE launch (`helpers.launched_run`: tests/launch_batch.py runs the
stages one after another in each process, each with a fresh accelerate state), the resumed runs one
more per engine; and each case below is one that no other run covers (the three scale-out modules and
the DDP tests of the stage modules together):
  engine  stages launched (tuning)                                  resumed        LoRA
  ddp     sft here; dpo / rm / rloo (lora) / ppo (full, lora) from their own modules (test_<stage>.py)
  zero2   dpo here; ppo (lora)                                       -              ppo
  zero3   sft, dpo (checkpointed) here; rm, kto (lora), rloo (lora),  rm, ppo        kto, rloo
          ppo (checkpointed)
  fsdp2   sft (checkpointed), dpo here; rm (lora), kto, grpo,         grpo           rm, ppo
          ppo (lora)
(test_scaleout_fit.py: rm / kto; test_scaleout_online.py: grpo / rloo / ppo.) ZeRO-2 partitions the
optimizer state only, the same for every stage; ZeRO-3 and FSDP2 shard parameters, which each stage's
extra models (reference, reward model, critic), sampling and evaluation meet in their own way.

The first DeepSpeed launch on a machine JIT-compiles DeepSpeed's shared-memory op (~80 s on 2 cores);
it is cached in build/torch_extensions (ignored by git). Every case is slow-marked (`make test` runs
them; `make unit` does not).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from helpers import build_once, launched_run, read_metrics, read_summary, register_launched, run_once, write_jsonl

from rlhfkit.config import build_config
from rlhfkit.tasks import get_task

pytestmark = pytest.mark.slow

HAS_DEEPSPEED = __import__("importlib").util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed not installed (pip install 'rlhfkit[deepspeed]')")

COMMON = dict(max_steps=4, learning_rate=1e-3, logging_steps=1, report_to=[], seed=3, disable_tqdm=True,
              lr_scheduler_type="linear", warmup_steps=1, max_grad_norm=1.0)
LAUNCHED = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, save_steps=2)
SINGLE = dict(per_device_train_batch_size=8, gradient_accumulation_steps=1)
CHECKPOINTED = {("zero3", "dpo"), ("fsdp2", "sft")}
"""Launched with gradient checkpointing (the single-process reference without: same curve)."""


# ---- data and configs ----------------------------------------------------------------------------

def scaleout_data(tmp_path_factory, model_dir: Path) -> dict:
    """The sft / dpo config values; the data files written once per session (shared by the workers)."""

    def write(d: Path) -> None:
        task = get_task("sentiment")
        for kind, n in (("sft", 64), ("preference", 48)):
            write_jsonl(d / f"{kind}.jsonl", task.make(kind, n, seed=0))

    d = build_once(tmp_path_factory, "scaleout_data", write)
    # sft evaluates the gold reward of samples at the end: under ZeRO-3/FSDP2 every rank samples
    return {"sft": dict(model_name_or_path="preset:tiny", dataset=str(d / "sft.jsonl"), max_length=64,
                        task="sentiment", eval_steps=4, eval_num_prompts=8, max_new_tokens=12),
            "dpo": dict(model_name_or_path=str(model_dir), dataset=str(d / "preference.jsonl"),
                        eval_dataset=str(d / "preference.jsonl"), eval_steps=2, max_length=48)}


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_model_dir) -> dict:
    return scaleout_data(tmp_path_factory, tiny_model_dir)


def stage_config(data: dict, stage: str, out: Path, **kw):
    return build_config(stage, dict(data[stage], output_dir=str(out), **COMMON, **kw))


def launched_job(engine: str, stage: str):
    extra = {"gradient_checkpointing": True} if (engine, stage) in CHECKPOINTED else {}

    def job(tmp_path_factory, model_dir: Path, out: Path):
        return stage, stage_config(scaleout_data(tmp_path_factory, model_dir), stage, out, **LAUNCHED, **extra), None

    return job


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, data):
    """Launched runs (one launch per engine for the three scale-out modules: `launched_run`) and
    single-process references (each made once per session, by whichever xdist worker asks first)."""

    def get(engine: str, stage: str) -> Path:
        if engine != "single":
            return launched_run(tmp_path_factory, tiny_model_dir, engine, f"scaleout_{stage}")
        return run_once(tmp_path_factory, f"scaleout/single_{stage}", stage,
                        lambda out: stage_config(data, stage, out, **SINGLE))

    return get


def assert_same_curve(a: Path, b: Path, rel: float = 1e-4, abs_: float = 1e-5) -> None:
    ma, mb = read_metrics(a), read_metrics(b)
    assert [r["step"] for r in ma] == [r["step"] for r in mb] == [1, 2, 3, 4]
    for ra, rb in zip(ma, mb):
        assert ra.keys() == rb.keys()
        for k in ra:
            if k != "epoch":  # epochs count micro-batches per process: 2 x 2 vs 8 x 1 differ by design
                assert ra[k] == pytest.approx(rb[k], rel=rel, abs=abs_), (ra["step"], k, ra[k], rb[k])


def assert_halved(held: list[int], total: int, spread: float = 0.05) -> None:
    """Each of the 2 ranks holds about half of `total` (within `spread` of it), and no more than all."""
    assert all((0.5 - spread) * total <= n <= (0.5 + spread) * total for n in held), (held, total)


def interrupted_copy(full: Path, out: Path, *final: str) -> Path:
    """What a run killed after its step-2 checkpoint leaves: `full` copied to `out` without the files
    only a finished run writes (weights, summary, tokenizer, config, chat template and `final`)."""
    ignore = shutil.ignore_patterns("*.safetensors", "summary.json", "tokenizer*", "config.json",
                                    "chat_template*", *final)
    shutil.copytree(full, out, ignore=lambda d, names: ignore(d, names) if Path(d) == full else set())
    assert not (out / "model.safetensors").exists()
    return out


def logits(model_dir: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.arange(3, 40).reshape(1, -1) % model.config.vocab_size
    with torch.no_grad():
        return model(input_ids=ids).logits


ENGINES = [pytest.param("ddp", marks=()), pytest.param("zero2", marks=needs_deepspeed),
           pytest.param("zero3", marks=needs_deepspeed), pytest.param("fsdp2", marks=())]


MATRIX = [(e, s) for e in ENGINES for s in ("sft", "dpo")
          if (e.values[0], s) not in {("ddp", "dpo"), ("zero2", "sft")}]  # covered elsewhere (table above)
for _e, _s in MATRIX:
    register_launched(_e.values[0], f"scaleout_{_s}", launched_job(_e.values[0], _s))


@pytest.mark.parametrize("engine, stage", [pytest.param(e.values[0], s, marks=e.marks) for e, s in MATRIX])
def test_engine_matches_one_process(runs, engine, stage):
    launched, single = runs(engine, stage), runs("single", stage)
    s, ref = read_summary(launched), read_summary(single)
    # 1. the engine asked for, as accelerate set it up
    assert (s["engine"], s["world_size"]) == (engine, 2)
    # FSDP2 is applied by rlhfkit over accelerate's data-parallel group (accelerate 1.15 has no FSDP on CPU)
    assert s["distributed_type"] == ("DEEPSPEED" if engine.startswith("zero") else "MULTI_CPU")
    assert (ref["engine"], ref["world_size"]) == ("single", 1)
    # 2. what each rank held
    total = ref["local_parameters"][0]
    assert ref["local_optimizer_state"] == [total]  # full fine-tuning: one moment per parameter
    params, optim = s["local_parameters"], s["local_optimizer_state"]
    if engine in ("zero3", "fsdp2"):
        assert_halved(params, total)
        assert sum(params) == pytest.approx(total, rel=0.01)
    else:
        assert params == [total, total]
    if engine == "ddp":
        assert optim == [total, total]
    else:
        assert_halved(optim, total)
    # 3. the same loss curve (and DPO's metrics, evaluation included) as one process
    assert_same_curve(launched, single)
    if stage == "sft":  # sampled at the end (every rank takes part under ZeRO-3/FSDP2)
        assert "eval/gold_reward" in read_metrics(launched)[-1]
    # 4. the saved model: plain transformers, one process, the single run's logits
    torch.testing.assert_close(logits(launched), logits(single), atol=1e-4, rtol=1e-4)
