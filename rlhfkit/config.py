"""Typed, documented configs: one class per stage, built from shared parts.

Every field carries a docstring (shown by `rlhfkit STAGE --help-config`). Unknown keys, wrong
types, missing values and impossible combinations raise `ConfigError` naming the key, the value
and a hint, before any model or data is loaded. Key names follow Hugging Face / TRL /
LLaMA-Factory so that users' habits carry over.
"""

from __future__ import annotations

import difflib
import re
import os
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from rlhfkit.errors import ConfigError

DatasetFormat = Literal[
    "text", "alpaca", "messages", "prompt", "prompt_completion", "preference", "ranking", "unpaired"
]


class BaseConfig(BaseModel):
    """Keys shared by every training stage."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)

    supports_lora_layers: ClassVar[bool] = True
    """The stage honours `lora_layers` (ppo does not yet)."""
    deterministic_forward: ClassVar[bool] = True
    """The stage needs deterministic forward passes (every preference and RL stage: a policy's and a
    reference's log-probs of the same sequence must agree, a reward must not depend on the pass):
    dropout is off everywhere, LoRA's included, and `lora_dropout > 0` is a config error. pt and
    sft set it False and keep `lora_dropout` as a training-time regulariser."""
    supports_4bit: ClassVar[bool] = False
    """The stage takes `load_in_4bit` (every stage: tested in tests/test_qlora.py)."""

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
    template: str | None = None
    """LLaMA-Factory's template name (`qwen`, `llama3`, `chatml`, `default`, ...; the list is
    `rlhfkit.data.templates.TEMPLATES`): use that chat template instead of the tokenizer's, and its
    end-of-turn marker as EOS when the tokenizer has it as one token. Not with `chat_template`."""

    # ---- data --------------------------------------------------------------------------------
    dataset: str | list[str]
    """Training data: a file (.json/.jsonl/.csv/.parquet), a list of files (mixed), a dataset
    saved with `save_to_disk`, or a hub id (needs internet). `name:split` selects a split."""
    dataset_dir: str | None = None
    """LLaMA-Factory: a directory holding `dataset_info.json`. When set, `dataset` and
    `eval_dataset` are names of its entries (a list or comma-separated), read with the entry's
    `file_name`, `formatting` (alpaca / sharegpt), `columns`, `tags` and `ranking`, and mapped onto
    the rows this stage trains on. Without it `dataset` is a path or hub id."""
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
    num_shards: int = 1
    """Split the training rows (after `val_size` is taken off, before `max_samples`) into this many
    disjoint shards of the `seed`-shuffled order and train on shard `shard_index` only: two reward
    models on disjoint halves of the same data (a proxy and a judge) are `num_shards: 2` with
    `shard_index: 0` and `1` (`datasets.Dataset.shard(num_shards, index, contiguous=True)` applied to
    the shuffled rows)."""
    shard_index: int = 0
    """Which of the `num_shards` shards to train on (0-based)."""
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
    """Warmup steps; overrides `warmup_ratio` when > 0. A value in (0, 1) is read as a ratio
    (as transformers >= 4.57 and LLaMA-Factory users do) and moved to `warmup_ratio`, with a note."""
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
    eval_strategy: Literal["no", "steps", "epoch"] | None = None
    """Hugging Face's name (also `evaluation_strategy`): `steps` evaluates every `eval_steps`
    (default: `logging_steps`), `epoch` at the end of every epoch (pt, sft, rm, dpo, kto), `no`
    only at the end of the run. None: every `eval_steps` when set."""
    save_steps: int | None = None
    """Write a resumable checkpoint every this many steps."""
    save_total_limit: int | None = 2
    """Keep at most this many checkpoints (oldest deleted first); None keeps all."""
    resume_from_checkpoint: str | bool | None = None
    """A checkpoint directory, or `true` for the latest one in `output_dir`."""
    disable_tqdm: bool | None = None
    """Hide progress bars (default: shown only on a terminal)."""
    report_to: str | list[str] = ["tensorboard"]
    """Experiment trackers besides metrics.jsonl (Hugging Face's convention: a name or a list):
    `tensorboard`, `wandb`, `mlflow`, `all` (tensorboard and every installed one of wandb, mlflow) or
    `none` / []. wandb and mlflow are optional extras (`pip install 'rlhfkit[wandb]'`); each gets the
    same metric names and the resolved config as parameters."""
    run_name: str | None = None
    """The run's name in wandb and mlflow (default: the name of `output_dir`)."""

    # ---- parameter-efficient fine-tuning and precision ---------------------------------------
    finetuning_type: Literal["full", "lora"] = "full"
    """`full` trains every weight; `lora` trains low-rank adapters (peft)."""
    lora_rank: int = 8
    """LoRA rank r."""
    lora_alpha: float = 16
    """LoRA scaling numerator (scale = alpha / r)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input. pt and sft only: a training-time regulariser, active in train mode
    and off in evaluation and generation (eval mode). rm, dpo, kto and ppo reject a value > 0: RLHF
    needs deterministic forward passes (the policy's and the reference's log-probs must agree)."""
    lora_target: str | list[str] = "all-linear"
    """Modules to adapt: `all-linear` or a list of module names (e.g. [q_proj, v_proj])."""
    lora_layers: int | None = None
    """With LoRA: adapt only the last N transformer layers (None: all). Backward then stops at the
    lowest adapted layer, so a step costs about (2 + 2 N / layers) / 4 of an all-layer step's FLOPs
    (a forward is 2 FLOPs per weight and token, LoRA's backward ~2 through the adapted part).
    Every stage but ppo (whose critic and reward adapters share the policy's base)."""
    merge_lora: bool = False
    """Also save the LoRA adapter merged into the base weights (`output_dir/merged`)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    load_in_4bit: bool = False
    """QLoRA: load the base model's linear layers in 4-bit NF4 (bitsandbytes, compute in fp32) and
    train LoRA adapters on top. Needs finetuning_type: lora and a saved model (not a preset, not
    GGUF); `pip install 'rlhfkit[qlora]'`. Every stage takes it under `single`/`ddp` (the reference
    is the 4-bit base with adapters off; ppo's critic and reward adapters share that base)."""
    bf16: bool = False
    """Train with bfloat16 autocast (weights and optimizer stay fp32). `auto`: bf16 where the
    hardware computes it natively (a GPU that supports it; a CPU with AVX512-BF16 or AMX), fp32
    elsewhere, decided when the config is loaded (the run's config.yaml holds the result). On a CPU
    without bf16 instructions autocast emulates it: matmuls measured ~60x slower than fp32 on an
    AVX2 CPU, so `bf16: true` there warns at start with the factor measured on that machine."""
    fp16: bool = False
    """float16 mixed precision is not implemented (it needs loss scaling in every loop). On a CPU,
    `fp16: true` trains in fp32 and says so at start (CPU autocast has no fp16 training path worth
    having); on a GPU it is an error that suggests `bf16: true`."""

    # ---- built-in task evaluation ------------------------------------------------------------
    task: str | None = None
    """Name of a built-in task (e.g. `sentiment`): enables gold-reward evaluation of samples."""
    eval_num_prompts: int = 64
    """Held-out prompts sampled for gold-reward evaluation (with `task`)."""
    max_new_tokens: int = 32
    """Tokens generated per prompt in evaluation and reports."""

    @field_validator("bf16", mode="before")
    @classmethod
    def _resolve_bf16(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() == "auto":
            from rlhfkit.train.loop import bf16_is_native

            return bf16_is_native()
        return value

    @model_validator(mode="after")
    def _check_combinations(self) -> "BaseConfig":
        problems = []
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            problems.append("set max_steps > 0 or num_train_epochs > 0")
        if self.eval_dataset is not None and self.val_size > 0:
            problems.append("give either eval_dataset or val_size, not both")
        if self.val_size < 0:
            problems.append(f"val_size must be >= 0, got {self.val_size}")
        if self.num_shards < 1 or not 0 <= self.shard_index < self.num_shards:
            problems.append(f"shard_index must be in [0, num_shards) and num_shards >= 1, got shard_index "
                            f"{self.shard_index}, num_shards {self.num_shards}")
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
        elif self.lora_dropout > 0 and self.deterministic_forward:
            problems.append(f"lora_dropout={self.lora_dropout}: this stage keeps every forward pass "
                            "deterministic (RLHF needs deterministic forward passes: the policy's and the "
                            "reference's log-probs of a sequence must agree and a reward must not change from "
                            "one pass to the next, which dropout breaks); set lora_dropout: 0 (pt and sft "
                            "accept it as a training-time regulariser)")
        if self.learning_rate < 0:
            problems.append(f"learning_rate must be >= 0, got {self.learning_rate}")
        if self.eval_steps is not None and self.eval_dataset is None and self.val_size == 0 and not self.task:
            problems.append("eval_steps needs eval_dataset or val_size > 0 (or a built-in `task`) to evaluate on")
        if self.merge_lora and self.finetuning_type != "lora":
            problems.append("merge_lora: true needs finetuning_type: lora")
        if self.lora_layers is not None:
            if self.lora_layers < 1 or self.finetuning_type != "lora":
                problems.append(f"lora_layers={self.lora_layers} needs finetuning_type: lora and a value >= 1")
            elif not self.supports_lora_layers:
                problems.append("lora_layers: not offered by this stage yet (its extra adapters share the "
                                "policy's layers); remove it")
        if self.dataset_dir is not None and self.column_map:
            problems.append("column_map does not apply with dataset_dir: the columns come from dataset_info.json")
        if self.fp16 and self.bf16:
            problems.append("give fp16 or bf16, not both")
        if self.template is not None and self.chat_template is not None:
            problems.append("give template (a LLaMA-Factory template name) or chat_template (Jinja), not both")
        if self.template is not None:
            from rlhfkit.data.templates import TEMPLATES

            if self.template not in TEMPLATES:
                problems.append(f"template '{self.template}' is not one rlhfkit knows"
                                f"{_suggest(self.template, list(TEMPLATES))}; known: {', '.join(TEMPLATES)} "
                                "(or leave it out to use the tokenizer's own chat template)")
        try:
            from rlhfkit.train.tracking import check_trackers

            check_trackers(self.trackers)
        except (ValueError, ConfigError) as e:
            problems.append(str(e))
        if self.load_in_4bit:
            if not self.supports_4bit:
                problems.append("load_in_4bit: this stage does not take a 4-bit base yet")
            if self.finetuning_type != "lora":
                problems.append("load_in_4bit: true needs finetuning_type: lora (QLoRA trains adapters on a "
                                "frozen 4-bit base)")
            if self.model_name_or_path.startswith("preset:") or self.gguf_file or \
                    str(self.model_name_or_path).endswith(".gguf"):
                problems.append("load_in_4bit: true needs a saved Hugging Face model directory or hub id "
                                "(not a preset or a GGUF file)")
            if self.merge_lora:
                problems.append("load_in_4bit: merge_lora would merge into a quantised base; merge the saved "
                                "adapter into the full-precision base instead")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def trackers(self) -> list[str]:
        """`report_to` resolved: a list of tracker names out of TRACKERS (`all` expanded to
        tensorboard and every installed optional tracker)."""
        names = [self.report_to] if isinstance(self.report_to, str) else list(self.report_to)
        if names in (["none"], ["None"]):
            return []
        out: list[str] = []
        for name in names:
            if name == "all":
                import importlib.util

                out += ["tensorboard"] + [t for t in ("wandb", "mlflow") if importlib.util.find_spec(t)]
            elif name in TRACKERS:
                out.append(name)
            else:
                raise ValueError(f"report_to: '{name}' is not a tracker rlhfkit supports{_suggest(name, TRACKERS)}; "
                                 f"choose from {', '.join(TRACKERS)}, all, none")
        return list(dict.fromkeys(out))


TRACKERS = ["tensorboard", "wandb", "mlflow"]


class PTConfig(BaseConfig):
    """`rlhfkit pt`: causal language modelling on raw text."""

    deterministic_forward: ClassVar[bool] = False
    supports_4bit: ClassVar[bool] = True

    dataset_format: DatasetFormat | None = "text"
    """Row format; `text` (a `text` column) for pretraining."""
    packing: bool = True
    """Concatenate documents (each ending with EOS) and cut into `max_length` blocks."""
    learning_rate: float = 1e-3
    """Peak learning rate (AdamW)."""


class SFTConfig(BaseConfig):
    """`rlhfkit sft`: supervised fine-tuning; loss on assistant replies only."""

    deterministic_forward: ClassVar[bool] = False
    supports_4bit: ClassVar[bool] = True

    learning_rate: float = 2e-5
    """Peak learning rate (AdamW)."""


DPOLossType = Literal["sigmoid", "robust", "hinge", "ipo", "simpo", "orpo"]


class _ReferenceConfig(BaseConfig):
    """Keys shared by the offline preference stages (dpo, kto): beta, the reference, truncation."""

    supports_4bit: ClassVar[bool] = True

    learning_rate: float = 1e-6
    """Peak learning rate (AdamW). Preference losses need small steps: 5e-7-1e-6 for full
    fine-tuning of a real model, ~1e-5-5e-5 for LoRA (TRL's default is 1e-6)."""
    beta: float = 0.1
    """Inverse temperature of the implicit reward beta * log(pi / pi_ref): larger keeps the
    policy closer to the reference."""
    ref_model: str | None = None
    """Reference model (path, hub id, .gguf); default `model_name_or_path`. Under LoRA the default
    reference is the base with adapters disabled (no second copy in memory)."""
    precompute_ref_log_probs: bool = False
    """Compute the reference log-probs of every example once before training (batched, cached in
    `output_dir/ref_logps.pt`; a resumed run reuses the cache) instead of keeping a frozen
    reference model in memory."""
    max_prompt_length: int | None = None
    """Keep at most this many prompt tokens (the END of the prompt); the response then keeps its
    first `max_length - prompt tokens` tokens. None: only `max_length` applies."""
    padding_free: bool = True
    """Forward passes on packed sequences: a batch's sequences share rows (block-diagonal causal
    attention from their position ids) instead of being padded to the longest, so no compute is
    spent on pads, and the sequences of one example (a pair's chosen and rejected; KTO's completion
    and mismatched completion in the reference pass) share one pass over their common prompt
    (a 4D mask; SDPA and eager attention, other kernels pack without sharing). Checked at start
    against the padded forward on a few training examples; a model whose attention ignores packed
    position ids or the mask falls back to padding with a warning. False: pad every sequence to the
    batch's longest. Either way the LM head only runs where a response token is scored."""

    @model_validator(mode="after")
    def _check_reference(self) -> "_ReferenceConfig":
        problems = []
        if self.beta <= 0:
            problems.append(f"beta must be > 0, got {self.beta}")
        if self.max_prompt_length is not None and not 1 <= self.max_prompt_length < self.max_length:
            problems.append(f"max_prompt_length must be in [1, max_length={self.max_length}), "
                            f"got {self.max_prompt_length}: it must leave room for the response")
        if problems:
            raise ValueError("; ".join(problems))
        return self


def label_smoothing_problems(e: float, loss_types: list[str]) -> list[str]:
    """label_smoothing e applies to sigmoid (cDPO, [0, 0.5]) and robust ([0, 0.5)); dpo and online_dpo."""
    if not e:
        return []
    if not set(loss_types) & {"sigmoid", "robust"}:
        return [f"label_smoothing={e} only applies to sigmoid and robust, not {loss_types}"]
    if "robust" in loss_types and not 0 <= e < 0.5:
        return [f"label_smoothing must be in [0, 0.5) for robust, got {e} (the loss divides by 1 - 2 label_smoothing)"]
    if not 0 <= e <= 0.5:
        return [f"label_smoothing must be in [0, 0.5], got {e}"]
    return []


class DPOConfig(_ReferenceConfig):
    """`rlhfkit dpo`: direct preference optimisation (DPO and its family) on preference pairs."""

    loss_type: DPOLossType | list[DPOLossType] = "sigmoid"
    """`sigmoid` (DPO; cDPO with label_smoothing), `robust`, `hinge` (SLiC), `ipo`, `simpo`
    (average log-probs, margin simpo_gamma, no reference), `orpo` (odds ratio + NLL, no
    reference), or a list of them combined with `loss_weights`."""
    loss_weights: list[float] | None = None
    """Weights of the loss types when `loss_type` is a list (default 1 each)."""
    label_smoothing: float = 0.0
    """Assumed share of flipped labels e for `sigmoid` (cDPO, in [0, 0.5]) and `robust` (< 0.5)."""
    reference_free: bool = False
    """Use a uniform reference (log-ratios become log-probs): no reference model at all."""
    simpo_gamma: float = 0.5
    """SimPO target reward margin gamma."""
    orpo_lambda: float = 0.1
    """ORPO weight lambda of the odds-ratio term next to the NLL of the chosen response."""
    sft_weight: float = 0.0
    """Weight of an added NLL term on the chosen response (RPO); 0 disables it."""

    @property
    def loss_types(self) -> list[str]:
        return [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)

    @model_validator(mode="after")
    def _check_dpo(self) -> "DPOConfig":
        problems = []
        types = self.loss_types
        if not types:
            problems.append("loss_type must name at least one loss")
        if len(set(types)) != len(types):
            problems.append(f"loss_type {types} lists a loss twice")
        if self.loss_weights is not None:
            if isinstance(self.loss_type, str):
                problems.append("loss_weights needs loss_type to be a list, e.g. loss_type: [sigmoid, ipo]")
            elif len(self.loss_weights) != len(types):
                problems.append(f"loss_weights has {len(self.loss_weights)} weights for {len(types)} "
                                f"loss types {types}")
            elif any(w < 0 for w in self.loss_weights):
                problems.append(f"loss_weights must be >= 0, got {self.loss_weights}")
        problems += label_smoothing_problems(self.label_smoothing, types)
        if self.sft_weight < 0:
            problems.append(f"sft_weight must be >= 0, got {self.sft_weight}")
        if self.orpo_lambda < 0:
            problems.append(f"orpo_lambda must be >= 0, got {self.orpo_lambda}")
        uses_reference = not self.reference_free and any(t not in ("simpo", "orpo") for t in types)
        if self.precompute_ref_log_probs and not uses_reference:
            problems.append(f"precompute_ref_log_probs: true but loss_type {types} with reference_free="
                            f"{self.reference_free} uses no reference model; drop precompute_ref_log_probs")
        if self.ref_model is not None and not uses_reference:
            problems.append(f"ref_model is set but loss_type {types} with reference_free={self.reference_free} "
                            "uses no reference model")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class KTOConfig(_ReferenceConfig):
    """`rlhfkit kto`: KTO on unpaired (prompt, completion, label) data; preference pairs become
    one desirable and one undesirable example each."""

    desirable_weight: float = 1.0
    """Loss weight w_D of desirable examples. Aim for w_D n_D / (w_U n_U) in [1, 4/3]."""
    undesirable_weight: float = 1.0
    """Loss weight w_U of undesirable examples."""

    @model_validator(mode="after")
    def _check_kto(self) -> "KTOConfig":
        problems = [f"{k} must be > 0, got {getattr(self, k)}"
                    for k in ("desirable_weight", "undesirable_weight") if getattr(self, k) <= 0]
        if problems:
            raise ValueError("; ".join(problems))
        return self


class RMConfig(BaseConfig):
    """`rlhfkit rm`: a reward model (scalar head on the SFT backbone) trained on preference pairs
    (Bradley-Terry) or rankings (Plackett-Luce), then normalised on reference responses."""

    supports_4bit: ClassVar[bool] = True

    learning_rate: float = 1e-5
    """Peak learning rate (AdamW). ~1e-5 for full fine-tuning of a real model, ~1e-4 for LoRA,
    ~1e-3 for the tiny preset."""
    max_prompt_length: int | None = None
    """Keep at most this many prompt tokens (the END of the prompt); the response then keeps its
    first `max_length - prompt tokens` tokens. None: only `max_length` applies."""
    center_rewards_coefficient: float | None = None
    """Weight of the reward-centering penalty coef * (sum of a row's rewards)^2 (Eisenstein et al.
    2023; 0.01 is a common value). None/0 disables it."""
    length_decorrelation_coefficient: float | None = None
    """Weight of coef * rho^2, rho the Pearson correlation of reward and response length over each
    micro-batch's responses (the single-head correlation term of ODIN, Chen et al. 2024): a reward
    that counts tokens is a known way RLHF fails. None/0 disables it; eval's `length_corr` shows
    the effect."""
    normalize_std: bool = False
    """Normalised reward = (r - mean) / std instead of r - mean (mean and std over the reference
    responses, computed after training and stored in reward_normalization.json)."""
    normalization_dataset: str | list[str] | None = None
    """Reference responses for the normalisation (prompt/completion, messages, preference: the
    chosen response, or ranking: the best response). Default: the chosen/best responses of the
    training data."""
    normalization_samples: int | None = 2000
    """Use at most this many reference responses (a seeded sample); None uses all."""
    calibration_bins: int = 10
    """Confidence bins of the expected calibration error and the reliability plot."""
    max_response_length: int | None = None
    """Keep at most this many tokens of each response (its START); the prompt then keeps its LAST
    `max_length - longest kept response of the row` tokens (at most `max_prompt_length`), so a
    pair's chosen and rejected keep the same end of the conversation and short replies leave it
    more room. None: the prompt is cut to `max_prompt_length` first and each response keeps
    what is left (the dpo/kto rule). Cut pairs are counted in summary.json, never dropped."""
    padding_free: bool = True
    """Forward passes on packed sequences, as dpo's `padding_free`: no compute on pads, and the
    responses of a row (chosen and rejected, or a ranking) share one pass over their common prompt,
    each reply a branch of it. Checked at start against the padded pass on a few training rows
    (a model whose attention ignores packed position ids or 4D masks pads instead, with a
    warning)."""

    @model_validator(mode="after")
    def _check_rm(self) -> "RMConfig":
        problems = []
        if self.max_prompt_length is not None and not 1 <= self.max_prompt_length < self.max_length:
            problems.append(f"max_prompt_length must be in [1, max_length={self.max_length}), "
                            f"got {self.max_prompt_length}: it must leave room for the response")
        if self.center_rewards_coefficient is not None and self.center_rewards_coefficient < 0:
            problems.append(f"center_rewards_coefficient must be >= 0 (or null), got "
                            f"{self.center_rewards_coefficient}")
        if self.length_decorrelation_coefficient is not None and self.length_decorrelation_coefficient < 0:
            problems.append(f"length_decorrelation_coefficient must be >= 0 (or null), got "
                            f"{self.length_decorrelation_coefficient}")
        if self.normalization_samples is not None and self.normalization_samples < 1:
            problems.append(f"normalization_samples must be >= 1 (or null), got {self.normalization_samples}")
        if self.calibration_bins < 1:
            problems.append(f"calibration_bins must be >= 1, got {self.calibration_bins}")
        if self.max_response_length is not None and not 1 <= self.max_response_length < self.max_length:
            problems.append(f"max_response_length must be in [1, max_length={self.max_length}), "
                            f"got {self.max_response_length}: it must leave room for the prompt")
        if self.dataset_format is not None and self.dataset_format not in ("preference", "ranking"):
            problems.append(f"dataset_format '{self.dataset_format}': a reward model trains on "
                            "preference or ranking rows")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class OnlineConfig(BaseConfig):
    """Keys shared by the online stages (ppo, grpo, rloo, online_dpo): prompts, sampling, rewards, the reference
    and the split of each rollout batch into minibatches and micro-batches."""

    dataset_format: DatasetFormat | None = "prompt"
    """Row format; `prompt` rows (a `prompt` column: a string or a message list; other columns are
    passed to reward functions). `preference` (or null: detected) takes the prompts of preference
    pairs, e.g. HH-RLHF transcripts, whose shared conversation is the prompt."""
    max_length: int = 512
    """Not used by the online stages: prompts are cut to `max_prompt_length`, responses to
    `max_new_tokens`."""
    max_steps: int = -1
    """Online steps (one rollout batch each); -1 derives them from `total_episodes` or
    `num_train_epochs` over the prompt dataset."""
    total_episodes: int | None = None
    """Prompts to sample over the whole run (TRL's name); steps = ceil(total_episodes /
    rollout_batch_size). Used when `max_steps` is -1."""
    gradient_accumulation_steps: int = 1
    """Derived by the online stages from the rollout batch, `num_mini_batches` and
    `per_device_train_batch_size`. Leave at 1."""

    # ---- reference and rewards -----------------------------------------------------------------
    ref_model: str | None = None
    """Reference model for the KL term; default `model_name_or_path` (the SFT model). Under LoRA
    the default reference is the base with adapters disabled (no copy in memory)."""
    reward_model: str | None = None
    """A reward-model directory from `rlhfkit rm` (full or LoRA), scored with its stored
    normalisation. Needed unless `reward_funcs` is given."""
    reward_funcs: list[str | dict[str, Any]] = []
    """Reward functions: `module:function` (imported from the Python path), a built-in name
    (`gold`, `exact_answer`, `regex_format`, `length_penalty`, `reasoning_gym`), or a mapping
    `{name: BUILTIN, key: value}` with its arguments. Called TRL-style as
    `fn(prompts=[...], completions=[...], completion_ids=[...], ended=[...], **other_columns)` ->
    one float (or None: not applicable) per completion. Alone, or added to the reward-model score
    (see `reward_weights`)."""
    reward_weights: list[float] | None = None
    """Weight of each reward source, in order [reward_model (when given), *reward_funcs];
    default 1 each."""
    judge_reward_model: str | None = None
    """A second reward-model directory (from `rlhfkit rm`) scored on the held-out evaluation responses
    only, never trained against: a stand-in for the human judge (Gao et al. 2022, "Scaling Laws for
    Reward Model Overoptimization": a proxy RM for training, a gold RM on other data for judging).
    Adds `eval/judge_score` and, against the step-0 (initial) policy's responses to the same
    prompts, `eval/judge_win_rate` (ties count half) and `eval/judge_score_diff` (the mean paired
    score difference), each with its standard error; `eval/win_rate` and `eval/score_diff` are the
    same by the training reward. Train the two on disjoint data (`num_shards` / `shard_index`)."""

    # ---- rollout -------------------------------------------------------------------------------
    rollout_batch_size: int = 64
    """Prompts per online step, over all processes: under torchrun / accelerate each of N
    processes takes rollout_batch_size / N of them."""
    generation_batch_size: int | None = None
    """Prompts per generation call; default this process's whole share of `rollout_batch_size`."""
    max_prompt_length: int = 128
    """Prompts keep their last this-many tokens."""
    max_new_tokens: int = 32
    """Longest response sampled (rollout and evaluation)."""
    temperature: float = 0.7
    """Sampling temperature; log-probs for the ratio and the KL are taken from logits /
    temperature, identically at rollout and in training."""
    top_k: int = 0
    """Top-k sampling (0: off). Leave off for RL: the log-probs ignore the truncation."""
    top_p: float = 1.0
    """Nucleus sampling (1: off). Leave off for RL: the log-probs ignore the truncation."""
    stop: list[str] = []
    """Stop strings: generation stops after one; such a response counts as finished (not
    penalised by the EOS trick)."""
    sampling_dtype: Literal["float32", "bfloat16"] = "float32"
    """The dtype of the sampler's linear layers (rollouts and evaluation). `bfloat16`: they run
    from bf16 copies of their weights, made at each rollout after the LoRA merge (attention, norms
    and the KV cache stay float32), while training, old/reference log-probs and the optimizer stay
    as they are: decoding a few rows on a CPU is bound by weight bytes (see
    benchmarks/README.md). The samples then come from a slightly different policy than the one
    trained; grpo/rloo/ppo correct each token's policy loss by truncated importance sampling
    (`sampling_is_cap`). Not with load_in_4bit, nor under zero3/fsdp2."""
    use_vllm: bool = False
    """Sample rollouts and evaluation responses with vLLM (TRL's name) instead of rlhfkit's own sampler:
    one engine in a process of its own (`rollout/vllm_engine.py`), given the policy's weights (LoRA
    merged) before every generation. vLLM's kernels are not the trainer's, so the samples come from a
    slightly different distribution: grpo/rloo/ppo correct it per token (`sampling_is_cap`; no
    top_k/top_p then), and the losses of online_dpo, xpo, spin and self_reward do not use the sampler's
    probabilities; nash_md's mixture cannot run in vLLM. `sampling_dtype` sets the engine's dtype. One
    process only; not with load_in_4bit."""
    vllm_python: str | None = None
    """The Python interpreter that has vLLM (`make vllm` builds `.venv-vllm/bin/python`: vLLM pins its
    own transformers); default this one."""
    vllm_gpu_memory_utilization: float = 0.3
    """On a GPU: the share of its memory the engine takes (weights + KV cache), next to the trainer."""
    sampling_is_cap: float = 2.0
    """With `sampling_dtype` other than float32 or `use_vllm`: the cap C of the per-token importance weight
    min(pi_old / pi_sampler, C) (truncated importance sampling, Yao et al. 2025; TRL's
    `vllm_importance_sampling_cap`)."""
    missing_eos_penalty: float | None = None
    """EOS trick: subtract this from the score of a response that did not finish (TRL)."""
    missing_eos_score: float | None = None
    """EOS trick: replace the score of a response that did not finish by this value (N+: -1)."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """Per-token KL estimator: k1 = logp - logp_ref, k2 = (logp - logp_ref)^2 / 2,
    k3 = exp(ref - logp) - (ref - logp) - 1."""

    # ---- update --------------------------------------------------------------------------------
    num_mini_batches: int = 1
    """Minibatches (= optimizer steps) per pass over a rollout batch."""
    per_device_train_batch_size: int = 8
    """Responses per forward/backward micro-batch (gradient accumulation fills a minibatch)."""
    per_device_eval_batch_size: int = 32
    """Rows per reward-model forward pass when scoring rollouts."""
    padding_free: bool = True
    """Training-side forward passes on packed sequences (no compute on pads; the responses to one
    prompt share one pass over it), checked at start against the padded pass. False: pad."""

    # ---- logging -------------------------------------------------------------------------------
    logging_steps: int = 1
    """Log metrics every this many online steps."""
    num_sample_generations: int = 4
    """Rollout samples (prompt, response, score) written to samples.jsonl at each logging step."""

    @property
    def group_size(self) -> int:
        """Responses per prompt in a rollout batch."""
        return 1

    @property
    def train_group_size(self) -> int:
        """Responses per prompt that the updates train on (the rollout batch's rows; online_dpo: its pair)."""
        return self.group_size

    @model_validator(mode="after")
    def _check_online(self) -> "OnlineConfig":
        problems = []
        if self.needs_reward and self.reward_model is None and not self.reward_funcs:
            problems.append("give reward_model (a directory from `rlhfkit rm`) and/or reward_funcs")
        from rlhfkit.rollout.rewards import check_reward_spec

        problems += [p for p in (check_reward_spec(s, has_task=self.task is not None) for s in self.reward_funcs) if p]
        n_sources = len(self.reward_funcs) + (self.reward_model is not None)
        if self.reward_weights is not None and len(self.reward_weights) != n_sources:
            problems.append(f"reward_weights has {len(self.reward_weights)} entries but there are {n_sources} "
                            "reward sources ([reward_model,] *reward_funcs)")
        if self.missing_eos_penalty is not None and self.missing_eos_score is not None:
            problems.append("give missing_eos_penalty or missing_eos_score, not both")
        if self.judge_reward_model is not None and self.judge_reward_model == self.reward_model:
            problems.append("judge_reward_model is the training reward_model: a judge must be a different reward "
                            "model (trained on other data) to say anything the training reward does not")
        if self.eval_strategy == "epoch":
            problems.append(f"eval_strategy: epoch is not offered by {self._stage} (an online step is not a pass "
                            "over the data); use eval_strategy: steps with eval_steps")
        if self.gradient_accumulation_steps != 1:
            problems.append(f"gradient_accumulation_steps is derived in {self._stage} (rollout batch / "
                            "num_mini_batches / per_device_train_batch_size); remove it")
        for key in ("rollout_batch_size", "num_mini_batches", "max_prompt_length", "max_new_tokens"):
            if getattr(self, key) < 1:
                problems.append(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.num_sample_generations < 0:
            problems.append(f"num_sample_generations must be >= 0, got {self.num_sample_generations}")
        if self.generation_batch_size is not None and self.generation_batch_size < 1:
            problems.append(f"generation_batch_size must be >= 1, got {self.generation_batch_size}")
        rows = self.rollout_batch_size * self.train_group_size
        if rows % self.num_mini_batches:
            problems.append(f"the rollout batch ({self._rows_text} = {rows} responses) must be divisible by "
                            f"num_mini_batches={self.num_mini_batches}")
        elif (rows // self.num_mini_batches) % self.per_device_train_batch_size:
            problems.append(f"the minibatch ({self._rows_text} / num_mini_batches = "
                            f"{rows // self.num_mini_batches} responses) must be divisible by "
                            f"per_device_train_batch_size={self.per_device_train_batch_size}")
        if self.temperature <= 0:
            problems.append(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0 or not 0 < self.top_p <= 1:
            problems.append(f"top_k must be >= 0 and top_p in (0, 1], got {self.top_k}, {self.top_p}")
        if self.total_episodes is not None and self.total_episodes < 1:
            problems.append(f"total_episodes must be >= 1, got {self.total_episodes}")
        if self.sampling_is_cap < 1:
            problems.append(f"sampling_is_cap must be >= 1, got {self.sampling_is_cap}")
        if self.sampling_dtype != "float32" and self.load_in_4bit:
            problems.append(f"sampling_dtype: {self.sampling_dtype} cannot copy a 4-bit (load_in_4bit) base; "
                            "use sampling_dtype: float32")
        if self.use_vllm:
            if self._sampler_correction and (self.top_k or self.top_p < 1):
                problems.append("top_k / top_p with use_vllm: vLLM's recorded log-probs would include the truncation, "
                                "the trainer's do not; leave them off")
            if self.load_in_4bit:
                problems.append("use_vllm with load_in_4bit: the 4-bit base cannot be merged into weights for the "
                                "engine; use load_in_4bit: false")
            if not 0 < self.vllm_gpu_memory_utilization <= 1:
                problems.append(f"vllm_gpu_memory_utilization must be in (0, 1], got {self.vllm_gpu_memory_utilization}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    _stage: ClassVar[str] = "online stages"
    _rows_text: ClassVar[str] = "rollout_batch_size"
    _sampler_correction: ClassVar[bool] = False
    """Whether the stage's loss weights each token by pi_old / pi_sampler (`sampling_is_cap`): with vLLM
    its rollouts record the sampler's log-probs."""

    @property
    def sampled_context(self) -> int | None:
        """Prompt + response tokens a sampled sequence may take (the vLLM engine's max_model_len; None: the
        model's whole context)."""
        return self.max_prompt_length + self.max_new_tokens
    needs_reward: ClassVar[bool] = True
    """Whether the stage trains on a reward (reward_model and/or reward_funcs required); spin does not."""


class PPOConfig(OnlineConfig):
    """`rlhfkit ppo`: RLHF with PPO against a reward model (and/or Python reward functions), with a
    per-token KL penalty to the reference (SFT) model. One PPO step = sample `rollout_batch_size`
    prompts, generate, score, compute KL-shaped rewards and GAE advantages, then
    `num_ppo_epochs` passes over `num_mini_batches` shuffled minibatches (each split into
    micro-batches of `per_device_train_batch_size`, gradients accumulated)."""

    supports_lora_layers: ClassVar[bool] = False
    supports_4bit: ClassVar[bool] = True  # QLoRA: policy, reference, critic, reward adapters on one 4-bit base

    learning_rate: float = 1e-5
    """Peak learning rate (AdamW), shared by the policy and the critic; decays linearly (N+: 3e-6
    for 1B-6.9B full fine-tuning; LoRA and tiny models take larger steps)."""
    adam_epsilon: float = 1e-5
    """AdamW epsilon (1e-5 as in the PPO implementations, RLHF_NOTES 23)."""
    value_init: Literal["reward_model", "zero"] | None = None
    """Critic initialisation: `reward_model` (default with an RM: its backbone and head, so values
    start as the normalised RM score) or `zero` (value head zero). Without an RM, or with an RM
    whose tokenizer (vocabulary) differs from the policy's (the critic reads the policy's token
    ids), the critic starts from the policy with a zero value head; `reward_model` is then an
    error."""

    # ---- rewards and advantages ----------------------------------------------------------------
    kl_coef: float = 0.05
    """beta of the per-token KL penalty r_t = -beta * kl_t (the initial value when adaptive)."""
    target_kl: float | None = None
    """Adaptive KL control (Ziegler et al.): beta is steered to keep the sequence KL near this
    value. None: beta fixed."""
    kl_horizon: float = 10000.0
    """Horizon (in samples) of the adaptive KL controller."""
    whiten_rewards: bool = False
    """Whiten the KL-shaped rewards over real tokens (mean kept) before GAE."""
    reward_clip: float | None = None
    """Clip scores to [-reward_clip, reward_clip] (DeepSpeed-Chat: 5). None: no clipping."""
    gamma: float = 1.0
    """Discount factor of GAE."""
    lam: float = 0.95
    """GAE lambda."""
    whiten_advantages: bool = True
    """Whiten advantages over real tokens (mean 0, variance 1) before the PPO epochs."""

    # ---- PPO update ----------------------------------------------------------------------------
    num_ppo_epochs: int = 4
    """Passes over each rollout batch."""
    cliprange: float = 0.2
    """Policy ratio clip epsilon."""
    cliprange_value: float = 0.2
    """Value clip range around the rollout values."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus (0: off; the entropy is still logged, outside the graph)."""

    _stage: ClassVar[str] = "ppo"
    _sampler_correction: ClassVar[bool] = True

    @model_validator(mode="after")
    def _check_ppo(self) -> "PPOConfig":
        problems = []
        if self.value_init == "reward_model" and self.reward_model is None:
            problems.append("value_init: reward_model needs reward_model; use value_init: zero")
        if self.num_ppo_epochs < 1:
            problems.append(f"num_ppo_epochs must be >= 1, got {self.num_ppo_epochs}")
        if self.kl_estimator == "k2":
            problems.append("kl_estimator k2 is not offered for ppo's reward shaping; use k1 or k3")
        if self.kl_coef < 0:
            problems.append(f"kl_coef must be >= 0, got {self.kl_coef}")
        if self.target_kl is not None and self.target_kl <= 0:
            problems.append(f"target_kl must be > 0 (or null), got {self.target_kl}")
        if self.kl_horizon <= 0:
            problems.append(f"kl_horizon must be > 0, got {self.kl_horizon}")
        if self.reward_clip is not None and self.reward_clip <= 0:
            problems.append(f"reward_clip must be > 0 (or null), got {self.reward_clip}")
        for key in ("gamma", "lam"):
            if not 0 <= getattr(self, key) <= 1:
                problems.append(f"{key} must be in [0, 1], got {getattr(self, key)}")
        for key in ("cliprange", "cliprange_value"):
            if getattr(self, key) <= 0:
                problems.append(f"{key} must be > 0, got {getattr(self, key)}")
        if self.vf_coef < 0 or self.entropy_coef < 0:
            problems.append("vf_coef and entropy_coef must be >= 0")
        if self.gradient_checkpointing and self.finetuning_type == "lora" and self.reward_model is None:
            # the critic is then adapter 'critic' on the policy's own base (rlhfkit.train.ppo_roles): a
            # checkpointed backward would recompute the policy's layers under the critic's adapter
            problems.append("gradient_checkpointing: true with LoRA and no reward_model puts the critic on the "
                            "policy's own base as a second adapter, which checkpointing cannot serve; set "
                            "gradient_checkpointing: false (or train the critic on its own base: a full reward "
                            "model, or one over another base)")
        if problems:
            raise ValueError("; ".join(problems))
        return self


AdvantageEstimator = Literal["grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"]


class GRPOConfig(OnlineConfig):
    """`rlhfkit grpo`: critic-free online RL. Each step samples `rollout_batch_size` prompts and
    `num_generations` responses to each, scores them, turns the scores into advantages within each
    prompt's group (`advantage_estimator`: GRPO, Dr. GRPO, RLOO, REINFORCE++), and takes
    `num_iterations` passes of `num_mini_batches` clipped policy-gradient steps. No critic."""

    supports_4bit: ClassVar[bool] = True  # QLoRA policy (build_model); the reference: the base, adapters off

    learning_rate: float = 1e-6
    """Peak learning rate (AdamW); TRL's GRPO default. LoRA and tiny models take larger steps."""
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    """Learning-rate schedule after warmup."""
    temperature: float = 1.0
    """Sampling temperature (TRL's GRPO default 1.0); log-probs use logits / temperature."""
    num_generations: int = 8
    """Responses sampled per prompt (the group G). The rollout batch holds rollout_batch_size x G
    responses; a group never splits across processes."""
    advantage_estimator: AdvantageEstimator = "grpo"
    """`grpo` (group mean/std, see scale_rewards), `dr_grpo` (group mean only), `rloo` (leave-one-
    out mean), `reinforce_pp` (REINFORCE++: token rewards with the KL, returns-to-go normalised
    over the global batch), `reinforce_pp_baseline` (the group mean subtracted first)."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """`grpo`: divide the centred rewards by the group's std (+1e-4), the whole batch's std, or
    not at all (Dr. GRPO)."""
    beta: float = 0.0
    """KL coefficient to the reference. 0 (TRL's GRPO default): no reference model is held and no
    reference pass runs."""
    kl_in_reward: bool | None = None
    """Where the KL goes: False = a per-token term beta * KL inside the loss (GRPO), True = into
    the reward before the advantages (RLOO: beta x summed k1 per sequence; REINFORCE++: per token).
    Default: False for grpo/dr_grpo, True for rloo and reinforce_pp*."""
    epsilon: float = 0.2
    """Lower clip range of the ratio (and the upper one unless epsilon_high is set)."""
    epsilon_high: float | None = None
    """Upper clip range (DAPO clip-higher, e.g. 0.28); None: epsilon."""
    importance_sampling_level: Literal["token", "sequence"] = "token"
    """`token`: a ratio per token (GRPO/PPO); `sequence`: GSPO's length-normalised sequence ratio."""
    loss_aggregation: Literal["token", "sequence", "constant"] = "token"
    """`token` (DAPO: sum over every real token / real tokens of the global batch), `sequence`
    (original GRPO: mean per response, then mean over responses), `constant` (Dr. GRPO: sum /
    (responses x max_new_tokens))."""
    num_iterations: int = 1
    """Passes over each rollout batch (mu in GRPO). With 1 the ratio is exactly 1 and no old-log-
    prob pass runs; with more, the ratio is to the sampling policy."""
    mask_truncated_completions: bool = False
    """Leave responses that hit max_new_tokens without EOS out of the loss (DAPO)."""
    dynamic_sampling: bool = False
    """DAPO dynamic sampling: drop groups whose rewards are all equal and sample more prompts to
    refill the batch, at most `max_sampling_rounds` rounds (then train on what there is)."""
    max_sampling_rounds: int = 3
    """Generation rounds per step with dynamic_sampling."""
    overlong_buffer: int | None = None
    """DAPO overlong penalty: responses longer than max_new_tokens - overlong_buffer tokens lose up
    to `overlong_penalty` linearly over the buffer. None: off."""
    overlong_penalty: float = 1.0
    """Size of the overlong penalty at max_new_tokens."""

    _stage: ClassVar[str] = "grpo"
    _sampler_correction: ClassVar[bool] = True
    _rows_text: ClassVar[str] = "rollout_batch_size x num_generations"

    @property
    def group_size(self) -> int:
        return self.num_generations

    @property
    def kl_goes_to_reward(self) -> bool:
        if self.kl_in_reward is not None:
            return self.kl_in_reward
        return self.advantage_estimator not in ("grpo", "dr_grpo")

    @model_validator(mode="after")
    def _check_grpo(self) -> "GRPOConfig":
        problems = []
        if self.num_generations < 2:
            problems.append(f"num_generations must be >= 2 (advantages compare a prompt's responses), "
                            f"got {self.num_generations}")
        if self.beta < 0:
            problems.append(f"beta must be >= 0, got {self.beta}")
        if self.epsilon <= 0 or (self.epsilon_high is not None and self.epsilon_high <= 0):
            problems.append(f"epsilon and epsilon_high must be > 0, got {self.epsilon}, {self.epsilon_high}")
        for key in ("num_iterations", "max_sampling_rounds"):
            if getattr(self, key) < 1:
                problems.append(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.overlong_buffer is not None and not 1 <= self.overlong_buffer <= self.max_new_tokens:
            problems.append(f"overlong_buffer must be in [1, max_new_tokens={self.max_new_tokens}], "
                            f"got {self.overlong_buffer}")
        if self.kl_in_reward and self.kl_estimator != "k1" and self.advantage_estimator != "reinforce_pp":
            problems.append("kl_in_reward folds the summed k1 log-ratio into the score; use kl_estimator: k1")
        if self.kl_in_reward is not None and self.beta == 0:
            problems.append("kl_in_reward is set but beta is 0 (no KL term at all)")
        if self.advantage_estimator != "grpo" and self.scale_rewards != "group":
            problems.append(f"scale_rewards applies to advantage_estimator grpo only, not "
                            f"{self.advantage_estimator}")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class RLOOConfig(GRPOConfig):
    """`rlhfkit rloo`: REINFORCE Leave-One-Out (Ahmadian et al. 2024): the GRPO loop with each
    response's baseline the mean reward of the OTHER responses to its prompt, and the KL to the
    reference folded into the reward (beta x summed k1 per sequence, TRL's convention)."""

    advantage_estimator: AdvantageEstimator = "rloo"
    """Defaults to `rloo` (leave-one-out); any estimator of grpo may be chosen."""
    beta: float = 0.05
    """KL coefficient; with the default kl_in_reward the sequence's summed k1 times beta is
    subtracted from its score before the leave-one-out baseline."""
    num_generations: int = 4
    """Responses sampled per prompt (k in RLOO)."""

    _stage: ClassVar[str] = "rloo"


OnlineDPOLossType = Literal["sigmoid", "robust", "hinge", "ipo"]


class PairedOnlineConfig(OnlineConfig):
    """Keys of the online stages that take DPO steps on pairs of responses to one prompt (online_dpo,
    spin; `train/pairs.py`): the loss, its beta, and whole pairs per micro-batch."""

    beta: float = 0.1
    """Inverse temperature of the implicit reward beta * log(pi / pi_ref)."""
    loss_type: OnlineDPOLossType = "sigmoid"
    """`sigmoid` (DPO; cDPO with label_smoothing), `robust`, `hinge` (SLiC), `ipo` (losses/dpo.py)."""
    label_smoothing: float = 0.0
    """Assumed share of flipped labels e for `sigmoid` (cDPO, in [0, 0.5]) and `robust` (< 0.5)."""

    _rows_text: ClassVar[str] = "rollout_batch_size x 2 (each prompt's pair)"

    @property
    def train_group_size(self) -> int:
        return 2

    @model_validator(mode="after")
    def _check_pairs(self) -> "PairedOnlineConfig":
        problems = []
        if self.beta <= 0:
            problems.append(f"beta must be > 0, got {self.beta}")
        problems += label_smoothing_problems(self.label_smoothing, [self.loss_type])
        if self.per_device_train_batch_size % 2:
            problems.append(f"per_device_train_batch_size counts responses and must be even (whole pairs), "
                            f"got {self.per_device_train_batch_size}")
        if self.sampling_dtype != "float32":
            problems.append(f"sampling_dtype: {self.sampling_dtype} is offered by grpo, rloo and ppo only (their "
                            f"loss has the importance-sampling correction; {self._stage}'s does not): use float32")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class OnlineDPOConfig(PairedOnlineConfig):
    """`rlhfkit online_dpo`: online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online
    AI Feedback"; Calandriello et al. 2024). Each step samples `num_generations` responses to each of
    `rollout_batch_size` prompts from the current policy, scores them with the reward model and/or
    reward functions, pairs each prompt's best- and worst-scored response (chosen, rejected) and
    takes DPO steps on those pairs against the reference. Ties (best = worst) give no pair (logged as
    `pairs/tied`)."""

    supports_4bit: ClassVar[bool] = True  # QLoRA policy; the reference: the base, adapters off

    learning_rate: float = 5e-7
    """Peak learning rate (AdamW); TRL's online DPO default. LoRA and tiny models take larger steps."""
    temperature: float = 0.9
    """Sampling temperature (TRL's online DPO default); the log-probs of the DPO loss, policy and
    reference, are taken from logits / temperature too (the tempered policy that sampled the pair)."""
    num_generations: int = 2
    """Responses sampled per prompt. 2: the pair itself (online DPO); more: the best- and
    worst-scored of them form the pair (best-vs-worst of n, as in iterative DPO, Xiong et al. 2024,
    Dong et al. 2024), which makes a tie rarer with a coarse reward."""

    _stage: ClassVar[str] = "online_dpo"

    @property
    def group_size(self) -> int:
        return self.num_generations

    @model_validator(mode="after")
    def _check_online_dpo(self) -> "OnlineDPOConfig":
        if self.num_generations < 2:
            raise ValueError(f"num_generations must be >= 2 (a pair needs two responses), got {self.num_generations}")
        return self


class XPOConfig(PairedOnlineConfig):
    """`rlhfkit xpo`: exploratory preference optimisation (Xie et al. 2024, "Exploratory Preference
    Optimization: Harnessing Implicit Q*-Approximation for Sample-Efficient RLHF"). Each step, every one
    of `rollout_batch_size` prompts gets one response from the current policy and one from the reference
    (the paper's sampling policy pi~ taken as pi_ref); the reward model and/or reward functions rank the
    two into (chosen, rejected), and the loss is online DPO's on those pairs plus the exploration term
    alpha x log pi(y~) of the reference's responses y~ (minimised: the policy is pushed off what the
    reference already says, towards responses it would not sample). Equal scores: no pair (the DPO term
    weighs the pair 0; the exploration term still applies)."""

    supports_4bit: ClassVar[bool] = True  # QLoRA policy; the reference: the base, adapters off

    learning_rate: float = 5e-7
    """Peak learning rate (AdamW), as online_dpo's. LoRA and tiny models take larger steps."""
    temperature: float = 0.9
    """Sampling temperature of both responses, policy's and reference's; the log-probs of the loss are
    taken from logits / temperature too."""
    alpha: float = 1e-5
    """Weight of the exploration term alpha x log pi(y~) (summed over y~'s tokens, the mean over the
    prompts); 0: online DPO on (policy, reference) pairs."""

    _stage: ClassVar[str] = "xpo"

    @property
    def group_size(self) -> int:
        return 2  # the policy's response and the reference's

    @model_validator(mode="after")
    def _check_xpo(self) -> "XPOConfig":
        if not self.alpha >= 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")
        return self


class NashMDConfig(OnlineConfig):
    """`rlhfkit nash_md`: Nash mirror descent, the policy-gradient form (Nash-MD-PG; Munos et al. 2023,
    "Nash Learning from Human Feedback"). Each step, every one of `rollout_batch_size` prompts gets one
    response y from the current policy and one y' from its geometric mixture with the reference
    (pi^(1 - mixture_coef) x ref^mixture_coef, token by token: the regularised opponent); the reward model
    and/or reward functions give the preference P(y > y') = sigmoid(score(y) - score(y')) (Bradley-Terry),
    and the policy takes policy-gradient steps on y with the reward P(y > y') - 1/2 minus beta x its KL to
    the reference (per token, reward-to-go): ascending the preference against the mixture while staying
    near the reference."""

    supports_4bit: ClassVar[bool] = True  # QLoRA policy; the reference: the base, adapters off

    learning_rate: float = 5e-7
    """Peak learning rate (AdamW), as online_dpo's. LoRA and tiny models take larger steps."""
    temperature: float = 0.9
    """Sampling temperature of both responses (the mixture: of the two tempered models); the log-probs of
    the loss and the KL are taken from logits / temperature too."""
    beta: float = 0.1
    """Weight of the KL to the reference in the reward (the paper's tau): each token's reward is -beta x
    its k1 log-ratio log pi - log ref (whose sum is the response's KL; `kl_estimator` must stay k1), the
    preference reward comes at the last token."""
    mixture_coef: float = 0.5
    """The reference's weight in the opponent's geometric mixture (the paper's beta): 0 is self-play
    against the current policy, 1 plays against the reference."""
    epsilon: float = 0.2
    """Clip range of the ratio to the policy that sampled (matters only from a step's second minibatch on:
    the first is on-policy, ratio 1)."""

    _stage: ClassVar[str] = "nash_md"

    @property
    def group_size(self) -> int:
        return 2  # the policy's response and the mixture's

    @property
    def train_group_size(self) -> int:
        return 1  # the updates train on the policy's response only

    @model_validator(mode="after")
    def _check_nash_md(self) -> "NashMDConfig":
        problems = []
        if not self.beta >= 0:
            problems.append(f"beta must be >= 0, got {self.beta}")
        if not 0.0 <= self.mixture_coef <= 1.0:
            problems.append(f"mixture_coef must be in [0, 1], got {self.mixture_coef}")
        if not self.epsilon > 0:
            problems.append(f"epsilon must be > 0, got {self.epsilon}")
        if self.kl_estimator != "k1":
            problems.append(f"kl_estimator {self.kl_estimator} is not offered by nash_md: its reward takes the k1 "
                            "log-ratio per token, whose reward-to-go gives the policy gradient of KL(pi || ref); use k1")
        if self.sampling_dtype != "float32":
            problems.append(f"sampling_dtype: {self.sampling_dtype} is offered by grpo, rloo and ppo only (their loss "
                            "has the importance-sampling correction; nash_md's does not): use float32")
        if self.use_vllm:
            problems.append("use_vllm is offered by grpo, rloo, ppo, online_dpo, xpo, spin and self_reward (their "
                            "losses correct for, or do not use, the sampler's own probabilities); not by nash_md, "
                            "whose per-token mixture of two models is not a model vLLM can run: use_vllm: false")
        if problems:
            raise ValueError("; ".join(problems))
        return self


SPIN_FORMATS = ("prompt_completion", "messages", "alpaca", "preference")


class IterativeConfig(PairedOnlineConfig):
    """Keys of the iterative stages (spin, self_reward; `train/iterative.py`): `num_iterations`
    iterations, each training on pairs the policy makes at its start, against that policy as the
    reference."""

    num_iterations: int = 2
    """Iterations; each makes its pairs with, and takes as its reference, the policy at its start."""
    num_train_epochs: float = 2.0
    """Passes over an iteration's pairs (spin's paper: 2-3). `max_steps` > 0 instead fixes the steps of
    each iteration; `total_episodes` the prompts each iteration trains on."""

    @model_validator(mode="after")
    def _check_iterations(self) -> "IterativeConfig":
        if self.num_iterations < 1:
            raise ValueError(f"num_iterations must be >= 1, got {self.num_iterations}")
        return self


class SPINConfig(IterativeConfig):
    """`rlhfkit spin`: self-play fine-tuning (Chen et al. 2024, "Self-Play Fine-Tuning Converts Weak
    Language Models to Strong Language Models"). Needs no reward and no preference: SFT data only. Each
    of `num_iterations` iterations, the policy at its start (the opponent, p_theta_t) samples one response
    to every training prompt; then DPO steps push the data's response (chosen) up and that sample
    (rejected) down, against p_theta_t as the reference (the paper's objective with the logistic loss:
    DPO's sigmoid loss). The next iteration's opponent is the policy it ends with."""

    supports_4bit: ClassVar[bool] = True

    dataset_format: DatasetFormat | None = None
    """Rows with a response to imitate: `prompt_completion` (the completion), `messages` / `alpaca`
    (the last assistant reply; the conversation before it is the prompt), `preference` (the chosen
    response). Null: detected."""
    learning_rate: float = 5e-7
    """Peak learning rate; the paper's (zephyr-7b, RMSprop). LoRA and tiny models take larger steps."""
    temperature: float = 1.0
    """Sampling temperature of the opponent's responses (the paper's 1.0); the log-probs of the loss are
    taken from logits / temperature too, as in every online pass."""
    _stage: ClassVar[str] = "spin"
    needs_reward: ClassVar[bool] = False

    @model_validator(mode="after")
    def _check_spin(self) -> "SPINConfig":
        if self.dataset_format is not None and self.dataset_format not in SPIN_FORMATS:
            raise ValueError(f"dataset_format: {self.dataset_format} has no response to imitate; spin takes "
                             + ", ".join(SPIN_FORMATS))
        return self


DEFAULT_JUDGE_TEMPLATE = """Review the user's request and the response below, and score the response with the additive \
5-point scale that follows: start at 0 and add each point whose condition holds.
- 1 point: the response is relevant to the request and gives some information about it, even if \
incomplete or partly off topic.
- 1 point: it addresses a substantial part of the request, without resolving it fully.
- 1 point: it answers the basic question usefully, whatever its flaws of form or completeness.
- 1 point: it addresses the request directly and completely, clearly and well organised.
- 1 point: it is an expert answer tailored to the request: accurate, focused, without extraneous content.

Request:
{prompt}

Response:
{response}

Explain your judgement in at most 100 words, then end with the line "Score: <points>"."""
"""The LLM-as-a-judge prompt of `self_reward` (after Yuan et al. 2024's additive 5-point prompt, in
rlhfkit's own words): `{prompt}` becomes the request (a conversation: its turns, one per line, with
their roles), `{response}` the response judged."""


class SelfRewardConfig(IterativeConfig):
    """`rlhfkit self_reward`: self-rewarding language models (Yuan et al. 2024): iterative DPO on pairs
    the policy samples and judges itself. Each of `num_iterations` iterations, the policy at its start
    samples `num_generations` responses to every training prompt, scores each one as an LLM judge
    (`judge_template`, `judge_samples` judgements averaged, the score read with `judge_score_pattern`),
    and pairs each prompt's highest- and lowest-scored response (equal scores: no pair); then DPO steps
    on those pairs against the policy at the iteration's start. No reward model: the judging skill comes
    from the model itself (the paper SFTs it on judgement examples first, `rlhfkit sft`)."""

    supports_4bit: ClassVar[bool] = True

    learning_rate: float = 1e-6
    """Peak learning rate; the paper's (Llama 2 70B, decaying to 1e-7). LoRA and tiny models take larger
    steps."""
    temperature: float = 0.7
    """Sampling temperature of the candidate responses (the paper's 0.7); the log-probs of the loss
    are taken from logits / temperature too, as in every online pass."""
    top_p: float = 0.9
    """Nucleus sampling of the candidates (the paper's 0.9)."""
    num_generations: int = 4
    """Candidate responses per prompt (the paper's 4); the highest- and lowest-judged form the pair."""
    num_train_epochs: float = 1.0
    """Passes over an iteration's pairs. `max_steps` > 0 instead fixes the steps of each iteration."""
    judge_template: str = DEFAULT_JUDGE_TEMPLATE
    """The judge's prompt, with `{prompt}` and `{response}` (each exactly once). It takes the form of
    the training prompts: through the chat template (one user turn) when they are conversations,
    as plain text when they are strings."""
    judge_samples: int = 3
    """Judgements sampled per response; its score is the mean of those whose score could be read (the
    paper: 3). A response with none is never picked for a pair."""
    judge_temperature: float = 0.7
    """Sampling temperature of the judgements."""
    judge_top_p: float = 0.9
    """Nucleus sampling of the judgements."""
    judge_max_new_tokens: int = 256
    """Tokens a judgement may take (the reasoning and the score line)."""
    judge_score_pattern: str = r"Score:\s*([0-9]+(?:\.[0-9]+)?)"
    """A regular expression with one group: the score is that group of its last match in the judgement."""
    judge_max_score: float = 5.0
    """Scores are read in [0, judge_max_score]; a number outside is unread (`judge/unread`)."""

    _stage: ClassVar[str] = "self_reward"
    needs_reward: ClassVar[bool] = False

    @property
    def group_size(self) -> int:
        return self.num_generations

    @property
    def sampled_context(self) -> None:
        """The model's whole context: a judge prompt holds a training prompt and a response inside
        `judge_template`, and its judgement follows."""
        return None

    @model_validator(mode="after")
    def _check_self_reward(self) -> "SelfRewardConfig":
        problems = []
        if self.num_generations < 2:
            problems.append(f"num_generations must be >= 2 (a pair needs two responses), got {self.num_generations}")
        for key in ("{prompt}", "{response}"):
            if self.judge_template.count(key) != 1:
                problems.append(f"judge_template must hold {key} exactly once, found it "
                                f"{self.judge_template.count(key)} times")
        if self.judge_samples < 1 or self.judge_max_new_tokens < 1:
            problems.append(f"judge_samples and judge_max_new_tokens must be >= 1, got {self.judge_samples}, "
                            f"{self.judge_max_new_tokens}")
        if self.judge_temperature <= 0 or not 0 < self.judge_top_p <= 1:
            problems.append(f"judge_temperature must be > 0 and judge_top_p in (0, 1], got "
                            f"{self.judge_temperature}, {self.judge_top_p}")
        if self.judge_max_score <= 0:
            problems.append(f"judge_max_score must be > 0, got {self.judge_max_score}")
        try:
            groups = re.compile(self.judge_score_pattern).groups
        except re.error as e:
            problems.append(f"judge_score_pattern {self.judge_score_pattern!r} is not a regular expression: {e}")
        else:
            if groups != 1:
                problems.append(f"judge_score_pattern must have exactly one group (the score), has {groups}")
        if problems:
            raise ValueError("; ".join(problems))
        return self


STAGES: dict[str, type[BaseConfig]] = {"pt": PTConfig, "sft": SFTConfig, "dpo": DPOConfig, "kto": KTOConfig,
                                       "rm": RMConfig, "ppo": PPOConfig, "grpo": GRPOConfig, "rloo": RLOOConfig,
                                       "online_dpo": OnlineDPOConfig, "spin": SPINConfig,
                                       "self_reward": SelfRewardConfig, "xpo": XPOConfig,
                                       "nash_md": NashMDConfig}


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


# ---- LLaMA-Factory / Hugging Face names -------------------------------------------------------
# rlhfkit's own keys are the primary ones; these are translated by `translate_keys` before
# validation, and what was translated is printed in one line.

KEY_ALIASES = {"cutoff_len": "max_length", "evaluation_strategy": "eval_strategy"}
"""Other projects' name -> rlhfkit's key with the same meaning. Giving both with different values
is an error."""

VALUE_ALIASES = {("lora_target", "all"): "all-linear"}
"""(key, their value) -> rlhfkit's value."""

_TRL_GRPO_KEYS = {"max_completion_length": "max_new_tokens"}
_TRL_GRPO_LOSS_TYPES = {"grpo": "sequence", "dapo": "token", "bnpo": "token", "dr_grpo": "constant"}
STAGE_KEY_ALIASES: dict[str, dict[str, str]] = {
    "grpo": _TRL_GRPO_KEYS, "rloo": _TRL_GRPO_KEYS, "ppo": {"response_length": "max_new_tokens"}}
"""TRL's names that mean one of rlhfkit's keys in one stage only."""

STAGE_VALUE_KEYS: dict[str, dict[str, tuple[str, dict[str, str]]]] = {
    "grpo": {"loss_type": ("loss_aggregation", _TRL_GRPO_LOSS_TYPES)},
    "rloo": {"loss_type": ("loss_aggregation", _TRL_GRPO_LOSS_TYPES)}}
"""TRL keys whose values name one of ours: stage -> {their key: (our key, {their value: our value})}.
GRPOTrainer's `loss_type`: `grpo` normalises each completion by its own length (our `sequence`),
`dapo` by the tokens of the global batch (`token`), `bnpo` by the local batch's tokens (`token`:
the same with one process; rlhfkit always normalises globally), `dr_grpo` by a constant (`constant`).
(`loss_type` in dpo/kto is their own key.)"""

IGNORED_KEYS = {
    "preprocessing_num_workers": "data is encoded in the training process",
    "preprocessing_batch_size": "data is encoded in the training process",
    "dataloader_num_workers": "batches are built in the training process",
    "overwrite_cache": "rlhfkit keeps no cache of preprocessed data",
    "ddp_timeout": "torch.distributed's default timeout applies",
    "do_eval": "rlhfkit evaluates whenever there is eval_dataset or val_size",
    "flash_attn": "the model's default attention kernel is used",
    "save_only_model": "checkpoints always hold what resuming needs",
    "logging_dir": "TensorBoard events go to output_dir/tensorboard",
    "plot_loss": "plots/loss.png is always written",
    "include_num_input_tokens_seen": "not tracked",
}
"""Keys that mean nothing here (or that rlhfkit always does): accepted, listed in one printed line.
`do_train` and `do_predict` are checked instead: rlhfkit STAGE always trains."""


def translate_keys(values: dict[str, Any], logging_steps: int = 10,
                   stage: str | None = None) -> tuple[dict[str, Any], list[str], list[str]]:
    """LLaMA-Factory / Hugging Face / TRL names -> rlhfkit's keys (see KEY_ALIASES, VALUE_ALIASES,
    STAGE_KEY_ALIASES, STAGE_VALUE_KEYS, IGNORED_KEYS). Returns (new values, notes on what was
    translated, the ignored keys that were dropped). `logging_steps` is the stage's default
    (eval_strategy: steps falls back to it, as in HF). Raises ConfigError on contradictions."""
    out = dict(values)
    notes: list[str] = []
    problems: list[str] = []
    for theirs, (ours, table) in STAGE_VALUE_KEYS.get(stage, {}).items():
        if theirs in out:
            value = out.pop(theirs)
            if value not in table:
                problems.append(f"{theirs}: {value!r} is not one of TRL's {', '.join(table)} (rlhfkit's key: {ours})")
                continue
            if ours in out and out[ours] != table[value]:
                problems.append(f"{theirs}={value!r} (= {ours}: {table[value]}) and {ours}={out[ours]!r} disagree; "
                                "give one")
            out[ours] = table[value]
            notes.append(f"{theirs}: {value} -> {ours}: {table[value]}")
    for theirs, ours in {**KEY_ALIASES, **STAGE_KEY_ALIASES.get(stage, {})}.items():
        if theirs in out:
            value = out.pop(theirs)
            if ours in out and out[ours] != value:
                problems.append(f"{theirs}={value!r} and {ours}={out[ours]!r} disagree ({theirs} is "
                                f"another project's name for {ours}); give one")
            out[ours] = value
            notes.append(f"{theirs} -> {ours}")
    for (key, theirs), ours in VALUE_ALIASES.items():
        if out.get(key) == theirs:
            out[key] = ours
            notes.append(f"{key}: {theirs} -> {ours}")
    if isinstance(out.get("lora_target"), str) and "," in out["lora_target"]:
        out["lora_target"] = [t.strip() for t in out["lora_target"].split(",") if t.strip()]
    warmup = out.get("warmup_steps")
    if isinstance(warmup, float) and 0 < warmup < 1:
        if out.get("warmup_ratio") not in (None, 0, 0.0, warmup):
            problems.append(f"warmup_steps={warmup} (a fraction: a ratio) and warmup_ratio={out['warmup_ratio']} "
                            "disagree; give one")
        out["warmup_ratio"] = out.pop("warmup_steps")
        notes.append(f"warmup_steps: {warmup} is a fraction, read as warmup_ratio: {warmup}")
    elif isinstance(warmup, float) and warmup == int(warmup):
        out["warmup_steps"] = int(warmup)
    strategy = out.get("eval_strategy")
    if strategy == "steps" and out.get("eval_steps") is None:
        out["eval_steps"] = out.get("logging_steps", logging_steps)
        notes.append(f"eval_strategy: steps without eval_steps -> eval_steps: {out['eval_steps']} (logging_steps)")
    elif strategy == "no" and out.get("eval_steps") is not None:
        notes.append(f"eval_strategy: no -> eval_steps {out['eval_steps']} not used (evaluation at the end only)")
        out["eval_steps"] = None
    if out.get("dataset_dir") is not None:
        for key in ("dataset", "eval_dataset"):
            if isinstance(out.get(key), str) and "," in out[key]:
                out[key] = [name.strip() for name in out[key].split(",") if name.strip()]
    for key, want in (("do_train", True), ("do_predict", False)):
        if key in out:
            if out.pop(key) is not want:
                problems.append(f"{key}: {not want}: rlhfkit STAGE trains (evaluate a model with "
                                "`rlhfkit eval-rm`, or a run's eval data at its end)")
    ignored = [k for k in out if k in IGNORED_KEYS]
    for k in ignored:
        del out[k]
    if problems:
        raise ConfigError("; ".join(problems))
    return out, notes, ignored


def build_config(stage: str, values: dict[str, Any], source: str = "config",
                 config_cls: type[BaseModel] | None = None) -> BaseConfig:
    """Validate `values` for `stage` (or for `config_cls`, a config outside STAGES such as `rlhfkit
    eval`'s, which takes its keys as they are); raise one ConfigError listing every problem.
    For a training stage LLaMA-Factory / Hugging Face names are translated first
    (`translate_keys`) and the translation printed."""
    if config_cls is None and stage not in STAGES:
        raise ConfigError(f"unknown stage '{stage}'{_suggest(stage, list(STAGES))}; "
                          f"choose one of {', '.join(STAGES)}")
    cls = config_cls or STAGES[stage]
    if "stage" in values:
        values = dict(values)
        named = values.pop("stage")
        if named != stage:
            raise ConfigError(f"{source}: the config says stage: {named} but it is being run as {stage}")
    notes: list[str] = []
    ignored: list[str] = []
    if config_cls is None:
        try:
            values, notes, ignored = translate_keys(values, cls.model_fields["logging_steps"].default, stage)
        except ConfigError as e:
            raise ConfigError(f"{source} ({stage}): {e}") from None
    fields = list(cls.model_fields)
    problems = []
    if values.get("dataset_dir") is not None:
        from rlhfkit.data.llamafactory import check_names

        for key in ("dataset", "eval_dataset"):
            if values.get(key) is not None:
                try:
                    check_names(values[key], values["dataset_dir"])
                except ValueError as e:
                    problems.append(f"{key}: {e}")
    known = fields + list(KEY_ALIASES) + list(IGNORED_KEYS) + list(STAGE_KEY_ALIASES.get(stage, {}))
    for key in values:
        if key not in cls.model_fields:
            problems.append(f"unknown key '{key}'{_suggest(key, known)}")
    if problems:
        raise ConfigError(f"{source} ({stage}): " + "; ".join(problems))
    try:
        config = cls(**values)
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
    if getattr(config, "template", None) is not None:
        from rlhfkit.data.templates import TEMPLATES

        notes.append(f"template: {config.template} -> {TEMPLATES[config.template].description} "
                     "(rlhfkit/data/templates.py)")
    if int(os.environ.get("RANK", "0")) == 0:
        if notes:
            print(f"[{stage}] LLaMA-Factory / Hugging Face / TRL keys: " + "; ".join(notes), flush=True)
        if ignored:
            print(f"[{stage}] ignored keys (no meaning in rlhfkit): "
                  + "; ".join(f"{k} ({IGNORED_KEYS[k]})" for k in ignored), flush=True)
    return config


def load_config(stage: str | None, path: str | Path | None, overrides: list[str] | None = None) -> BaseConfig:
    """Read a YAML config, apply `key=value` overrides, validate for `stage`.

    A `stage:` key in the file (LLaMA-Factory's) names the stage when `stage` is None
    (`rlhfkit train CONFIG.yaml`); when both are given they must agree."""
    values = read_yaml(path) if path else {}
    values.update(parse_overrides(overrides or []))
    source = str(path) if path else "command line"
    named = values.pop("stage", None)
    if stage is None:
        if named is None:
            raise ConfigError(f"{source}: no `stage:` key; add one ({', '.join(STAGES)}) or run "
                              "`rlhfkit STAGE CONFIG.yaml`")
        stage = str(named)
    elif named is not None and named != stage:
        raise ConfigError(f"{source}: the config says stage: {named} but the command is `rlhfkit {stage}`; "
                          f"run `rlhfkit {named}` (or `rlhfkit train`), or fix the stage key")
    return build_config(stage, values, source=source)


def describe_config(cls: type[BaseConfig]) -> str:
    """Human-readable list of keys, defaults and docstrings (for --help-config)."""
    lines = [f"{cls.__name__}: {cls.__doc__ or ''}".strip()]
    for name, field in cls.model_fields.items():
        default = "(required)" if field.is_required() else f"= {field.default!r}"
        lines.append(f"  {name} {default}\n      {(field.description or '').replace(chr(10), ' ')}")
    return "\n".join(lines)


def dump_config(config: BaseConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
