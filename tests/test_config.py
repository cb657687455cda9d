"""Configs: typed, documented, loud about mistakes; every example config under configs/ validates.

Example configs name their stage in a comment line at the top, `# stage: NAME`, and reference
built-in task data as `data/<task>/<kind>_<split>.jsonl`, the files written by
`rlhfkit data TASK data/<task>`. Any other relative dataset path must exist in the repository.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import re
from pathlib import Path

import pytest
import yaml

import rlhfkit
from rlhfkit.config import (
    STAGES,
    BaseConfig,
    SFTConfig,
    build_config,
    describe_config,
    load_config,
    parse_overrides,
    read_yaml,
)
from rlhfkit.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
# configs/accelerate/ holds accelerate launch configs (tests/test_engine.py) and pipeline_*.yaml are
# `rlhfkit pipeline` configs (several stages, tests/test_pipeline.py): not single-stage configs
CONFIGS = sorted(p for p in (REPO / "configs").glob("**/*.yaml")
                 if "accelerate" not in p.relative_to(REPO).parts and not p.name.startswith("pipeline_"))
BASE = {"model_name_or_path": "preset:tiny", "dataset": "data/sentiment/sft_train.jsonl", "output_dir": "runs/x"}
_STAGE_LINE = re.compile(r"^#\s*stage:\s*([A-Za-z0-9_-]+)\s*$")


def register_all_stages() -> dict[str, type[BaseConfig]]:
    """Import every rlhfkit module so that stages registered with `register_stage` appear."""
    for info in pkgutil.walk_packages(rlhfkit.__path__, "rlhfkit."):
        importlib.import_module(info.name)
    return STAGES


def config_stage(path: Path) -> str:
    """The stage named by the `# stage: NAME` comment in the file's leading comment block."""
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        if not line.startswith("#"):
            break
        if m := _STAGE_LINE.match(line.strip()):
            return m.group(1)
    raise AssertionError(f"{path}: no '# stage: NAME' comment at the top of the file")


def _error(stage: str, **values) -> str:
    with pytest.raises(ConfigError) as err:
        build_config(stage, values)
    return str(err.value)


# ---- helpful errors ----------------------------------------------------------------------------------

def test_valid_config_builds_with_documented_defaults():
    config = build_config("sft", dict(BASE))
    assert isinstance(config, SFTConfig)
    assert config.learning_rate == 2e-5 and config.finetuning_type == "full"


def test_unknown_key_suggests_the_right_one():
    msg = _error("sft", **BASE, learning_rat=1e-4)
    assert "unknown key 'learning_rat'" in msg and "did you mean 'learning_rate'" in msg


def test_several_unknown_keys_are_all_named():
    msg = _error("sft", **BASE, learning_rat=1e-4, zzz_not_a_key=1)
    assert "learning_rat" in msg and "zzz_not_a_key" in msg


def test_wrong_type_names_key_and_value():
    msg = _error("sft", **BASE, learning_rate="fast")
    assert "learning_rate" in msg and "'fast'" in msg
    msg = _error("sft", **BASE, finetuning_type="qlora")
    assert "finetuning_type" in msg and "'qlora'" in msg and "lora" in msg


@pytest.mark.parametrize("native", [True, False])
def test_bf16_auto_is_bf16_where_the_hardware_has_it(monkeypatch, native):
    """`bf16: auto` becomes true or false when the config is loaded, from the device's bf16 support
    (emulated bf16 on a CPU without AVX512-BF16 / AMX measured ~60x slower than fp32); true and false
    stay as written, and another word is an error that names the key."""
    import rlhfkit.train.loop as loop

    monkeypatch.setattr(loop, "bf16_is_native", lambda: native)
    assert build_config("sft", {**BASE, "bf16": "auto"}).bf16 is native
    assert build_config("sft", {**BASE, "bf16": "AUTO"}).bf16 is native
    assert build_config("sft", {**BASE, "bf16": True}).bf16 is True
    assert build_config("sft", {**BASE, "bf16": False}).bf16 is False
    msg = _error("sft", **BASE, bf16="sometimes")
    assert "bf16" in msg and "'sometimes'" in msg


def test_missing_required_key_is_named_with_its_docstring():
    values = dict(BASE)
    del values["output_dir"]
    msg = _error("sft", **values)
    assert "missing required key 'output_dir'" in msg
    assert "config.yaml" in msg  # the field's docstring explains it


@pytest.mark.parametrize("values, expected", [
    ({"eval_dataset": "data/sentiment/sft_eval.jsonl", "val_size": 0.1}, "either eval_dataset or val_size"),
    ({"eval_steps": 10}, "eval_steps needs eval_dataset or val_size"),
    ({"merge_lora": True}, "merge_lora: true needs finetuning_type: lora"),
    ({"max_steps": 0, "num_train_epochs": 0}, "max_steps > 0 or num_train_epochs > 0"),
    ({"max_steps": -1, "num_train_epochs": -1.0}, "max_steps > 0 or num_train_epochs > 0"),
    ({"val_size": 2.5}, "whole"),
    ({"per_device_train_batch_size": 0}, "per_device_train_batch_size must be >= 1"),
    ({"warmup_ratio": 1.0}, "warmup_ratio"),
    ({"num_shards": 2, "shard_index": 2}, "shard_index must be in [0, num_shards)"),
    ({"num_shards": 0}, "num_shards >= 1"),
])
def test_impossible_combinations_raise(values, expected):
    assert expected in _error("sft", **{**BASE, **values})


