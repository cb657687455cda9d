"""nash_md on tiny untrained models: the geometric mixture sampler (coef 0 is the policy, 1 the reference,
LoRA's reference the base with adapters off; the sampled tokens' log-probs equal the mixture recomputed by
hand over whole sequences, through the generator's KV cache, finished rows dropped), the Bradley-Terry
preference, the first update (ratio 1, KL 0, the loss -mean (P - 1/2) x length recomputed by hand), a
constant reward trains nothing, resume, config errors; on 2 processes, each sharded engine against DDP.
The learning test lives in tests/test_grpo_learning.py (the arithmetic SFT fixture)."""

from __future__ import annotations

from contextlib import contextmanager
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
from rlhfkit.rollout.generate import HFGenerator, SamplingParams
from rlhfkit.rollout.mixture import GeometricMixture
from rlhfkit.train import online as online_module
from rlhfkit.train.nash_md import preference_against, train_nash_md


@pytest.fixture(scope="module")
def fx(tmp_path_factory, tiny_tokenizer):
    return grpo_fixtures(tmp_path_factory, tiny_tokenizer)


def nash_config(fx, out, **kw):
    return online_config("nash_md", fx / "sft", fx / "prompts.jsonl", out,
                         dict(WORDS, rollout_batch_size=4, per_device_train_batch_size=4, temperature=1.0), kw)


# ---- the opponent's sampler -----------------------------------------------------------------------------

def two_models(tiny_tokenizer):
    from rlhfkit.models.presets import build_preset_model

    torch.manual_seed(0)
    a = build_preset_model("tiny", tiny_tokenizer).eval()
    torch.manual_seed(1)
    b = build_preset_model("tiny", tiny_tokenizer).eval()
    return a, b


def frozen(model):
    @contextmanager
    def factory():
        yield model

    return factory


PROMPTS = ["The movie was", "What is 2 + 3?", "My friend said that the"]


def test_mixture_at_its_ends_is_either_model(tiny_tokenizer):
    """Greedy decoding: coef 0 gives the policy's tokens, coef 1 the reference's; the two models differ."""
    policy, reference = two_models(tiny_tokenizer)
    ids = [tiny_tokenizer(p, add_special_tokens=False).input_ids for p in PROMPTS]
    gen = HFGenerator(tiny_tokenizer, batch_size=2)
    greedy = SamplingParams(max_new_tokens=8, do_sample=False)
    own = gen.generate(policy, ids, greedy, num_generations=2).response_ids
    other = gen.generate(reference, ids, greedy, num_generations=2).response_ids
    assert not torch.equal(own, other)
    policy.train()  # a new mixture is in training mode too: sampling through it leaves the policy in eval
    assert torch.equal(gen.generate(GeometricMixture(policy, frozen(reference), 0.0), ids, greedy,
                                    num_generations=2).response_ids, own)
    assert not policy.training
    assert torch.equal(gen.generate(GeometricMixture(policy, frozen(reference), 1.0), ids, greedy,
                                    num_generations=2).response_ids, other)


def test_lora_mixture_takes_the_base_with_adapters_off_as_the_reference(tiny_tokenizer):
    """The LoRA reference (the base with adapters disabled) inside the mixture: coef 1 samples the base,
    coef 0 the adapted policy, with a trained (non-zero) adapter."""
    from rlhfkit.models.load import apply_lora
    from rlhfkit.train.online import adapters_disabled

    base, _ = two_models(tiny_tokenizer)
    gen = HFGenerator(tiny_tokenizer, batch_size=3)
    greedy = SamplingParams(max_new_tokens=8, do_sample=False)
    ids = [tiny_tokenizer(p, add_special_tokens=False).input_ids for p in PROMPTS]
    base_tokens = gen.generate(base, ids, greedy).response_ids
    policy = apply_lora(base, rank=8, alpha=16, dropout=0.0, target="all-linear")
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    policy.eval()
    adapted = gen.generate(policy, ids, greedy).response_ids
    assert not torch.equal(adapted, base_tokens)
    reference = lambda: adapters_disabled(policy)  # noqa: E731  (build_reference's LoRA reference)
    assert torch.equal(gen.generate(GeometricMixture(policy, reference, 1.0), ids, greedy).response_ids, base_tokens)
    assert torch.equal(gen.generate(GeometricMixture(policy, reference, 0.0), ids, greedy).response_ids, adapted)


