"""Built-in model presets: randomly initialised Llama-style models for from-scratch training.

`model_name_or_path: preset:tiny` builds the model below with a byte-level BPE tokenizer trained
on the run's own texts. The result saves as a normal Hugging Face directory that later stages
load by path.
"""

from __future__ import annotations

from collections.abc import Iterable

from rlhfkit.errors import ConfigError

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|im_end|>"
BOS_TOKEN = "<|im_start|>"

# ChatML, the template of SmolLM2/Qwen. Used for presets and for tokenizers without a template.
# Each assistant turn ends with <|im_end|>, which is the EOS of preset tokenizers.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

PRESETS: dict[str, dict] = {
    # ~3.5M parameters with a 1k vocabulary: trains in minutes on 2 CPU cores.
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4, max_position_embeddings=512, tokenizer_vocab_size=1024),
    # A little bigger, for the demo's later stages if they need capacity.
    "small": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
                  num_key_value_heads=6, max_position_embeddings=1024, tokenizer_vocab_size=2048),
    # SmolLM2-135M's shape (random init): the benchmark's "real-size" model.
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                         tokenizer_vocab_size=49152, rope_theta=100000.0),
}


def preset_name(model_name_or_path: str) -> str | None:
    if not model_name_or_path.startswith("preset:"):
        return None
    name = model_name_or_path.split(":", 1)[1]
    if name not in PRESETS:
        raise ConfigError(f"model_name_or_path: unknown preset '{name}'; choose one of "
                          + ", ".join(f"preset:{p}" for p in PRESETS))
    return name


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Train a byte-level BPE tokenizer on `texts`; returns a PreTrainedTokenizerFast with a
    dedicated pad token (id 0), EOS `<|im_end|>` and the ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN, EOS_TOKEN, BOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN, bos_token=None,
        model_max_length=1_000_000,
    )
    fast.chat_template = DEFAULT_CHAT_TEMPLATE
    return fast


def build_preset_model(name: str, tokenizer):
    """A randomly initialised LlamaForCausalLM of preset `name` sized to `tokenizer`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = {k: v for k, v in PRESETS[name].items() if k != "tokenizer_vocab_size"}
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
        attention_dropout=0.0,
        **spec,
    )
    return LlamaForCausalLM(config)
