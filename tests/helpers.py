"""Helpers shared by the test modules: reading a run directory, launching a stage on 2 CPU
processes (torchrun or `accelerate launch`), the launched runs of the tests batched into one launch per
engine, and comparing two runs that must agree."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
ACCEL = REPO / "configs" / "accelerate"


def shared_dir(tmp_path_factory, name: str) -> Path:
    """A directory shared by all xdist workers of this session (they have sibling basetemps)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    return base / name


def build_once(tmp_path_factory, name: str, build) -> Path:
    """Run `build(dir)` once per session (into an existing `dir`), whichever worker gets there first;
    the others wait (file lock) and reuse the result. `dir/DONE` is written when `build` returns."""
    from filelock import FileLock

    out = shared_dir(tmp_path_factory, name)
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if not (out / "DONE").exists():
            shutil.rmtree(out, ignore_errors=True)  # what a failed attempt left
            out.mkdir()
            build(out)
            (out / "DONE").write_text("ok")
    return out


def run_once(tmp_path_factory, name: str, stage: str, config_for) -> Path:
    """The single-process run `name` of `stage`, made in this process once per session (`build_once`)
    into `<dir>/run` from the config `config_for(<dir>/run)`: the scale-out modules' references."""
    from rlhfkit.cli import stage_function

    return build_once(tmp_path_factory, name, lambda d: stage_function(stage)(config_for(d / "run"))) / "run"


LAUNCHED_JOBS: dict[str, dict[str, Callable]] = {}
"""launch -> {name: job}: the launched runs of the test modules, registered at import
(`register_launched`). A launch is an engine (`configs/accelerate/<engine>.yaml`), or `<engine>-<tag>`
for a second launch under it (the resumed runs, which need the first launch's checkpoints). A job is
`job(tmp_path_factory, model_dir, out) -> (stage, config, env)`: the stage, its config writing to
`out`, and environment variables for that run only."""


def register_launched(launch_name: str, name: str, job: Callable) -> None:
    LAUNCHED_JOBS.setdefault(launch_name, {})[name] = job


def launched_run(tmp_path_factory, model_dir: Path, launch_name: str, name: str) -> Path:
    """The run `name` of the launch `launch_name`: every job registered for it runs in ONE launch on
    2 processes (tests/launch_batch.py: each process runs the stages one after another, each with a
    fresh accelerate state from the launch's environment), made once per session by whichever xdist
    worker asks first. A launch costs ~10 s of imports per process before any work, most of what one
    of these tiny runs costs. Returns `<dir>/<name>/run`; the launch's output is in `<dir>/launch.log`.
    A failed launch fails every later request at once with its output (no second attempt)."""
    from filelock import FileLock

    from rlhfkit.config import dump_config

    engine = launch_name.split("-")[0]
    out = shared_dir(tmp_path_factory, f"launched/{launch_name}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if (out / "FAILED").exists():
            pytest.fail(f"the {launch_name} launch failed earlier:\n" + (out / "FAILED").read_text())
        if not (out / "DONE").exists():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            jobs = []
            for job_name, job in LAUNCHED_JOBS[launch_name].items():
                (out / job_name).mkdir()
                stage, config, env = job(tmp_path_factory, model_dir, out / job_name / "run")
                dump_config(config, out / job_name / "config.yaml")
                jobs.append(dict(name=job_name, stage=stage, config=str(out / job_name / "config.yaml"),
                                 env=env or {}))
            (out / "jobs.json").write_text(json.dumps(jobs, indent=1))
            proc = launch_script(REPO / "tests" / "launch_batch.py", str(out / "jobs.json"), engine=engine,
                                 check=False)
            (out / "launch.log").write_text(proc.stdout + proc.stderr)
            if proc.returncode != 0:
                (out / "FAILED").write_text(proc.stdout[-2000:] + proc.stderr[-6000:])
                pytest.fail(f"the {launch_name} launch failed:\n" + (out / "FAILED").read_text())
            (out / "DONE").write_text("ok")
    assert name in LAUNCHED_JOBS[launch_name], (launch_name, name)
    return out / name / "run"


def write_tiny_policy(out: Path, tokenizer, prompts: list[str]) -> None:
    """`out/sft`: an untrained tiny preset model (seed 0) with `tokenizer`, as an SFT stage saves it;
    `out/prompts.jsonl`: `prompts`, each with an `extra` column (its length) that reward functions get."""
    from rlhfkit.models.presets import build_preset_model

    torch.manual_seed(0)
    build_preset_model("tiny", tokenizer).save_pretrained(out / "sft")
    tokenizer.save_pretrained(out / "sft")
    write_jsonl(out / "prompts.jsonl", [{"prompt": p, "extra": len(p)} for p in prompts])


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_metrics(out: Path) -> list[dict]:
    """The records of a run's metrics.jsonl, in order."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def read_summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def load_weights(out: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / name))


def assert_same_weights(a: Path, b: Path, name: str = "model.safetensors") -> None:
    """The weights file `name` of run directories `a` and `b`: the same tensors, bit for bit (resume tests)."""
    wa, wb = load_weights(a, name), load_weights(b, name)
    assert set(wa) == set(wb) and wa
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_env(**extra: str) -> dict[str, str]:
    """The environment of a 2-process launch: CPU only, one intra-op thread per process, no
    ACCELERATE_* / FSDP_* settings inherited from the caller, the repository and tests/ importable
    (reward functions defined in test modules), DeepSpeed's JIT-compiled ops cached under build/."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    env.pop("RLHFKIT_TEST_LENGTHS", None)
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=f"{REPO}:{REPO / 'tests'}",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / "build" / "torch_extensions")))
    env.update(extra)
    return env


