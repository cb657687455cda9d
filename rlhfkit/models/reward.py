"""Reward models: a scalar head on a causal-LM backbone, read at the last real token.

A reward model is a plain Hugging Face `AutoModelForSequenceClassification` with `num_labels=1`
(for Llama-style models: `LlamaForSequenceClassification`, backbone `model`, head `score`), built
from the SFT causal LM by taking over its backbone module (weights moved, not copied) and a fresh head
`score.weight ~ N(0, 1/sqrt(hidden + 1))`. Llama's `score` head has no bias; none is needed: a
constant offset in the reward changes no preference probability sigmoid(r_c - r_r), and the
offset the model does learn is removed by the stored normalisation (`reward_normalization.json`,
`(r - mean)`, and `/ std` when configured).

The reward of a sequence is the head's output at its last real token (the appended EOS of the
response), found from the attention mask, so left, right and no padding give the same value.

Saved directories load with plain transformers:

    model = AutoModelForSequenceClassification.from_pretrained(rm_dir)   # full fine-tuning
    raw = model(input_ids, attention_mask=mask).logits[:, 0]             # right-padded batch
    norm = json.load(open(rm_dir / "reward_normalization.json"))
    reward = (raw - norm["mean"]) / (norm["std"] if norm["divide_by_std"] else 1.0)

(transformers finds the last non-pad token from `config.pad_token_id`; for left-padded batches pass
`position_ids = (mask.cumsum(-1) - 1).clamp(min=0)` as rlhfkit does.) A LoRA reward model is a
peft adapter directory whose `adapter_config.json` names the base (the SFT model) and whose
adapter file also holds the trained `score` head (`modules_to_save`):
`PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base, num_labels=1),
rm_dir)`. `load_reward_model` handles both, and applies the normalisation.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from rlhfkit.errors import ConfigError
from rlhfkit.models.load import disable_dropout, load_causal_lm, load_tokenizer, lora_layer_targets, resolve_source
from rlhfkit.models.logprobs import forward_inputs, position_ids_from_mask
from rlhfkit.models.presets import preset_name

NORMALIZATION_FILE = "reward_normalization.json"


# ---- indexing ----------------------------------------------------------------------------------

def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last True per row; correct for left, right and no padding.

    `arange(T) * mask` is largest at the last real position (a row whose only real token is
    position 0 is all zeros, and argmax then returns 0, also correct). An all-False row gives 0."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(-1)


# ---- building --------------------------------------------------------------------------------

def init_reward_head(head: torch.nn.Linear) -> None:
    """weight ~ N(0, std = 1/sqrt(hidden + 1)), bias 0 if the head has one (in place)."""
    with torch.no_grad():
        head.weight.normal_(0.0, 1.0 / math.sqrt(head.in_features + 1))
        if head.bias is not None:
            head.bias.zero_()


def _is_sequence_classifier(model_name_or_path: str, gguf_file: str | None, trust_remote_code: bool) -> bool:
    """True when the path/id holds an `...ForSequenceClassification` checkpoint."""
    if preset_name(model_name_or_path) is not None or model_name_or_path.endswith(".gguf") or gguf_file:
        return False
    path = Path(model_name_or_path).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        if (path / "adapter_config.json").is_file():
            raise ConfigError(
                f"model_name_or_path: {model_name_or_path} is a LoRA adapter, not a model; start from "
                "the merged model (train it with merge_lora: true and use OUTPUT_DIR/merged)")
        return False
    from transformers import AutoConfig

    source, kwargs = resolve_source(model_name_or_path)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
    except OSError as e:
        raise ConfigError(f"model_name_or_path: could not load {model_name_or_path}: {e}") from None
    return any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))


def _from_causal_lm(lm):
    """A sequence-classification model (num_labels=1) with `lm`'s backbone weights."""
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(lm.config)
    config.num_labels = 1
    config.architectures = None
    # Built on the meta device (no memory, no random init), then given the LM's own backbone
    # module: the weights are moved, not copied, and only the head is allocated.
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config, dtype=lm.dtype)
    backbone = getattr(lm, lm.base_model_prefix)
    backbone.config = model.config
    setattr(model, model.base_model_prefix, backbone)
    head = model.score
    model.score = torch.nn.Linear(head.in_features, head.out_features, bias=head.bias is not None, dtype=lm.dtype)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise NotImplementedError(f"{type(model).__name__}: parameters {leftover[:3]} are not part of the "
                                  "backbone or the `score` head; rlhfkit cannot convert this architecture")
    model.name_or_path = lm.name_or_path
    for attr in ("is_loaded_in_4bit", "hf_quantizer"):  # a 4-bit (QLoRA) backbone: peft and saving must know
        if getattr(lm, attr, None):
            setattr(model, attr, getattr(lm, attr))
    return model


