"""Resumable checkpoints, written atomically.

Layout: `output_dir/checkpoints/step-000120/` holding `model.safetensors` (trainable weights for
LoRA, all weights otherwise), `optimizer.pt`, `scheduler.pt`, `rng-RANK.pt` and, written last,
`trainer_state.json`. The directory is built under a temporary name and renamed into place, so a
killed run never leaves a half-written checkpoint that `resume_from_checkpoint: true` would pick.
The data position is the step itself: batches are a pure function of (seed, step).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rlhfkit.errors import ConfigError

_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / "trainer_state.json").is_file()]
    return [p for _, p in sorted(found)]


def resolve_resume(output_dir: str | Path, resume: str | bool | None) -> Path | None:
    """`true` -> the latest complete checkpoint (None if there is none yet); a path -> that path."""
    if resume in (None, False):
        return None
    if resume is True or resume == "true":
        ckpts = list_checkpoints(output_dir)
        return ckpts[-1] if ckpts else None
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise ConfigError(f"resume_from_checkpoint: {resume} is not a complete checkpoint "
                          "(no trainer_state.json)")
    return path


def _trainable_state(model) -> dict[str, torch.Tensor]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return {n: p.detach().contiguous().clone() for n, p in named}


DEEPSPEED_DIR, DEEPSPEED_TAG = "deepspeed", "state"
"""Under DeepSpeed the weights and optimizer state are the engine's own (partitioned) checkpoint,
written by every rank to `step-N/deepspeed/state/`, instead of model.safetensors + optimizer.pt."""


def save_checkpoint(output_dir, step: int, model, optimizer, scheduler, *, rank: int, is_main: bool,
                    barrier=lambda: None, keep: int | None = None, extra_state: dict | None = None,
                    deepspeed_engine=None, fsdp: bool = False) -> Path:
    root = checkpoint_root(output_dir)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    torch.save({"torch": torch.get_rng_state(), "python": random.getstate()}, tmp / f"rng-{rank}.pt")
    if deepspeed_engine is not None:  # collective: every rank writes its partition
        deepspeed_engine.save_checkpoint(str(tmp / DEEPSPEED_DIR), tag=DEEPSPEED_TAG)
    if fsdp:  # collective: gather the full weights and optimizer state (FSDP2 keys) for the main process
        from rlhfkit.train.fsdp import full_model_state, full_optimizer_state

        weights, optim_state = full_model_state(model), full_optimizer_state(model, optimizer)
        extra_state = {**(extra_state or {}), "optimizer_format": "fsdp2"}
    if is_main:
        if fsdp:
            save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "model.safetensors"))
            torch.save(optim_state, tmp / "optimizer.pt")
        elif deepspeed_engine is None:
            save_file(_trainable_state(model), str(tmp / "model.safetensors"))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    barrier()
    if is_main:
        state = {"step": step, **(extra_state or {})}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep is not None:
            for old in list_checkpoints(output_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(path: Path, model, optimizer, scheduler, *, rank: int, deepspeed_engine=None,
                    fsdp: bool = False) -> dict:
    """Restore weights, optimizer, scheduler and this rank's RNG; returns trainer_state. Under
    DeepSpeed (`deepspeed_engine`, after `prepare`) the engine loads its own partitions; under FSDP2
    (`fsdp`, after sharding) every rank reads the full state and keeps its shards."""
    state = json.loads((path / "trainer_state.json").read_text())
    has_engine_state = (path / DEEPSPEED_DIR).is_dir()
    if has_engine_state != (deepspeed_engine is not None) or (state.get("optimizer_format") == "fsdp2") != fsdp:
        raise ConfigError(f"checkpoint {path} was written under another engine "
                          f"({'DeepSpeed' if has_engine_state else state.get('optimizer_format', 'single/ddp')}): "
                          "resume it under the same engine")
    if fsdp:
        from rlhfkit.train.fsdp import load_full_state

        load_full_state(model, optimizer, load_file(str(path / "model.safetensors")),
                        torch.load(path / "optimizer.pt", weights_only=False))  # our own file
    elif deepspeed_engine is not None:
        deepspeed_engine.load_checkpoint(str(path / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, load_optimizer_states=True,
                                         load_lr_scheduler_states=False)
    else:
        weights = load_file(str(path / "model.safetensors"))
        params = dict(model.named_parameters())
        missing = [n for n in weights if n not in params]
        if missing:
            raise ConfigError(f"checkpoint {path} does not match the model: unknown weights {missing[:3]}")
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value)
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng_path = path / f"rng-{rank}.pt"
    if rng_path.exists():
        rng = torch.load(rng_path, weights_only=False)  # our own file: tensors and Python tuples
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
    return state
