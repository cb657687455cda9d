"""Sampling throughput: rlhfkit's `HFGenerator` vs HF `generate(num_return_sequences=G)`, same work.

    python benchmarks/bench_generate.py [--models tiny,smollm2-135m] [--rounds 3] [--threads 1]
                                        [--prompts 8] [--generations 8] [--max-new-tokens 128]
                                        [--min-len 60] [--max-len 250] [--eos-hazard 0.025] [--json OUT]

The online-RL case: P prompts of varied length (evenly spread over [min-len, max-len], shuffled;
random token ids) x G samples each, temperature 1, up to `max-new-tokens` new tokens, all in one
chunk (batch_size = P, so P x G rows decode together on both sides). Models are random-init
(`tiny` preset; `smollm2-135m` = SmolLM2-135M's shape with its 49152-token vocabulary, a small
BPE stand-in tokenizer: sampled ids beyond it decode to nothing). Random models rarely sample
EOS, so the lm_head gets a bias on EOS, b = log(h (V - 1)): with near-uniform logits a row ends
at each step with probability about h, so lengths spread roughly geometrically (mean ~1/h, a
few rows reaching the cap), the spread that makes HF keep decoding finished rows. The measured
lengths are reported for both sides (each side draws its own samples).

HF side: what `HFGenerator` did before it had its own decode loop, with `num_return_sequences=G`:
`model.generate` on the left-padded prompts (KV cache; every one of the P x G rows is
prefilled, and every row runs until the last one ends), pad suppressed, then
`truncate_after_eos` and `batch_decode`. rlhfkit side: `HFGenerator(tok, batch_size=P).generate(
..., num_generations=G)`: one prefill per prompt (prompts of similar length batched), its cache
laid out G times, finished rows leave the batch.

`--rounds` rounds run both back to back, alternating which goes first (H R, R H, ...), with the
same seed within a round and a different one per round. Reported per side: wall time, CPU time
of the process (less sensitive to other processes on a shared machine), response tokens (EOS
included), tokens/s = tokens / wall time, decode steps and row-steps (rows x steps run), and the
1-minute load average before each run. The ratio is HF time / rlhfkit time within each round.
glibc malloc is tuned as a CPU training run does (`tune_cpu_allocator`), for both sides.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "generate.json"
SMOLLM2_VOCAB = 49152


def stand_in_tokenizer(vocab_size: int = 1024):
    """A small preset tokenizer (pad 0, EOS 1) trained on synthetic words in a few seconds."""
    from rlhfkit.models.presets import train_tokenizer

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 6))) for _ in range(800)]
    return train_tokenizer([" ".join(rng.choice(words) for _ in range(30)) for _ in range(500)], vocab_size)


def build_model(name: str, tok, eos_hazard: float):
    """Random-init Llama of preset `name` (vocabulary 49152 for smollm2-135m, else the
    tokenizer's), with an lm_head bias log(h (V - 1)) on EOS (untied copy of the weights)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhfkit.models.presets import PRESETS

    spec = {k: v for k, v in PRESETS[name].items() if k != "tokenizer_vocab_size"}
    vocab = SMOLLM2_VOCAB if name == "smollm2-135m" else len(tok)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, pad_token_id=tok.pad_token_id,
                                         eos_token_id=tok.eos_token_id, bos_token_id=None,
                                         tie_word_embeddings=True, **spec)).eval()
    head = torch.nn.Linear(model.config.hidden_size, vocab, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[tok.eos_token_id] = math.log(eos_hazard * (vocab - 1))
    model.lm_head = head
    return model


def make_prompts(tok, n: int, min_len: int, max_len: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [round(min_len + (max_len - min_len) * i / max(n - 1, 1)) for i in range(n)]
    rng.shuffle(lengths)
    return [[rng.randrange(3, len(tok)) for _ in range(k)] for k in lengths]


def run_hf(model, tok, prompts, params, G: int, seed: int) -> dict:
    """The pre-decode-loop HFGenerator with num_return_sequences=G."""
    import torch

    from rlhfkit.data.collate import pad_batch
    from rlhfkit.rollout.generate import truncate_after_eos

    pad = tok.pad_token_id
    with torch.no_grad():
        torch.manual_seed(seed)
        batch = pad_batch(prompts, pad, side="left")
        out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"].long(),
                             max_new_tokens=params.max_new_tokens, do_sample=True, temperature=params.temperature,
                             top_k=params.top_k, top_p=params.top_p, pad_token_id=pad,
                             eos_token_id=tok.eos_token_id, suppress_tokens=[pad], num_return_sequences=G)
        responses, mask, ended = truncate_after_eos(out[:, batch["input_ids"].shape[1]:], tok.eos_token_id, pad)
        mask = mask & (responses != pad)
        tok.batch_decode(responses, skip_special_tokens=True)
    lengths = mask.sum(-1).tolist()
    return {"lengths": lengths, "ended": int(ended.sum()), "steps": responses.shape[1],
            "row_steps": len(lengths) * responses.shape[1]}


def run_hf_shared_prefill(model, tok, prompts, params, G: int, seed: int) -> dict:
    """HF `generate` with the prefill shared: the P prompts (all but their last token) go through
    the model once, the DynamicCache is repeated G times (`batch_repeat_interleave`) and passed to
    `generate` as `past_key_values` with the P x G prompts; finished rows still run to the end."""
    import torch
    from transformers import DynamicCache

    from rlhfkit.data.collate import pad_batch
    from rlhfkit.models.logprobs import position_ids_from_mask
    from rlhfkit.rollout.generate import truncate_after_eos

    pad = tok.pad_token_id
    with torch.no_grad():
        torch.manual_seed(seed)
        batch = pad_batch(prompts, pad, side="left")
        ids, attention = batch["input_ids"], batch["attention_mask"]
        cache = DynamicCache(config=model.config)
        model(input_ids=ids[:, :-1], attention_mask=attention[:, :-1].long(),
              position_ids=position_ids_from_mask(attention[:, :-1]), past_key_values=cache, use_cache=True,
              logits_to_keep=1)
        cache.batch_repeat_interleave(G)
        out = model.generate(input_ids=ids.repeat_interleave(G, 0), attention_mask=attention.repeat_interleave(G, 0).long(),
                             past_key_values=cache, max_new_tokens=params.max_new_tokens, do_sample=True,
                             temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, pad_token_id=pad,
                             eos_token_id=tok.eos_token_id, suppress_tokens=[pad])
        responses, mask, ended = truncate_after_eos(out[:, ids.shape[1]:], tok.eos_token_id, pad)
        mask = mask & (responses != pad)
        tok.batch_decode(responses, skip_special_tokens=True)
    lengths = mask.sum(-1).tolist()
    return {"lengths": lengths, "ended": int(ended.sum()), "steps": responses.shape[1],
            "row_steps": len(lengths) * responses.shape[1]}


def run_rlhfkit(model, tok, prompts, params, G: int, seed: int) -> dict:
    from rlhfkit.rollout.generate import HFGenerator

    gen = HFGenerator(tok, batch_size=len(prompts)).generate(model, prompts, params, generator_seed=seed,
                                                             num_generations=G)
    lengths = gen.response_mask.sum(-1).tolist()
    # every row is computed at step t while it is unfinished, i.e. row-steps = response tokens
    return {"lengths": lengths, "ended": int(gen.ended.sum()), "steps": gen.response_ids.shape[1],
            "row_steps": sum(lengths)}


SIDES = {"hf": run_hf, "hf_shared_prefill": run_hf_shared_prefill, "rlhfkit": run_rlhfkit}


def timed(fn, *args) -> dict:
    load = os.getloadavg()[0]
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(*args)
    result.update(wall_s=time.perf_counter() - wall, cpu_s=time.process_time() - cpu, load_before=load)
    result["tokens"] = sum(result["lengths"])
    result["tok_per_s"] = result["tokens"] / result["wall_s"]
    return result


def length_summary(lengths: list[int], cap: int) -> str:
    s = sorted(lengths)
    return (f"min {s[0]}, median {statistics.median(s):g}, mean {statistics.mean(s):.1f}, max {s[-1]}, "
            f"{sum(x == cap for x in s)}/{len(s)} at the cap")


def bench_model(name: str, args) -> dict:
    import torch

    from rlhfkit.rollout.generate import SamplingParams

    tok = stand_in_tokenizer()
    model = build_model(name, tok, args.eos_hazard)
    prompts = make_prompts(tok, args.prompts, args.min_len, args.max_len)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=1.0)
    G = args.generations
    # warm-up (kernels, allocator) on a small problem
    warm = SamplingParams(max_new_tokens=4)
    for side in args.sides:
        SIDES[side](model, tok, [p[:16] for p in prompts[:2]], warm, 2, 0)
    rounds = []
    for r in range(args.rounds):
        order = list(args.sides) if r % 2 == 0 else list(reversed(args.sides))
        result = {"round": r, "order": order}
        for side in order:
            result[side] = timed(SIDES[side], model, tok, prompts, params, G, r)
            print(f"  {name} round {r} {side}: {result[side]['wall_s']:.1f} s wall, {result[side]['cpu_s']:.1f} s cpu, "
                  f"{result[side]['tokens']} tokens, {result[side]['tok_per_s']:.1f} tok/s, "
                  f"load {result[side]['load_before']:.2f}", flush=True)
        for side in order:  # HF time / this side's time, within the round
            result[side]["vs_hf_wall"] = result["hf"]["wall_s"] / result[side]["wall_s"]
            result[side]["vs_hf_cpu"] = result["hf"]["cpu_s"] / result[side]["cpu_s"]
        rounds.append(result)
    return {"model": name, "params": sum(p.numel() for p in model.parameters()),
            "vocab": model.config.vocab_size, "prompt_lengths": [len(p) for p in prompts],
            "generations": G, "max_new_tokens": args.max_new_tokens, "eos_hazard": args.eos_hazard,
            "threads": torch.get_num_threads(), "sides": list(args.sides), "rounds": rounds}


