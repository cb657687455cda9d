"""TRL on the settings of rlhfkit's HH-RLHF example configs: held-out accuracy side by side.

    python benchmarks/trl_hh_accuracy.py --stage rm  [--trl-python /tmp/trl116venv/bin/python]
    python benchmarks/trl_hh_accuracy.py --stage dpo [--threads 2] [--max-steps N] [--workdir DIR]

Reads the example config (`configs/rm_hh_smollm2_lora.yaml` or `configs/dpo_hh_smollm2_lora.yaml`)
and trains TRL's RewardTrainer / DPOTrainer (in its own venv, never rlhfkit's) on what it says:
- model: SmolLM2-135M-Instruct (the `make smollm` GGUF, de-quantised to fp32, as `bench_rm --vs-trl`),
  LoRA with the config's rank, alpha and targets, dropout 0 (rm: the `score` head trained in full);
- data: the config's `val_size` / `seed` split of ../shared/data (the same 1288 training and 512
  held-out HH-RLHF pairs; prompt = the conversation as messages, SmolLM2's chat template);
- optimisation: the config's learning rate, scheduler, warm-up ratio, batch, steps, `bf16`
  (autocast), rm: `center_rewards_coefficient`, dpo: `beta` and the sigmoid loss; no gradient
  checkpointing (as rlhfkit runs), seed = the config's seed, one process, `--threads` threads.
What cannot be identical, and is recorded in the JSON:
- truncation: TRL's RewardTrainer drops every pair whose chosen or rejected is longer than
  `max_length` (counted: `train_pairs_kept`); its DPOTrainer keeps the start of a long sequence
  (`truncation_mode: keep_start`, the only one it offers), where rlhfkit keeps the end of the
  conversation and the start of each reply (`max_prompt_length` / `max_response_length`);
- rlhfkit-only keys (rm: `length_decorrelation_coefficient`) have no TRL equivalent and are off.
Evaluation on the 512 held-out pairs:
- rm: TRL's model is merged and saved as a plain sequence-classification model and scored by
  `rlhfkit eval-rm` with the config's lengths: every held-out pair, cut as rlhfkit cuts (the
  same evaluation as the example's), and TRL's own `evaluate` on the pairs it keeps;
- dpo: TRL's own `evaluate` (implicit-reward accuracy, `eval_rewards/accuracies`) on the held-out
  pairs under its truncation (rlhfkit has no post-hoc DPO evaluation command).
Results go to benchmarks/results/trl_hh_<stage>.json (wall time of training included).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import dequantized_smollm2  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TRL_PYTHON = "/tmp/trl116venv/bin/python"
CONFIGS = {"rm": ROOT / "configs" / "rm_hh_smollm2_lora.yaml", "dpo": ROOT / "configs" / "dpo_hh_smollm2_lora.yaml"}


def prepare(stage: str, workdir: Path, eval_limit: int = 0) -> dict:
    """The de-quantised model (and, for rm, the initial sequence-classification model) and the
    train / eval JSONL of the config's split; the config's values as a dict."""
    import torch

    from rlhfkit.config import load_config
    from rlhfkit.data.sources import jsonl_lines
    from rlhfkit.models.reward import build_reward_model
    from rlhfkit.train.common import load_split

    os.chdir(ROOT)  # the example configs name ../shared/data relative to the repository
    c = load_config(stage, str(CONFIGS[stage]), [f"output_dir={workdir / 'unused'}"])
    workdir.mkdir(parents=True, exist_ok=True)
    if not (workdir / "lm" / "config.json").exists():
        tok, lm = dequantized_smollm2(c.model_name_or_path)
        lm.save_pretrained(workdir / "lm")
        tok.save_pretrained(workdir / "lm")
        del lm
    if stage == "rm" and not (workdir / "rm_init" / "config.json").exists():
        from rlhfkit.models.load import load_tokenizer

        tok = load_tokenizer(str(workdir / "lm"))
        torch.manual_seed(c.seed)
        rm = build_reward_model(str(workdir / "lm"), tok)
        rm.save_pretrained(workdir / "rm_init")
        tok.save_pretrained(workdir / "rm_init")
        del rm
    train_rows, eval_rows = load_split(c, ("preference",))
    eval_rows = eval_rows[:eval_limit] if eval_limit else eval_rows
    files = {}
    for name, rows in (("train", train_rows), ("eval", eval_rows)):
        files[name] = str(workdir / f"{name}.jsonl")
        Path(files[name]).write_text("".join(json.dumps({k: r[k] for k in ("prompt", "chosen", "rejected")}) + "\n"
                                             for r in rows))
    # eval-rm reads the held-out pairs as they are in the data file (HH transcripts): rlhfkit keeps an
    # empty final HH reply (4 of the 1800 pairs) but rejects an empty assistant message in a message list
    source = jsonl_lines(Path(c.dataset).read_text(encoding="utf-8"))  # the lines `_source` counts
    files["eval_source"] = str(workdir / "eval_source.jsonl")
    Path(files["eval_source"]).write_text("".join(source[int(r["_source"].rsplit(":line ", 1)[1]) - 1] + "\n"
                                                  for r in eval_rows))
    return {"config": c.model_dump(mode="json"), "model": str(workdir / ("rm_init" if stage == "rm" else "lm")),
            **files}


def child(args) -> dict:
    """Runs in TRL's venv: train, evaluate with TRL, save (rm: merged) and report."""
    import torch

    torch.set_num_threads(args.threads)
    import trl
    from datasets import load_dataset
    from peft import LoraConfig, TaskType

    spec = json.loads(Path(args.spec).read_text())
    c = spec["config"]
    train = load_dataset("json", data_files=spec["train"], split="train")
    held_out = load_dataset("json", data_files=spec["eval"], split="train")
    common = dict(output_dir=str(Path(args.workdir) / f"trl_{args.stage}_out"), per_device_train_batch_size=c[
        "per_device_train_batch_size"], per_device_eval_batch_size=c["per_device_eval_batch_size"],
                  gradient_accumulation_steps=c["gradient_accumulation_steps"], learning_rate=c["learning_rate"],
                  lr_scheduler_type=c["lr_scheduler_type"],
                  warmup_steps=c.get("warmup_steps") or c["warmup_ratio"],  # transformers 5: a float < 1 is a ratio
                  max_grad_norm=c["max_grad_norm"], weight_decay=c["weight_decay"], max_length=c["max_length"],
                  logging_steps=c["logging_steps"], save_strategy="no", eval_strategy="no", report_to=[], use_cpu=True,
                  dataloader_num_workers=0, seed=c["seed"], bf16=bool(c["bf16"]), fp16=False,
                  gradient_checkpointing=False)
    if args.max_steps:
        common["max_steps"] = args.max_steps
    elif c["max_steps"] > 0:
        common["max_steps"] = c["max_steps"]
    else:
        common["num_train_epochs"] = c["num_train_epochs"]
    target = c["lora_target"]  # "all-linear" or module names: peft takes both as given
    if args.stage == "rm":
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(spec["model"])
        model = AutoModelForSequenceClassification.from_pretrained(spec["model"], num_labels=1, dtype=torch.float32)
        config = trl.RewardConfig(**common, disable_dropout=True,
                                  center_rewards_coefficient=c.get("center_rewards_coefficient"))
        lora = LoraConfig(r=c["lora_rank"], lora_alpha=c["lora_alpha"], lora_dropout=0.0, target_modules=target,
                          task_type=TaskType.SEQ_CLS, modules_to_save=["score"])
        trainer = trl.RewardTrainer(model=model, args=config, train_dataset=train, processing_class=tok,
                                    peft_config=lora)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(spec["model"])
        model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
        loss = c["loss_type"] if isinstance(c["loss_type"], list) else [c["loss_type"]]  # TRL 1.x: a list
        config = trl.DPOConfig(**common, beta=c["beta"], loss_type=loss)
        lora = LoraConfig(r=c["lora_rank"], lora_alpha=c["lora_alpha"], lora_dropout=0.0, target_modules=target,
                          task_type=TaskType.CAUSAL_LM)
        trainer = trl.DPOTrainer(model=model, args=config, train_dataset=train, processing_class=tok,
                                 peft_config=lora)
    kept = len(trainer.train_dataset)
    start = time.perf_counter()
    out = trainer.train()
    train_s = time.perf_counter() - start
    result = {"version": f"trl {trl.__version__}", "train_pairs": len(train), "train_pairs_kept": kept,
              "train_wall_s": train_s, "optimizer_steps": out.global_step, "threads": args.threads}
    metrics = trainer.evaluate(held_out)
    result["trl_eval"] = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    if args.stage == "rm":
        merged = trainer.model.merge_and_unload()
        merged.save_pretrained(Path(args.workdir) / "trl_rm_merged", safe_serialization=True)
        tok.save_pretrained(Path(args.workdir) / "trl_rm_merged")
    return result


