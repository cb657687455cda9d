"""The four PPO roles (policy, reference, critic, reward) built from a PPOConfig.

Memory layouts (RLHF_NOTES 11, issue #4 "Roles and memory"):

LoRA, reward model = LoRA adapter over the same SFT base (the usual pipeline): ONE base in memory
  policy     base + adapter `default` (trainable)            -> logits
  reference  base with adapters disabled                     -> logits
  critic     base + adapter `critic` (starts as a copy of the reward adapter) + value head
  reward     base + adapter `reward` (frozen) + the RM head (frozen), normalised
LoRA, reward model on another base (full RM, or LoRA over a different base): the policy base
  serves policy and reference; a separate frozen RM model serves the reward (adapters disabled)
  and, with adapter `critic` + value head, the critic. Two bases in memory.
LoRA, reward functions only: the critic is adapter `critic` on the policy base.
Full fine-tuning: separate copies (policy, frozen reference, critic backbone copy, frozen RM).

A reward model whose tokenizer (vocabulary) differs from the policy's scores re-encoded texts
with its own tokenizer, but the critic reads the POLICY's token ids at every response position,
so it cannot live on the reward model's backbone: it is then built on the policy backbone (full
fine-tuning: a copy of it; LoRA: adapter `critic` on the policy base, as with reward functions
only) with a zero value head, and `value_init: reward_model` is a ConfigError.

The value head is a Linear(hidden, 1) with bias. Initialised from the reward model it is the
RM head with the stored normalisation folded in (w / s, (b - mean) / s), so at step 0 the value
read at the reward model's position equals the normalised score exactly. `value_init: zero`
(and every run without a reward model) starts it at 0.

peft quirk handled here: `set_adapter` and `disable_adapter` rewrite `requires_grad` of every
adapter (only the active one stays trainable). Every switch goes through `Roles.adapter` /
`Roles.reference`, which restore the trainable set afterwards, so one optimizer can train the
policy and critic adapters of one base.
"""

from __future__ import annotations

import copy
import json
import logging
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rlhfkit.config import PPOConfig
from rlhfkit.errors import ConfigError
from rlhfkit.models.load import (
    apply_lora,
    base_reference,
    disable_dropout,
    enable_gradient_checkpointing,
    load_causal_lm,
    prepare_4bit,
)
from rlhfkit.models.logprobs import hidden_at, response_hidden
from rlhfkit.models.reward import (
    Normalization,
    RewardScorer,
    last_token_index,
    load_normalization,
    load_reward_model,
    reward_backbone,
    reward_head,
)

log = logging.getLogger("rlhfkit")

POLICY, CRITIC, REWARD = "default", "critic", "reward"


def _same_path(a: str | None, b: str | None) -> bool:
    """Do two model references name the same model? (`pkg:` files and paths resolved, as an adapter
    records its base: `base_reference`.)"""
    if a is None or b is None:
        return False
    a, b = base_reference(a), base_reference(b)
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return a == b


def value_head_from_reward(head: torch.nn.Linear | None, norm: Normalization | None, hidden: int) -> torch.nn.Linear:
    """Linear(hidden, 1, bias) = the RM head with normalisation folded in, or zeros when `head` is None."""
    out = torch.nn.Linear(hidden, 1, bias=True)
    with torch.no_grad():
        out.weight.zero_()
        out.bias.zero_()
        if head is not None:
            norm = norm or Normalization()
            scale = 1.0 / max(norm.std, 1e-8) if norm.divide_by_std else 1.0
            out.weight.copy_(head.weight.detach().float() * scale)
            bias = float(head.bias.detach().item()) if head.bias is not None else 0.0
            out.bias.fill_((bias - norm.mean) * scale)
    return out


class Trainable(torch.nn.ModuleDict):
    """The trained modules of the PPO roles (policy; critic backbone or base; value head), one module
    for the optimizer, checkpoints and the engine (one DeepSpeed engine wraps it). Its forward runs a
    function of the roles, `trainable(fn)` = `fn()`: called through the engine, each micro-batch's
    forward passes go through DeepSpeed's forward (its per-forward bookkeeping, which ZeRO-3's
    gradient reduction relies on), whichever roles they use."""

    def forward(self, fn):
        return fn()


