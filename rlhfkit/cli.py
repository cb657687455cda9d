"""Command line: `rlhfkit STAGE CONFIG.yaml [key=value ...]`, `rlhfkit train CONFIG.yaml` (the stage
from the config's `stage:` key, LLaMA-Factory style), `rlhfkit data TASK OUT_DIR`, `rlhfkit demo`. Stages are plain functions; the CLI only parses, validates and dispatches."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from rlhfkit.errors import RlhfkitError

# stage -> "module:function" taking the validated config; imported lazily (fast --help).
STAGE_FUNCTIONS = {
    "pt": "rlhfkit.train.pt:train_pt",
    "sft": "rlhfkit.train.sft:train_sft",
    "dpo": "rlhfkit.train.dpo:train_dpo",
    "kto": "rlhfkit.train.kto:train_kto",
    "rm": "rlhfkit.train.rm:train_rm",
    "ppo": "rlhfkit.train.ppo:train_ppo",
    "grpo": "rlhfkit.train.grpo:train_grpo",
    "rloo": "rlhfkit.train.grpo:train_grpo",
    "online_dpo": "rlhfkit.train.online_dpo:train_online_dpo",
    "xpo": "rlhfkit.train.xpo:train_xpo",
    "nash_md": "rlhfkit.train.nash_md:train_nash_md",
    "spin": "rlhfkit.train.spin:train_spin",
    "self_reward": "rlhfkit.train.self_reward:train_self_reward",
}

USAGE = """rlhfkit STAGE CONFIG.yaml [key=value ...]   train a stage ({stages})
rlhfkit train CONFIG.yaml [key=value ...]   train the stage named by the config's `stage:` key
rlhfkit STAGE --help-config                 list the stage's config keys
rlhfkit data TASK OUT_DIR [--seed N]        write a built-in task's data files ({tasks})
rlhfkit data reasoning-gym:TASK OUT_DIR     prompt files of a reasoning-gym task [--size N] [--seed N]
rlhfkit pipeline CONFIG.yaml [key=value]    several stages from one YAML (skip/resume/re-run), report.html
rlhfkit demo [--output-dir DIR]             the built-in end-to-end demo
rlhfkit eval-rm MODEL DATA                  evaluate a reward model on preference/ranking rows
rlhfkit eval-dpo RUN [DATA]                 a DPO run's implicit-reward accuracy (+ SE), pair by pair
rlhfkit score MODEL DATA [--output F]       add a `reward` field to prompt/response rows
rlhfkit eval [CONFIG.yaml] [--model N=REF]  compare models: rewards, KL, win rates vs a baseline
rlhfkit generate MODEL PROMPTS OUT.jsonl    sample responses to a prompt file (resumable)
rlhfkit chat MODEL [--compare MODEL2]       chat in the terminal (streaming)
rlhfkit webchat MODEL [--compare MODEL2]    chat in a local web page (needs rlhfkit[web])
rlhfkit estimate-memory MODEL --stage S --engine E [--num-processes N]   memory per process and role"""

# evaluation commands: name -> "module:function" taking argv (imported lazily)
RM_COMMANDS = {"eval-rm": "rlhfkit.eval.reward_cli:run_eval_rm", "score": "rlhfkit.eval.reward_cli:run_score",
               "eval-dpo": "rlhfkit.eval.dpo_cli:run_eval_dpo", "eval": "rlhfkit.eval.compare:run_eval_cli"}
# using a trained model: name -> "module:function" taking argv (imported lazily)
USE_COMMANDS = {"generate": "rlhfkit.use.generate:run_generate", "chat": "rlhfkit.use.chat:run_chat",
                "webchat": "rlhfkit.use.webchat:run_webchat"}
# other tools taking argv: name -> "module:function" (imported lazily)
TOOL_COMMANDS = {"estimate-memory": "rlhfkit.train.memory:run_estimate_memory",
                 "pipeline": "rlhfkit.pipeline:run_pipeline_cli"}


def stage_function(stage: str):
    module, fn = STAGE_FUNCTIONS[stage].split(":")
    return getattr(importlib.import_module(module), fn)


def run_stage(stage: str | None, argv: list[str]) -> int:
    """`rlhfkit STAGE CONFIG.yaml ...`, or with stage None (`rlhfkit train CONFIG.yaml ...`) the
    stage named by the config's `stage:` key."""
    from rlhfkit.config import STAGES, describe_config, load_config

    if "--help-config" in argv or "-h" in argv or "--help" in argv:
        if stage is None:
            print("rlhfkit train CONFIG.yaml [key=value ...]: runs the stage named by the config's `stage:` key "
                  f"({', '.join(STAGES)}); `rlhfkit STAGE --help-config` lists a stage's keys")
        else:
            print(describe_config(STAGES[stage]))
        return 0
    if not argv or "=" in argv[0]:
        raise RlhfkitError(f"usage: rlhfkit {stage or 'train'} CONFIG.yaml [key=value ...]")
    config = load_config(stage, argv[0], argv[1:])
    stage = stage or next(name for name, cls in STAGES.items() if type(config) is cls)
    result = stage_function(stage)(config)
    from rlhfkit.train.engine import end_distributed

    end_distributed()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[{stage}] done: model and outputs in {result.output_dir}")
    return 0


