"""Typed, documented configs: one class per stage, built from shared parts.

Every field carries a docstring (shown by `rlhfkit STAGE --help-config`). Unknown keys, wrong
types, missing values and impossible combinations raise `ConfigError` naming the key, the value
and a hint, before any model or data is loaded. Key names follow Hugging Face / TRL /
LLaMA-Factory so that users' habits carry over.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from rlhfkit.errors import ConfigError

DatasetFormat = Literal[
    "text", "alpaca", "messages", "prompt", "prompt_completion", "preference", "ranking", "unpaired"
]


class BaseConfig(BaseModel):
    """Keys shared by every training stage."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)

    # ---- model -------------------------------------------------------------------------------
    model_name_or_path: str
    """A local Hugging Face model directory, a hub id (needs internet), a `.gguf` file, or
    `preset:NAME` (e.g. `preset:tiny`): a randomly initialised model whose tokenizer is trained
    on this run's own data."""
    tokenizer_name_or_path: str | None = None
    """Tokenizer to load when it differs from `model_name_or_path`."""
    gguf_file: str | None = None
    """GGUF file name inside `model_name_or_path` (a directory or hub repo)."""
    trust_remote_code: bool = False
    """Allow model code from the hub to run. Off by default (security)."""
    chat_template: str | None = None
    """A Jinja chat template overriding the tokenizer's (default: the tokenizer's own, or
    rlhfkit's ChatML template when it has none)."""

    # ---- data --------------------------------------------------------------------------------
    dataset: str | list[str]
    """Training data: a file (.json/.jsonl/.csv/.parquet), a list of files (mixed), a dataset
    saved with `save_to_disk`, or a hub id (needs internet). `name:split` selects a split."""
    dataset_format: DatasetFormat | None = None
    """Row format; detected from the columns when omitted."""
    column_map: dict[str, str] = {}
    """Rename columns before format detection: `{their_name: our_name}`."""
    eval_dataset: str | list[str] | None = None
    """Held-out data, same forms as `dataset`."""
    val_size: float = 0.0
    """Split this much off the training data for evaluation: a fraction (< 1) or a row count."""
    max_samples: int | None = None
    """Use at most this many training rows (after shuffling with `seed`)."""
    max_length: int = 512
    """Maximum tokens per example (prompt + response)."""

    # ---- output ------------------------------------------------------------------------------
    output_dir: str
    """Where the run writes config.yaml, metrics.jsonl, TensorBoard events, plots, summary.json,
    checkpoints and the final model."""
    overwrite_output_dir: bool = False
    """Allow writing into a non-empty `output_dir` that holds a finished run."""

    # ---- optimisation ------------------------------------------------------------------------
    max_steps: int = -1
    """Optimizer steps to train for; -1 derives it from `num_train_epochs`."""
    num_train_epochs: float = 1.0
    """Passes over the training data (used when `max_steps` is -1)."""
    per_device_train_batch_size: int = 8
    """Examples per device per micro-batch."""
    per_device_eval_batch_size: int = 16
    """Examples per device per evaluation batch."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step. Global batch = per_device x accumulation x processes."""
    learning_rate: float = 5e-5
    """Peak learning rate (AdamW)."""
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    """Learning-rate schedule after warmup."""
    warmup_ratio: float = 0.0
    """Fraction of the steps spent warming up linearly from 0."""
    warmup_steps: int = 0
    """Warmup steps; overrides `warmup_ratio` when > 0."""
    weight_decay: float = 0.0
    """AdamW weight decay (not applied to biases and norms)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 disables clipping)."""
    seed: int = 42
    """Seed for initialisation, shuffling, dropout and sampling."""

    # ---- logging, evaluation, checkpoints -----------------------------------------------------
    logging_steps: int = 10
    """Log training metrics every this many optimizer steps."""
    eval_steps: int | None = None
    """Evaluate every this many steps (needs `eval_dataset` or `val_size`); always at the end."""
    save_steps: int | None = None
    """Write a resumable checkpoint every this many steps."""
    save_total_limit: int | None = 2
    """Keep at most this many checkpoints (oldest deleted first); None keeps all."""
    resume_from_checkpoint: str | bool | None = None
    """A checkpoint directory, or `true` for the latest one in `output_dir`."""
    disable_tqdm: bool | None = None
    """Hide progress bars (default: shown only on a terminal)."""
    report_to: list[Literal["tensorboard"]] = ["tensorboard"]
    """Loggers besides metrics.jsonl; [] for none."""

    # ---- parameter-efficient fine-tuning and precision ---------------------------------------
    finetuning_type: Literal["full", "lora"] = "full"
    """`full` trains every weight; `lora` trains low-rank adapters (peft)."""
    lora_rank: int = 8
    """LoRA rank r."""
    lora_alpha: float = 16
    """LoRA scaling numerator (scale = alpha / r)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input (0: deterministic, as RLHF needs)."""
    lora_target: str | list[str] = "all-linear"
    """Modules to adapt: `all-linear` or a list of module names (e.g. [q_proj, v_proj])."""
    merge_lora: bool = False
    """Also save the LoRA adapter merged into the base weights (`output_dir/merged`)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    bf16: bool = False
    """Train with bfloat16 autocast (weights and optimizer stay fp32)."""

    # ---- built-in task evaluation ------------------------------------------------------------
    task: str | None = None
    """Name of a built-in task (e.g. `sentiment`): enables gold-reward evaluation of samples."""
    eval_num_prompts: int = 64
    """Held-out prompts sampled for gold-reward evaluation (with `task`)."""
    max_new_tokens: int = 32
    """Tokens generated per prompt in evaluation and reports."""

    @model_validator(mode="after")
    def _check_combinations(self) -> "BaseConfig":
        problems = []
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            problems.append("set max_steps > 0 or num_train_epochs > 0")
        if self.eval_dataset is not None and self.val_size > 0:
            problems.append("give either eval_dataset or val_size, not both")
        if self.val_size < 0:
            problems.append(f"val_size must be >= 0, got {self.val_size}")
        if self.val_size >= 1 and self.val_size != int(self.val_size):
            problems.append(f"val_size >= 1 is a row count and must be whole, got {self.val_size}")
        for key in ("per_device_train_batch_size", "per_device_eval_batch_size",
                    "gradient_accumulation_steps", "logging_steps", "max_length", "lora_rank"):
            if getattr(self, key) < 1:
                problems.append(f"{key} must be >= 1, got {getattr(self, key)}")
        for key in ("eval_steps", "save_steps"):
            value = getattr(self, key)
            if value is not None and value < 1:
                problems.append(f"{key} must be >= 1 (or null), got {value}")
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.lora_dropout < 1:
            problems.append(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.learning_rate < 0:
            problems.append(f"learning_rate must be >= 0, got {self.learning_rate}")
        if self.eval_steps is not None and self.eval_dataset is None and self.val_size == 0:
            problems.append("eval_steps needs eval_dataset or val_size > 0 to evaluate on")
        if self.merge_lora and self.finetuning_type != "lora":
            problems.append("merge_lora: true needs finetuning_type: lora")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class PTConfig(BaseConfig):
    """`rlhfkit pt`: causal language modelling on raw text."""

    dataset_format: DatasetFormat | None = "text"
    """Row format; `text` (a `text` column) for pretraining."""
    packing: bool = True
    """Concatenate documents (each ending with EOS) and cut into `max_length` blocks."""
    learning_rate: float = 1e-3
    """Peak learning rate (AdamW)."""


class SFTConfig(BaseConfig):
    """`rlhfkit sft`: supervised fine-tuning; loss on assistant replies only."""

    learning_rate: float = 2e-5
    """Peak learning rate (AdamW)."""


STAGES: dict[str, type[BaseConfig]] = {"pt": PTConfig, "sft": SFTConfig}


def register_stage(name: str, config_cls: type[BaseConfig]) -> None:
    """Later stages (rm, dpo, ppo, ...) add their config class here."""
    STAGES[name] = config_cls


# ---- loading -----------------------------------------------------------------------------------

def _suggest(key: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(key, choices, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`key=value` strings from the command line; values parsed as YAML (`lr=1e-4`, `x=[a,b]`)."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"command-line override '{item}' is not of the form key=value")
        key, value = item.split("=", 1)
        key = key.strip().lstrip("-").replace("-", "_")
        try:
            out[key] = yaml.safe_load(value) if value != "" else None
        except yaml.YAMLError:
            out[key] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of key: value, got {type(data).__name__}")
    return data


def build_config(stage: str, values: dict[str, Any], source: str = "config") -> BaseConfig:
    """Validate `values` for `stage`; raise one ConfigError listing every problem."""
    if stage not in STAGES:
        raise ConfigError(f"unknown stage '{stage}'{_suggest(stage, list(STAGES))}; "
                          f"choose one of {', '.join(STAGES)}")
    cls = STAGES[stage]
    fields = list(cls.model_fields)
    problems = []
    for key in values:
        if key not in cls.model_fields:
            problems.append(f"unknown key '{key}'{_suggest(key, fields)}")
    if problems:
        raise ConfigError(f"{source} ({stage}): " + "; ".join(problems))
    try:
        return cls(**values)
    except ValidationError as e:
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"])
            if err["type"] == "missing":
                problems.append(f"missing required key '{loc}': {cls.model_fields[loc].description}")
            elif not loc:
                problems.append(err["msg"].removeprefix("Value error, "))
            else:
                value = values.get(str(err["loc"][0]), err.get("input"))
                problems.append(f"key '{loc}' = {value!r}: {err['msg']}")
        raise ConfigError(f"{source} ({stage}): " + "; ".join(dict.fromkeys(problems))) from None


def load_config(stage: str, path: str | Path | None, overrides: list[str] | None = None) -> BaseConfig:
    """Read a YAML config, apply `key=value` overrides, validate for `stage`."""
    values = read_yaml(path) if path else {}
    values.update(parse_overrides(overrides or []))
    return build_config(stage, values, source=str(path) if path else "command line")


def describe_config(cls: type[BaseConfig]) -> str:
    """Human-readable list of keys, defaults and docstrings (for --help-config)."""
    lines = [f"{cls.__name__}: {cls.__doc__ or ''}".strip()]
    for name, field in cls.model_fields.items():
        default = "(required)" if field.is_required() else f"= {field.default!r}"
        lines.append(f"  {name} {default}\n      {(field.description or '').replace(chr(10), ' ')}")
    return "\n".join(lines)


def dump_config(config: BaseConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
