"""The shared training loop: invariances (accumulation; data parallel: test_scaleout.py's ddp sft and
each stage's torchrun test), exact resume, atomic checkpoints. Each test trains a preset tiny model
for a few steps on a slice of task data."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhfkit.config import build_config
from rlhfkit.tasks import get_task
from rlhfkit.train import checkpoint as ckpt_mod
from rlhfkit.train.checkpoint import list_checkpoints, resolve_resume
from rlhfkit.train.loop import BatchStream
from rlhfkit.train.sft import train_sft


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "sft.jsonl"
    rows = get_task("sentiment").make("sft", 64, seed=0)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sft_config(data: Path, out: Path, **overrides):
    values = dict(model_name_or_path="preset:tiny", dataset=str(data), output_dir=str(out), max_length=64,
                  max_steps=4, learning_rate=1e-3, logging_steps=1, report_to=[], seed=3,
                  per_device_train_batch_size=8, disable_tqdm=True)
    values.update(overrides)
    return build_config("sft", values)


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


def assert_same_weights(a: Path, b: Path, atol: float):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=0, msg=k)


def test_batch_stream_is_a_function_of_the_index():
    a = BatchStream(10, 3, seed=1)
    b = BatchStream(10, 3, seed=1)
    seen = [a.indices(k) for k in range(a.per_epoch)]
    flat = [i for batch in seen for i in batch]
    assert set(flat) == set(range(10)) and len(flat) == 12  # every example, padded by wrapping to 4 x 3
    assert [b.indices(k) for k in reversed(range(8))] == [a.indices(k) for k in reversed(range(8))]
    assert a.indices(0) != a.indices(a.per_epoch)  # a new permutation each epoch
    r0, r1 = BatchStream(10, 2, world_size=2, rank=0, seed=1), BatchStream(10, 2, world_size=2, rank=1, seed=1)
    assert set(r0.indices(0)).isdisjoint(r1.indices(0))


def test_accumulation_matches_one_big_batch(sft_file, tmp_path):
    """batch 8 x accumulation 1 and batch 2 x accumulation 4 give the same losses and weights:
    the loss is normalised by the tokens of the whole global batch, not per micro-batch."""
    big = train_sft(sft_config(sft_file, tmp_path / "big", per_device_train_batch_size=8))
    small = train_sft(sft_config(sft_file, tmp_path / "small", per_device_train_batch_size=2,
                                 gradient_accumulation_steps=4))
    assert big.summary["steps"] == small.summary["steps"] == 4
    assert losses(tmp_path / "big") == pytest.approx(losses(tmp_path / "small"), abs=1e-5)
    assert_same_weights(tmp_path / "big", tmp_path / "small", atol=1e-5)
    # and training did something: every trainable tensor changed from its initial value
    init = train_sft(sft_config(sft_file, tmp_path / "init", max_steps=1, learning_rate=0.0))
    changed = {k: not torch.equal(v, weights(tmp_path / "init")[k]) for k, v in weights(tmp_path / "big").items()}
    assert init.summary["steps"] == 1 and all(changed.values()), [k for k, c in changed.items() if not c]


def test_resume_after_interruption_gives_identical_weights(sft_file, tmp_path, monkeypatch):
    full = tmp_path / "full"
    train_sft(sft_config(sft_file, full, max_steps=6, save_steps=3))
    assert [p.name for p in list_checkpoints(full)] == ["step-000003"]

    # Interrupt a second run right after its first checkpoint is written.
    broken = tmp_path / "broken"
    real_save = ckpt_mod.save_checkpoint

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr("rlhfkit.train.loop.save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_sft(sft_config(sft_file, broken, max_steps=6, save_steps=3))
    monkeypatch.undo()
    assert not (broken / "model.safetensors").exists()
    # a half-written checkpoint from a later kill must not be picked as the latest
    (broken / "checkpoints" / ".tmp-step-000006").mkdir()
    assert resolve_resume(broken, True).name == "step-000003"

    resumed = train_sft(sft_config(sft_file, broken, max_steps=6, save_steps=3, resume_from_checkpoint=True))
    assert resumed.summary["steps"] == 6
    assert losses(broken) == pytest.approx(losses(full), abs=1e-6)
    assert [json.loads(x)["step"] for x in (broken / "metrics.jsonl").read_text().splitlines()] == list(range(1, 7))
    assert_same_weights(full, broken, atol=0)


def test_finished_run_is_not_overwritten_by_accident(sft_file, tmp_path):
    from rlhfkit.errors import ConfigError

    train_sft(sft_config(sft_file, tmp_path / "o", max_steps=1))
    with pytest.raises(ConfigError, match="already holds a finished run"):
        train_sft(sft_config(sft_file, tmp_path / "o", max_steps=1))
    train_sft(sft_config(sft_file, tmp_path / "o", max_steps=1, overwrite_output_dir=True))


@pytest.mark.plots
def test_run_outputs(sft_file, tmp_path):
    out = tmp_path / "o"
    train_sft(sft_config(sft_file, out, max_steps=2, report_to=["tensorboard"], val_size=8, eval_steps=1))
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "plots/loss.png", "model.safetensors",
                 "config.json", "tokenizer.json"):
        assert (out / name).exists(), name
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_examples"] == 56 and summary["eval_examples"] == 8
    assert "eval/loss" in summary and "skipped_train" in summary
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)


def test_lora_run_saves_adapter_and_merged_model(sft_file, tmp_path):
    out = tmp_path / "lora"
    res = train_sft(sft_config(sft_file, out, max_steps=2, finetuning_type="lora", lora_rank=4,
                               merge_lora=True, learning_rate=1e-2))
    assert (out / "adapter_model.safetensors").exists() and (out / "adapter_config.json").exists()
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, res.model(input_ids=ids).logits, atol=1e-4, rtol=0)


def test_lora_adapter_records_absolute_base_and_reloads_alone(sft_file, tmp_path, monkeypatch):
    """An adapter trained on a local base directory names that directory absolutely, so peft
    reloads it from anywhere; a preset base (random weights) always gets `merged/` as well."""
    from peft import AutoPeftModelForCausalLM

    base = tmp_path / "base"
    train_sft(sft_config(sft_file, base, max_steps=1))
    monkeypatch.chdir(tmp_path)  # a relative model path, as users write in configs
    res = train_sft(sft_config(sft_file, tmp_path / "lora", max_steps=2, finetuning_type="lora", lora_rank=4,
                               learning_rate=1e-2, model_name_or_path="base"))
    recorded = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str(base.resolve())
    assert not (tmp_path / "lora" / "merged").exists()
    monkeypatch.chdir("/")
    reloaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "lora")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, res.model(input_ids=ids).logits, atol=1e-5, rtol=0)
    train_sft(sft_config(sft_file, tmp_path / "preset_lora", max_steps=1, finetuning_type="lora", lora_rank=4))
    assert (tmp_path / "preset_lora" / "merged" / "model.safetensors").exists()


def test_sft_lora_dropout_is_active_in_training_and_off_in_evaluation(sft_file, tiny_model_dir, tmp_path,
                                                                      monkeypatch):
    """lora_dropout in SFT is a training-time regulariser: the dropout modules keep their rate, but
    `fit` evaluates in eval mode, so every evaluation is deterministic (each is run twice here)."""
    import rlhfkit.train.lm as lm

    real, seen = lm.lm_eval, []

    def twice(run, model, examples, pad):
        first, second = real(run, model, examples, pad), real(run, model, examples, pad)
        seen.append((first, second, model.training))
        return first

    monkeypatch.setattr(lm, "lm_eval", twice)
    result = train_sft(sft_config(sft_file, tmp_path, model_name_or_path=str(tiny_model_dir), max_steps=2,
                                  finetuning_type="lora", lora_rank=4,
                                  lora_dropout=0.5, learning_rate=1e-2, val_size=8, eval_steps=1))
    assert len(seen) == 2
    for first, second, training in seen:
        assert first == second and not training
    model = result.model
    dropouts = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout) and "lora_dropout" in n]
    assert dropouts and all(m.p == 0.5 for m in dropouts)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    model.train()  # the trained adapters are non-zero, so train-mode passes differ through the dropout
    with torch.no_grad():
        assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
    model.eval()


def test_cpu_allocator_tuning_and_bf16_probe_run():
    from rlhfkit.train.loop import bf16_is_native, bf16_slowdown, cpu_has_native_bf16, tune_cpu_allocator

    assert tune_cpu_allocator() is sys.platform.startswith("linux")  # glibc accepts both settings
    assert isinstance(cpu_has_native_bf16(), bool)
    assert bf16_is_native() is cpu_has_native_bf16()  # no CUDA in the tests
    threads = torch.get_num_threads()
    slowdown = bf16_slowdown(size=256, repeats=5)
    assert slowdown > 0 and torch.get_num_threads() == threads
    if not cpu_has_native_bf16():  # emulated: measured 69x at this size on an AVX2 CPU
        assert slowdown > 2


def test_optimizer_is_fused_adamw(tiny_tokenizer):
    from rlhfkit.config import build_config
    from rlhfkit.models.presets import build_preset_model
    from rlhfkit.train.loop import build_optimizer

    config = build_config("sft", dict(model_name_or_path="preset:tiny", dataset="x.jsonl", output_dir="o"))
    opt = build_optimizer(build_preset_model("tiny", tiny_tokenizer), config)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"] is True