def build_reward_model(model_name_or_path: str, tokenizer, *, gguf_file: str | None = None,
                       trust_remote_code: bool = False, dtype: torch.dtype = torch.float32,
                       load_in_4bit: bool = False):
    """An `AutoModelForSequenceClassification` (num_labels=1) for reward modelling.

    From a causal LM (HF directory, hub id, `.gguf` file or `preset:NAME`): its backbone plus a
    fresh head (`init_reward_head`). From an existing sequence-classification checkpoint: loaded
    as is, head kept. Either way: embeddings sized to `tokenizer`, `config.pad_token_id` set,
    dropout off, weights read from safetensors only. `load_in_4bit` (QLoRA, from a causal LM): the
    backbone's linear layers in 4-bit NF4 (`load_causal_lm`), the fresh head in `dtype`."""
    from transformers import AutoModelForSequenceClassification

    if load_in_4bit:
        if _is_sequence_classifier(model_name_or_path, gguf_file, trust_remote_code):
            raise ConfigError(f"load_in_4bit: {model_name_or_path} is already a reward model (sequence "
                              "classifier); a 4-bit reward model is built from a causal LM (the SFT model)")
        lm = load_causal_lm(model_name_or_path, tokenizer, gguf_file=gguf_file,
                            trust_remote_code=trust_remote_code, dtype=dtype, load_in_4bit=True)
        model = _from_causal_lm(lm)
        del lm
        init_reward_head(reward_head(model))
        model.score.to(model.get_input_embeddings().weight.device)  # where the 4-bit backbone loaded
        model.config.pad_token_id = tokenizer.pad_token_id
        disable_dropout(model)
        return model  # a 4-bit model cannot be cast (and stays where it loaded)
    if _is_sequence_classifier(model_name_or_path, gguf_file, trust_remote_code):
        source, kwargs = resolve_source(model_name_or_path)
        model = AutoModelForSequenceClassification.from_pretrained(
            source, trust_remote_code=trust_remote_code, dtype=dtype, use_safetensors=True, **kwargs)
        if model.config.num_labels != 1:
            raise ConfigError(f"model_name_or_path: {model_name_or_path} is a classifier with "
                              f"num_labels={model.config.num_labels}; a reward model needs num_labels=1")
        if model.get_input_embeddings().num_embeddings < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            with torch.no_grad():
                model.get_input_embeddings().weight[tokenizer.pad_token_id].zero_()
    else:
        lm = load_causal_lm(model_name_or_path, tokenizer, gguf_file=gguf_file,
                            trust_remote_code=trust_remote_code, dtype=dtype)
        model = _from_causal_lm(lm)
        del lm
        init_reward_head(reward_head(model))
    model.config.pad_token_id = tokenizer.pad_token_id
    disable_dropout(model)
    return model.to(dtype)


# ---- parts through wrappers --------------------------------------------------------------------

