"""QLoRA (`load_in_4bit: true`): a 4-bit NF4 base (bitsandbytes' CPU backend) with LoRA adapters.
Gradients flow through the 4-bit base (after a no-grad eval pass too): the adapters' gradients equal
those of the same model with the NF4 weights dequantized to fp32; sft, rm, dpo and kto runs train and
save an adapter that reloads over the full-precision base; bad combinations (full fine-tuning, a
preset, a merged save, the online stages, the sharded engines) fail at config time."""

from __future__ import annotations

import json

import pytest
import torch

from rlhfkit.config import build_config

bnb = pytest.importorskip("bitsandbytes")


def _lora(model):
    from rlhfkit.models.load import apply_lora

    torch.manual_seed(0)
    model = apply_lora(model, rank=4, alpha=8, dropout=0.0, target="all-linear")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero B, so A gets a gradient too
        for name, p in sorted(model.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def test_lora_gradients_through_the_4bit_base_match_the_dequantized_model(tiny_model_dir, tiny_tokenizer):
    from peft import prepare_model_for_kbit_training

    from rlhfkit.models.load import load_causal_lm

    quantized = load_causal_lm(str(tiny_model_dir), tiny_tokenizer, load_in_4bit=True)
    linear4 = {n: m for n, m in quantized.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(linear4) == 4 * 7  # q, k, v, o, gate, up, down in each of the 4 layers
    dense = load_causal_lm(str(tiny_model_dir), tiny_tokenizer)
    with torch.no_grad():
        for name, m in linear4.items():
            weight = bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
            assert not torch.equal(weight, dense.get_submodule(name).weight)  # NF4 rounding changed it
            dense.get_submodule(name).weight.copy_(weight)
    quantized = _lora(prepare_model_for_kbit_training(quantized, use_gradient_checkpointing=False))
    dense = _lora(dense)
    ids = torch.randint(1, len(tiny_tokenizer), (2, 24), generator=torch.Generator().manual_seed(2))
    grads = []
    for model in (quantized, dense):
        # a no-grad eval pass first (an evaluation, a reference pass): on AVX512-BF16 CPUs bitsandbytes
        # would repack the 4-bit weights for inference there (`keep_4bit_layout` keeps them as they are)
        model.eval()
        with torch.no_grad():
            model(input_ids=ids[:1])
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 28
    worst = max((grads[0][n] - grads[1][n]).norm().item() / grads[1][n].norm().item() for n in grads[1])
    print(f"worst relative gradient difference {worst:.2e}")
    assert worst < 0.02, worst  # the 4-bit kernel computes in another order
    assert all(grads[0][n].abs().sum() > 0 for n in grads[0] if "layers.0." in n)  # layer 0 gets gradients


def test_qlora_sft_trains_and_saves_an_adapter(tiny_model_dir, tmp_path):
    from rlhfkit.tasks import get_task
    from rlhfkit.train.sft import train_sft

    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in get_task("sentiment").make("sft", 32, seed=0)))
    config = build_config("sft", dict(model_name_or_path=str(tiny_model_dir), dataset=str(data), max_length=48,
                                      output_dir=str(tmp_path / "out"), finetuning_type="lora", load_in_4bit=True,
                                      max_steps=3, learning_rate=1e-3, per_device_train_batch_size=8,
                                      logging_steps=1, report_to=[], disable_tqdm=True))
    result = train_sft(config)
    assert len(result.history) == 3
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in result.model.modules())


@pytest.fixture(scope="module")
def preference_data(tmp_path_factory):
    from rlhfkit.tasks import get_task

    d = tmp_path_factory.mktemp("qlora_data")
    for name, n, seed in (("train", 16, 0), ("eval", 4, 1)):
        rows = get_task("sentiment").make("preference", n, seed=seed)
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