def test_sampled_log_probs_are_the_mixtures(tiny_tokenizer):
    """Each sampled token's log-prob (the sampler's own, `record_logps`) equals the tempered mixture
    log_softmax(((1 - c) log pi + c log ref) / T) recomputed from whole-sequence forwards of both models
    (pad suppressed), for rows that end early too: the split KV cache follows the generator's row dropping."""
    from rlhfkit.models.logprobs import sampling_scores, token_logps

    policy, reference = two_models(tiny_tokenizer)
    ids = [tiny_tokenizer(p, add_special_tokens=False).input_ids for p in PROMPTS]
    T, coef = 0.8, 0.3
    params = SamplingParams(max_new_tokens=10, temperature=T, stop=("e",))  # rows end early, at different steps
    g = HFGenerator(tiny_tokenizer, batch_size=3).generate(
        GeometricMixture(policy, frozen(reference), coef), ids, params, generator_seed=3, num_generations=4,
        record_logps=True)
    lengths = g.response_mask.sum(-1)
    for i in range(len(g.texts)):
        m = g.response_mask[i]
        prompt, response = g.prompt_ids[i], g.response_ids[i][m]
        seq = torch.tensor([prompt + response.tolist()])
        with torch.no_grad():
            a = policy(seq).logits[0, len(prompt) - 1:-1].float()
            b = reference(seq).logits[0, len(prompt) - 1:-1].float()
        mixed = (1 - coef) * torch.log_softmax(a, -1) + coef * torch.log_softmax(b, -1)
        expected = token_logps(sampling_scores(mixed, T, [tiny_tokenizer.pad_token_id]), response)
        torch.testing.assert_close(g.sampling_logps[i][m], expected, atol=1e-5, rtol=1e-5)
    assert lengths.min() < lengths.max()  # rows of different lengths: the cache dropped finished rows


def test_mixture_needs_one_vocabulary(tiny_tokenizer):
    policy, reference = two_models(tiny_tokenizer)
    reference.resize_token_embeddings(reference.get_input_embeddings().weight.shape[0] + 8)
    with pytest.raises(ValueError, match="share the vocabulary"):
        GeometricMixture(policy, frozen(reference), 0.5)


# ---- the stage --------------------------------------------------------------------------------------------

def test_preference_is_bradley_terry():
    p = preference_against(torch.tensor([1.0, 0.0, float("nan"), 0.0, 0.0, 0.0]))
    torch.testing.assert_close(p, torch.tensor([torch.sigmoid(torch.tensor(1.0)).item(), 0.5, 0.5]))


@pytest.mark.parametrize("kw", [dict(), dict(finetuning_type="lora", num_mini_batches=2, per_device_train_batch_size=2)],
                         ids=["full", "lora_two_minibatches"])
def test_first_update_is_the_preference_gradient(fx, tmp_path, monkeypatch, kw):
    """Step 1 (policy = reference, so the KL is exactly 0 and the first ratio 1): the logged loss is
    -mean over responses of (P(y > y') - 1/2) x |y|, with P = sigmoid(score(y) - score(y')) from the
    scores of the step; every trained tensor changed."""
    seen = []
    original = online_module.score_rollout

    def spy(c, scorer, ro):
        scores, parts = original(c, scorer, ro)
        seen.append((scores.clone(), ro.response_mask.sum(-1)))
        return scores, parts

    monkeypatch.setattr(online_module, "score_rollout", spy)  # rollouts_against's scorer
    c = nash_config(fx, tmp_path / "run", val_size=2, beta=0.1, **kw)
    initial = initial_weights(c)
    result = train_nash_md(c)
    step1 = next(r for r in result.history if r["step"] == 1)
    scores, lengths = seen[0]
    P = torch.sigmoid(scores[:4] - scores[4:])
    assert step1["objective/kl"] == 0.0 and step1["policy/first_ratio"] == 1.0
    assert step1["preference/mean"] == pytest.approx(P.mean().item(), abs=1e-6)
    assert (P != 0.5).any()
    if c.num_mini_batches == 1:
        assert step1["loss"] == pytest.approx(-((P - 0.5) * lengths[:4]).mean().item(), abs=1e-5)
    assert step1["scores/policy"] == pytest.approx(scores[:4].mean().item(), abs=1e-6)
    assert step1["scores/mixture"] == pytest.approx(scores[4:].mean().item(), abs=1e-6)
    assert_every_trained_tensor_changed(initial, tmp_path / "run", c.finetuning_type)
    s = result.summary
    assert s["stage"] == "nash_md" and s["mixture_coef"] == 0.5 and "initial_eval/kl" in s