def test_possible_combinations_pass():
    build_config("sft", {**BASE, "eval_steps": 10, "val_size": 0.1})
    build_config("sft", {**BASE, "eval_steps": 10, "eval_dataset": "data/sentiment/sft_eval.jsonl"})
    build_config("sft", {**BASE, "merge_lora": True, "finetuning_type": "lora"})
    build_config("sft", {**BASE, "max_steps": 5, "num_train_epochs": 0})


def test_unknown_stage_suggests():
    with pytest.raises(ConfigError, match="did you mean 'sft'"):
        build_config("stf", dict(BASE))


# ---- YAML and overrides ----------------------------------------------------------------------------

def test_overrides_are_parsed_as_yaml(tmp_path):
    parsed = parse_overrides(["lora_target=[q_proj,v_proj]", "max_steps=5", "bf16=true", "--seed=3",
                              "eval_dataset=", "output_dir=a=b"])
    assert parsed["lora_target"] == ["q_proj", "v_proj"]
    assert parsed["max_steps"] == 5 and parsed["bf16"] is True and parsed["seed"] == 3
    assert parsed["eval_dataset"] is None and parsed["output_dir"] == "a=b"
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**BASE, "learning_rate": 1e-3}))
    config = load_config("sft", path, ["learning_rate=1e-4", "lora_target=[q_proj,v_proj]",
                                       "finetuning_type=lora"])
    assert isinstance(config.learning_rate, float) and config.learning_rate == pytest.approx(1e-4)
    assert config.lora_target == ["q_proj", "v_proj"] and config.finetuning_type == "lora"


def test_override_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["learning_rate"])