@dataclass
class Roles:
    """What the PPO loop needs: `policy` (a causal LM; peft under LoRA), and four operations.

    `trainable` holds every trained module (for the optimizer, checkpoints and the
    parameter-change test); `modules` lists each role's modules (for counting memory)."""

    policy: torch.nn.Module
    value_head: torch.nn.Linear
    critic_backbone: torch.nn.Module
    trainable: "Trainable"
    ref_model: torch.nn.Module | None = None          # None: policy with adapters disabled
    critic_peft: torch.nn.Module | None = None         # the peft model holding adapter `critic`
    reward_scorer: RewardScorer | None = None          # separate reward model (frozen)
    reward_backbone_shared: torch.nn.Module | None = None  # shared base: backbone for adapter `reward`
    reward_head_shared: torch.nn.Linear | None = None
    reward_normalization: Normalization | None = None
    reward_same_vocab: bool = True
    critic_on_reward_model: bool = False               # critic backbone = the separate reward model's
    reward_padding_free: bool = False                  # score packed (`pack_rewards`)
    modules: dict[str, list[torch.nn.Module]] = field(default_factory=dict)
    _trainable_names: dict[int, set[str]] = field(default_factory=dict)

    def __post_init__(self):
        # by parameter NAME per model, not by object: FSDP2 replaces each parameter by its shard (and,
        # while unsharded, by the whole tensor), so the objects change but the names do not
        models = [*self.trainable.values(), self.policy, *([self.critic_peft] if self.critic_peft else [])]
        self._trainable_names = {id(m): {n for n, p in m.named_parameters() if p.requires_grad}
                                 for m in models}

    # ---- adapter switching -----------------------------------------------------------------
    def _restore_grads(self, peft_model) -> None:
        names = self._trainable_names.get(id(peft_model), set())
        for n, p in peft_model.named_parameters():
            p.requires_grad_(n in names)

    @contextmanager
    def adapter(self, peft_model, name: str):
        """Run `peft_model` with adapter `name` active; back to the policy adapter afterwards."""
        if peft_model is None or not hasattr(peft_model, "set_adapter"):
            yield
            return
        previous = peft_model.active_adapter
        peft_model.set_adapter(name)
        self._restore_grads(peft_model)
        try:
            yield
        finally:
            peft_model.set_adapter(previous)
            self._restore_grads(peft_model)

    @contextmanager
    def reference(self):
        """Yields the reference model: a separate frozen copy, or the policy with adapters off."""
        if self.ref_model is not None:
            yield self.ref_model
            return
        with self.policy.disable_adapter():
            yield self.policy
        self._restore_grads(self.policy)

    # ---- modes ---------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> None:
        """Train (True) or eval mode for the trained roles: the policy, the critic's backbone and value
        head (dropout is off everywhere; the mode switches gradient checkpointing on in the training
        passes and off for sampling and the no-grad passes)."""
        for module in (self.policy, self.critic_backbone, self.value_head):
            module.train(mode)

    def enable_gradient_checkpointing(self) -> None:
        """`gradient_checkpointing: true` for every role that trains: the policy and the critic's
        backbone (under LoRA on one base: the same layers)."""
        for module in (self.policy, self.critic_backbone):
            enable_gradient_checkpointing(module)

    # ---- roles ---------------------------------------------------------------------------------
    def values(self, input_ids, attention_mask, context_length: int, padding_free: bool = False) -> torch.Tensor:
        """(B, W) critic values V(s_t), read from the hidden state before response token t of a rollout
        batch (prompt | response layout; `response_hidden`); 0 where that state is not a real token."""
        peft = self.critic_peft
        with self.adapter(peft, CRITIC) if peft is not None else nullcontext():
            hidden = response_hidden(self.critic_backbone, input_ids, attention_mask, context_length,
                                     padding_free=padding_free)
        return self.value_head(hidden.float()).squeeze(-1).float()

    def pack_rewards(self, flag: bool) -> None:
        """Score the reward model's passes packed, padding-free (`flag`), like every other pass: a
        rollout batch is left-padded prompts + right-padded responses, so a padded pass computes
        ~1.5x the real tokens on varied lengths."""
        self.reward_padding_free = flag
        if self.reward_scorer is not None:
            self.reward_scorer.padding_free = flag

    @property
    def reward_vocab_size(self) -> int:
        """The vocabulary of the ids `reward` takes (the separate reward model's own, when it has one)."""
        model = self.reward_scorer.model if self.reward_scorer is not None else self.policy
        return model.config.vocab_size

    @torch.no_grad()
    def packed_rewards_match(self, input_ids, attention_mask, atol: float = 1e-3) -> bool:
        """Whether the packed reward pass gives this batch the padded pass's scores (a model that
        ignores packed position ids would not). Leaves the packing as it was."""
        was = self.reward_padding_free
        try:
            self.pack_rewards(False)
            padded = self.reward(input_ids, attention_mask)
            self.pack_rewards(True)
            packed = self.reward(input_ids, attention_mask)
        finally:
            self.pack_rewards(was)
        return bool(torch.allclose(padded, packed, atol=atol, rtol=0))

    @torch.no_grad()
    def reward(self, input_ids, attention_mask) -> torch.Tensor:
        """(B,) normalised reward-model score read at the last real token (packed when
        `reward_padding_free`)."""
        if self.reward_scorer is not None:
            peft = self.critic_peft if self.critic_peft is not None and self.critic_peft is not self.policy else None
            context = peft.disable_adapter() if peft is not None else nullcontext()
            with context:
                scores = self.reward_scorer.score(input_ids, attention_mask)
            if peft is not None:
                self._restore_grads(peft)
            return scores
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        with self.adapter(self.policy, REWARD):
            last = hidden_at(self.reward_backbone_shared, input_ids, attention_mask.bool(), rows,
                             last_token_index(attention_mask), padding_free=self.reward_padding_free)
        raw = self.reward_head_shared(last).squeeze(-1).float()
        return self.reward_normalization.apply(raw)

    @property
    def has_reward_model(self) -> bool:
        return self.reward_scorer is not None or self.reward_head_shared is not None

    def unique_parameters(self) -> tuple[int, dict[str, int]]:
        """(parameters in memory counted once, per-role counts) over every role's modules."""
        seen: set[int] = set()
        total, per_role = 0, {}
        for role, mods in self.modules.items():
            n = 0
            for m in mods:
                for p in m.parameters():
                    n += p.numel()
                    if id(p) not in seen:
                        seen.add(id(p))
                        total += p.numel()
            per_role[role] = n
        return total, per_role


