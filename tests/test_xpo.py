"""xpo on tiny untrained models: pairing (the policy's response against the reference's, ties), the first
update is at the reference (implicit rewards 0, the DPO term log 2) with the exploration term alpha x the
policy's mean log-prob of the reference's responses added, the reference's responses are the initial
model's (full fine-tuning: its frozen copy; LoRA: the base with adapters disabled, never the merged
adapter), the exploration term alone lowers the policy's likelihood of the reference's responses, resume,
config errors; on 2 processes, each sharded engine against DDP. The learning test lives in
tests/test_grpo_learning.py (the arithmetic SFT fixture)."""

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

from rlhfkit.config import build_config
from rlhfkit.errors import ConfigError
from rlhfkit.train import online as online_module
from rlhfkit.train import xpo as xpo_module
from rlhfkit.train.xpo import policy_against_reference, train_xpo


@pytest.fixture(scope="module")
def fx(tmp_path_factory, tiny_tokenizer):
    return grpo_fixtures(tmp_path_factory, tiny_tokenizer)


def xpo_config(fx, out, **kw):
    return online_config("xpo", fx / "sft", fx / "prompts.jsonl", out,
                         dict(WORDS, rollout_batch_size=4, per_device_train_batch_size=8, temperature=1.0, alpha=0.1),
                         kw)


def test_policy_against_reference_pairs():
    """Rows 0..P-1 the policy's responses, P..2P-1 the reference's: the higher-scored is chosen; equal or
    unscored is no preference (the policy's listed first)."""
    chosen, rejected, decisive, won = policy_against_reference(torch.tensor([1.0, 2.0, 2.0, 0.0]))
    assert chosen.tolist() == [2, 1] and rejected.tolist() == [0, 3]
    assert decisive.tolist() == [True, True] and won.tolist() == [False, True]
    nan = float("nan")
    chosen, rejected, decisive, won = policy_against_reference(torch.tensor([3.0, nan, 1.0, 3.0, 1.0, 0.0]))
    assert chosen.tolist() == [0, 1, 2] and rejected.tolist() == [3, 4, 5]
    assert decisive.tolist() == [False, False, True] and won.tolist() == [False, False, True]


@pytest.mark.parametrize("kw", [dict(), dict(finetuning_type="lora")], ids=["full", "lora"])
def test_first_update_is_at_the_reference_plus_the_exploration_term(fx, tmp_path, kw):
    """One step: the training forward is the reference's own (every implicit reward 0, the DPO term log 2
    on untied pairs); the logged loss is that plus alpha x the mean log-prob of the reference's responses,
    and every trained tensor changed (LoRA: its B matrices)."""
    c = xpo_config(fx, tmp_path / "run", val_size=2, **kw)
    initial = initial_weights(c)
    result = train_xpo(c)
    step1 = next(r for r in result.history if r["step"] == 1)
    assert step1["pairs/tied"] < 1.0  # some pairs carry a preference
    assert step1["rewards/chosen"] == 0.0 and step1["rewards/rejected"] == 0.0 and step1["pairs/logratio"] == 0.0
    assert step1["loss/dpo"] == pytest.approx(math.log(2), abs=1e-6)
    assert step1["logps/reference_response"] < -1.0  # six tokens of a tiny untrained model
    assert step1["loss/exploration"] == pytest.approx(0.1 * step1["logps/reference_response"], rel=1e-5)
    assert step1["loss"] == pytest.approx(step1["loss/dpo"] + step1["loss/exploration"], abs=1e-5)
    assert step1["scores/chosen"] > step1["scores/rejected"]
    assert 0.0 <= step1["pairs/policy_won"] <= 1.0 - step1["pairs/tied"]
    assert_every_trained_tensor_changed(initial, tmp_path / "run", c.finetuning_type)
    s = result.summary
    assert s["stage"] == "xpo" and s["alpha"] == 0.1 and "initial_eval/scores" in s


