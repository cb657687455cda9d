"""PPO step throughput and peak memory: rlhfkit's `train_ppo` vs TRL's PPOTrainer on identical work.

    python benchmarks/bench_ppo.py [--models tiny,smollm2-135m] [--finetuning full,lora] [--rounds 2]
                                   [--steps N] [--rlhfkit-only MODEL/FT,...]
                                   [--trl-python /tmp/trl112venv/bin/python] [--json OUT]

Each configuration's models are prepared once; then `--rounds` rounds run rlhfkit and TRL back to
back, alternating which goes first (R T, T R, ...), so on a shared machine both see similar load;
the rlhfkit / TRL ratios are taken within a round, and each run records the 1-minute load average
before and after it.

One PPO step = generate `batch` responses of exactly `response_length` tokens (random-init models
practically never sample EOS) to prompts of `prompt_length` tokens, score them with the reward
model, reference log-probs and values, then `epochs` x `minibatches` optimizer steps. Reported per
step (fastest and median of the timed steps; the first `warmup` steps are excluded):
samples/s = batch / step time, the split generation / scoring (reward + reference + old
log-probs + values + advantages) / training, and the child process's peak RSS (ru_maxrss,
each configuration in a fresh interpreter; the models are built and saved by a separate child).

Where the ceiling is: after its timed run, each child runs exactly one more step (fresh models)
under torch's FlopCounterMode, which counts every matmul and attention FLOP (generation, no-grad
forwards, forward + backward), and measures its own fp32 matmul peak (2048 x 2048, same thread
count). `MFU` = FLOPs per step / fastest step / that peak. The FLOP counts of the two
implementations show how much work each does for the same PPO step; a speed-up beyond
peak / achieved (100% / MFU) is impossible for identical work on this CPU.

Models: `tiny` (preset, 3.5M) and `smollm2-135m` (SmolLM2-135M's shape, random init, vocabulary
49152; the tokenizer is a small BPE stand-in: sampled ids beyond it decode to nothing). Roles:
full = separate policy, reference, critic and reward model; lora = one base + LoRA reward adapter
(rlhfkit serves all four roles from one base). TRL (optional, `trl==1.12.0`,
`trl.experimental.ppo`, in its own venv with torch 2.13.0 CPU) gets the same directories: policy
and reference from the SFT directory, reward and value model from the (merged) reward model;
under LoRA TRL takes `peft_config` for the policy, and keeps separate reward and value models.
Identical work: same prompts, batch, response length, temperature, epochs, one minibatch per
epoch, same micro-batch; generation and the reward-model forward in one chunk of the whole batch
on both sides (rlhfkit `generation_batch_size` / `per_device_eval_batch_size`, TRL
`local_rollout_forward_batch_size`; TRL runs its reference and value forwards in that chunk too,
rlhfkit its old log-probs, values and reference log-probs in the training micro-batches); 1 torch
thread each. rlhfkit samples with the LoRA policy adapter merged into the base (restored
bit-exactly afterwards); TRL samples through peft's unmerged adapter layers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import matmul_peak  # noqa: E402

DEFAULT_JSON = ROOT / "benchmarks" / "results" / "ppo.json"
# model -> (batch, prompt_length, response_length, epochs, minibatches, micro-batch, steps incl. 1 warmup)
# One minibatch per epoch: TRL accumulates gradients over `gradient_accumulation_steps` micro-batches
# across minibatch boundaries (batch = micro x accumulation), so with more than one minibatch the
# two would take a different number of optimizer steps for the same forward/backward work.
SHAPES = {"tiny": (32, 16, 32, 2, 1, 8, 4), "smollm2-135m": (8, 16, 32, 1, 1, 4, 3)}
LORA = dict(rank=16, alpha=32)


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def counted_flops(run_one_step) -> float:
    """Matmul/attention FLOPs (forward, backward, generation) of one PPO step, counted by torch's
    FlopCounterMode around a run of exactly one step (set-up does no matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        run_one_step()
    return float(counter.get_total_flops())


def efficiency(result: dict, flops: float) -> dict:
    """FLOPs per step, achieved FLOP/s on the fastest step, and that as a share of this process's
    measured single-precision matmul peak at the same thread count (MFU)."""
    peak = matmul_peak("fp32")
    achieved = flops / result["step_s_best"]
    return {"flops_per_step": flops, "achieved_gflops": achieved / 1e9, "peak_gflops": peak / 1e9,
            "mfu": achieved / peak}


def prepare(model: str, finetuning: str, out: Path) -> None:
    """Write sft/ (causal LM + tokenizer), rm/ (reward model; LoRA adapter over sft/ under lora),
    rm_merged/ (a full reward model for TRL) and prompts.jsonl."""
    import random

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhfkit.models.presets import PRESETS, train_tokenizer
    from rlhfkit.models.reward import apply_reward_lora, build_reward_model

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 6))) for _ in range(800)]
    tok = train_tokenizer([" ".join(rng.choice(words) for _ in range(30)) for _ in range(500)], 1024)
    spec = {k: v for k, v in PRESETS[model].items() if k != "tokenizer_vocab_size"}
    vocab = 49152 if model == "smollm2-135m" else len(tok)
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                      bos_token_id=None, tie_word_embeddings=True, **spec))
    lm.save_pretrained(out / "sft")
    tok.save_pretrained(out / "sft")
    rm = build_reward_model(str(out / "sft"), tok)
    rm.save_pretrained(out / "rm_merged")
    tok.save_pretrained(out / "rm_merged")
    if finetuning == "lora":
        peft_rm = apply_reward_lora(rm, base_model_name_or_path=str((out / "sft").resolve()), rank=LORA["rank"],
                                    alpha=LORA["alpha"], dropout=0.0, target="all-linear")
        peft_rm.save_pretrained(out / "rm")
        tok.save_pretrained(out / "rm")
    else:
        os.symlink(out / "rm_merged", out / "rm")
    _, prompt_len, *_ = SHAPES[model]
    with (out / "prompts.jsonl").open("w") as f:
        for _ in range(256):
            text = " ".join(rng.choice(words) for _ in range(60))
            ids = tok(text)["input_ids"][:prompt_len]
            f.write(json.dumps({"prompt": tok.decode(ids)}) + "\n")