def _lora_kwargs(c: PPOConfig) -> dict:
    return dict(rank=c.lora_rank, alpha=c.lora_alpha, dropout=c.lora_dropout, target=c.lora_target)


def _lora_config_like(c: PPOConfig, adapter_config: dict | None = None, exclude: list[str] | None = None):
    """A LoraConfig for an extra adapter: the RM adapter's own shape when copying it, else ours.
    `exclude`: modules never adapted (the RM's `score` head, which the critic does not use)."""
    from peft import LoraConfig

    if adapter_config is not None:
        keys = ("r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "fan_in_fan_out",
                "init_lora_weights", "bias")
        kwargs = {k: adapter_config[k] for k in keys if k in adapter_config}
        if isinstance(kwargs.get("target_modules"), list):
            kwargs["target_modules"] = sorted(kwargs["target_modules"])
        kwargs["bias"] = "none"
        return LoraConfig(**kwargs)
    return LoraConfig(r=c.lora_rank, lora_alpha=c.lora_alpha, lora_dropout=c.lora_dropout,
                      target_modules=c.lora_target, bias="none", exclude_modules=exclude)


def _load_adapter_weights(peft_model, rm_dir: Path, name: str) -> dict[str, torch.Tensor]:
    """Load the LoRA weights of the RM adapter in `rm_dir` into adapter `name` of `peft_model`;
    returns the RM's non-LoRA weights (its `score` head) by short name."""
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    state = load_peft_weights(str(rm_dir), device="cpu")
    lora = {k: v for k, v in state.items() if "lora_" in k}
    rest = {k: v for k, v in state.items() if "lora_" not in k}
    result = set_peft_model_state_dict(peft_model, lora, adapter_name=name)
    missing = [k for k in result.unexpected_keys if "lora_" in k]
    if missing or not lora:
        raise ConfigError(f"reward_model {rm_dir}: its LoRA weights do not fit the policy's base "
                          f"({len(lora)} tensors; unexpected e.g. {missing[:2]})")
    return rest


