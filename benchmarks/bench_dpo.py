"""DPO and KTO training throughput and peak memory: rlhfkit vs TRL's DPOTrainer / KTOTrainer on
identical work, on this CPU.

    python benchmarks/bench_dpo.py [--stages dpo,kto] [--impls rlhfkit,trl] [--models tiny,small]
                                   [--steps N] [--warmup N] [--batch-size B] [--max-length T]
                                   [--threads N] [--trl-python /tmp/trlvenv/bin/python] [--json OUT]
                                   [--default-malloc]

TRL is an optional benchmark dependency; install it into a separate venv, never into rlhfkit's:

    python3 -m venv /tmp/trlvenv && /tmp/trlvenv/bin/pip install torch==2.13.0 trl
    /tmp/trlvenv/bin/pip install -e .        # TRL's child also needs rlhfkit (to build the model)

Identical work for both implementations:
- model: a `preset:NAME` Llama built by rlhfkit (BPE tokenizer trained on the benchmark's own
  rows, dedicated pad token), saved once as a Hugging Face directory that both load; fp32, full
  fine-tuning, dropout off, the reference a frozen copy of the initial policy;
- data: the built-in `sentiment` task's preference rows (DPO) / unpaired rows (KTO), string
  prompts, EOS appended to responses, nothing truncated (max_length above the longest row);
- optimisation: AdamW, constant learning rate 1e-5, max_grad_norm 1, batch B pairs (DPO) or B
  examples (KTO) per step, no accumulation, no evaluation, no checkpoints, one process;
  DPO: sigmoid loss, beta 0.1; KTO: beta 0.1, weights 1, KL from mismatched pairs.
- threads: `torch.set_num_threads(--threads)` in both children (default 1: on a shared 2-core
  machine a second thread mostly adds contention).

Measured in a fresh subprocess per (stage, implementation, model): the wall time of each
optimizer step (rlhfkit: between consecutive `on_log` calls of `fit` with logging_steps 1; TRL: a
`TrainerCallback.on_step_end`), after `--warmup` steps. Throughput (pairs/s for DPO, examples/s
for KTO): the mean, examples of the timed steps / their total time, which is what a run gets;
also B / median step and B / fastest step. The data are exactly one epoch for both (rows =
(warmup + steps) x B), so both process the same examples, though batched in a different order:
steps differ in their sequences' lengths, and a padded step's cost follows its longest sequence,
so a padding implementation's median and fastest steps say less about its throughput than the
mean. Peak memory: the child's `ru_maxrss` (model load, tokenisation and
training; both load the same model the same way), read after the last optimizer step (so saving
the model and plotting afterwards do not count), and again at exit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import trl_step_stamps  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "dpo.json"
DEFAULT_TRL_PYTHON = "/tmp/trlvenv/bin/python"
LR, BETA = 1e-5, 0.1


# ---- set-up (parent) ---------------------------------------------------------------------------

def prepare(workdir: Path, models: list[str], n_rows: int) -> None:
    """Task rows (preference + unpaired, string prompts) and one saved model per preset."""
    import torch

    from rlhfkit.models.load import load_causal_lm, load_tokenizer
    from rlhfkit.tasks import get_task

    task = get_task("sentiment")
    rows = {"dpo": task.make("preference", n_rows, seed=0), "kto": task.make("unpaired", n_rows, seed=0)}
    for stage, rs in rows.items():
        keep = ("prompt", "chosen", "rejected") if stage == "dpo" else ("prompt", "completion", "label")
        with (workdir / f"{stage}.jsonl").open("w") as f:
            for r in rs:
                f.write(json.dumps({k: r[k] for k in keep}) + "\n")
    texts = [r["prompt"] + r["chosen"] for r in rows["dpo"]] + [r["prompt"] + r["rejected"] for r in rows["dpo"]]
    for name in models:
        out = workdir / name
        if (out / "config.json").exists():
            continue
        tok = load_tokenizer(f"preset:{name}", preset_texts=lambda: iter(texts))
        torch.manual_seed(0)
        model = load_causal_lm(f"preset:{name}", tok)
        model.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)


# ---- children ----------------------------------------------------------------------------------

def max_rss_mb() -> float:
    """Peak resident set size of this process so far (ru_maxrss, monotonic), MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _result(marks: list[float], rss: list[float], batch: int, warmup: int, extra: dict) -> dict:
    step_times = [b - a for a, b in zip(marks, marks[1:])]
    timed = step_times[warmup:]
    return {"step_s_median": statistics.median(timed), "step_s_best": min(timed),
            "per_s_mean": batch * len(timed) / sum(timed),
            "per_s_median": batch / statistics.median(timed), "per_s_best": batch / min(timed),
            "steps_timed": len(timed), "step_times": step_times,
            "peak_rss_mb": rss[-1], "peak_rss_at_exit_mb": max_rss_mb(), **extra}