@pytest.mark.parametrize("stage", ["rm", "dpo", "kto"])
def test_qlora_preference_stages_train_and_save_an_adapter(stage, tiny_model_dir, preference_data, tmp_path):
    """rm, dpo and kto on a 4-bit base: 3 steps of LoRA (dpo/kto: the reference is the 4-bit base with
    the adapters off; every stage evaluates at the end, a no-grad pass over the 4-bit layers), the
    loss moves, the adapters leave their initialisation, the saved adapter over the 4-bit base loaded
    again gives the trained model's outputs, and it loads over the full-precision base too."""
    from safetensors.torch import load_file

    from rlhfkit.train.dpo import train_dpo
    from rlhfkit.train.kto import train_kto
    from rlhfkit.train.rm import train_rm

    out = tmp_path / "out"
    config = build_config(stage, dict(
        model_name_or_path=str(tiny_model_dir), dataset=str(preference_data / "train.jsonl"),
        eval_dataset=str(preference_data / "eval.jsonl"), max_length=48, output_dir=str(out), finetuning_type="lora",
        load_in_4bit=True, max_steps=3, learning_rate=2e-3, per_device_train_batch_size=8, logging_steps=1,
        report_to=[], disable_tqdm=True, seed=0))
    result = {"rm": train_rm, "dpo": train_dpo, "kto": train_kto}[stage](config)
    losses = [r["loss"] for r in result.history if "loss" in r]
    assert len(losses) == 3 and len(set(losses)) == 3, losses  # each step's batch differs: the loss moves
    assert any(k.startswith("eval/") for k in result.history[-1])
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in result.model.modules())
    adapter = load_file(str(out / "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: every adapter trained
    base = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == str(tiny_model_dir.resolve())  # the full-precision base, not a 4-bit copy
    # the saved adapter over the 4-bit base loaded again: the trained model exactly; over the
    # full-precision base (what `rlhfkit generate` / PPO's reward model load): it loads and runs
    from peft import PeftModel

    from rlhfkit.models.load import load_causal_lm, load_for_use, load_tokenizer
    from rlhfkit.models.reward import build_reward_model, load_reward_model, sequence_rewards

    tokenizer = load_tokenizer(str(out))
    ids, mask = torch.arange(5, 29).reshape(2, 12), torch.ones(2, 12, dtype=torch.bool)
    with torch.no_grad():
        if stage == "rm":
            assert any("score" in k for k in adapter)  # the head trains with the adapters and saves with them
            base4 = build_reward_model(base, tokenizer, load_in_4bit=True)
            again = PeftModel.from_pretrained(base4, str(out)).eval()
            trained = sequence_rewards(result.model.eval(), ids, mask)
            torch.testing.assert_close(sequence_rewards(again, ids, mask), trained)
            assert load_reward_model(out).raw_score(ids, mask).isfinite().all()
        else:
            again = PeftModel.from_pretrained(load_causal_lm(base, tokenizer, load_in_4bit=True), str(out)).eval()
            torch.testing.assert_close(again(input_ids=ids).logits, result.model.eval()(input_ids=ids).logits)
            model, _ = load_for_use(str(out))
            assert model(input_ids=ids).logits.isfinite().all()


@pytest.mark.parametrize("stage, kw, message", [
    ("sft", dict(finetuning_type="full"), "needs finetuning_type: lora"),
    ("kto", dict(finetuning_type="full"), "needs finetuning_type: lora"),
    ("sft", dict(finetuning_type="lora", model_name_or_path="preset:tiny"), "not a preset"),
    ("rm", dict(finetuning_type="lora", model_name_or_path="preset:tiny"), "not a preset"),
    ("sft", dict(finetuning_type="lora", merge_lora=True), "merge_lora"),
    ("dpo", dict(finetuning_type="lora", merge_lora=True), "merge_lora"),
    ("ppo", dict(finetuning_type="full", reward_funcs=["gold"], task="sentiment"), "needs finetuning_type: lora"),
    ("grpo", dict(finetuning_type="full", reward_funcs=["gold"], task="sentiment"), "needs finetuning_type: lora"),
])
def test_bad_4bit_configs_fail_early(stage, kw, message):
    from rlhfkit.errors import ConfigError

    values = {**dict(model_name_or_path="some/dir", dataset="x.jsonl", output_dir="o", load_in_4bit=True), **kw}
    with pytest.raises(ConfigError, match=message):
        build_config(stage, values)


@pytest.mark.parametrize("engine", ["zero2", "zero3", "fsdp2"])
@pytest.mark.parametrize("stage", ["rm", "dpo", "kto"])
def test_qlora_under_a_sharded_engine_is_refused(engine, stage):
    from rlhfkit.errors import ConfigError
    from rlhfkit.train.engine import check_config, check_supported

    config = build_config(stage, dict(model_name_or_path="some/dir", dataset="x.jsonl", output_dir="o",
                                      finetuning_type="lora", load_in_4bit=True))
    check_supported(engine, stage)  # the stage itself runs there
    with pytest.raises(ConfigError, match=f"load_in_4bit .QLoRA. under engine '{engine}'"):
        check_config(engine, config)
    check_config("ddp", config)


@pytest.mark.parametrize("stage", ["grpo", "rloo"])
def test_qlora_grpo_trains_and_saves_an_adapter(stage, tiny_model_dir, tmp_path):
    """grpo on a 4-bit base: the reference is the base with the adapters off (KL and first ratio
    exactly 0 at step 1: sampling, old and reference passes and the training pass agree), the
    adapters train, the saved adapter reloads over the full-precision base."""
    from safetensors.torch import load_file

    from rlhfkit.models.load import load_for_use
    from rlhfkit.train.grpo import train_grpo

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("The movie was", "This film is",
                                                                          "My friend said", "The cat")))
    out = tmp_path / "out"
    config = build_config(stage, dict(
        model_name_or_path=str(tiny_model_dir), dataset=str(prompts), output_dir=str(out), finetuning_type="lora",
        load_in_4bit=True, reward_funcs=["test_grpo:words_reward"], rollout_batch_size=4, num_generations=4,
        per_device_train_batch_size=8, num_mini_batches=1, max_steps=2, max_new_tokens=6, beta=0.04,
        learning_rate=2e-3, report_to=[], disable_tqdm=True, seed=0))
    result = train_grpo(config)
    step1 = next(r for r in result.history if r["step"] == 1)
    assert step1["objective/kl"] == 0.0 and step1["policy/first_ratio_dev"] == 0.0
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in result.model.modules())
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert all(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)
    load_for_use(str(out))