def _score_head_from_state(rest: dict[str, torch.Tensor], hidden: int) -> torch.nn.Linear:
    weight = next((v for k, v in rest.items() if k.endswith("score.weight")), None)
    if weight is None:
        raise ConfigError("reward_model: the LoRA adapter holds no `score` head (modules_to_save)")
    bias = next((v for k, v in rest.items() if k.endswith("score.bias")), None)
    head = torch.nn.Linear(hidden, 1, bias=bias is not None)
    with torch.no_grad():
        head.weight.copy_(weight.float())
        if bias is not None:
            head.bias.copy_(bias.float())
    head.requires_grad_(False)
    return head


def _reward_vocab_check(c: PPOConfig, rm_dir: Path, tokenizer, printer) -> bool:
    """True when the reward model's tokenizer has the policy's vocabulary. When it does not, says
    where the critic goes and why, or raises ConfigError for an explicit `value_init: reward_model`
    (checked from the tokenizer alone, before any model loads)."""
    from rlhfkit.models.load import load_tokenizer

    rm_vocab, vocab = load_tokenizer(str(rm_dir)).get_vocab(), tokenizer.get_vocab()
    if rm_vocab == vocab:
        return True
    why = (f"the reward model {rm_dir} uses another tokenizer than the policy ({len(rm_vocab)} vs "
           f"{len(vocab)} tokens, different vocabularies) and a critic reads the policy's token ids")
    if c.value_init == "reward_model":
        raise ConfigError(f"value_init: reward_model: {why}, so it cannot start from the reward model's "
                          "backbone and head; use value_init: zero (or leave it unset)")
    layout = ("adapter 'critic' on the policy base" if c.finetuning_type == "lora"
              else "a copy of the policy backbone")
    printer(f"[ppo] critic: {layout} with a zero value head, not the reward model: {why}. The reward model "
            "scores the texts re-encoded with its own tokenizer")
    return False


