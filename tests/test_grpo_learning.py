"""GRPO / RLOO / online DPO / XPO / Nash-MD / SPIN learning tests: from the arithmetic SFT model, critic-free RL on the train prompts with
the task's gold reward raises exact-match accuracy on HELD-OUT prompts (never in SFT or RL data).

Setup: the `arithmetic_sft` fixture (preset:tiny pretrained on "world knowledge" whose answers are
right 90% of the time, every prompt of both splits, then SFT'd on the 70%-correct demonstrations of
the train prompts only). SFT blurs what pretraining knew; RL on the train prompts sharpens the answer
distribution again, and that carries over to the held-out prompts. Accuracy is measured by the stage's
own evaluation: one T=1 sample (the training temperature) per row of the task's eval-split prompt rows,
2120 rows = each of the 106 held-out prompts 20 times (the rows cycle through the split), at step 0
(the SFT model) and after the last step (`initial_eval/accuracy`, `eval/accuracy`). 20 samples per
prompt: with one, the sampling noise of the step-0 accuracy alone (std ~0.05) is as large as the gain.

GRPO (GRPO_LEARNING): 60 steps x 64 prompts x 8 responses, one optimizer step per batch (60), full
fine-tuning, lr 1e-4 constant, beta 0, gold reward (1 / 0.1 / 0), group-normalised advantages.
RLOO (RLOO_LEARNING): the same with the rloo stage's defaults: 4 responses per prompt, leave-one-out
baseline, beta 0.05 x summed k1 folded into the reward.

Measured (arithmetic_sft fixture, seeds 0 / 1 / 2; the exact T=1 accuracy of the SFT model on the
held-out prompts is 0.529, its greedy accuracy 0.887):
  held-out accuracy  SFT 0.534 / 0.547 / 0.526
    GRPO  -> 0.721 / 0.723 / 0.722   gain +0.187 / +0.176 / +0.196  (seeds 3, 4: +0.200, +0.189)
    RLOO  -> 0.697 / 0.671 / 0.688   gain +0.163 / +0.124 / +0.161  (seeds 3, 4: +0.168, +0.158)
  RLOO KL to the SFT model on held-out prompts 0.24 / 0.30 / 0.26 nats per response.
  GRPO with sampling_dtype bfloat16 (seed 0, 2026-11-30): 0.531 -> 0.737, gain +0.207; in the same
  session float32 sampling gave 0.525 -> 0.704 (+0.180) and RLOO 0.525 -> 0.683 (+0.158) (the sampler's
  private generator changed since the numbers above; the step-0 accuracy differs between the two
  samplers because the evaluation samples through the bf16 sampler too).
Online DPO (ONLINE_DPO_LEARNING): the same prompts and steps, 4 responses per prompt, the best- and
worst-scored of each prompt's 4 as the pair, one DPO step (sigmoid, beta 0.1, full fine-tuning, lr 1e-4
constant) per batch against the SFT model. Measured 2026-12-01 (seeds 0 / 1 / 2 / 3 / 4, AVX2 CPU, one
thread): SFT 0.533 / 0.530 / 0.506 / 0.533 / 0.520 -> 0.677 / 0.693 / 0.670 / 0.642 / 0.680, gain
+0.144 / +0.164 / +0.164 / +0.109 / +0.160 (mean 0.148, std 0.023), KL to the SFT model 0.24-0.32 nats;
0.47-0.52 of the prompts per step had no pair by the end. With 2 responses per prompt (the pair itself)
the gain was +0.033 / +0.043 (seeds 0 / 1: two thirds of the pairs tied, 0.66-0.68); 30 steps gave
+0.065 / +0.103, and lr 2e-4 for 30 steps -0.033 / -0.013 (KL 0.47-0.53): too large a step undoes it.
38-52 s each on one thread beside another job (steps ~0.4 s, two evaluations of 2120 samples, loading).
The required gain of 0.06 is 3.8 std below the mean and 0.049 below the smallest gain;
the KL bound 1.0 is 3x the largest KL measured.
XPO (XPO_LEARNING): the online DPO set-up with each prompt's pair the policy's answer against the SFT
model's (the reference's), alpha 1e-5, 120 steps. Measured 2026-12-02 (seeds 0-4, AVX512-BF16 EPYC, one
thread each, four runs sharing the 2 cores): SFT 0.525 / 0.528 / 0.504 / 0.536 / 0.529 -> 0.664 / 0.621 /
0.667 / 0.625 / 0.627, gain +0.140 / +0.092 / +0.162 / +0.090 / +0.098 (mean 0.116, std 0.032), KL to the
SFT model 0.49-0.66; 129-133 s each. 60 steps gave +0.06 (seeds 0 / 1); alpha 1e-2 and more lost accuracy
(README). The required gain of 0.05 is 2 std below the mean and 0.040 below the smallest gain; the KL
bound 1.5 is 2.3x the largest KL measured.
Nash-MD (NASH_MD_LEARNING): 120 steps x 64 prompts, each answered once by the policy and once by its
token-level geometric mixture with the SFT model (mixture_coef 0.5); Bradley-Terry preference of the gold
reward, policy-gradient steps (one per batch) with P - 1/2 and -0.05 x k1 per token as the reward, full
fine-tuning, lr 1e-4 constant. Measured 2026-12-02 (seeds 0-4, AVX512-BF16 EPYC, one thread each, four
runs sharing the 2 cores): SFT 0.525 / 0.528 / 0.504 / 0.536 / 0.529 -> 0.665 / 0.660 / 0.632 / 0.637 /
0.617, gain +0.141 / +0.132 / +0.127 / +0.101 / +0.088 (mean 0.118, std 0.022), KL to the SFT model
0.23-0.33; 95-108 s each. 60 steps gave +0.039-0.097 (seed 4 the lowest), lr 2e-4 lost accuracy. The
required gain of 0.05 is 3 std below the mean and 0.038 below the smallest gain; the KL bound 1.0 is 3x
the largest KL measured.
SPIN (SPIN_LEARNING; no reward): the SFT data's demonstrations that are right (2120 of the 3000: data
better than the model, which learned the 70%-right ones), the paper's iterations: 2 of one pass each over
them (34 steps of 64 prompts; each iteration's opponent and reference the policy at its start, its
samples reused for the whole pass), sigmoid, beta 0.1, full fine-tuning, lr 3e-5 constant. Measured
2026-12-02 (seeds 0-4, AVX2 CPU, two runs sharing the 2 cores): SFT 0.533 / 0.530 / 0.506 / 0.533 / 0.520
-> 0.631 / 0.596 / 0.600 / 0.593 / 0.575, gain +0.099 / +0.066 / +0.093 / +0.060 / +0.055 (mean 0.075,
std 0.020); the second opponent's answers equal the (right) data's on 0.642 of the training rows against
the first's 0.591 (seed 0). At lr 1e-4 the same iterations lost accuracy (-0.045) while one-step
iterations gained (+0.079 mean over 5 seeds): README, "Self-play fine-tuning". The required gain of 0.03
is 2.2 std below the mean and 0.025 below the smallest gain; the KL bound 1.0 is ~7x the KL to the SFT
model measured (0.145, seed 0). ~70 s on one thread.
Seed-to-seed std of the gain over seeds 0-4: GRPO 0.009, RLOO 0.018 (seeds 0-2: 0.010, 0.022). The
required gain of 0.08 is > 3.5x the larger std and 0.044 below the smallest gain measured (RLOO seed 1); the KL bound 1.0 is
> 3x the largest KL measured. CPU (one thread, machine shared): fixture ~80 s, GRPO ~35 s, RLOO ~30 s.
"""