def test_override_unknown_key_names_the_command_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(BASE))
    with pytest.raises(ConfigError, match="did you mean 'learning_rate'"):
        load_config("sft", path, ["learning_rat=1e-4"])


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model_name_or_path: preset:tiny\noutput_dir: runs/x\ndataset: [a, b\nseed: 1\n")
    with pytest.raises(ConfigError) as err:
        read_yaml(path)
    msg = str(err.value)
    assert re.search(re.escape(str(path)) + r":\d+", msg), msg
    line = int(re.search(re.escape(str(path)) + r":(\d+)", msg).group(1))
    assert 3 <= line <= 5


def test_missing_or_non_mapping_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_yaml(tmp_path / "nope.yaml")
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        read_yaml(path)


# ---- documentation ----------------------------------------------------------------------------------

def test_every_field_of_every_stage_has_a_docstring():
    for stage, cls in register_all_stages().items():
        undocumented = [name for name, f in cls.model_fields.items() if not (f.description or "").strip()]
        assert not undocumented, f"{stage}: fields without a docstring: {undocumented}"
        text = describe_config(cls)
        assert "output_dir (required)" in text


# ---- example configs ----------------------------------------------------------------------------------

def test_example_configs_exist():
    """configs/**/*.yaml: at least one example config (each is validated below)."""
    assert len(CONFIGS) >= 1, f"no example configs found under {REPO / 'configs'}"


def _dataset_paths(values: dict) -> list[str]:
    out = []
    for key in ("dataset", "eval_dataset"):
        value = values.get(key)
        if value is None:
            continue
        out += [value] if isinstance(value, str) else list(value)
    return out


def _task_files() -> dict[str, set[str]]:
    """{task name: file names written by `rlhfkit data TASK DIR`}."""
    from rlhfkit.tasks import KINDS, task_names
    from rlhfkit.tasks.base import SPLITS

    from rlhfkit.tasks.reasoning_gym import RECOMMENDED_CONFIGS

    files = {f"{kind}_{split}.jsonl" for kind in KINDS for split in SPLITS} | {"task.json"}
    # `rlhfkit data reasoning-gym:NAME data/NAME` writes prompt files for a reasoning-gym dataset
    rg_files = {"prompt_train.jsonl", "prompt_eval.jsonl", "reasoning_gym.json"}
    return {**{name: files for name in task_names()}, **{name: rg_files for name in RECOMMENDED_CONFIGS}}


def check_example_config(path: Path, repo: Path = REPO) -> BaseConfig:
    """Validate `path` for the stage named by its `# stage: NAME` line, and its dataset paths:
    a relative path is either `data/<task>/<file>` written by `rlhfkit data <task> data/<task>`,
    or a file that exists relative to the repo root."""
    stages = register_all_stages()
    stage = config_stage(path)
    assert stage in stages, f"{path.name}: stage '{stage}' is not registered (known: {', '.join(stages)})"
    values = read_yaml(path)
    config = build_config(stage, values, source=str(path))
    task_files = _task_files()
    for spec in _dataset_paths(values):
        p = Path(spec)
        assert not (p.is_absolute() or spec.startswith("~")), (
            f"{path.name}: dataset {spec} must be relative to the repo root")
        if p.parts[0] == "data":
            assert len(p.parts) == 3 and p.parts[1] in task_files, (
                f"{path.name}: {spec} is not data/<task>/<file> for a built-in task "
                f"({', '.join(task_files)})")
            assert p.parts[2] in task_files[p.parts[1]], (
                f"{path.name}: `rlhfkit data {p.parts[1]}` writes no file named {p.parts[2]}")
        elif p.suffix:  # any other relative file must ship with the repo
            assert (repo / p).exists(), f"{path.name}: dataset {spec} does not exist"
    return config


def test_check_example_config_itself(tmp_path):
    good = tmp_path / "sft.yaml"
    good.write_text("# An example.\n# stage: sft\n\nmodel_name_or_path: preset:tiny\n"
                    "dataset: data/sentiment/sft_train.jsonl\neval_dataset: [data/arithmetic/sft_eval.jsonl]\n"
                    "output_dir: runs/sft\n")
    assert config_stage(good) == "sft"
    assert isinstance(check_example_config(good, tmp_path), SFTConfig)
    for bad, expected in [
        (good.read_text().replace("sft_train", "sft_tarin"), "writes no file"),
        (good.read_text().replace("data/sentiment", "data/nosuchtask"), "built-in task"),
        (good.read_text().replace("data/sentiment/sft_train.jsonl", "examples/x.jsonl"), "does not exist"),
        (good.read_text().replace("# stage: sft", "# stage: pt"), None),  # valid as pt too
    ]:
        path = tmp_path / "bad.yaml"
        path.write_text(bad)
        if expected is None:
            check_example_config(path, tmp_path)
            continue
        with pytest.raises(AssertionError, match=expected):
            check_example_config(path, tmp_path)
    nostage = tmp_path / "nostage.yaml"
    nostage.write_text("model_name_or_path: preset:tiny\n# stage: sft\n")
    with pytest.raises(AssertionError, match="stage: NAME"):
        config_stage(nostage)


# No configs yet -> one failing case (not an empty, skipped parametrization).
@pytest.mark.parametrize("path", CONFIGS or [None], ids=[str(p.relative_to(REPO)) for p in CONFIGS] or ["none"])
def test_example_config_validates(path):
    assert path is not None, "no example configs under configs/"
    check_example_config(path)


@pytest.mark.parametrize("stage", ["rm", "dpo", "kto", "ppo"])
def test_lora_dropout_is_an_error_where_forward_passes_must_be_deterministic(stage):
    extra = {"reward_model": "runs/rm"} if stage == "ppo" else {}
    message = _error(stage, **BASE, finetuning_type="lora", lora_dropout=0.1, **extra)
    assert f"({stage}): lora_dropout=0.1" in message
    assert "RLHF needs deterministic forward passes" in message and "log-probs" in message
    assert "lora_dropout: 0" in message
    assert build_config(stage, {**BASE, "finetuning_type": "lora", "lora_dropout": 0.0, **extra}).lora_dropout == 0


@pytest.mark.parametrize("stage", ["pt", "sft"])
def test_lora_dropout_is_a_training_regulariser_in_pt_and_sft(stage):
    assert build_config(stage, {**BASE, "finetuning_type": "lora", "lora_dropout": 0.1}).lora_dropout == 0.1
    assert "off in evaluation and generation" in describe_config(STAGES[stage])


def test_shards_are_disjoint_halves_of_the_training_rows(tmp_path):
    """num_shards / shard_index: the val_size rows are the same as without shards, and the shards
    partition the rest (a proxy and a judge reward model on disjoint halves)."""
    from rlhfkit.train.common import load_split

    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i}", "chosen": "a", "rejected": "b"}) + "\n" for i in range(25)))
    base = {"model_name_or_path": "m", "dataset": str(path), "output_dir": str(tmp_path / "o"), "val_size": 5,
            "seed": 3}
    whole_train, whole_val = load_split(build_config("rm", base), ("preference",))
    parts = [load_split(build_config("rm", {**base, "num_shards": 2, "shard_index": k}), ("preference",))
             for k in (0, 1)]
    prompts = [{r["prompt"] for r in train} for train, _ in parts]
    assert [r["prompt"] for r in parts[0][1]] == [r["prompt"] for r in whole_val] == [r["prompt"] for r in parts[1][1]]
    assert not prompts[0] & prompts[1] and sorted(map(len, prompts)) == [10, 10]
    assert prompts[0] | prompts[1] == {r["prompt"] for r in whole_train}
    with pytest.raises(ConfigError, match="leaves shard 0 without training rows"):
        load_split(build_config("rm", {**base, "val_size": 22, "num_shards": 4, "shard_index": 0}), ("preference",))