@pytest.mark.parametrize("tuning", ["full", "lora"])
def test_the_reference_responses_are_the_initial_models(fx, tmp_path, monkeypatch, tuning):
    """At step 3, after two large updates, the reference's responses are what the initial model samples
    with the step's reference seed (LoRA: the base with the adapter disabled; sampling must not merge the
    disabled adapter back in), while the policy's differ from the initial model's with its seed."""
    from rlhfkit.models.load import load_causal_lm, load_tokenizer
    from rlhfkit.rollout.generate import HFGenerator
    from rlhfkit.rollout.rollout import generate_rollout
    from rlhfkit.train.online import rollout_seed

    calls = []

    def spy(*args, **kw):
        ro = generate_rollout(*args, **kw)
        calls.append((args[4], ro.texts))  # (prompt rows, texts)
        return ro

    monkeypatch.setattr(online_module, "generate_rollout", spy)  # rollouts_against's sampler
    c = xpo_config(fx, tmp_path / "run", max_steps=3, learning_rate=3e-2, finetuning_type=tuning)
    train_xpo(c)
    assert len(calls) == 6  # policy, reference per step
    tok = load_tokenizer(c.model_name_or_path)
    initial = load_causal_lm(c.model_name_or_path, tok)
    rows = calls[4][0]
    ids = [tok(r["prompt"], add_special_tokens=False).input_ids for r in rows]
    from rlhfkit.rollout.generate import SamplingParams

    params = SamplingParams(max_new_tokens=c.max_new_tokens, temperature=c.temperature)
    generator = HFGenerator(tok, batch_size=len(ids))
    ref = generate_rollout(initial, tok, generator, ids, rows, params, rollout_seed(c, 2, 0, round_=1), "cpu")
    own = generate_rollout(initial, tok, generator, ids, rows, params, rollout_seed(c, 2, 0), "cpu")
    assert calls[5][1] == ref.texts
    assert calls[4][1] != own.texts  # the policy has moved


def test_the_exploration_term_alone_lowers_the_reference_responses_likelihood(fx, tmp_path, monkeypatch):
    """Every pair tied (a constant reward): the DPO term is 0 and the update is the exploration term's
    alone; one step lowers the policy's log-prob of the reference's responses it trained on. With
    alpha 0 nothing trains."""
    from rlhfkit.models.load import load_causal_lm, load_tokenizer
    from rlhfkit.train.pairs import response_sums

    from rlhfkit.rollout.rollout import generate_rollout

    seen = {}
    original = xpo_module.pair_updates

    def spy(run, opt, policy, pairs, ref_logps, decisive, plan, c, explore=None, alpha=0.0):
        seen.update(pairs=pairs, explore=explore, ref_logps=ref_logps)
        return original(run, opt, policy, pairs, ref_logps, decisive, plan, c, explore=explore, alpha=alpha)

    def sampled(*args, **kw):
        ro = generate_rollout(*args, **kw)
        seen.setdefault("responses", []).append(ro.responses.tolist())
        return ro

    monkeypatch.setattr(xpo_module, "pair_updates", spy)
    monkeypatch.setattr(online_module, "generate_rollout", sampled)
    c = xpo_config(fx, tmp_path / "run", reward_funcs=["test_grpo:constant_reward"], alpha=1.0)
    result = train_xpo(c)
    step1 = next(r for r in result.history if r["step"] == 1)
    assert step1["pairs/tied"] == 1.0 and step1["loss/dpo"] == 0.0 and step1["grad_norm"] > 0
    assert step1["loss"] == pytest.approx(step1["loss/exploration"], abs=1e-6)
    pairs, explore = seen["pairs"], seen["explore"]
    rows = explore.nonzero().squeeze(1)
    assert rows.tolist() == [1, 3, 5, 7]  # ties: the policy's response is listed first, the reference's second
    policy_sampled, reference_sampled = seen["responses"]  # the weighted rows hold the reference's responses
    assert policy_sampled != reference_sampled
    for i, row in enumerate(rows.tolist()):
        mask = pairs.response_mask[row]
        width = int(mask.sum())
        assert pairs.responses[row][:width].tolist() == reference_sampled[i][:width]
    tok = load_tokenizer(c.model_name_or_path)
    after = load_causal_lm(str(tmp_path / "run"), tok)
    with torch.no_grad():
        before_logps = seen["ref_logps"][rows]  # the reference = the initial model
        after_logps = response_sums(after, pairs, rows, c)
    assert after_logps.mean() < before_logps.mean() - 0.01, (before_logps, after_logps)

    c0 = xpo_config(fx, tmp_path / "zero", reward_funcs=["test_grpo:constant_reward"], alpha=0.0)
    initial = initial_weights(c0)
    step1 = next(r for r in train_xpo(c0).history if r["step"] == 1)
    assert step1["loss/exploration"] == 0.0 and step1["logps/reference_response"] < -1.0 and step1["grad_norm"] == 0.0
    trained = load_file(str(tmp_path / "zero" / "model.safetensors"))
    assert all(torch.equal(initial[n], trained[n]) for n in initial)


def row_index_reward(prompts, completions, **kwargs):
    """Each response scores its row's index: two copies of one response never score the same."""
    return [float(i) for i in range(len(completions))]