from __future__ import annotations

import json

import pytest

from rlhfkit.config import build_config
from rlhfkit.train.grpo import train_grpo
from rlhfkit.train.loop import cpu_has_native_bf16
from rlhfkit.train.nash_md import train_nash_md
from rlhfkit.train.online_dpo import train_online_dpo
from rlhfkit.train.spin import train_spin
from rlhfkit.train.xpo import train_xpo

pytestmark = pytest.mark.slow

COMMON = dict(reward_funcs=["gold"], task="arithmetic", rollout_batch_size=64, num_mini_batches=1,
              per_device_train_batch_size=256, max_steps=60, learning_rate=1e-4, lr_scheduler_type="constant",
              temperature=1.0, max_new_tokens=3, eval_num_prompts=2120, logging_steps=5, report_to=[],
              disable_tqdm=True)
GRPO_LEARNING = dict(COMMON, num_generations=8)
RLOO_LEARNING = dict(COMMON)  # the rloo stage's defaults: num_generations 4, beta 0.05 (k1 in the reward)
ONLINE_DPO_LEARNING = dict(COMMON, num_generations=4, per_device_train_batch_size=128, beta=0.1)
XPO_LEARNING = dict(COMMON, max_steps=120, per_device_train_batch_size=128, beta=0.1, alpha=1e-5)
NASH_MD_LEARNING = dict(COMMON, max_steps=120, per_device_train_batch_size=64, beta=0.05, mixture_coef=0.5)
SPIN_LEARNING = dict(COMMON, reward_funcs=[], num_iterations=2, num_train_epochs=1, max_steps=-1,
                     per_device_train_batch_size=128, beta=0.1, learning_rate=3e-5)