def build_roles(c: PPOConfig, tokenizer, device, printer=print) -> Roles:
    """Load/build every role for `c` (see the module docstring). Dropout is off in all."""
    rm_dir = Path(c.reward_model) if c.reward_model else None
    rm_adapter_cfg = None
    same_vocab = True
    if rm_dir is not None:
        if not rm_dir.is_dir():
            raise ConfigError(f"reward_model: {rm_dir} is not a directory")
        if (rm_dir / "adapter_config.json").is_file():
            rm_adapter_cfg = json.loads((rm_dir / "adapter_config.json").read_text())
        same_vocab = _reward_vocab_check(c, rm_dir, tokenizer, printer)
    torch.manual_seed(c.seed)
    policy = prepare_4bit(load_causal_lm(c.model_name_or_path, tokenizer, gguf_file=c.gguf_file,
                                         trust_remote_code=c.trust_remote_code, load_in_4bit=c.load_in_4bit),
                          gradient_checkpointing=c.gradient_checkpointing)  # QLoRA: a 4-bit base
    hidden = policy.config.hidden_size
    ref_path = c.ref_model or c.model_name_or_path
    separate_ref = c.finetuning_type == "full" or not _same_path(ref_path, c.model_name_or_path)
    ref_model = None
    if separate_ref:
        ref_model = load_causal_lm(ref_path, tokenizer, trust_remote_code=c.trust_remote_code,
                                   gguf_file=c.gguf_file if ref_path == c.model_name_or_path else None)
        # Never trained (not in `trainable`, only run under no_grad), but its weights carry the same
        # requires_grad flag as the policy's base weights: on some CPUs (seen: MKL on AVX-512) a
        # linear layer rounds differently when its weight requires grad, even under no_grad, and
        # the KL must be exactly 0 while policy = reference.
        ref_model.requires_grad_(c.finetuning_type == "full").eval()

    shares_base = (c.finetuning_type == "lora" and rm_adapter_cfg is not None and same_vocab
                   and _same_path(rm_adapter_cfg.get("base_model_name_or_path"), c.model_name_or_path))
    critic_from_rm = rm_dir is not None and same_vocab and (c.value_init or "reward_model") == "reward_model"

    if c.finetuning_type == "lora":
        policy = apply_lora(policy, **_lora_kwargs(c))
        if shares_base:
            # one base: reward adapter (frozen) + critic adapter (a copy of it, trainable)
            policy.add_adapter(REWARD, _lora_config_like(c, rm_adapter_cfg))
            rest = _load_adapter_weights(policy, rm_dir, REWARD)
            rm_head = _score_head_from_state(rest, hidden)
            norm = load_normalization(rm_dir)
            policy.add_adapter(CRITIC, _lora_config_like(c, rm_adapter_cfg) if critic_from_rm else _lora_config_like(c))
            if critic_from_rm:
                _load_adapter_weights(policy, rm_dir, CRITIC)
            policy.set_adapter(POLICY)
            for n, p in policy.named_parameters():
                p.requires_grad_(f".{POLICY}." in n or f".{CRITIC}." in n)
            value_head = value_head_from_reward(rm_head if critic_from_rm else None, norm, hidden)
            roles = Roles(policy=policy, value_head=value_head, critic_backbone=reward_backbone_of_lm(policy),
                          trainable=Trainable({"policy": policy, "value_head": value_head}),
                          ref_model=ref_model, critic_peft=policy,
                          reward_backbone_shared=reward_backbone_of_lm(policy), reward_head_shared=rm_head,
                          reward_normalization=norm)
            roles.modules = {"policy": [policy], "reference": [ref_model or policy],
                             "critic": [policy, value_head], "reward": [policy, rm_head]}
            printer("[ppo] LoRA: one base model serves policy (adapter 'default'), reference (adapters "
                    "disabled), critic (adapter 'critic' + value head) and reward (adapter 'reward' + head)")
        elif rm_dir is not None and same_vocab:
            scorer = load_reward_model(rm_dir, device="cpu")
            from peft import get_peft_model

            rm_model = scorer.model
            rm_model.requires_grad_(False)
            critic_peft = get_peft_model(rm_model, _lora_config_like(c, exclude=["score"]), adapter_name=CRITIC)
            scorer.model = critic_peft
            value_head = value_head_from_reward(reward_head(rm_model) if critic_from_rm else None,
                                                scorer.normalization, rm_model.config.hidden_size)
            if not critic_from_rm:
                log.info("value_init: zero -> the critic backbone is still the reward model's")
            roles = Roles(policy=policy, value_head=value_head, critic_backbone=reward_backbone(critic_peft),
                          trainable=Trainable({"policy": policy, "critic": critic_peft,
                                                         "value_head": value_head}),
                          ref_model=ref_model, critic_peft=critic_peft, reward_scorer=scorer,
                          critic_on_reward_model=True)
            roles.modules = {"policy": [policy], "reference": [ref_model or policy],
                             "critic": [critic_peft, value_head], "reward": [critic_peft]}
            printer("[ppo] LoRA: the policy base serves policy and reference; the reward model (another "
                    "base) serves reward (adapters disabled) and critic (adapter 'critic' + value head)")
        else:
            # reward functions only, or a reward model on another tokenizer: the critic is adapter
            # `critic` on the policy base with a zero value head; such a reward model stays separate
            scorer = load_reward_model(rm_dir, device="cpu") if rm_dir is not None else None
            if scorer is not None:
                scorer.model.requires_grad_(False)
            policy.add_adapter(CRITIC, _lora_config_like(c))
            policy.set_adapter(POLICY)
            for n, p in policy.named_parameters():
                p.requires_grad_(f".{POLICY}." in n or f".{CRITIC}." in n)
            value_head = value_head_from_reward(None, None, hidden)
            roles = Roles(policy=policy, value_head=value_head, critic_backbone=reward_backbone_of_lm(policy),
                          trainable=Trainable({"policy": policy, "value_head": value_head}),
                          ref_model=ref_model, critic_peft=policy, reward_scorer=scorer,
                          reward_same_vocab=same_vocab)
            roles.modules = {"policy": [policy], "reference": [ref_model or policy], "critic": [policy, value_head]}
            if scorer is not None:
                roles.modules["reward"] = [scorer.model]
            printer("[ppo] LoRA: one base model serves policy, reference (adapters disabled) and critic "
                    "(adapter 'critic' + zero value head); rewards from "
                    + ("a separate reward model" if scorer is not None else "Python functions"))
    else:
        scorer = load_reward_model(rm_dir, device="cpu") if rm_dir is not None else None
        if scorer is not None:
            scorer.model.requires_grad_(False)
        if scorer is not None and same_vocab:
            critic_backbone = copy.deepcopy(reward_backbone(scorer.model))
            value_head = value_head_from_reward(reward_head(scorer.model) if critic_from_rm else None,
                                                scorer.normalization, scorer.model.config.hidden_size)
        else:  # reward functions only, or a reward model on another tokenizer: the policy backbone
            critic_backbone = copy.deepcopy(reward_backbone_of_lm(policy))
            value_head = value_head_from_reward(None, None, hidden)
        critic_backbone.requires_grad_(True)
        disable_dropout(critic_backbone)
        roles = Roles(policy=policy, value_head=value_head, critic_backbone=critic_backbone,
                      trainable=Trainable({"policy": policy, "critic": critic_backbone,
                                                     "value_head": value_head}),
                      ref_model=ref_model, reward_scorer=scorer, reward_same_vocab=same_vocab,
                      critic_on_reward_model=scorer is not None and same_vocab)
        roles.modules = {"policy": [policy], "reference": [ref_model], "critic": [critic_backbone, value_head]}
        if scorer is not None:
            roles.modules["reward"] = [scorer.model]
        printer("[ppo] full fine-tuning: separate policy, reference, critic"
                + (" and reward model" if scorer is not None else " (rewards from Python functions)"))
    for mods in roles.modules.values():
        for m in mods:
            m.to(device)
            disable_dropout(m)
    if roles.reward_scorer is not None:
        roles.reward_scorer.model.to(device).eval()
    return roles