@pytest.mark.parametrize("stage", ["xpo", "online_dpo"])
def test_the_same_response_twice_is_no_preference(fx, tmp_path, stage):
    """top_k 1 at step 1 (policy = reference): both responses of every pair are the same token sequence;
    a reward that scores copies apart must not make them a preference (no DPO term: loss/dpo 0)."""
    kw = dict(reward_funcs=["test_xpo:row_index_reward"], top_k=1)
    c = (xpo_config(fx, tmp_path / "run", alpha=0.0, **kw) if stage == "xpo" else
         build_config("online_dpo", dict(xpo_config(fx, tmp_path / "run", **kw).model_dump(exclude={"alpha"}),
                                         num_generations=2)))
    from rlhfkit.train.online_dpo import train_online_dpo

    result = (train_xpo if stage == "xpo" else train_online_dpo)(c)
    step1 = next(r for r in result.history if r["step"] == 1)
    assert step1["pairs/tied"] == 1.0 and step1["loss"] == 0.0 and step1["grad_norm"] == 0.0


def test_resume_gives_the_same_weights(fx, tmp_path):
    kw = dict(max_steps=3, finetuning_type="lora", num_mini_batches=2, per_device_train_batch_size=2)
    train_xpo(xpo_config(fx, tmp_path / "a", save_steps=2, **kw))
    ckpt = tmp_path / "a" / "checkpoints" / "step-000002"
    train_xpo(xpo_config(fx, tmp_path / "b", resume_from_checkpoint=str(ckpt), **kw))
    assert_same_weights(tmp_path / "a", tmp_path / "b", "adapter_model.safetensors")


def test_config_errors_before_any_model_loads(fx, tmp_path):
    cases = [(dict(alpha=-0.1), "alpha must be >= 0"),
             (dict(num_generations=4), "num_generations"),
             (dict(per_device_train_batch_size=3, rollout_batch_size=3), "must be even"),
             (dict(beta=0), "beta must be > 0"),
             (dict(sampling_dtype="bfloat16"), "offered by grpo, rloo and ppo only"),
             (dict(reward_funcs=[]), "give reward_model")]
    for kw, message in cases:
        with pytest.raises(ConfigError, match=message):
            xpo_config(fx, tmp_path, **kw)
    assert not (tmp_path / "config.yaml").exists()


LAUNCHED = dict(max_steps=2, per_device_train_batch_size=2, finetuning_type="lora", save_steps=1, val_size=2,
                eval_steps=2)


def launched_job(tmp_path_factory, model_dir: Path, out: Path):
    """The 2-process runs of the test below, the same under ddp, zero2, zero3 and fsdp2 (one job in each
    engine's launch of `launched_run`): LoRA, 2 prompts per process, micro-batches of one pair."""
    from transformers import AutoTokenizer

    fx = grpo_fixtures(tmp_path_factory, AutoTokenizer.from_pretrained(model_dir))
    return "xpo", xpo_config(fx, out, **LAUNCHED), None


ENGINES = ("zero2", "zero3", "fsdp2")
register_launched("ddp", "xpo_ddp", launched_job)
for _engine in ENGINES:
    register_launched(_engine, f"xpo_{_engine}", launched_job)


@pytest.mark.slow
@pytest.mark.parametrize("engine", [pytest.param(e, marks=needs_deepspeed if e.startswith("zero") else ())
                                    for e in ENGINES])
def test_sharded_engines_follow_ddp(fx, tmp_path_factory, tiny_model_dir, engine):
    """The same 2-process run under DeepSpeed ZeRO-2 / ZeRO-3 / FSDP2 and under DDP (ZeRO-3 and FSDP2: the
    LoRA policy's parameters sharded and gathered to sample, the reference's responses sampled from its
    base with adapters disabled inside the same gather): the same rollouts, pairs, curves and adapter
    (within 1e-4); under DDP the first update is at the reference with the global pair counts."""
    ddp = launched_run(tmp_path_factory, tiny_model_dir, "ddp", "xpo_ddp")
    records = [r for r in read_metrics(ddp) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2] and records[0]["episodes"] == 8
    assert records[0]["loss/dpo"] == pytest.approx(math.log(2), abs=1e-6) or records[0]["pairs/tied"] == 1.0
    assert records[0]["rewards/chosen"] == 0.0
    sharded = launched_run(tmp_path_factory, tiny_model_dir, engine, f"xpo_{engine}")
    assert_sharded_follows_ddp(sharded, ddp, engine, ("loss", "loss/exploration", "grad_norm", "rewards/margins",
                                                      "logps/reference_response", "scores/policy",
                                                      "scores/reference", "pairs/tied", "gen/length",
                                                      "eval/scores", "eval/kl"))