MIN_SPIN_GAIN = 0.03
MAX_SPIN_KL = 1.0
MIN_ONLINE_DPO_GAIN = 0.06
MAX_ONLINE_DPO_KL = 1.0
MIN_XPO_GAIN = 0.05
MAX_XPO_KL = 1.5
MIN_NASH_MD_GAIN = 0.05
MAX_NASH_MD_KL = 1.0
MIN_ACCURACY_GAIN = 0.08
MAX_RLOO_KL = 1.0


def _run(stage: str, overrides: dict, arithmetic_sft, out, seed: int = 0):
    config = build_config(stage, dict(dict(model_name_or_path=str(arithmetic_sft["sft"]),
                                           dataset=str(arithmetic_sft["data"] / "prompt_train.jsonl"),
                                           output_dir=str(out), seed=seed), **overrides))
    trainers = {"online_dpo": train_online_dpo, "xpo": train_xpo, "nash_md": train_nash_md, "spin": train_spin}
    result = trainers.get(stage, train_grpo)(config)
    s = result.summary
    print(json.dumps({k: v for k, v in s.items() if k.startswith(("eval/", "initial_", "rewards/", "scores/"))}, indent=1))
    return result


def _check_learned(result):
    s, history = result.summary, result.history
    gain = s["eval/accuracy"] - s["initial_eval/accuracy"]
    assert gain >= MIN_ACCURACY_GAIN, s
    rewards = [r["rewards/mean"] for r in history if "rewards/mean" in r]
    assert rewards[-1] > rewards[0]  # the training reward rose too
    first = next(r for r in history if "policy/first_ratio" in r)
    assert first["policy/first_ratio_dev"] == 0.0  # every ratio of the first update is exactly 1


def test_grpo_raises_held_out_accuracy(arithmetic_sft, tmp_path):
    result = _run("grpo", GRPO_LEARNING, arithmetic_sft, tmp_path / "grpo")
    assert result.summary["stage"] == "grpo"
    _check_learned(result)


@pytest.mark.skipif(not cpu_has_native_bf16(),
                    reason="bf16 is emulated on this CPU (no AVX512-BF16 / AMX): the bf16 sampler runs 15-75x "
                           "slower than float32 there (this test: 96 s against ~35 s), which is why rlhfkit warns "
                           "against sampling_dtype: bfloat16 on it; the bf16 sampler's unit tests run everywhere")
def test_grpo_with_bf16_sampling_raises_held_out_accuracy(arithmetic_sft, tmp_path):
    """The same run sampled through bf16 linear layers (`sampling_dtype: bfloat16`), each token's loss
    weighted by truncated importance sampling: it learns like the float32 sampler. Run where the CPU
    computes bf16 natively (the machine of the numbers above); test_grpo.py and test_generate.py test
    the bf16 sampler itself on every CPU."""
    result = _run("grpo", dict(GRPO_LEARNING, sampling_dtype="bfloat16"), arithmetic_sft, tmp_path / "grpo_bf16")
    _check_learned(result)
    gaps = [r["sampling/logp_gap"] for r in result.history if "sampling/logp_gap" in r]
    assert gaps and all(0 < g < 0.05 for g in gaps)


