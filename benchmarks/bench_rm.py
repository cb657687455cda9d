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
from bench_train import SMOLLM2_VOCAB, VocabOnly, current_rss, peak_rss, tiny_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "rm.json"

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
    args = p.parse_args(argv)
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