def run_data(argv: list[str]) -> int:
    from rlhfkit.tasks import get_task
    from rlhfkit.tasks import reasoning_gym as rgym

    parser = argparse.ArgumentParser(
        prog="rlhfkit data", description="write a built-in task's data files, or prompt files of a "
        f"reasoning-gym task ({rgym.PREFIX}TASK, e.g. {rgym.PREFIX}chain_sum; needs {rgym.INSTALL})")
    parser.add_argument("task")
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    rg_only = parser.add_argument_group(f"{rgym.PREFIX}TASK only")
    rg_only.add_argument("--size", type=int, default=None,
                         help=f"rows of prompt_train.jsonl (default {rgym.DEFAULT_SIZE})")
    rg_only.add_argument("--eval-size", type=int, default=None,
                         help=f"rows of prompt_eval.jsonl (default {rgym.DEFAULT_EVAL_SIZE})")
    rg_only.add_argument("--chat", action="store_true", help="prompts as a user message (default: the text)")
    rg_only.add_argument("--config", default=None, metavar="JSON",
                         help="the reasoning-gym dataset's config keys as a JSON object (default: a small "
                         "config for chain_sum and products, the library's default otherwise)")
    args = parser.parse_args(argv)
    if args.task.startswith(rgym.PREFIX):
        return _run_data_reasoning_gym(args)
    rg_flags = (("--size", args.size), ("--eval-size", args.eval_size), ("--chat", args.chat or None),
                ("--config", args.config))
    given = [flag for flag, value in rg_flags if value is not None]
    if given:
        raise RlhfkitError(f"{', '.join(given)}: only for {rgym.PREFIX}TASK data (built-in task "
                           f"{args.task!r} writes every data kind at its default sizes)")
    try:
        task = get_task(args.task)
    except ValueError as e:
        raise RlhfkitError(str(e)) from None
    paths = task.write(args.out_dir, seed=args.seed)
    for key, path in paths.items():
        print(f"{key:18s} {path}")
    return 0


def _run_data_reasoning_gym(args) -> int:
    import json

    from rlhfkit.tasks import reasoning_gym as rgym

    config = None
    if args.config is not None:
        try:
            config = json.loads(args.config)
        except json.JSONDecodeError as e:
            raise RlhfkitError(f"--config: not valid JSON ({e}): {args.config}") from None
        if not isinstance(config, dict):
            raise RlhfkitError(f"--config: expected a JSON object of config keys, got {args.config}")
    paths = rgym.write(args.task[len(rgym.PREFIX):], args.out_dir, seed=args.seed, config=config,
                       chat=args.chat,
                       size=rgym.DEFAULT_SIZE if args.size is None else args.size,
                       eval_size=rgym.DEFAULT_EVAL_SIZE if args.eval_size is None else args.eval_size)
    for key, path in paths.items():
        print(f"{key:18s} {path}")
    return 0


def run_demo(argv: list[str]) -> int:
    from rlhfkit.demo import demo

    parser = argparse.ArgumentParser(prog="rlhfkit demo", description="built-in end-to-end demo")
    parser.add_argument("--output-dir", default="runs/demo")
    parser.add_argument("--task", default="sentiment")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="fewer steps (for smoke tests)")
    args = parser.parse_args(argv)
    demo(args.output_dir, task=args.task, seed=args.seed, quick=args.quick)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from rlhfkit.tasks import task_names

    usage = USAGE.format(stages=", ".join(STAGE_FUNCTIONS), tasks=", ".join(task_names()))
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    try:
        if command in STAGE_FUNCTIONS:
            return run_stage(command, rest)
        if command == "train":
            return run_stage(None, rest)
        if command == "data":
            return run_data(rest)
        if command == "demo":
            return run_demo(rest)
        lazy = {**RM_COMMANDS, **USE_COMMANDS, **TOOL_COMMANDS}
        if command in lazy:
            module, fn = lazy[command].split(":")
            return getattr(importlib.import_module(module), fn)(rest)
        import difflib

        close = difflib.get_close_matches(command, [*STAGE_FUNCTIONS, "train", "data", "demo", *lazy], n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        print(f"error: unknown command '{command}'{hint}\n\n{usage}", file=sys.stderr)
        return 2
    except RlhfkitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