def rlhfkit_eval_rm(model_dir: Path, data: str, c: dict) -> dict:
    """`rlhfkit eval-rm` on every held-out pair, with the config's lengths (no stored normalisation:
    accuracy and correlations do not depend on it); its summary.json."""
    from rlhfkit.eval.reward_cli import run_eval_rm

    out = model_dir / "eval-rlhfkit"
    argv = [str(model_dir), data, "--max-length", str(c["max_length"]), "--output-dir", str(out)]
    for key in ("max_prompt_length", "max_response_length"):
        if c.get(key):
            argv += [f"--{key.replace('_', '-')}", str(c[key])]
    run_eval_rm(argv)
    return json.loads((out / "summary.json").read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stage", choices=["rm", "dpo"], required=True)
    p.add_argument("--trl-python", default=DEFAULT_TRL_PYTHON)
    p.add_argument("--workdir", default="/tmp/trl_hh_accuracy")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--max-steps", type=int, default=0, help="override the config's steps (a quick check)")
    p.add_argument("--eval-limit", type=int, default=0, help="only the first N held-out pairs (a quick check)")
    p.add_argument("--json", default=None, help="default: benchmarks/results/trl_hh_<stage>.json")
    p.add_argument("--note", default="")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    workdir = Path(args.workdir) / args.stage
    if args.child:
        args.workdir = str(workdir)
        print("RESULT " + json.dumps(child(args)), flush=True)
        return 0
    spec = prepare(args.stage, workdir, args.eval_limit)
    spec_path = workdir / "spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    start = time.perf_counter()
    log = workdir / "trl_child.log"  # TRL's progress bars and warnings, readable while it runs
    with open(log, "w") as err:
        proc = subprocess.run([args.trl_python, __file__, "--child", "--stage", args.stage, "--workdir",
                               args.workdir, "--threads", str(args.threads), "--max-steps", str(args.max_steps),
                               "--spec", str(spec_path)], env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    wall = time.perf_counter() - start
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        sys.stderr.write(proc.stdout[-4000:] + log.read_text()[-8000:])
        raise SystemExit(f"TRL child failed (exit {proc.returncode}; its log: {log})")
    result = {"stage": args.stage, "config": str(CONFIGS[args.stage].relative_to(ROOT)), "child_wall_s": wall,
              "eval_pairs": sum(1 for _ in open(spec["eval"])),
              **json.loads(line[len("RESULT "):]), "note": args.note,
              "date": time.strftime("%Y-%m-%d %H:%M")}
    out = Path(args.json or ROOT / "benchmarks" / "results" / f"trl_hh_{args.stage}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")  # TRL's part is kept even if the scoring below fails
    if args.stage == "rm":
        ours = rlhfkit_eval_rm(workdir / "trl_rm_merged", spec["eval_source"], spec["config"])
        result["rlhfkit_eval_rm"] = {k: v for k, v in ours.items() if not isinstance(v, list)}
        out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "config"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
