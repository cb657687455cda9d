"""Engine detection: what a launch asks for, what accelerate set up, and the rule that a launch
rlhfkit cannot honour is an error, never a silent fallback to another engine (accelerate itself
drops a DeepSpeed or FSDP config under `Accelerator(cpu=True)`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ACCEL, REPO, launch, launch_env

from rlhfkit.errors import ConfigError
from rlhfkit.train.engine import Engine, check_engine, check_supported, deepspeed_stage, requested_engine


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory) -> Path:
    from rlhfkit.tasks import get_task

    path = tmp_path_factory.mktemp("data") / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in get_task("sentiment").make("sft", 64, seed=0)))
    return path


def test_requested_engine_from_launch_environment(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    assert requested_engine({}) == "single"
    assert requested_engine({"WORLD_SIZE": "1"}) == "single"
    assert requested_engine({"WORLD_SIZE": "2"}) == "ddp"
    assert requested_engine({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ds),
                             "WORLD_SIZE": "2"}) == "zero3"
    # the JSON's stage wins over the accelerate field; the field serves when there is no JSON
    assert deepspeed_stage({"ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ds), "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}) == 3
    assert requested_engine({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}) == "zero2"
    assert requested_engine({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}) == "fsdp2"
    assert requested_engine({"ACCELERATE_USE_FSDP": "true"}) == "fsdp1"
    with pytest.raises(ConfigError, match="ZeRO stage"):
        requested_engine({"ACCELERATE_USE_DEEPSPEED": "true"})
    with pytest.raises(ConfigError, match="cannot be read"):
        requested_engine({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(tmp_path / "x")})


def test_shipped_deepspeed_configs_name_their_stage():
    for name, stage in (("zero2", 2), ("zero3", 3), ("zero3_offload", 3)):
        assert deepspeed_stage({"ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ACCEL / f"{name}.json")}) == stage
        assert f"configs/accelerate/{name}.json" in (ACCEL / f"{name}.yaml").read_text()


def test_unsupported_engine_or_stage_is_an_error():
    for stage in ("pt", "sft", "rm", "dpo", "kto", "ppo", "grpo", "rloo", "online_dpo", "xpo", "nash_md", "spin", "self_reward"):
        check_supported("single", stage)
        check_supported("ddp", stage)
        for engine in ("zero2", "zero3", "fsdp2"):
            check_supported(engine, stage)
    for stage in ("a_new_stage",):  # a stage not (yet) tested under the sharded engines is refused
        with pytest.raises(ConfigError, match=f"stage '{stage}' cannot run under engine 'zero3'"):
            check_supported("zero3", stage)
        with pytest.raises(ConfigError, match=f"stage '{stage}' cannot run under engine 'fsdp2'"):
            check_supported("fsdp2", stage)
    for engine in ("zero1", "fsdp1", "megatron"):
        with pytest.raises(ConfigError, match="does not support"):
            check_supported(engine, "sft")


def test_merged_lora_under_zero3_or_fsdp2_is_refused():
    from rlhfkit.config import build_config
    from rlhfkit.train.engine import check_config

    def config(**kw):
        return build_config("sft", dict(dataset="x.jsonl", output_dir="o", finetuning_type="lora", **kw))

    for engine in ("ddp", "zero2", "zero3", "fsdp2"):
        check_config(engine, config(model_name_or_path="some/dir"))
    for engine in ("ddp", "zero2"):
        check_config(engine, config(model_name_or_path="preset:tiny"))
        check_config(engine, config(model_name_or_path="some/dir", merge_lora=True))
    for engine in ("zero3", "fsdp2"):
        for kw in (dict(model_name_or_path="preset:tiny"), dict(model_name_or_path="some/dir", merge_lora=True)):
            with pytest.raises(ConfigError, match="LoRA with a merged save"):
                check_config(engine, config(**kw))


def test_bf16_sampling_under_zero3_or_fsdp2_is_refused():
    from rlhfkit.config import build_config
    from rlhfkit.train.engine import check_config

    config = build_config("grpo", dict(model_name_or_path="some/dir", dataset="x.jsonl", output_dir="o",
                                       reward_funcs=["exact_answer"], sampling_dtype="bfloat16",
                                       rollout_batch_size=4, num_generations=4, per_device_train_batch_size=8))
    for engine in ("single", "ddp", "zero2"):
        check_config(engine, config)
    for engine in ("zero3", "fsdp2"):
        with pytest.raises(ConfigError, match=f"sampling_dtype: bfloat16 under engine '{engine}'"):
            check_config(engine, config)


def test_an_engine_other_than_the_one_asked_for_is_an_error():
    check_engine("zero3", Engine("zero3", "DEEPSPEED", 2))
    with pytest.raises(ConfigError, match="asks for engine 'zero3' but accelerate set up 'ddp'"):
        check_engine("zero3", Engine("ddp", "MULTI_CPU", 2))


def _config(tmp_path, data_file, stage: str = "sft") -> Path:
    cfg = tmp_path / f"{stage}.yaml"
    extra = "task: sentiment\nreward_funcs: [gold]\n" if stage == "ppo" else ""
    cfg.write_text(f"model_name_or_path: preset:tiny\ndataset: {data_file}\nmax_length: 32\nmax_steps: 1\n"
                   f"report_to: []\ndisable_tqdm: true\noutput_dir: {tmp_path / 'out'}\n{extra}")
    return cfg


def test_deepspeed_launch_dropped_by_accelerate_is_an_error_not_ddp(sft_file, tmp_path):
    """2 processes asking for ZeRO-3 while accelerate is told to use the CPU (`ACCELERATE_USE_CPU`, as
    `Accelerator(cpu=True)` did in rlhfkit before): accelerate drops the DeepSpeed plugin and sets up
    MULTI_CPU data parallel; rlhfkit refuses to train on it."""
    env = launch_env(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_USE_CPU="true",
                     ACCELERATE_DEEPSPEED_CONFIG_FILE=str(ACCEL / "zero3.json"))
    proc = launch("sft", _config(tmp_path, sft_file), env=env, check=False, timeout=300)
    assert proc.returncode != 0
    assert ("asks for engine 'zero3' but accelerate set up 'ddp'" in proc.stderr
            or "deepspeed is not installed" in proc.stderr), proc.stderr[-2000:]
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


@pytest.mark.parametrize("accelerate_env, stage, message", [
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "ppo", "'fsdp1', which rlhfkit does not support"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "sft", "'fsdp1', which rlhfkit does not support"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "1"}, "ppo",
     "'zero1', which rlhfkit does not support"),
])
def test_unhonourable_launch_fails_before_training(sft_file, tmp_path, accelerate_env, stage, message):
    """The launch environment accelerate sets for an FSDP config, or a DeepSpeed config for a stage
    without a DeepSpeed path: an error before any model loads (no process group needed)."""
    proc = subprocess.run([sys.executable, "-m", "rlhfkit", stage, str(_config(tmp_path, sft_file, stage))],
                          env=launch_env(**accelerate_env), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]


def test_single_process_run_records_its_engine(sft_file, tmp_path):
    from rlhfkit.config import build_config
    from rlhfkit.train.sft import train_sft

    config = build_config("sft", dict(model_name_or_path="preset:tiny", dataset=str(sft_file), max_length=32,
                                      max_steps=1, report_to=[], disable_tqdm=True, output_dir=str(tmp_path)))
    result = train_sft(config)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["engine"], summary["world_size"], summary["distributed_type"]) == ("single", 1, "NO")
    assert result.summary["engine"] == "single"


def test_accelerate_launch_configs_load():
    """Every configs/accelerate/*.yaml is a config accelerate itself loads, asking for its engine."""
    from accelerate.commands.config.config_args import load_config_from_file

    expected = {"ddp": "MULTI_GPU", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED", "zero3_offload": "DEEPSPEED",
                "fsdp2": "FSDP"}
    assert sorted(p.stem for p in ACCEL.glob("*.yaml")) == sorted(expected)
    for name, dtype in expected.items():
        config = load_config_from_file(str(ACCEL / f"{name}.yaml"))
        assert str(getattr(config.distributed_type, "value", config.distributed_type)) == dtype, name
        assert config.num_processes == 2
    assert load_config_from_file(str(ACCEL / "fsdp2.yaml")).fsdp_config["fsdp_version"] == 2


def test_more_processes_than_gpus_is_a_clear_error(monkeypatch):
    """Seen on a 1-GPU machine: torchrun --nproc_per_node 2 died in the launch with 'invalid device
    ordinal'. Now a ConfigError says why and what to do; CPU processes are unaffected."""
    import torch

    from rlhfkit.train.engine import check_gpu_count

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"2 processes on this machine but 1 GPU\(s\) visible.*CUDA_VISIBLE_DEVICES="):
        check_gpu_count(on_cpu=False)
    check_gpu_count(on_cpu=True)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    check_gpu_count(on_cpu=False)
