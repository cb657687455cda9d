"""QLoRA (`load_in_4bit: true`): a 4-bit NF4 base (bitsandbytes' CPU backend) with LoRA adapters.
Gradients flow through the 4-bit base: the adapters' gradients equal those of the same model with
the NF4 weights dequantized to fp32; an sft run trains and saves a loadable adapter; bad
combinations fail at config time."""

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


@pytest.mark.parametrize("stage, kw, message", [
    ("sft", dict(finetuning_type="full"), "needs finetuning_type: lora"),
    ("sft", dict(finetuning_type="lora", model_name_or_path="preset:tiny"), "not a preset"),
    ("sft", dict(finetuning_type="lora", merge_lora=True), "merge_lora"),
    ("rm", dict(finetuning_type="lora"), "does not take a 4-bit base"),
    ("dpo", dict(finetuning_type="lora"), "does not take a 4-bit base"),
    ("ppo", dict(finetuning_type="lora", reward_funcs=["gold"], task="sentiment"), "does not take a 4-bit base"),
])
def test_bad_4bit_configs_fail_early(stage, kw, message):
    from rlhfkit.errors import ConfigError

    values = {**dict(model_name_or_path="some/dir", dataset="x.jsonl", output_dir="o", load_in_4bit=True), **kw}
    with pytest.raises(ConfigError, match=message):
        build_config(stage, values)