def table(results: list[dict]) -> str:
    med = statistics.median
    lines = ["| model | side | wall s (median) | CPU s (median) | tokens (mean) | tok/s (median) | "
             "row-steps (mean) | HF wall / this (per round) | HF CPU / this (per round) | lengths (all rounds) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        for side in res["sides"]:
            runs = [r[side] for r in res["rounds"]]
            lengths = [x for run in runs for x in run["lengths"]]
            vs_wall = ", ".join(f"{r['vs_hf_wall']:.2f}" for r in runs)
            vs_cpu = ", ".join(f"{r['vs_hf_cpu']:.2f}" for r in runs)
            lines.append(
                f"| {res['model']} | {side} | {med(r['wall_s'] for r in runs):.1f} | {med(r['cpu_s'] for r in runs):.1f} "
                f"| {statistics.mean(r['tokens'] for r in runs):.0f} | {med(r['tok_per_s'] for r in runs):.1f} "
                f"| {statistics.mean(r['row_steps'] for r in runs):.0f} "
                f"| {vs_wall} | {vs_cpu} "
                f"| {length_summary(lengths, res['max_new_tokens'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,smollm2-135m")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--min-len", type=int, default=60)
    parser.add_argument("--max-len", type=int, default=250)
    parser.add_argument("--eos-hazard", type=float, default=0.025)
    parser.add_argument("--sides", default="hf,hf_shared_prefill,rlhfkit",
                        help="which samplers to run (hf is always needed for the ratios)")
    parser.add_argument("--json", default=str(DEFAULT_JSON))
    args = parser.parse_args(argv)
    args.sides = args.sides.split(",")
    if "hf" not in args.sides or any(side not in SIDES for side in args.sides):
        parser.error(f"--sides: a comma-separated subset of {', '.join(SIDES)} that includes hf")

    import torch

    from rlhfkit.train.loop import tune_cpu_allocator

    malloc_tuned = tune_cpu_allocator()
    torch.set_num_threads(args.threads)
    results = [bench_model(name, args) for name in args.models.split(",")]
    print(table(results))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "malloc_tuned": malloc_tuned, "torch": torch.__version__,
                               "results": results}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
