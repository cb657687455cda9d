"""Plain helpers the stage functions share: data loading and splitting, model set-up, encoding
with skip counting, evaluation pieces and the final save. No stage logic lives here."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from rlhfkit.config import BaseConfig
from rlhfkit.data.encode import Encoded
from rlhfkit.data.formats import to_canonical
from rlhfkit.data.sources import load_rows
from rlhfkit.errors import ConfigError
from rlhfkit.models.load import (
    apply_lora,
    base_reference,
    count_parameters,
    disable_dropout,
    load_causal_lm,
    load_tokenizer,
    prepare_4bit,
)
from rlhfkit.models.presets import preset_name
from rlhfkit.train.loop import Run
from rlhfkit.train.tracking import progress


def load_split(config: BaseConfig, formats: tuple[str, ...]) -> tuple[list[dict], list[dict]]:
    """Read, validate and canonicalise train (and eval) rows; split `val_size` off when asked.

    Every row is validated here, before any model is loaded."""
    def read(spec) -> list[dict]:
        if config.dataset_dir is not None:  # LLaMA-Factory names in dataset_dir/dataset_info.json
            from rlhfkit.data.llamafactory import load_stage_rows

            rows, fmt = load_stage_rows(spec, config.dataset_dir, formats, seed=config.seed)
            return to_canonical(rows, fmt)
        return to_canonical(load_rows(spec, config.column_map), config.dataset_format)

    train = read(config.dataset)
    check_format(train, formats, config.dataset)
    if config.eval_dataset is not None:
        evaluation = read(config.eval_dataset)
        check_format(evaluation, formats, config.eval_dataset)
    else:
        evaluation = []
    rng = random.Random(config.seed)
    if config.val_size > 0 or config.num_shards > 1:
        order = list(range(len(train)))
        rng.shuffle(order)
        n_val = 0
        if config.val_size > 0:
            n_val = int(config.val_size) if config.val_size >= 1 else max(1, round(config.val_size * len(train)))
            if n_val >= len(train):
                raise ConfigError(f"val_size={config.val_size} leaves no training rows (dataset has {len(train)})")
            evaluation = [train[i] for i in order[:n_val]]
        rest = order[n_val:]
        if config.num_shards > 1:  # contiguous pieces of the shuffled order, sizes differing by at most 1
            k, n = config.shard_index, config.num_shards
            rest = rest[k * len(rest) // n:(k + 1) * len(rest) // n]
            if not rest:
                raise ConfigError(f"num_shards={n} leaves shard {k} without training rows "
                                  f"({len(order) - n_val} rows to share)")
        train = [train[i] for i in sorted(rest)]
    if config.max_samples is not None and config.max_samples < len(train):
        order = list(range(len(train)))
        rng.shuffle(order)
        train = [train[i] for i in sorted(order[:config.max_samples])]
    return train, evaluation


def row_format(row: dict) -> str:
    for key, fmt in (("text", "text"), ("messages", "messages"), ("chosen", "preference"),
                     ("responses", "ranking"), ("label", "unpaired"), ("completion", "prompt_completion")):
        if key in row:
            return fmt
    return "prompt"


def check_format(rows: list[dict], formats: tuple[str, ...], spec) -> None:
    fmt = row_format(rows[0])
    if fmt not in formats:
        raise ConfigError(f"dataset {spec}: rows are in '{fmt}' format, which this stage cannot train on; "
                          f"it takes {', '.join(formats)}")


def row_texts(rows: Iterable[dict]) -> Iterable[str]:
    """Every string in canonical rows (for training a preset's tokenizer)."""
    def walk(value):
        if isinstance(value, str):
            yield value
        elif isinstance(value, list):
            for v in value:
                yield from walk(v)
        elif isinstance(value, dict):
            for k, v in value.items():
                if k not in ("role", "_source"):
                    yield from walk(v)
    for row in rows:
        yield from walk({k: v for k, v in row.items() if not k.startswith("_")})


def config_tokenizer(c: BaseConfig, texts: Callable[[], Iterable[str]]):
    """The tokenizer a config names (`tokenizer_name_or_path` or the model's; a preset trains one
    on `texts()`), with a dedicated pad token and the configured chat template."""
    if c.template is None:
        return load_tokenizer(c.model_name_or_path, tokenizer_name_or_path=c.tokenizer_name_or_path,
                              gguf_file=c.gguf_file, trust_remote_code=c.trust_remote_code,
                              chat_template=c.chat_template, preset_texts=texts)
    from rlhfkit.data.templates import TEMPLATES, use_stop_as_eos

    template = TEMPLATES[c.template]
    tokenizer = load_tokenizer(c.model_name_or_path, tokenizer_name_or_path=c.tokenizer_name_or_path,
                               gguf_file=c.gguf_file, trust_remote_code=c.trust_remote_code,
                               chat_template=template.jinja, preset_texts=texts)
    use_stop_as_eos(tokenizer, template)
    return tokenizer


def setup_model(run: Run, texts: Callable[[], Iterable[str]]):
    """Tokenizer + causal LM from the config (LoRA applied when asked). Prints parameter counts."""
    tokenizer = config_tokenizer(run.config, texts)
    return build_model(run, tokenizer), tokenizer


def build_model(run: Run, tokenizer):
    """The config's causal LM for `tokenizer` (LoRA applied when asked), on the run's device. Prints
    parameter counts.

    Dropout is off (`load_causal_lm`). LoRA adds dropout modules of its own: pt and sft keep them
    (`lora_dropout`, active in train mode only); the preference and RL stages
    (`deterministic_forward`) switch them off again, whatever the config says."""
    c = run.config
    torch.manual_seed(c.seed)
    model = load_causal_lm(c.model_name_or_path, tokenizer, gguf_file=c.gguf_file,
                           trust_remote_code=c.trust_remote_code, load_in_4bit=c.load_in_4bit)
    if c.load_in_4bit:  # QLoRA: norms and embeddings in fp32, inputs that carry gradients to the adapters
        model = prepare_4bit(model, gradient_checkpointing=c.gradient_checkpointing)
    if c.finetuning_type == "lora":
        model = apply_lora(model, rank=c.lora_rank, alpha=c.lora_alpha, dropout=c.lora_dropout,
                           target=c.lora_target, last_layers=c.lora_layers)
        if c.deterministic_forward:
            disable_dropout(model)
    if not c.load_in_4bit:  # a 4-bit model is placed at load time and cannot be moved
        model.to(run.device)
    trainable, total = count_parameters(model)
    run.print(f"[{run.stage}] model {c.model_name_or_path}: {total / 1e6:.2f}M parameters, "
              f"{trainable / 1e6:.2f}M trainable ({c.finetuning_type})")
    return model


def encode_all(rows: list[dict], encode: Callable[[dict], Encoded | None], *, desc: str,
               quiet: bool | None) -> tuple[list[Encoded], int]:
    """Encode rows; examples that `encode` returns None for (too long) are skipped and counted."""
    out, skipped = [], 0
    for row in progress(rows, disable=quiet, desc=desc):
        example = encode(row)
        if example is None:
            skipped += 1
        else:
            out.append(example)
    return out, skipped


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def shard(items: list, run: Run) -> list:
    """This process's share of an evaluation set (every world_size-th item). Under ZeRO-3 / FSDP2
    every forward pass is a collective, so every rank must run as many: the set must split evenly."""
    from rlhfkit.train.deepspeed import shards_parameters

    if shards_parameters(run) and len(items) % run.world_size:
        raise ConfigError(f"under engine '{run.engine.name}' every process must evaluate as many examples: "
                          f"{len(items)} evaluation examples do not split over {run.world_size} processes "
                          "(choose val_size or an eval_dataset size that does)")
    return items[run.rank::run.world_size]


def save_final(run: Run, model, tokenizer, adapter: str | None = None) -> Path:
    """The trained model in Hugging Face format (safetensors) + tokenizer in output_dir: THE save
    path of every stage.

    LoRA runs save the adapter there (`adapter`: only that one, when the model holds several, e.g.
    PPO's policy next to its critic and reward adapters), its `base_model_name_or_path` the absolute
    base path (so `peft.AutoPeftModelForCausalLM.from_pretrained(output_dir)` works from any
    directory), and the merged model under `merged/` when asked. A preset base has random weights
    that exist nowhere else, so its LoRA runs always save `merged/` too."""
    c = run.config
    out = run.output_dir
    lora = c.finetuning_type == "lora"
    from_preset = preset_name(c.model_name_or_path) is not None
    from rlhfkit.train.deepspeed import gathered_parameters
    from rlhfkit.train.fsdp import full_model_state, is_fsdp

    state = full_model_state(model) if is_fsdp(run) else None  # FSDP2: gather the shards (collective)
    with gathered_parameters(run, model):  # ZeRO-3: whole weights on every rank while the main process writes
        if run.is_main:
            _save_final_main(run, model, tokenizer, adapter, lora, from_preset, state)
    run.accelerator.wait_for_everyone()
    return out


def _save_final_main(run: Run, model, tokenizer, adapter: str | None, lora: bool, from_preset: bool,
                     state: dict | None = None) -> None:
    c = run.config
    out = run.output_dir
    names = list(model.peft_config) if lora else []
    selected = [adapter] if adapter is not None and len(names) > 1 else None
    if lora and not from_preset:
        for name in names:
            model.peft_config[name].base_model_name_or_path = base_reference(c.model_name_or_path)
    model.save_pretrained(out, safe_serialization=True, **({"selected_adapters": selected} if selected else {}),
                          **({"state_dict": state} if state is not None else {}))
    tokenizer.save_pretrained(out)
    if lora and (c.merge_lora or from_preset):
        if from_preset and not c.merge_lora:
            run.print(f"[{run.stage}] LoRA on {c.model_name_or_path}: the random base exists only in "
                      f"this run, so the merged model is saved too ({out / 'merged'})")
        if selected:  # merge only the chosen adapter, on a copy (the others stay in the live model)
            import copy

            model = copy.deepcopy(model)
            for name in names:
                if name != adapter:
                    model.delete_adapter(name)
        merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
        merged.save_pretrained(out / "merged", safe_serialization=True)
        tokenizer.save_pretrained(out / "merged")


def config_task(name: str | None):
    """The built-in task a config's `task` names (None when unset); an unknown name is a
    ConfigError raised before any model loads."""
    if not name:
        return None
    from rlhfkit.tasks import get_task

    try:
        return get_task(name)
    except ValueError as e:
        raise ConfigError(f"task: {e}") from None


def skipped_note(run: Run, skipped: dict[str, int], what: str) -> None:
    """Print how many examples of each split were skipped as too long (never silently)."""
    for name, n in skipped.items():
        if n:
            run.print(f"[{run.stage}] skipped {n} {name} {what} within max_length={run.config.max_length}")


def gold_eval(run: Run, model, tokenizer, task) -> dict:
    """Gold reward / EOS rate / length of samples on the task's held-out prompts (main process);
    the first 8 samples are appended to `output_dir/samples.jsonl`."""
    from rlhfkit.train.deepspeed import samples_on_this_rank

    if task is None or not samples_on_this_rank(run):
        return {}
    import json

    from rlhfkit.eval.generation import sample_and_score

    c = run.config
    metrics, samples = sample_and_score(model, tokenizer, task, n_prompts=c.eval_num_prompts,
                                        max_new_tokens=c.max_new_tokens, seed=c.seed)
    if not run.is_main:  # ZeRO-3: this rank only took part in the collective forward passes
        return {}
    with (run.output_dir / "samples.jsonl").open("a") as f:
        for s in samples[:8]:
            f.write(json.dumps(s) + "\n")
    return metrics


def keep_padding_free(run: Run, matches: Callable[[], bool]) -> bool:
    """`padding_free` as the config asks, unless `matches()` (the stage's check of its packed forward
    against its padded one on a few training examples) says the model's attention ignores packed
    position ids or the shared-prompt mask: then one warning, and padding for the whole run
    (`run.config.padding_free` set False). The one rule of every stage that packs."""
    if not run.config.padding_free:
        return False
    if matches():
        return True
    run.print(f"[{run.stage}] WARNING: this model's packed forward pass (padding_free: true) does not match "
              "its padded one (its attention does not follow packed position ids or the shared-prompt mask): "
              "padding instead")
    run.config.padding_free = False
    return False
