"""online_dpo on tiny untrained models: pairing (best / worst, ties), the first update is at policy =
reference (every implicit reward exactly 0, sigmoid loss log 2), the loss is the DPO loss of the
sampled pairs recomputed by hand, micro-batches add up to the minibatch, tied pairs train nothing,
resume, config errors before loading; on 2 processes, the global pair count under DDP and each sharded
engine (ZeRO-2, ZeRO-3, FSDP2) against DDP. The learning test lives in tests/test_grpo_learning.py
(the arithmetic SFT fixture)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import (
    assert_every_trained_tensor_changed,
    assert_same_weights,
    assert_sharded_follows_ddp,
    launched_run,
    read_metrics,
    register_launched,
)
from safetensors.torch import load_file
from test_grpo import WORDS, grpo_fixtures, initial_weights, online_config
from test_scaleout import needs_deepspeed

from rlhfkit.errors import ConfigError
from rlhfkit.train.online_dpo import train_online_dpo
from rlhfkit.train.pairs import best_and_worst


@pytest.fixture(scope="module")
def fx(tmp_path_factory, tiny_tokenizer):
    return grpo_fixtures(tmp_path_factory, tiny_tokenizer)


def odpo_config(fx, out, **kw):
    return online_config("online_dpo", fx / "sft", fx / "prompts.jsonl", out,
                         dict(WORDS, rollout_batch_size=4, num_generations=2, per_device_train_batch_size=8,
                              temperature=1.0), kw)


def test_best_and_worst_pairs_each_group():
    best, worst, decisive = best_and_worst(torch.tensor([1.0, 3.0, 2.0, 2.0]), 2)
    assert best.tolist() == [1, 2] and worst.tolist() == [0, 3] and decisive.tolist() == [True, False]
    # groups of 4: the first of equal maxima / minima; a flat group still names two different rows
    best, worst, decisive = best_and_worst(torch.tensor([0.0, 1.0, 1.0, 0.0, 5.0, 5.0, 5.0, 5.0]), 4)
    assert best.tolist() == [1, 4] and worst.tolist() == [0, 5] and decisive.tolist() == [True, False]
    # NaN (a response self_reward's judge could not score) is never picked while another is scored;
    # one scored response, or none, is no preference
    nan = float("nan")
    best, worst, decisive = best_and_worst(torch.tensor([nan, 1.0, 3.0, nan, nan, 2.0, nan, nan, nan, nan]), 5)
    assert best.tolist() == [2, 5] and worst.tolist() == [1, 6] and decisive.tolist() == [True, False]
    best, worst, decisive = best_and_worst(torch.tensor([nan, nan]), 2)
    assert best.tolist() == [0] and worst.tolist() == [1] and decisive.tolist() == [False]


@pytest.mark.parametrize("kw", [dict(), dict(finetuning_type="lora", num_generations=4)], ids=["full", "lora_of_4"])
def test_first_update_is_at_the_reference_and_every_parameter_trains(fx, tmp_path, kw):
    """One step, one minibatch: the training forward is the reference's own (every implicit reward 0,
    the sigmoid loss log 2 on untied pairs), and every trained tensor changed (LoRA: its B matrices)."""
    c = odpo_config(fx, tmp_path / "run", val_size=2, **kw)
    initial = initial_weights(c)
    result = train_online_dpo(c)
    step1 = next(r for r in result.history if r["step"] == 1)
    assert step1["pairs/tied"] < 1.0  # some pairs carry a preference
    assert step1["rewards/chosen"] == 0.0 and step1["rewards/rejected"] == 0.0 and step1["pairs/logratio"] == 0.0
    assert step1["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert step1["scores/chosen"] > step1["scores/rejected"]
    assert_every_trained_tensor_changed(initial, tmp_path / "run", c.finetuning_type)
    s = result.summary
    assert s["stage"] == "online_dpo" and s["loss_type"] == "sigmoid" and "initial_eval/scores" in s


def test_loss_is_the_dpo_loss_of_the_sampled_pairs(fx, tmp_path):
    """After one step, the step-2 loss logged equals -log sigmoid(beta h) recomputed by hand from the
    policy and reference log-probs of step 2's pairs (padded forward, no packing), tied pairs out."""
    from rlhfkit.losses.masked import masked_sum
    from rlhfkit.train import pairs as pair_module
    from rlhfkit.train.online import rollout_logps

    seen = {}
    original = pair_module.pair_micro_loss

    def spy(policy, pairs, ref_logps, decisive, idx, c, n_pairs, **kw):
        loss, stats = original(policy, pairs, ref_logps, decisive, idx, c, n_pairs, **kw)
        if policy.training:
            with torch.no_grad():
                lp = rollout_logps(policy, pairs, idx, c.model_copy(update={"padding_free": False}))[0]
                seq = masked_sum(lp, pairs.response_mask[idx], dim=1)
            h = (seq[0::2] - ref_logps[idx[0::2]]) - (seq[1::2] - ref_logps[idx[1::2]])
            w = decisive[idx[0::2] // 2].float()
            seen.setdefault("by_hand", []).append((-torch.nn.functional.logsigmoid(c.beta * h) * w).sum() / n_pairs)
            seen.setdefault("logged", []).append(stats["loss"])
        return loss, stats

    pair_module.pair_micro_loss = spy
    try:
        train_online_dpo(odpo_config(fx, tmp_path / "run", max_steps=2, beta=0.5))
    finally:
        pair_module.pair_micro_loss = original
    assert len(seen["logged"]) == 2
    for by_hand, logged in zip(seen["by_hand"], seen["logged"]):
        assert logged == pytest.approx(by_hand.item(), abs=1e-5)
    assert seen["logged"][1] != pytest.approx(math.log(2), abs=1e-4)  # step 2 is off the reference


def test_micro_batches_add_up_to_the_minibatch(fx, tmp_path):
    """Pairs in micro-batches of one pair (gradients accumulated) train the same weights as one
    micro-batch of all four: each micro-batch's loss is divided by the minibatch's untied pairs."""
    whole = train_online_dpo(odpo_config(fx, tmp_path / "a", max_steps=2, per_device_train_batch_size=8))
    split = train_online_dpo(odpo_config(fx, tmp_path / "b", max_steps=2, per_device_train_batch_size=2))
    for a, b in zip(whole.history, split.history):
        if "loss" in a:
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    a = load_file(str(tmp_path / "a" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    # within a tenth of one Adam step (lr 1e-3): an element whose gradient is near 0 turns float
    # rounding of the summation order into up to ~2.3e-5 of movement (measured, one element of 65536)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-4, rtol=1e-4)


def test_tied_pairs_train_nothing(fx, tmp_path):
    c = odpo_config(fx, tmp_path / "run", reward_funcs=["test_grpo:constant_reward"])
    initial = initial_weights(c)
    result = train_online_dpo(c)
    step1 = next(r for r in result.history if r["step"] == 1)
    assert step1["pairs/tied"] == 1.0 and step1["loss"] == 0.0 and step1["grad_norm"] == 0.0
    after = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert all(torch.equal(initial[n], after[n]) for n in initial)


def test_resume_gives_the_same_weights(fx, tmp_path):
    kw = dict(max_steps=3, finetuning_type="lora", num_generations=4, num_mini_batches=2, per_device_train_batch_size=4)
    train_online_dpo(odpo_config(fx, tmp_path / "a", save_steps=2, **kw))
    ckpt = tmp_path / "a" / "checkpoints" / "step-000002"
    train_online_dpo(odpo_config(fx, tmp_path / "b", resume_from_checkpoint=str(ckpt), **kw))
    assert_same_weights(tmp_path / "a", tmp_path / "b", "adapter_model.safetensors")


def test_config_errors_before_any_model_loads(fx, tmp_path):
    cases = [(dict(num_generations=1), "num_generations must be >= 2"),
             (dict(per_device_train_batch_size=3, rollout_batch_size=3), "must be even"),
             (dict(rollout_batch_size=3, per_device_train_batch_size=4), "must be divisible by per_device_train"),
             (dict(loss_type="hinge", label_smoothing=0.1), "only applies to sigmoid and robust"),
             (dict(loss_type="robust", label_smoothing=0.5), r"\[0, 0.5\) for robust"),
             (dict(beta=0), "beta must be > 0"),
             (dict(loss_type="simpo"), "loss_type"),
             (dict(sampling_dtype="bfloat16"), "offered by grpo, rloo and ppo only"),
             (dict(reward_funcs=[]), "give reward_model")]
    for kw, message in cases:
        with pytest.raises(ConfigError, match=message):
            odpo_config(fx, tmp_path, **kw)
    assert not (tmp_path / "config.yaml").exists()


LAUNCHED = dict(max_steps=2, per_device_train_batch_size=2, finetuning_type="lora", num_generations=4,
                save_steps=1, val_size=2, eval_steps=2)


def launched_job(tmp_path_factory, model_dir: Path, out: Path):
    """The 2-process runs of the tests below, the same under ddp, zero2, zero3 and fsdp2 (one job in
    each engine's launch of `launched_run`): LoRA, 2 prompts per process, micro-batches of one pair."""
    from transformers import AutoTokenizer

    fx = grpo_fixtures(tmp_path_factory, AutoTokenizer.from_pretrained(model_dir))
    return "online_dpo", odpo_config(fx, out, **LAUNCHED), None


ENGINES = ("zero2", "zero3", "fsdp2")
register_launched("ddp", "online_dpo_ddp", launched_job)
for _engine in ENGINES:
    register_launched(_engine, f"online_dpo_{_engine}", launched_job)


@pytest.mark.slow
def test_two_processes_share_the_pair_count(fx, tmp_path_factory, tiny_model_dir, tmp_path):
    """DDP on 2 CPU processes (2 prompts each, micro-batches of one pair): each process's
    loss is divided by the untied pairs of the GLOBAL minibatch, so the logged loss (the processes'
    shares summed) of the first update, at the reference, is log 2 (divided by the local count it would
    be up to 2 log 2). The two processes sample different prompts, and the run ends with the adapter
    saved. Not compared with one process: a process's samples
    depend on its rank's seed (and top_k 1 makes a group's responses equal, so every pair a tie)."""
    run = launched_run(tmp_path_factory, tiny_model_dir, "ddp", "online_dpo_ddp")
    records = [r for r in read_metrics(run) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2]
    first = records[0]
    assert first["pairs/tied"] < 1.0 and first["episodes"] == 16
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert (run / "adapter_model.safetensors").is_file() and (run / "summary.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("engine", [pytest.param(e, marks=needs_deepspeed if e.startswith("zero") else ())
                                    for e in ENGINES])
def test_sharded_engines_follow_ddp(fx, tmp_path_factory, tiny_model_dir, engine):
    """The same 2-process run under DeepSpeed ZeRO-2 / ZeRO-3 / FSDP2 and under DDP (ZeRO-3 and FSDP2:
    the LoRA policy's parameters sharded, its base with adapters disabled, the reference, sharded
    with it; sampling and the held-out evaluation with the parameters gathered): each rank samples
    with its own seed in both, so the rollouts, pairs, metric curves and trained adapter are the same
    (the engines reduce and clip in another order: equal within 1e-4)."""
    ddp = launched_run(tmp_path_factory, tiny_model_dir, "ddp", "online_dpo_ddp")
    sharded = launched_run(tmp_path_factory, tiny_model_dir, engine, f"online_dpo_{engine}")
    assert [r["step"] for r in read_metrics(ddp)] == [0, 1, 2]
    assert_sharded_follows_ddp(sharded, ddp, engine, ("loss", "grad_norm", "rewards/margins", "rewards/chosen",
                                                      "logps/chosen", "scores/mean", "pairs/tied", "gen/length",
                                                      "eval/scores", "eval/kl"))