def fsdp_roots(roles: Roles) -> tuple[list[torch.nn.Module], list[torch.nn.Module]]:
    """Under FSDP2: (the trained models, each sharded as its own root: policy, critic backbone or critic
    base, value head; the extra FSDP units inside them). The critic's backbone is called on its own
    (`Roles.values`, and the shared-base reward), so where it lives inside a root (the LoRA critic on the
    policy's or the reward model's base) it is an FSDP unit of its own: calling it under a sharded root
    would otherwise leave the root's own parameters (embeddings, final norm) sharded. The frozen
    reference and reward model are not here: they stay whole on every rank (LoRA: the reference is the
    policy base with adapters off, sharded with it)."""
    roots = list({id(m): m for m in roles.trainable.values()}.values())
    inner = [] if any(roles.critic_backbone is r for r in roots) else [roles.critic_backbone]
    return roots, inner


# ---- saving the critic --------------------------------------------------------------------------

CRITIC_DIR = "critic"


def _seq_cls_around(backbone, config, value_head: torch.nn.Linear, pad_token_id: int | None):
    """A `...ForSequenceClassification` (num_labels=1) holding `backbone` (not copied) with the value
    head as its `score`, and the Normalization that adds the value head's bias back (Llama's
    `score` has no bias): its normalised score at a position = the critic's value there."""
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(config)
    config.num_labels = 1
    config.architectures = None
    config.pad_token_id = pad_token_id
    dtype = next(backbone.parameters()).dtype
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config, dtype=dtype)
    setattr(model, model.base_model_prefix, backbone)
    has_bias = model.score.bias is not None
    model.score = torch.nn.Linear(value_head.in_features, 1, bias=has_bias, dtype=dtype)
    with torch.no_grad():
        model.score.weight.copy_(value_head.weight)
        if has_bias:
            model.score.bias.copy_(value_head.bias)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise NotImplementedError(f"{type(model).__name__}: cannot save the critic ({leftover[:3]} are not "
                                  "part of the backbone or the head)")
    bias = 0.0 if has_bias else float(value_head.bias.detach().item())
    return model, Normalization(mean=-bias, reference="ppo critic: -mean is the value head's bias")


