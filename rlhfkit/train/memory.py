"""`rlhfkit estimate-memory MODEL --stage STAGE --engine ENGINE`: memory per process, per role,
computed from the model config (no weights loaded: the model is built on the meta device).

Per role (the models a stage holds, as rlhfkit places them):
- weights: parameters x bytes per weight; rlhfkit keeps fp32 weights (`bf16: true` is autocast), so
  4 bytes, except for trained roles under DeepSpeed with `--bf16` (bf16 weights, 2 bytes, and an
  fp32 master copy counted with the optimizer);
- gradients: trainable parameters x 4 bytes (2 under DeepSpeed bf16);
- optimizer: AdamW's two fp32 moments, 8 bytes per trainable parameter (+4 for DeepSpeed bf16's
  fp32 master weights);
- activations (trained roles, one micro-batch of `--batch` sequences of `--seq-len` tokens), after
  Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", eq. 2):
  per layer s*b*h*(34 + 5*a*s/h) bytes at 16 bits, doubled for fp32 activations; with gradient
  checkpointing only each layer's input (2*s*b*h bytes at 16 bits) plus one layer's full set; plus
  the logits (s*b*V x 4 bytes, an upper bound: rlhfkit computes them only at response positions).

Partitioning over N processes: `single`/`ddp` hold everything; `zero2` divides gradients and
optimizer state by N; `zero3` and `fsdp2` divide weights, gradients and optimizer state by N.
Frozen roles (reference, reward model) are kept whole on every process under every engine (rlhfkit
does not partition inference-only models; see rlhfkit/train/deepspeed.py). Under LoRA the roles share
one base (as rlhfkit runs them): the reference is that base with adapters off, so it costs nothing
extra, and PPO's critic and reward are adapters (+ heads) on it. Buffers, the CUDA context, allocator
fragmentation and communication buckets are not counted: treat the result as a lower bound.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

GB = 1024 ** 3

STAGE_ROLES: dict[str, list[tuple[str, bool]]] = {
    "pt": [("policy", True)],
    "sft": [("policy", True)],
    "rm": [("reward", True)],
    "dpo": [("policy", True), ("reference", False)],
    "kto": [("policy", True), ("reference", False)],
    "grpo": [("policy", True), ("reference", False)],
    "rloo": [("policy", True), ("reference", False)],
    "online_dpo": [("policy", True), ("reference", False)],
    "xpo": [("policy", True), ("reference", False)],
    "nash_md": [("policy", True), ("reference", False)],
    "spin": [("policy", True)],  # the reference log-probs are the policy's own, taken once per iteration
    "self_reward": [("policy", True)],  # judge and reference: the policy itself
    "ppo": [("policy", True), ("reference", False), ("reward", False), ("critic", True)],
}
"""Stage -> its roles, (name, trained)."""

ENGINE_DIVISORS = {"single": (1, 1, 1), "ddp": (1, 1, 1), "zero2": (1, 0, 0), "zero3": (0, 0, 0),
                   "fsdp2": (0, 0, 0)}
"""Engine -> for (weights, gradients, optimizer) whether it is divided over processes (0) or whole (1)."""


@dataclass
class RoleMemory:
    role: str
    trained: bool
    parameters: int
    trainable: int
    weights_gb: float
    gradients_gb: float
    optimizer_gb: float
    activations_gb: float

    @property
    def total_gb(self) -> float:
        return self.weights_gb + self.gradients_gb + self.optimizer_gb + self.activations_gb


def model_config(model: str):
    """The transformers config of a preset (`preset:NAME`), a local directory or a hub id."""
    from rlhfkit.models.presets import PRESETS, preset_name

    name = preset_name(model)
    if name is not None:
        from transformers import LlamaConfig

        spec = dict(PRESETS[name])
        vocab = spec.pop("tokenizer_vocab_size")
        return LlamaConfig(vocab_size=vocab, tie_word_embeddings=True, **spec)
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model)


def count_parameters(config, lora_rank: int = 0) -> tuple[int, int, int]:
    """(parameters, LoRA parameters on every linear layer but the head, hidden size) of the model,
    built on the meta device (no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    head = model.get_output_embeddings()
    lora = sum(lora_rank * (m.in_features + m.out_features) for m in model.modules()
               if isinstance(m, torch.nn.Linear) and m is not head)
    return total, lora, config.hidden_size


def activation_bytes(config, batch: int, seq_len: int, gradient_checkpointing: bool, bf16: bool,
                     lm_head: bool = True) -> float:
    """Activation memory of one micro-batch's forward + backward (see the module docstring); the
    logits term only for a role with an LM head (`lm_head`: not the critic's or reward's scalar head)."""
    s, b, h = seq_len, batch, config.hidden_size
    a, layers, vocab = config.num_attention_heads, config.num_hidden_layers, config.vocab_size
    scale = 1.0 if bf16 else 2.0  # the formula counts 16-bit activations
    full_layer = s * b * h * (34 + 5 * a * s / h) * scale
    per_layer = 2 * s * b * h * scale if gradient_checkpointing else full_layer
    extra = full_layer if gradient_checkpointing else 0.0
    return layers * per_layer + extra + (s * b * vocab * 4 if lm_head else 0.0)


def estimate(model: str, stage: str, engine: str, num_processes: int = 1, *, lora_rank: int = 0,
             batch: int = 1, seq_len: int = 512, gradient_checkpointing: bool = False,
             bf16: bool = False) -> list[RoleMemory]:
    """Memory per process of each role of `stage` under `engine` on `num_processes` processes."""
    if stage not in STAGE_ROLES:
        raise ValueError(f"--stage {stage}: choose one of {', '.join(STAGE_ROLES)}")
    if engine not in ENGINE_DIVISORS:
        raise ValueError(f"--engine {engine}: choose one of {', '.join(ENGINE_DIVISORS)}")
    if num_processes < 1:
        raise ValueError(f"--num-processes must be >= 1, got {num_processes}")
    config = model_config(model)
    total, lora, hidden = count_parameters(config, lora_rank)
    deepspeed_bf16 = bf16 and engine in ("zero2", "zero3")
    w_bytes, g_bytes, o_bytes = (2, 2, 12) if deepspeed_bf16 else (4, 4, 8)
    whole_w, whole_g, whole_o = ENGINE_DIVISORS[engine]
    n = num_processes

    def part(value: float, whole: int) -> float:
        return value if whole else value / n

    act = {head: activation_bytes(config, batch, seq_len, gradient_checkpointing, bf16, lm_head=head)
           for head in (True, False)}
    out = []
    for i, (role, trained) in enumerate(STAGE_ROLES[stage]):
        if lora_rank:
            # one shared base, held by the first role; later roles add an adapter (+ a value/score head)
            params = (total if i == 0 else 0) + (lora if role != "reference" else 0)
            params += hidden if role in ("reward", "critic") else 0
            trainable = (lora + (hidden if role in ("reward", "critic") else 0)) if trained else 0
        else:
            params = total + (hidden if role in ("reward", "critic") else 0)
            trainable = params if trained else 0
        sharded = trained  # frozen roles stay whole on every process
        weights = params * (w_bytes if trained else 4)  # frozen roles: fp32 copies outside the engine
        out.append(RoleMemory(
            role=role, trained=trained, parameters=params, trainable=trainable,
            weights_gb=(part(weights, whole_w) if sharded else weights) / GB,
            gradients_gb=part(trainable * g_bytes, whole_g) / GB,
            optimizer_gb=part(trainable * o_bytes, whole_o) / GB,
            activations_gb=(act[role in ("policy", "reference")] / GB) if trained else 0.0,
        ))
    return out


def format_table(rows: list[RoleMemory]) -> str:
    head = f"{'role':10s} {'params':>10s} {'trainable':>10s} {'weights':>8s} {'grads':>8s} {'optim':>8s} " \
           f"{'activ':>8s} {'total':>8s}   (GiB per process)"
    lines = [head]
    for r in rows:
        lines.append(f"{r.role:10s} {r.parameters / 1e6:9.1f}M {r.trainable / 1e6:9.1f}M {r.weights_gb:8.2f} "
                     f"{r.gradients_gb:8.2f} {r.optimizer_gb:8.2f} {r.activations_gb:8.2f} {r.total_gb:8.2f}")
    lines.append(f"{'total':10s} {'':>10s} {'':>10s} {'':>8s} {'':>8s} {'':>8s} {'':>8s} "
                 f"{sum(r.total_gb for r in rows):8.2f}")
    return "\n".join(lines)


def run_estimate_memory(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rlhfkit estimate-memory",
                                     description="memory per process of each role, from the model config")
    parser.add_argument("model", help="preset:NAME, a model directory or a hub id")
    parser.add_argument("--stage", default="sft", choices=list(STAGE_ROLES))
    parser.add_argument("--engine", default="ddp", choices=list(ENGINE_DIVISORS))
    parser.add_argument("--num-processes", type=int, default=8)
    parser.add_argument("--lora-rank", type=int, default=0, help="0: full fine-tuning")
    parser.add_argument("--batch", type=int, default=1, help="micro-batch (sequences per process)")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    rows = estimate(args.model, args.stage, args.engine, args.num_processes, lora_rank=args.lora_rank,
                    batch=args.batch, seq_len=args.seq_len, gradient_checkpointing=args.gradient_checkpointing,
                    bf16=args.bf16)
    if args.json:
        print(json.dumps([{**asdict(r), "total_gb": r.total_gb} for r in rows], indent=1))
    else:
        print(f"{args.model} | stage {args.stage} | engine {args.engine} x {args.num_processes} process(es) | "
              f"micro-batch {args.batch} x {args.seq_len} tokens"
              + (" | gradient checkpointing" if args.gradient_checkpointing else "")
              + (f" | LoRA r{args.lora_rank}" if args.lora_rank else "") + (" | bf16" if args.bf16 else ""))
        print(format_table(rows))
    return 0