def child_rlhfkit(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from rlhfkit.config import build_config
    from rlhfkit.train import loop, preference

    if args.default_malloc:  # start_run tunes glibc malloc (faster steps, more resident memory)
        loop.tune_cpu_allocator = lambda: False

    marks: list[float] = []
    rss: list[float] = []
    original_fit = preference.fit

    def timed_fit(*a, on_log=None, **kw):
        def stamp(step, record):
            marks.append(time.perf_counter())
            rss.append(max_rss_mb())
            if on_log is not None:
                on_log(step, record)
        marks.append(time.perf_counter())
        return original_fit(*a, on_log=stamp, **kw)

    preference.fit = timed_fit
    out = tempfile.mkdtemp(prefix=f"bench_{args.stage}_")
    common = dict(model_name_or_path=str(Path(args.workdir) / args.model), dataset=str(Path(args.workdir) / f"{args.stage}.jsonl"),
                  output_dir=out, max_steps=args.warmup + args.steps, per_device_train_batch_size=args.batch_size,
                  learning_rate=LR, lr_scheduler_type="constant", max_length=args.max_length, logging_steps=1,
                  report_to=[], disable_tqdm=True, beta=BETA, seed=0)
    if args.stage == "dpo":
        from rlhfkit.train.dpo import train_dpo

        train_dpo(build_config("dpo", common))
    else:
        from rlhfkit.train.kto import train_kto

        train_kto(build_config("kto", common))
    return _result(marks, rss, args.batch_size, args.warmup, {"version": "rlhfkit"})


def child_trl(args) -> dict:
    import dataclasses

    import torch

    torch.set_num_threads(args.threads)
    import trl
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    marks: list[float] = []
    rss: list[float] = []

    model_dir = str(Path(args.workdir) / args.model)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    data = load_dataset("json", data_files=str(Path(args.workdir) / f"{args.stage}.jsonl"), split="train")
    config_cls = trl.DPOConfig if args.stage == "dpo" else trl.KTOConfig
    fields = {f.name for f in dataclasses.fields(config_cls)}
    values = dict(output_dir=tempfile.mkdtemp(prefix=f"bench_trl_{args.stage}_"), max_steps=args.warmup + args.steps,
                  per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1, learning_rate=LR,
                  lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, beta=BETA, max_length=args.max_length,
                  max_prompt_length=args.max_length, max_completion_length=args.max_length,
                  logging_steps=10**6, save_strategy="no", eval_strategy="no", report_to=[], use_cpu=True,
                  dataloader_num_workers=0, disable_dropout=True, seed=0, bf16=False, fp16=False,
                  precompute_ref_log_probs=False, remove_unused_columns=False)
    if args.stage == "dpo":
        values.update(loss_type=["sigmoid"] if "loss_weights" in fields else "sigmoid")
    else:
        values.update(desirable_weight=1.0, undesirable_weight=1.0)
    config = config_cls(**{k: v for k, v in values.items() if k in fields})
    trainer_cls = trl.DPOTrainer if args.stage == "dpo" else trl.KTOTrainer
    trainer = trainer_cls(model=model, args=config, train_dataset=data, processing_class=tok)
    trainer.add_callback(trl_step_stamps(marks, rss))
    trainer.train()
    return _result(marks, rss, args.batch_size, args.warmup, {"version": f"trl {trl.__version__}"})


# ---- parent ------------------------------------------------------------------------------------

def run_child(python: str, args, stage: str, impl: str, model: str) -> dict:
    cmd = [python, __file__, "--child", impl, "--stage", stage, "--model", model, "--workdir", args.workdir,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch-size", str(args.batch_size),
           "--max-length", str(args.max_length), "--threads", str(args.threads)]
    if args.default_malloc:
        cmd.append("--default-malloc")
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr or proc.stdout)[-2000:]}
    return json.loads(lines[-1][len("RESULT "):])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stages", default="dpo,kto")
    p.add_argument("--impls", default="rlhfkit,trl")
    p.add_argument("--models", default="tiny,small")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--trl-python", default=DEFAULT_TRL_PYTHON)
    p.add_argument("--default-malloc", action="store_true",
                   help="skip rlhfkit's glibc malloc tuning (tune_cpu_allocator) in its children")
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", default=str(DEFAULT_JSON))
    p.add_argument("--child", choices=["rlhfkit", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--stage", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        result = (child_rlhfkit if args.child == "rlhfkit" else child_trl)(args)
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    args.workdir = args.workdir or tempfile.mkdtemp(prefix="bench_dpo_")
    models = args.models.split(",")
    n_rows = (args.warmup + args.steps) * args.batch_size
    prepare(Path(args.workdir), models, n_rows)
    pythons = {"rlhfkit": sys.executable, "trl": args.trl_python}
    started = time.time()
    results = []
    for stage in args.stages.split(","):
        for model in models:
            for impl in args.impls.split(","):
                if impl == "trl" and not Path(pythons["trl"]).exists():
                    print(f"skip {impl}: {pythons['trl']} not found (see the module docstring)")
                    continue
                r = run_child(pythons[impl], args, stage, impl, model)
                r.update(stage=stage, impl=impl, model=model)
                results.append(r)
                if "error" in r:
                    print(f"{stage} {model} {impl}: FAILED\n{r['error']}")
                else:
                    print(f"{stage} {model} {impl}: {r['per_s_mean']:.1f}/s mean, {r['per_s_median']:.1f}/s median, "
                          f"{r['per_s_best']:.1f}/s best, "
                          f"peak RSS {r['peak_rss_mb']:.0f} MB ({r['version']})", flush=True)

    unit = {"dpo": "pairs/s", "kto": "examples/s"}
    lines = ["| stage | model | impl | version | mean | median | best | peak RSS MB | speed-up (mean / median) "
             "| RSS ratio |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            continue
        base = next((t for t in results if t["impl"] == "trl" and t["stage"] == r["stage"]
                     and t["model"] == r["model"] and "error" not in t), None)
        speed = (f"{r['per_s_mean'] / base['per_s_mean']:.2f}x / {r['per_s_median'] / base['per_s_median']:.2f}x"
                 if base else "-")
        rss = f"{r['peak_rss_mb'] / base['peak_rss_mb']:.2f}" if base else "-"
        lines.append(f"| {r['stage']} | {r['model']} | {r['impl']} | {r['version']} | "
                     f"{r['per_s_mean']:.1f} {unit[r['stage']]} | {r['per_s_median']:.1f} | {r['per_s_best']:.1f} | "
                     f"{r['peak_rss_mb']:.0f} "
                     f"| {speed} | {rss} |")
    print("\n".join(lines))
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.processor()
            or platform.machine(), "cpus": os.cpu_count(), "threads": args.threads,
            "load_average": os.getloadavg(), "seconds": round(time.time() - started, 1),
            "batch_size": args.batch_size, "max_length": args.max_length, "steps": args.steps,
            "warmup": args.warmup, "tuned_malloc": not args.default_malloc, "note": "shared machine: other processes were running"}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"meta": meta, "results": results, "table": lines}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