@pytest.mark.parametrize("stage", ["xpo", "nash_md"])
def test_qlora_xpo_and_nash_md_sample_the_reference_from_the_4bit_base(stage, tiny_model_dir, tmp_path):
    """xpo and nash_md on a 4-bit base, whose reference is the base with the adapters off: xpo samples
    from it (the sampler does not merge into 4-bit weights), nash_md mixes it token by token with the
    policy. At step 1 policy = reference: xpo's implicit rewards are 0, nash_md's KL is 0 and its first
    ratio 1; the adapters train and the saved adapter reloads over the full-precision base."""
    from safetensors.torch import load_file

    from rlhfkit.models.load import load_for_use
    from rlhfkit.train.nash_md import train_nash_md
    from rlhfkit.train.xpo import train_xpo

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("The movie was", "This film is",
                                                                          "My friend said", "The cat")))
    out = tmp_path / "out"
    config = build_config(stage, dict(
        model_name_or_path=str(tiny_model_dir), dataset=str(prompts), output_dir=str(out), finetuning_type="lora",
        load_in_4bit=True, reward_funcs=["test_grpo:words_reward"], rollout_batch_size=4,
        per_device_train_batch_size=4, max_steps=2, max_new_tokens=6, beta=0.1, learning_rate=2e-3,
        temperature=1.0, report_to=[], disable_tqdm=True, seed=0))
    result = {"xpo": train_xpo, "nash_md": train_nash_md}[stage](config)
    step1 = next(r for r in result.history if r["step"] == 1)
    if stage == "xpo":
        assert step1["rewards/chosen"] == 0.0 and step1["rewards/rejected"] == 0.0
    else:
        assert step1["objective/kl"] == 0.0 and step1["policy/first_ratio"] == 1.0
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in result.model.modules())
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert all(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)
    load_for_use(str(out))


def test_qlora_ppo_shares_one_4bit_base(tiny_model_dir, preference_data, tmp_path):
    """ppo on a 4-bit base with a LoRA reward model over the same (full-precision) base: policy,
    reference (adapters off), critic and reward adapters on ONE 4-bit base; the KL is exactly 0 at
    the first step, the policy adapter trains, the saved adapter and critic reload."""
    from safetensors.torch import load_file

    from rlhfkit.models.load import load_for_use
    from rlhfkit.models.reward import load_reward_model
    from rlhfkit.train.ppo import train_ppo
    from rlhfkit.train.rm import train_rm

    common = dict(model_name_or_path=str(tiny_model_dir), finetuning_type="lora", report_to=[], disable_tqdm=True,
                  seed=0, learning_rate=2e-3)
    train_rm(build_config("rm", dict(common, dataset=str(preference_data / "train.jsonl"), max_length=48,
                                     output_dir=str(tmp_path / "rm"), max_steps=1, per_device_train_batch_size=8)))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("The movie was", "This film is",
                                                                         "My friend said", "The cat")))
    out = tmp_path / "ppo"
    result = train_ppo(build_config("ppo", dict(
        common, dataset=str(prompts), output_dir=str(out), load_in_4bit=True, reward_model=str(tmp_path / "rm"),
        rollout_batch_size=4, per_device_train_batch_size=4, num_mini_batches=1, num_ppo_epochs=1, max_steps=2,
        max_new_tokens=6)))
    step1 = next(r for r in result.history if r["step"] == 1)
    assert step1["objective/kl"] == 0.0
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in result.model.modules())
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert adapter and all(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)
    load_for_use(str(out))
    assert load_reward_model(out / "critic").raw_score(torch.arange(5, 17).reshape(1, 12),
                                                       torch.ones(1, 12, dtype=torch.bool)).isfinite().all()
