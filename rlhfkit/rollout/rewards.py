"""Reward functions (minimal version; the full reward layer replaces it)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

from rlhfkit.errors import ConfigError


@dataclass
class RewardFunction:
    name: str
    fn: object


def check_reward_spec(spec) -> str | None:
    if isinstance(spec, str) and spec.count(":") == 1 and all(spec.split(":")):
        return None
    return f"reward_funcs entry {spec!r} must look like 'module:function'"


def load_reward_funcs(specs, task=None) -> list[RewardFunction]:
    funcs = []
    for spec in specs:
        module, name = spec.split(":")
        try:
            fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"reward_funcs: cannot import {spec!r}: {e}") from None
        funcs.append(RewardFunction(name, fn))
    return funcs


def score_completions(funcs, *, prompts, completions, completion_ids, ended, rows) -> dict[str, torch.Tensor]:
    extra = [k for k in rows[0] if k != "prompt" and not k.startswith("_")]
    columns = {k: [r.get(k) for r in rows] for k in extra}
    out = {}
    for f in funcs:
        values = f.fn(prompts=prompts, completions=completions, completion_ids=completion_ids, ended=ended, **columns)
        if len(values) != len(prompts):
            raise ConfigError(f"reward function {f.name} returned {len(values)} values for {len(prompts)} completions")
        out[f"func/{f.name}"] = torch.tensor([float(v) for v in values])
    return out


def combine_rewards(parts: dict[str, torch.Tensor], weights: list[float]):
    total = sum(w * s for w, s in zip(weights, parts.values()))
    return total, {}