def run_rlhfkit(cfg: dict) -> dict:
    import torch

    torch.set_num_threads(cfg.get("threads", 1))  # small models on a shared CPU: oversubscription is ~50x slower

    from rlhfkit.config import build_config
    from rlhfkit.train.ppo import train_ppo

    d = Path(cfg["dir"])
    batch, prompt_len, resp_len, epochs, minis, micro, steps = SHAPES[cfg["model"]]
    steps = cfg.get("steps") or steps
    values = dict(
        model_name_or_path=str(d / "sft"), reward_model=str(d / "rm"), dataset=str(d / "prompts.jsonl"),
        output_dir=str(d / "out_rlhfkit"), overwrite_output_dir=True, finetuning_type=cfg["finetuning"],
        lora_rank=LORA["rank"], lora_alpha=LORA["alpha"], rollout_batch_size=batch, per_device_train_batch_size=micro,
        per_device_eval_batch_size=batch, generation_batch_size=batch, num_mini_batches=minis,
        num_ppo_epochs=epochs, max_steps=steps,
        max_new_tokens=resp_len, max_prompt_length=prompt_len, temperature=0.7, report_to=[], disable_tqdm=True,
        logging_steps=1, num_sample_generations=0)
    t0 = time.perf_counter()
    train_ppo(build_config("ppo", values))
    total = time.perf_counter() - t0
    rows = [json.loads(x) for x in (d / "out_rlhfkit" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "time/training" in r][1:]  # drop the warm-up step
    times = [r["time/generation"] + r["time/scoring"] + r["time/training"] for r in rows]
    split = {k: statistics.median(r[f"time/{k}"] for r in rows) for k in ("generation", "scoring", "training")}
    result = {**cfg, "impl": "rlhfkit", "threads": torch.get_num_threads(), "batch": batch, "steps_timed": len(times),
              "step_s_best": min(times), "step_s_median": statistics.median(times),
              "samples_per_s": batch / min(times), "split_s": split, "peak_rss_mb": peak_rss() / 2**20,
              "wall_s": total}
    one = dict(values, output_dir=str(d / "out_rlhfkit_flops"), max_steps=1)
    return {**result, **efficiency(result, counted_flops(lambda: train_ppo(build_config("ppo", one))))}


def run_trl(cfg: dict) -> dict:
    import dataclasses

    import torch

    torch.set_num_threads(cfg.get("threads", 1))  # small models on a shared CPU: oversubscription is ~50x slower
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    d = Path(cfg["dir"])
    batch, prompt_len, resp_len, epochs, minis, micro, steps = SHAPES[cfg["model"]]
    steps = cfg.get("steps") or steps
    tok = AutoTokenizer.from_pretrained(d / "sft")
    tok.padding_side = "left"
    prompts = [json.loads(x)["prompt"] for x in (d / "prompts.jsonl").read_text().splitlines()]
    ds = Dataset.from_dict({"input_ids": [tok(p)["input_ids"][:prompt_len] for p in prompts]})
    policy = AutoModelForCausalLM.from_pretrained(d / "sft")
    rm = AutoModelForSequenceClassification.from_pretrained(d / "rm_merged", num_labels=1)
    vm = AutoModelForSequenceClassification.from_pretrained(d / "rm_merged", num_labels=1)
    peft_config, ref = None, None
    if cfg["finetuning"] == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], target_modules="all-linear",
                                 task_type="CAUSAL_LM")
    else:
        ref = AutoModelForCausalLM.from_pretrained(d / "sft")
    # TRL's rollout batch = per_device_train_batch_size x gradient_accumulation_steps; generation and
    # the no-grad forwards run in chunks of local_rollout_forward_batch_size (= the whole batch, as
    # rlhfkit's generation_batch_size and reward-model per_device_eval_batch_size above)
    args = PPOConfig(output_dir=str(d / "out_trl"), per_device_train_batch_size=micro,
                     gradient_accumulation_steps=batch // micro, num_mini_batches=minis,
                     num_ppo_epochs=epochs, total_episodes=batch * steps, response_length=resp_len,
                     local_rollout_forward_batch_size=batch, temperature=0.7, report_to=[], logging_steps=1,
                     save_strategy="no", num_sample_generations=0, stop_token="eos", use_cpu=True,
                     learning_rate=1e-5, seed=0)
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            stamps.append(time.perf_counter())

    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=rm,
                         value_model=vm, train_dataset=ds, peft_config=peft_config, callbacks=[Clock()])
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    times = [b - a for a, b in zip(stamps, stamps[1:])]
    result = {**cfg, "impl": "trl", "threads": torch.get_num_threads(), "batch": batch, "steps_timed": len(times),
              "step_s_best": min(times), "step_s_median": statistics.median(times),
              "samples_per_s": batch / min(times), "split_s": None, "peak_rss_mb": peak_rss() / 2**20,
              "wall_s": total}

    def one_step():  # a fresh trainer (fresh models) for exactly one step
        one = dataclasses.replace(args, output_dir=str(d / "out_trl_flops"), total_episodes=batch)
        models = {k: None if m is None else type(m).from_pretrained(d / ("sft" if k in ("model", "ref_model")
                                                                        else "rm_merged"))
                  for k, m in (("model", policy), ("ref_model", ref), ("reward_model", rm), ("value_model", vm))}
        PPOTrainer(args=one, processing_class=tok, train_dataset=ds, peft_config=peft_config, **models).train()

    return {**result, **efficiency(result, counted_flops(one_step))}