def test_rloo_raises_held_out_accuracy(arithmetic_sft, tmp_path):
    result = _run("rloo", RLOO_LEARNING, arithmetic_sft, tmp_path / "rloo")
    s = result.summary
    assert s["stage"] == "rloo" and s["initial_eval/kl"] == 0.0  # step 0 is the SFT model itself
    _check_learned(result)
    assert s["eval/kl"] < MAX_RLOO_KL, s


def test_online_dpo_raises_held_out_accuracy(arithmetic_sft, tmp_path):
    result = _run("online_dpo", ONLINE_DPO_LEARNING, arithmetic_sft, tmp_path / "online_dpo")
    s, history = result.summary, result.history
    assert s["stage"] == "online_dpo" and s["initial_eval/kl"] == 0.0
    assert s["eval/accuracy"] - s["initial_eval/accuracy"] >= MIN_ONLINE_DPO_GAIN, s
    scores = [r["scores/mean"] for r in history if "scores/mean" in r]
    assert scores[-1] > scores[0]  # the training reward rose too
    assert s["eval/kl"] < MAX_ONLINE_DPO_KL, s


def test_xpo_raises_held_out_accuracy(arithmetic_sft, tmp_path):
    """XPO: each prompt's pair is the policy's answer against the SFT model's, plus the exploration term."""
    result = _run("xpo", XPO_LEARNING, arithmetic_sft, tmp_path / "xpo")
    s, history = result.summary, result.history
    assert s["stage"] == "xpo" and s["initial_eval/kl"] == 0.0
    assert s["eval/accuracy"] - s["initial_eval/accuracy"] >= MIN_XPO_GAIN, s
    won = [r["pairs/policy_won"] for r in history if "pairs/policy_won" in r]
    assert won[-1] > won[0]  # the policy's answers beat the reference's more often
    assert s["eval/kl"] < MAX_XPO_KL, s


def test_nash_md_raises_held_out_accuracy(arithmetic_sft, tmp_path):
    """Nash-MD: the policy's answer against its token-level geometric mixture with the SFT model, the
    Bradley-Terry preference of the gold reward, policy-gradient steps with the KL in the reward."""
    result = _run("nash_md", NASH_MD_LEARNING, arithmetic_sft, tmp_path / "nash_md")
    s, history = result.summary, result.history
    assert s["stage"] == "nash_md" and s["initial_eval/kl"] == 0.0
    assert s["eval/accuracy"] - s["initial_eval/accuracy"] >= MIN_NASH_MD_GAIN, s
    first = next(r for r in history if "policy/first_ratio" in r)
    assert first["policy/first_ratio"] == 1.0  # on-policy: the first ratio of every step is 1
    scores = [r["scores/policy"] for r in history if "scores/policy" in r]
    assert scores[-1] > scores[0]  # the training reward rose too
    assert s["eval/kl"] < MAX_NASH_MD_KL, s


def test_spin_raises_held_out_accuracy(arithmetic_sft, tmp_path):
    """SPIN from the arithmetic SFT model on the demonstrations that are right (the SFT data's 70%:
    the data SPIN imitates must be better than the model), no reward: 2 iterations of one pass over
    them (34 steps of 64), each iteration's opponent and reference the policy at its start."""
    from rlhfkit.tasks import get_task

    task = get_task("arithmetic")
    rows = [json.loads(x) for x in (arithmetic_sft["data"] / "sft_train.jsonl").read_text().splitlines()]
    right = [r for r in rows if task.correct(r["prompt"], r["completion"])]
    data = tmp_path / "sft_right.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in right))
    result = _run("spin", dict(SPIN_LEARNING, dataset=str(data), ref_model=str(arithmetic_sft["sft"])),
                  arithmetic_sft, tmp_path / "spin")
    s = result.summary
    assert s["stage"] == "spin" and s["steps"] == 68 and s["initial_eval/kl"] == 0.0
    assert s["eval/accuracy"] - s["initial_eval/accuracy"] >= MIN_SPIN_GAIN, s
    # the second opponent answers the training prompts like the (right) data more often than the first
    same = []
    for iteration in (0, 1):
        lines = (tmp_path / "spin" / "spin" / f"iteration-{iteration}-rank-0.jsonl").read_text().splitlines()
        same.append(sum(json.loads(x)["identical"] for x in lines) / len(lines))
    assert same[1] > same[0], same
    assert s["eval/kl"] < MAX_SPIN_KL, s