def test_a_constant_reward_trains_nothing(fx, tmp_path):
    """Every preference 1/2 and, at the reference, every KL 0: every advantage is 0."""
    c = nash_config(fx, tmp_path / "run", reward_funcs=["test_grpo:constant_reward"], beta=0.1)
    initial = initial_weights(c)
    result = train_nash_md(c)
    step1 = next(r for r in result.history if r["step"] == 1)
    assert step1["preference/mean"] == 0.5 and step1["grad_norm"] == 0.0 and step1["advantages/abs_mean"] == 0.0
    after = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert all(torch.equal(initial[n], after[n]) for n in initial)


def test_resume_gives_the_same_weights(fx, tmp_path):
    kw = dict(max_steps=3, finetuning_type="lora", num_mini_batches=2, per_device_train_batch_size=2)
    train_nash_md(nash_config(fx, tmp_path / "a", save_steps=2, **kw))
    ckpt = tmp_path / "a" / "checkpoints" / "step-000002"
    train_nash_md(nash_config(fx, tmp_path / "b", resume_from_checkpoint=str(ckpt), **kw))
    assert_same_weights(tmp_path / "a", tmp_path / "b", "adapter_model.safetensors")


def test_config_errors_before_any_model_loads(fx, tmp_path):
    cases = [(dict(mixture_coef=1.5), r"mixture_coef must be in \[0, 1\]"),
             (dict(beta=-0.1), "beta must be >= 0"),
             (dict(epsilon=0), "epsilon must be > 0"),
             (dict(beta=float("nan")), "beta must be >= 0"),
             (dict(kl_estimator="k3"), "kl_estimator k3 is not offered by nash_md"),
             (dict(num_generations=4), "num_generations"),
             (dict(rollout_batch_size=3, per_device_train_batch_size=2), "must be divisible by per_device_train"),
             (dict(sampling_dtype="bfloat16"), "offered by grpo, rloo and ppo only"),
             (dict(reward_funcs=[]), "give reward_model")]
    for kw, message in cases:
        with pytest.raises(ConfigError, match=message):
            nash_config(fx, tmp_path, **kw)
    assert not (tmp_path / "config.yaml").exists()


LAUNCHED = dict(max_steps=2, per_device_train_batch_size=1, finetuning_type="lora", save_steps=1, val_size=2,
                eval_steps=2, beta=0.1)


def launched_job(tmp_path_factory, model_dir: Path, out: Path):
    """The 2-process runs of the test below, the same under ddp, zero2, zero3 and fsdp2 (one job in each
    engine's launch of `launched_run`): LoRA, 2 prompts per process, micro-batches of one response."""
    from transformers import AutoTokenizer

    fx = grpo_fixtures(tmp_path_factory, AutoTokenizer.from_pretrained(model_dir))
    return "nash_md", nash_config(fx, out, **LAUNCHED), None


ENGINES = ("zero2", "zero3", "fsdp2")
register_launched("ddp", "nash_md_ddp", launched_job)
for _engine in ENGINES:
    register_launched(_engine, f"nash_md_{_engine}", launched_job)


@pytest.mark.slow
@pytest.mark.parametrize("engine", [pytest.param(e, marks=needs_deepspeed if e.startswith("zero") else ())
                                    for e in ENGINES])
def test_sharded_engines_follow_ddp(fx, tmp_path_factory, tiny_model_dir, engine):
    """The same 2-process run under DeepSpeed ZeRO-2 / ZeRO-3 / FSDP2 and under DDP (ZeRO-3 and FSDP2: the
    LoRA policy's parameters sharded and gathered to sample, the mixture switching its adapters off and on
    per token inside the same gather): the same rollouts, preferences, curves and adapter (within 1e-4);
    under DDP the first update is on-policy at the reference."""
    ddp = launched_run(tmp_path_factory, tiny_model_dir, "ddp", "nash_md_ddp")
    records = [r for r in read_metrics(ddp) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2] and records[0]["episodes"] == 8
    assert records[0]["policy/first_ratio"] == 1.0 and records[0]["objective/kl"] == 0.0
    sharded = launched_run(tmp_path_factory, tiny_model_dir, engine, f"nash_md_{engine}")
    assert_sharded_follows_ddp(sharded, ddp, engine, ("loss", "grad_norm", "preference/mean", "scores/policy",
                                                      "scores/mixture", "objective/kl", "gen/length",
                                                      "gen/mixture_length", "eval/scores", "eval/kl"))