def launch(stage: str, config: Path, *overrides: str, engine: str | None = None, check: bool = True,
           env: dict[str, str] | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """`rlhfkit <stage> <config> [overrides]` on 2 CPU processes: under torchrun (DDP) when `engine` is
    None, else `accelerate launch --config_file configs/accelerate/<engine>.yaml`. With `check`, a
    non-zero exit fails the test with the end of the output."""
    return _launch(["-m", "rlhfkit", stage, str(config), *overrides], engine, check, env, timeout)


def launch_script(script: Path, *args: str, engine: str | None = None, check: bool = True,
                  env: dict[str, str] | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """`script args` on 2 CPU processes, launched as `launch` launches a stage."""
    return _launch([str(script), *args], engine, check, env, timeout)


def _launch(command: list[str], engine: str | None, check: bool, env: dict[str, str] | None,
            timeout: int) -> subprocess.CompletedProcess:
    if engine is None:
        runner = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]
    else:
        runner = ["-m", "accelerate.commands.launch", "--config_file", str(ACCEL / f"{engine}.yaml"),
                  "--num_processes", "2", "--main_process_port", str(free_port())]
    proc = subprocess.run([sys.executable, *runner, *command], env=launch_env() if env is None else env,
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def assert_same_run(a: Path, b: Path, weights: str = "model.safetensors", *, weights_atol: float,
                    rel: float = 1e-4, abs_: float = 1e-5) -> None:
    """Every logged metric (train and eval) of every step agrees within rel / abs_, and so do the
    trained weights within weights_atol (rtol 1e-4). The weight tolerance is the caller's: Adam divides
    by sqrt(v), so float rounding in a near-zero gradient moves the odd weight by a fraction of the
    learning rate per step."""
    ma, mb = read_metrics(a), read_metrics(b)
    assert len(ma) == len(mb) and ma
    for ra, rb in zip(ma, mb):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert ra[k] == pytest.approx(rb[k], rel=rel, abs=abs_), (ra["step"], k, ra[k], rb[k])
    wa, wb = load_weights(a, weights), load_weights(b, weights)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=weights_atol, rtol=1e-4, msg=k)


def assert_sharded_follows_ddp(sharded: Path, ddp: Path, engine: str, keys: tuple[str, ...]) -> None:
    """A 2-process LoRA run under a sharded engine against the same run under DDP: the engines named
    in their summaries; what each rank held (ZeRO-2: every parameter and half the optimizer state;
    ZeRO-3 / FSDP2: about half of both); the same logged steps, the metrics `keys` and the trained
    adapter within 1e-4 (the engines reduce and clip in another order)."""
    from safetensors.torch import load_file
    from test_scaleout import assert_halved

    s, ref = read_summary(sharded), read_summary(ddp)
    assert (s["engine"], s["world_size"]) == (engine, 2) and ref["engine"] == "ddp"
    total, state = ref["local_parameters"][0], ref["local_optimizer_state"][0]
    assert ref["local_parameters"] == [total, total]
    if engine == "zero2":  # parameters whole on each rank, the optimizer state halved
        assert s["local_parameters"] == [total, total]
    else:  # each rank held about half of the trained LoRA
        assert_halved(s["local_parameters"], total, spread=0.1)
    assert_halved(s["local_optimizer_state"], state, spread=0.1)
    ma, mb = read_metrics(sharded), read_metrics(ddp)
    assert [r["step"] for r in ma] == [r["step"] for r in mb]
    for ra, rb in zip(ma, mb):
        for k in keys:
            if k in rb:
                assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-5), (ra["step"], k, ra[k], rb[k])
    a = load_file(str(sharded / "adapter_model.safetensors"))
    b = load_file(str(ddp / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and b
    for k in b:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-4, msg=k)


def assert_every_trained_tensor_changed(initial: dict[str, torch.Tensor], run: Path, finetuning_type: str) -> None:
    """A run's saved weights against `initial` (`test_grpo.initial_weights`): every trained tensor moved
    (LoRA: its B matrices; the A matrices start random and may not need to)."""
    from safetensors.torch import load_file

    after = load_file(str(run / ("adapter_model.safetensors" if finetuning_type == "lora" else "model.safetensors")))
    trained = {n for n in initial if "lora_A" not in n} if finetuning_type == "lora" else set(initial)
    unchanged = [n for n in trained if torch.equal(initial[n], after[n.replace(".default", "")])]
    assert not unchanged, unchanged[:5]


def importance_sampling_case(group_size: int):
    """Two responses (3 and 2 tokens) whose sampler log-probs are shifted from the trainer's so that the
    truncated importance weights at cap 2 are [0.5, 1, 2 (3 capped)] and [1.5, 1 | pad]: (logps with
    gradients, response mask, a Rollout carrying the sampler's log-probs, the expected weights)."""
    import math

    from rlhfkit.rollout.rollout import Rollout

    logps = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    shift = torch.tensor([[math.log(0.5), 0.0, math.log(3.0)], [math.log(1.5), 0.0, 0.0]])
    ro = Rollout(input_ids=torch.zeros(2, 4, dtype=torch.long), attention_mask=torch.ones(2, 4, dtype=torch.bool),
                 responses=torch.zeros(2, 3, dtype=torch.long), response_mask=mask, context_length=1,
                 ended=torch.ones(2, dtype=torch.bool), texts=["", ""], rows=[{}, {}], group_size=group_size,
                 truncated=torch.zeros(2, dtype=torch.bool), sampling_logps=(logps.detach() - shift))
    return logps, mask, ro, torch.tensor([[0.5, 1.0, 2.0], [1.5, 1.0, 0.0]])