def _unwrap(model):
    """The HF sequence-classification model under DDP (`.module`) and peft wrappers."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):  # peft PeftModel
        model = model.get_base_model()
    return model


def reward_head(model) -> torch.nn.Linear:
    """The `score` head (the trainable copy when peft wraps it as a module to save)."""
    head = _unwrap(model).score
    if hasattr(head, "modules_to_save"):  # peft ModulesToSaveWrapper
        if head.active_adapters:
            return head.modules_to_save[head.active_adapters[0]]
        return head.original_module
    return head


def reward_backbone(model):
    """The base transformer (e.g. LlamaModel; with LoRA layers in it under peft)."""
    inner = _unwrap(model)
    return getattr(inner, inner.base_model_prefix)


# ---- rewards ---------------------------------------------------------------------------------

def _head_outputs(model, inputs: dict) -> torch.Tensor:
    """(R, W) float32: the head applied at every position of the model inputs `inputs` (values at
    pads and packed tails are meaningless). Runs the model's own forward (so DDP and peft wrappers
    see the call) and reads the head's per-position output with a forward hook: the HF forward
    itself returns only a pooled value."""
    captured = []
    hook = reward_head(model).register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        model(**inputs, use_cache=False)
    finally:
        hook.remove()
    return captured[-1].squeeze(-1).float()


def token_rewards(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) float32: the head applied at every position of a padded batch (position ids from the
    mask; values at pads are meaningless)."""
    return _head_outputs(model, dict(input_ids=input_ids, attention_mask=attention_mask.long(),
                                     position_ids=position_ids_from_mask(attention_mask)))


def sequence_rewards(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, padding_free: bool = False,
                     groups: list[int] | None = None) -> torch.Tensor:
    """(B,) raw reward at the last real token of each row (the EOS of the response).

    `padding_free`: the rows are packed first (`rlhfkit.models.logprobs.pack_plan`), so no layer
    computes a pad, and rows with the same `groups` id (a pair's chosen and rejected, which share
    the whole conversation) share one pass over their common prefix: the conversation once, each
    reply as a branch (`shared_prefix_attention`; SDPA / eager attention). The same packing as
    DPO's log-probs (`forward_inputs`); equal to the padded pass up to float rounding as long as
    the model follows packed position ids and 4D masks (`padding_free_rewards_match` checks)."""
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    cols = last_token_index(attention_mask)
    inputs, at_rows, at_cols = forward_inputs(model, input_ids, attention_mask.bool(), rows, cols,
                                              padding_free, groups)
    return _head_outputs(model, inputs)[at_rows, at_cols]


def packing_probe(vocab_size: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of three right-padded rows of different lengths (token ids 5, 6,
    ... within the vocabulary): a batch on which to check that a model scores packed rows as padded
    ones before a run packs its passes."""
    from rlhfkit.data.collate import pad_batch

    batch = pad_batch([[(5 + i) % vocab_size for i in range(n)] for n in (7, 12, 4)], 0, side="right")
    return batch["input_ids"].to(device), batch["attention_mask"].to(device)


@torch.no_grad()
def padding_free_rewards_match(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                               groups: list[int] | None = None, atol: float = 1e-3) -> bool:
    """True when the packed pass (with shared prefixes for `groups`) gives this batch the padded
    pass's rewards (a model whose attention ignores packed position ids or 4D masks would not)."""
    padded = sequence_rewards(model, input_ids, attention_mask)
    packed = sequence_rewards(model, input_ids, attention_mask, padding_free=True, groups=groups)
    return bool(torch.allclose(padded, packed, atol=atol, rtol=0))


# ---- normalisation -----------------------------------------------------------------------------

@dataclass
class Normalization:
    """`(r - mean)`, and `/ std` when `divide_by_std`: statistics of the raw reward over a
    reference set of responses (`reference` says which), so those average 0 after training."""

    mean: float = 0.0
    std: float = 1.0
    divide_by_std: bool = False
    reference: str = ""
    count: int = 0

    def apply(self, rewards: torch.Tensor) -> torch.Tensor:
        out = rewards - self.mean
        if self.divide_by_std:
            out = out / max(self.std, 1e-8)
        return out

    @classmethod
    def from_rewards(cls, rewards: torch.Tensor, *, divide_by_std: bool = False,
                     reference: str = "") -> "Normalization":
        r = rewards.double().flatten()
        std = r.std(unbiased=False).item() if r.numel() > 1 else 1.0
        return cls(mean=r.mean().item(), std=std, divide_by_std=divide_by_std, reference=reference,
                   count=r.numel())


def save_normalization(directory, norm: Normalization) -> Path:
    path = Path(directory) / NORMALIZATION_FILE
    path.write_text(json.dumps(asdict(norm), indent=2) + "\n")
    return path


def load_normalization(directory) -> Normalization:
    """The stored normalisation; identity when the directory has none (a foreign checkpoint)."""
    path = Path(directory) / NORMALIZATION_FILE
    if not path.is_file():
        return Normalization()
    data = json.loads(path.read_text())
    known = {f.name for f in fields(Normalization)}
    return Normalization(**{k: v for k, v in data.items() if k in known})


# ---- the consumer-facing scorer ------------------------------------------------------------

@dataclass
class RewardScorer:
    """A loaded reward model with its tokenizer and normalisation: what PPO, `eval-rm` and
    `score` use."""

    model: object
    tokenizer: object
    normalization: Normalization
    padding_free: bool = False
    """Score packed batches (`sequence_rewards`); set it after `padding_free_rewards_match`."""

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def raw_score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  groups: list[int] | None = None) -> torch.Tensor:
        """(B,) un-normalised rewards (float32, on the input's device); packed when
        `padding_free` is set (rows with the same `groups` id share their common prefix)."""
        r = sequence_rewards(self.model, input_ids.to(self.device), attention_mask.to(self.device),
                             padding_free=self.padding_free, groups=groups)
        return r.to(input_ids.device)

    @torch.no_grad()
    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              groups: list[int] | None = None) -> torch.Tensor:
        """(B,) normalised rewards (float32, on the input's device), no grad."""
        return self.normalization.apply(self.raw_score(input_ids, attention_mask, groups))