def _merged_critic(roles: Roles):
    """A stand-alone copy of the critic's backbone with its LoRA adapter merged, and its config."""
    peft = copy.deepcopy(roles.critic_peft)
    for name in [n for n in peft.peft_config if n != CRITIC]:
        peft.delete_adapter(name)
    merged = peft.merge_and_unload()
    inner = merged.get_base_model() if hasattr(merged, "get_base_model") else merged
    return getattr(inner, inner.base_model_prefix), inner.config


def save_critic(out_dir, roles: Roles, c: PPOConfig, tokenizer, state_of=None) -> Path:
    """Write the trained critic to `out_dir` as a reward-model directory:
    `load_reward_model(out_dir).score(ids, mask)` = the critic's value read at the last real token
    (the value one past the response, where a critic initialised from the RM starts at the
    normalised score), so it can initialise the critic of a later run or be inspected.

    LoRA with the critic adapter on the policy's base (reloadable): a LoRA reward-model adapter
    directory over that base (the critic adapter + the value head as `score`); otherwise (full
    fine-tuning, a preset base that exists only in this run, a critic on a separate RM's base) a
    full sequence-classification model. The value head's bias is stored as the normalisation mean.

    `state_of(module)`: the module's whole state dict (default `module.state_dict()`); under FSDP2
    the caller passes gathered full state dicts (a sharded module's own state_dict gives shards)."""
    from safetensors.torch import save_file

    from rlhfkit.models.load import base_reference
    from rlhfkit.models.presets import preset_name
    from rlhfkit.models.reward import save_normalization

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    head = roles.value_head
    on_policy_base = roles.critic_peft is not None and roles.critic_peft is roles.policy
    if on_policy_base and preset_name(c.model_name_or_path) is None:
        from peft import get_peft_model_state_dict

        state = {k: v.detach().contiguous() for k, v in
                 get_peft_model_state_dict(roles.policy, adapter_name=CRITIC,
                                           state_dict=state_of(roles.policy) if state_of else None).items()}
        lora_cfg = copy.deepcopy(roles.policy.peft_config[CRITIC])
        lora_cfg.task_type = "SEQ_CLS"
        lora_cfg.modules_to_save = ["score"]
        lora_cfg.exclude_modules = None
        lora_cfg.inference_mode = True
        lora_cfg.target_modules = sorted({k.split(".")[-3] for k in state if ".lora_" in k})
        base = base_reference(c.model_name_or_path)
        if c.gguf_file:
            base = str(Path(base) / c.gguf_file)
        lora_cfg.base_model_name_or_path = base
        lora_cfg.save_pretrained(str(out))
        state["base_model.model.score.weight"] = head.weight.detach().to(next(iter(state.values())).dtype).clone()
        save_file(state, str(out / "adapter_model.safetensors"))
        norm = Normalization(mean=-float(head.bias.detach().item()),
                             reference="ppo critic: -mean is the value head's bias")
        critic_tokenizer = tokenizer
    else:
        if roles.critic_peft is not None:
            backbone, config = _merged_critic(roles)
        else:
            backbone, config = roles.critic_backbone, roles.policy.config
            if roles.critic_on_reward_model:
                config = roles.reward_scorer.model.config
        critic_tokenizer = roles.reward_scorer.tokenizer if roles.critic_on_reward_model else tokenizer
        model, norm = _seq_cls_around(backbone, config, head, critic_tokenizer.pad_token_id)
        state = None
        if state_of is not None and roles.critic_peft is None:  # the backbone's gathered weights + the head
            state = {f"{model.base_model_prefix}.{k}": v for k, v in state_of(backbone).items()}
            state.update({f"score.{k}": v for k, v in model.score.state_dict().items()})
        model.save_pretrained(str(out), safe_serialization=True, **({"state_dict": state} if state else {}))
    critic_tokenizer.save_pretrained(str(out))
    save_normalization(out, norm)
    return out


def reward_backbone_of_lm(model):
    """The transformer under a causal LM (through peft): LlamaForCausalLM.model."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(inner, inner.base_model_prefix)
