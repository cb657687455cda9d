"""`rlhfkit estimate-memory`: parameter counts from the config (meta device) and the per-role,
per-engine arithmetic, against values worked out by hand for the tiny preset."""

from __future__ import annotations

import pytest

from rlhfkit.cli import main
from rlhfkit.train.memory import GB, activation_bytes, estimate, model_config

# tiny preset: vocab 1024, hidden 256, intermediate 688, 4 layers, 4 heads, tied embeddings
# embedding 1024*256 = 262144; per layer: q,k,v,o 4*256*256 = 262144, mlp 3*256*688 = 528384,
# two norms 512 -> 791040; 4 layers 3164160; final norm 256 -> 3426560 parameters
TINY = 3426560
# LoRA r8 on every linear but the head: per layer 4*8*(256+256) + 3*8*(256+688) = 16384 + 22656 = 39040
TINY_LORA8 = 4 * 39040


def test_parameter_counts_and_full_fine_tuning_partitioning():
    ddp = {r.role: r for r in estimate("preset:tiny", "ppo", "ddp", 2, seq_len=8)}
    assert ddp["policy"].parameters == TINY and ddp["policy"].trainable == TINY
    assert ddp["critic"].parameters == TINY + 256  # + the value head
    assert ddp["reference"].trainable == 0 and ddp["reference"].optimizer_gb == 0
    assert ddp["policy"].weights_gb == pytest.approx(TINY * 4 / GB)
    assert ddp["policy"].optimizer_gb == pytest.approx(TINY * 8 / GB)
    z2 = {r.role: r for r in estimate("preset:tiny", "ppo", "zero2", 2, seq_len=8)}
    assert z2["policy"].weights_gb == pytest.approx(TINY * 4 / GB)  # weights whole under ZeRO-2
    assert z2["policy"].gradients_gb == pytest.approx(TINY * 4 / 2 / GB)
    assert z2["policy"].optimizer_gb == pytest.approx(TINY * 8 / 2 / GB)
    for engine in ("zero3", "fsdp2"):
        z3 = {r.role: r for r in estimate("preset:tiny", "ppo", engine, 4, seq_len=8)}
        assert z3["policy"].weights_gb == pytest.approx(TINY * 4 / 4 / GB)
        assert z3["policy"].optimizer_gb == pytest.approx(TINY * 8 / 4 / GB)
        assert z3["reference"].weights_gb == pytest.approx(TINY * 4 / GB)  # frozen roles stay whole
    bf16 = {r.role: r for r in estimate("preset:tiny", "sft", "zero3", 2, seq_len=8, bf16=True)}
    assert bf16["policy"].weights_gb == pytest.approx(TINY * 2 / 2 / GB)
    assert bf16["policy"].optimizer_gb == pytest.approx(TINY * 12 / 2 / GB)  # fp32 master + 2 moments


def test_lora_shares_one_base():
    rows = {r.role: r for r in estimate("preset:tiny", "ppo", "ddp", 1, lora_rank=8, seq_len=8)}
    assert rows["policy"].parameters == TINY + TINY_LORA8 and rows["policy"].trainable == TINY_LORA8
    assert rows["reference"].parameters == 0  # the base with adapters off
    assert rows["critic"].parameters == TINY_LORA8 + 256 and rows["critic"].trainable == TINY_LORA8 + 256
    assert rows["reward"].trainable == 0


def test_activation_formula():
    config = model_config("preset:tiny")
    s, b, h, a, L, V = 16, 2, 256, 4, 4, 1024
    layer16 = s * b * h * (34 + 5 * a * s / h)
    assert activation_bytes(config, b, s, False, True) == pytest.approx(L * layer16 + s * b * V * 4)
    assert activation_bytes(config, b, s, False, False, lm_head=False) == pytest.approx(2 * L * layer16)
    assert activation_bytes(config, b, s, True, True) == pytest.approx(L * 2 * s * b * h + layer16 + s * b * V * 4)


def test_command_prints_a_table(capsys):
    assert main(["estimate-memory", "preset:tiny", "--stage", "dpo", "--engine", "zero3",
                 "--num-processes", "2", "--seq-len", "64"]) == 0
    out = capsys.readouterr().out
    assert "engine zero3 x 2" in out and "policy" in out and "reference" in out and "total" in out
    with pytest.raises(SystemExit):
        main(["estimate-memory", "preset:tiny", "--engine", "zero9"])