# ---- LoRA --------------------------------------------------------------------------------------

def apply_reward_lora(model, *, base_model_name_or_path: str, rank: int, alpha: float, dropout: float,
                      target: str | list[str], last_layers: int | None = None):
    """peft LoRA (task SEQ_CLS: the `score` head is a trainable module to save) on a reward model;
    with `last_layers`, only on the last that many transformer layers (peft `layers_to_transform`).

    `base_model_name_or_path` is recorded in adapter_config.json and must load as the base again
    (an absolute directory or .gguf path; not a preset, which has no weights to reload)."""
    from peft import LoraConfig, TaskType, get_peft_model

    if preset_name(base_model_name_or_path) is not None:
        raise ConfigError("a LoRA reward model needs a base that can be reloaded; save the preset "
                          "model first and pass its directory")
    layers, target = lora_layer_targets(model, last_layers, target)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target,
                        bias="none", task_type=TaskType.SEQ_CLS, modules_to_save=["score"],
                        layers_to_transform=layers)
    peft_model = get_peft_model(model, config)
    peft_model.peft_config["default"].base_model_name_or_path = base_model_name_or_path
    return peft_model


# ---- loading ---------------------------------------------------------------------------------

def load_reward_model(path, device="cpu", *, dtype: torch.dtype | None = None) -> RewardScorer:
    """A saved reward model (full or LoRA directory) with tokenizer and normalisation, eval mode.

    LoRA directories are merged into their base (read from adapter_config.json's
    `base_model_name_or_path`) for scoring."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"reward model {path} is not a directory")
    tokenizer = load_tokenizer(str(path))
    dtype = dtype or torch.float32
    adapter = path / "adapter_config.json"
    if adapter.is_file():
        from peft import PeftModel

        base = json.loads(adapter.read_text()).get("base_model_name_or_path")
        if not base:
            raise ConfigError(f"{adapter}: base_model_name_or_path is empty; cannot find the base model")
        model = build_reward_model(base, tokenizer, dtype=dtype)
        model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    elif (path / "config.json").is_file():
        model = build_reward_model(str(path), tokenizer, dtype=dtype)
    else:
        raise ConfigError(f"reward model {path}: neither config.json nor adapter_config.json found")
    disable_dropout(model)
    model.to(device).eval()
    return RewardScorer(model, tokenizer, load_normalization(path))