def spawn(python: str, mode: str, cfg: dict, timeout: float) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "TOKENIZERS_PARALLELISM": "false", "TRL_EXPERIMENTAL_SILENCE": "1"}
    load_before = os.getloadavg()[0]
    try:
        proc = subprocess.run([python, str(Path(__file__).resolve()), mode, json.dumps(cfg)], capture_output=True,
                              text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {**cfg, "impl": mode.lstrip("-"), "error": f"timed out after {timeout:.0f}s"}
    load = {"load_before": load_before, "load_after": os.getloadavg()[0]}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return {**json.loads(line[len("RESULT "):]), **load}
    return {**cfg, "impl": mode.lstrip("-"), "error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}


def table(results: list[dict]) -> str:
    lines = ["| model | finetuning | round | impl | samples/s (best step) | step s (best / median) | generation / "
             "scoring / training s (median) | GFLOP / step | GFLOP/s (best step) | MFU | peak RSS MB | "
             "load avg (1 min, before / after) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        head = f"| {r['model']} | {r['finetuning']} | {r.get('round', '')} | {r['impl']} |"
        if "error" in r:
            lines.append(f"{head} error: {r['error'][:80]} | | | | | | | |")
            continue
        sp = r["split_s"]
        split = f"{sp['generation']:.2f} / {sp['scoring']:.2f} / {sp['training']:.2f}" if sp else "(not split)"
        lines.append(f"{head} {r['samples_per_s']:.2f} | {r['step_s_best']:.2f} / {r['step_s_median']:.2f} | "
                     f"{split} | {r['flops_per_step'] / 1e9:.1f} | {r['achieved_gflops']:.1f} | {r['mfu']:.0%} | "
                     f"{r['peak_rss_mb']:.0f} | {r['load_before']:.1f} / {r['load_after']:.1f} |")
    return "\n".join(lines)


def ratios(results: list[dict]) -> str:
    """rlhfkit / TRL per configuration and round (the two runs of a round are back to back)."""
    lines = ["| model | finetuning | round | samples/s rlhfkit / TRL | FLOPs / step rlhfkit / TRL | MFU rlhfkit / TRL "
             "| peak RSS rlhfkit / TRL |", "|---|---|---|---|---|---|---|"]
    for r in results:
        if r.get("impl") != "rlhfkit" or "error" in r:
            continue
        t = next((x for x in results if x.get("impl") == "trl" and "error" not in x and x["model"] == r["model"]
                  and x["finetuning"] == r["finetuning"] and x.get("round") == r.get("round")), None)
        if t is not None:
            lines.append(f"| {r['model']} | {r['finetuning']} | {r['round']} | "
                         f"{r['samples_per_s'] / t['samples_per_s']:.2f}x | "
                         f"{r['flops_per_step'] / t['flops_per_step']:.2f} | {r['mfu']:.0%} / {t['mfu']:.0%} | "
                         f"{r['peak_rss_mb'] / t['peak_rss_mb']:.0%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("--prepare", "--rlhfkit", "--trl"):
        cfg = json.loads(argv[1])
        if argv[0] == "--prepare":
            prepare(cfg["model"], cfg["finetuning"], Path(cfg["dir"]))
            print("RESULT " + json.dumps({"ok": True}))
        else:
            print("RESULT " + json.dumps((run_rlhfkit if argv[0] == "--rlhfkit" else run_trl)(cfg)))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="tiny,smollm2-135m")
    p.add_argument("--finetuning", default="full,lora")
    p.add_argument("--rounds", type=int, default=2,
                   help="rlhfkit and TRL runs per configuration, alternating (R T, T R, ...) so both see the "
                        "same load on a shared machine")
    p.add_argument("--steps", type=int, default=0, help="PPO steps per run incl. 1 warm-up (0: per-shape default)")
    p.add_argument("--rlhfkit-only", default="", help="configurations MODEL/FT (comma-separated) run without TRL")
    p.add_argument("--trl-python", default="/tmp/trl112venv/bin/python",
                   help="interpreter of a venv with trl==1.12.0 and peft (skipped when missing)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (both implementations)")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--json", default=str(DEFAULT_JSON))
    args = p.parse_args(argv)
    solo = set(filter(None, args.rlhfkit_only.split(",")))
    results = []
    for model in args.models.split(","):
        for ft in args.finetuning.split(","):
            with tempfile.TemporaryDirectory() as tmp:
                cfg = {"model": model, "finetuning": ft, "dir": tmp, "threads": args.threads, "steps": args.steps}
                prep = spawn(sys.executable, "--prepare", cfg, args.timeout)
                if "error" in prep:
                    results.append({**cfg, "impl": "prepare", "error": prep["error"]})
                    continue
                impls = [("--rlhfkit", sys.executable)]
                if Path(args.trl_python).exists() and f"{model}/{ft}" not in solo:
                    impls.append(("--trl", args.trl_python))
                start = len(results)
                for rnd in range(args.rounds):
                    for mode, python in (impls if rnd % 2 == 0 else impls[::-1]):
                        results.append({**spawn(python, mode, {**cfg, "round": rnd + 1}, args.timeout)})
                        results[-1].pop("dir", None)
                        print(table(results[-1:]).splitlines()[-1], flush=True)
            print(table(results[start:]), flush=True)
    print("\n" + table(results))
    print("\n" + ratios(results))
    for r in results:
        if r.get("impl") == "rlhfkit" and "error" not in r:
            sp = r["split_s"]
            tot = sum(sp.values())
            print(f"{r['model']}/{r['finetuning']} round {r['round']}: time goes to generation "
                  f"{sp['generation'] / tot:.0%}, scoring {sp['scoring'] / tot:.0%}, training {sp['training'] / tot:.0%}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
