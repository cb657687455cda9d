"""HFGenerator: the decode loop against HF `generate` token for token (greedy and top_k=1), the
padding/prefill/compaction machinery, stop strings, determinism and the sampled distribution."""

from __future__ import annotations

import pytest
import torch

from rlhfkit.data.collate import pad_batch
from rlhfkit.models.presets import build_preset_model
from rlhfkit.rollout import generate as generate_module
from rlhfkit.rollout.generate import HFGenerator, SamplingParams, compaction, length_groups

TEXTS = ["the movie was", "What is 2 + 3? It is", "hi", "A dog", "the book is great and the plot was slow",
         "Our trip felt lovely to me.", "my friend", "The cat seemed dark and so was the rest."]


def _prompts(tok, texts=TEXTS):
    return [tok(t)["input_ids"] for t in texts]


def _eos_model(tok, seed: int = 0, scale: float = 6.0):
    """A fresh tiny model whose EOS row of the (tied) lm_head is scaled: the EOS logit swings with
    the context, so greedy rows end at different steps (lengths 1 to >16 on TEXTS, checked by the
    tests that rely on it). Prompts never contain EOS, so its scaled embedding is never read."""
    torch.manual_seed(seed)
    model = build_preset_model("tiny", tok).eval()
    with torch.no_grad():
        model.lm_head.weight[tok.eos_token_id] *= scale
    return model


def _hf_generate(model, tok, prompts, params: SamplingParams, G: int = 1) -> torch.Tensor:
    """HF `generate` with the settings the old HFGenerator passed; rows prompt-major. Greedy HF
    refuses num_return_sequences > 1, so there every prompt is given G times instead."""
    pad = tok.pad_token_id
    if not params.do_sample:
        prompts = [p for p in prompts for _ in range(G)]
    batch = pad_batch(prompts, pad, side="left")
    kwargs = dict(max_new_tokens=params.max_new_tokens, do_sample=params.do_sample, pad_token_id=pad,
                  eos_token_id=tok.eos_token_id, suppress_tokens=[pad],
                  stop_strings=list(params.stop) or None, tokenizer=tok if params.stop else None)
    if params.do_sample:
        kwargs.update(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                      num_return_sequences=G)
    out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"].long(), **kwargs)
    return out[:, batch["input_ids"].shape[1]:]


def _same_tokens(a: torch.Tensor, b: torch.Tensor, pad: int) -> bool:
    width = max(a.shape[1], b.shape[1])
    a = torch.nn.functional.pad(a, (0, width - a.shape[1]), value=pad)
    b = torch.nn.functional.pad(b, (0, width - b.shape[1]), value=pad)
    return torch.equal(a, b)


def _lengths(gen) -> list[int]:
    return gen.response_mask.sum(-1).tolist()


# ---- token for token against HF generate ---------------------------------------------------------------

def test_greedy_matches_hf_generate_with_ragged_prompts_and_several_samples(tiny_tokenizer):
    tok = tiny_tokenizer
    model = _eos_model(tok)
    prompts = _prompts(tok)
    params = SamplingParams(max_new_tokens=16, do_sample=False)
    gen = HFGenerator(tok, batch_size=5).generate(model, prompts, params, num_generations=3)  # 2 chunks
    # The case under test: rows leave the batch at different steps, others run to the limit.
    lengths = _lengths(gen)
    assert len(set(lengths)) >= 4 and min(lengths) == 1 and max(lengths) == 16
    assert gen.ended.any() and not gen.ended.all()
    hf = _hf_generate(model, tok, prompts, params, G=3)
    assert _same_tokens(gen.response_ids, hf, tok.pad_token_id)
    assert gen.response_ids.shape == (24, 16)
    assert gen.prompt_ids == [p for p in prompts for _ in range(3)]  # prompt-major
    # HF pads after EOS too; ended = EOS seen (no stop strings here).
    assert gen.ended.tolist() == (hf == tok.eos_token_id).any(-1).tolist()


def test_top_k_1_sampling_matches_hf_num_return_sequences(tiny_tokenizer):
    tok = tiny_tokenizer
    model = _eos_model(tok)
    prompts = _prompts(tok)
    params = SamplingParams(max_new_tokens=12, do_sample=True, top_k=1, temperature=0.7)
    gen = HFGenerator(tok).generate(model, prompts, params, generator_seed=0, num_generations=4)
    hf = _hf_generate(model, tok, prompts, params, G=4)
    assert len(set(_lengths(gen))) >= 3
    assert _same_tokens(gen.response_ids, hf, tok.pad_token_id)


def test_stop_string_matches_hf_stop_strings(tiny_tokenizer):
    """Greedy with stop "." : a row ends at the token completing "." (kept, then pad), like HF's
    stop_strings; that row counts as ended and its text ends with the stop string."""
    tok = tiny_tokenizer
    model = _eos_model(tok, scale=1.0)
    dot = tok.convert_tokens_to_ids(".")
    with torch.no_grad():  # "." likely after some contexts (the tied embedding changes too: same model for both)
        model.lm_head.weight[dot] *= 4.0
    prompts = _prompts(tok)
    params = SamplingParams(max_new_tokens=12, do_sample=False, stop=(".",))
    gen = HFGenerator(tok).generate(model, prompts, params, num_generations=2)
    hf = _hf_generate(model, tok, prompts, params, G=2)
    assert _same_tokens(gen.response_ids, hf, tok.pad_token_id)
    stopped = [t.endswith(".") for t in gen.texts]
    assert any(stopped) and not all(stopped)
    eos_seen = (gen.response_ids == tok.eos_token_id).any(-1).tolist()
    assert gen.ended.tolist() == [s or e for s, e in zip(stopped, eos_seen)]
    for i, t in enumerate(gen.texts):
        if stopped[i]:
            assert t.count(".") == 1 and gen.response_ids[i, _lengths(gen)[i]:].eq(tok.pad_token_id).all()


# ---- padding, prefill groups, the fallback cache ---------------------------------------------------------

def test_left_padding_and_prefill_groups_do_not_change_tokens(tiny_tokenizer, monkeypatch):
    """Each prompt alone (no padding) vs all together: prefill groups with padding, one padded
    batch (the fallback for caches that are not plain DynamicLayers) and several chunks."""
    tok = tiny_tokenizer
    model = _eos_model(tok)
    prompts = _prompts(tok)
    lengths = [len(p) for p in prompts]
    assert any(len({lengths[i] for i in g}) > 1 for g in length_groups(lengths))  # a group with padding
    params = SamplingParams(max_new_tokens=10, do_sample=False)
    alone = [HFGenerator(tok).generate(model, [p], params, num_generations=2) for p in prompts]
    expected = [row for g in alone for row in g.response_ids[:, :_lengths(g)[0]].tolist()]

    def rows(gen):
        return [r[:n] for r, n in zip(gen.response_ids.tolist(), _lengths(gen))]

    assert rows(HFGenerator(tok).generate(model, prompts, params, num_generations=2)) == expected
    assert rows(HFGenerator(tok, batch_size=3).generate(model, prompts, params, num_generations=2)) == expected
    monkeypatch.setattr(generate_module, "_is_plain", lambda cache: False)
    assert rows(HFGenerator(tok).generate(model, prompts, params, num_generations=2)) == expected


def test_pad_is_never_sampled_and_masks_are_consistent(tiny_tokenizer):
    tok = tiny_tokenizer
    torch.manual_seed(0)
    model = build_preset_model("tiny", tok)
    with torch.no_grad():
        model.lm_head.weight[tok.pad_token_id] *= 50.0  # pad would dominate if it were not suppressed
        model.lm_head.weight[tok.eos_token_id] *= 4.0
    model.train()
    prompts = _prompts(tok)
    gen = HFGenerator(tok, batch_size=3).generate(model, prompts, SamplingParams(max_new_tokens=12),
                                                  generator_seed=0, num_generations=4)
    assert model.training  # mode restored
    eos, pad = tok.eos_token_id, tok.pad_token_id
    lengths = _lengths(gen)
    assert gen.response_ids.shape == (32, max(lengths))
    assert not (gen.response_ids[gen.response_mask] == pad).any()
    for i, n in enumerate(lengths):
        assert gen.response_mask[i, :n].all() and not gen.response_mask[i, n:].any()
        assert (gen.response_ids[i, n:] == pad).all()
        eos_at = (gen.response_ids[i, :n] == eos).nonzero().flatten().tolist()
        assert eos_at == ([n - 1] if gen.ended[i] else [])
    assert gen.ended.any() and not gen.ended.all()


# ---- determinism and the sampled distribution ------------------------------------------------------------

def test_generator_seed_is_deterministic_and_leaves_the_global_rng_alone(tiny_tokenizer):
    tok = tiny_tokenizer
    model = _eos_model(tok, scale=3.0)
    prompts = _prompts(tok)
    params = SamplingParams(max_new_tokens=8, temperature=0.9, top_p=0.95)
    state = torch.random.get_rng_state()
    a = HFGenerator(tok, batch_size=4).generate(model, prompts, params, generator_seed=3, num_generations=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = HFGenerator(tok, batch_size=4).generate(model, prompts, params, generator_seed=3, num_generations=3)
    assert torch.equal(a.response_ids, b.response_ids) and a.texts == b.texts
    c = HFGenerator(tok, batch_size=4).generate(model, prompts, params, generator_seed=4, num_generations=3)
    assert not torch.equal(a.response_ids, c.response_ids)


def _peaked_model(tok):
    """Logits scaled up 8x (through the final norm's weight: the lm_head is tied to the input
    embedding) so a few dozen tokens carry most of the mass; near-uniform logits over the whole
    vocabulary would need far more samples to test."""
    torch.manual_seed(1)
    model = build_preset_model("tiny", tok).eval()
    with torch.no_grad():
        model.model.norm.weight.mul_(8.0)
    return model


def _first_token_frequencies(model, tok, prompt, params, n_calls=4, G=2500):
    counts = torch.zeros(model.config.vocab_size, dtype=torch.float64)
    for seed in range(n_calls):
        gen = HFGenerator(tok).generate(model, [prompt], params, generator_seed=seed, num_generations=G)
        counts += torch.bincount(gen.response_ids[:, 0], minlength=counts.numel())
    return counts / counts.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.3, 5, 1.0), (1.3, 0, 0.7)])
def test_first_token_frequencies_match_the_processed_softmax(tiny_tokenizer, temperature, top_k, top_p):
    """10000 sampled first tokens vs the probabilities of HF's processing, computed here in
    float64: pad removed, logits / T, the top-k, then the smallest set of most likely tokens whose
    mass reaches top_p. Every token within 5 standard errors (+ 2 samples' worth, for the tiny
    probabilities), nothing sampled outside the allowed set, and total variation over the tokens
    with p >= 0.005 (the rest pooled) < 0.05 (0.027 at worst in 200 simulated runs of exact
    multinomial draws). The top-p case (38 tokens kept) fails if top-p ran before the temperature
    (12 tokens kept, total variation 0.30)."""
    tok = tiny_tokenizer
    model = _peaked_model(tok)
    prompt = tok("the movie was")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[0, -1].double()
    logits[tok.pad_token_id] = -float("inf")
    probs = torch.softmax(logits / temperature, -1)
    if top_k:
        probs[probs < probs.topk(top_k).values[-1]] = 0
    if top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs  # mass of the strictly more likely tokens
        probs[order[before >= top_p]] = 0
    probs = probs / probs.sum()
    assert (probs > 0).sum() >= 5 and probs.max() < 0.75  # a distribution worth testing
    freq = _first_token_frequencies(model, tok, prompt, SamplingParams(
        max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p))
    n = 10000
    assert not freq[probs == 0].any()
    se = (probs * (1 - probs) / n).sqrt()
    assert ((freq - probs).abs() <= 5 * se + 2 / n).all()
    big = probs >= 0.005
    pooled = [(f[big], f[~big].sum()) for f in (freq, probs)]
    tv = 0.5 * ((pooled[0][0] - pooled[1][0]).abs().sum() + (pooled[0][1] - pooled[1][1]).abs())
    assert tv < 0.05


# ---- LoRA ------------------------------------------------------------------------------------------------

def _lora_model(tok):
    """`_eos_model` with LoRA on every linear layer, B drawn non-zero (so the adapters change the tokens)."""
    from rlhfkit.models.load import apply_lora

    model = apply_lora(_eos_model(tok), rank=4, alpha=8, dropout=0.0, target="all-linear")
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model


def test_lora_model_samples_with_merged_adapters_and_is_restored(tiny_tokenizer):
    tok = tiny_tokenizer
    model = _lora_model(tok)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prompts = _prompts(tok)
    params = SamplingParams(max_new_tokens=10, do_sample=False)
    gen = HFGenerator(tok).generate(model, prompts, params, num_generations=2)
    hf = _hf_generate(model, tok, prompts, params, G=2)  # through peft's unmerged adapter layers
    assert _same_tokens(gen.response_ids, hf, tok.pad_token_id)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())


# ---- sampling in another dtype and the sampler's own log-probs ---------------------------------------------

def _rollout_logps(model, tok, gen, temperature: float) -> torch.Tensor:
    """The trainer's log-probs of `gen`'s responses (models.logprobs.response_logps on the rollout layout)."""
    from rlhfkit.models.logprobs import response_logps

    queries = pad_batch(gen.prompt_ids, tok.pad_token_id, side="left")
    ids = torch.cat([queries["input_ids"], gen.response_ids], 1)
    mask = torch.cat([queries["attention_mask"], gen.response_mask], 1)
    with torch.no_grad():
        return response_logps(model, ids, mask, queries["input_ids"].shape[1], temperature,
                              suppress_ids=[tok.pad_token_id])[0]


def test_recorded_sampling_logps_are_the_trainers_logps(tiny_tokenizer):
    """In the model's own dtype the sampler's recorded log-probs (pad suppressed, / temperature) are
    what the trainer computes for the same tokens, position by position, 0 after each row's end
    (greedy rows of very different lengths; the temperature still defines the recorded log-probs)."""
    tok = tiny_tokenizer
    model = _eos_model(tok)
    params = SamplingParams(max_new_tokens=12, temperature=0.7, do_sample=False)
    gen = HFGenerator(tok, batch_size=3).generate(model, _prompts(tok), params, num_generations=2, record_logps=True)
    assert gen.sampling_logps.shape == gen.response_ids.shape
    assert len(set(_lengths(gen))) >= 3  # ragged rows: positions after an end must stay 0
    assert torch.all(gen.sampling_logps[~gen.response_mask] == 0)
    torch.testing.assert_close(gen.sampling_logps, _rollout_logps(model, tok, gen, 0.7), atol=2e-5, rtol=0)
    assert HFGenerator(tok).generate(model, _prompts(tok), params).sampling_logps is None


def test_bf16_linears_sample_what_hf_samples_with_them_and_leave_the_model_untouched(tiny_tokenizer):
    """`dtype=torch.bfloat16`: the linear layers (LM head included) compute in bf16 from copies; the
    tokens are HF generate's under the same `linears_in`, the recorded log-probs differ from the
    float32 model's (so bf16 really ran) by little (measured: mean 0.002, max 0.016 nats), and the
    model is left bit-identical (LoRA merged and restored, no patched forward left behind)."""
    from rlhfkit.rollout.generate import linears_in

    tok = tiny_tokenizer
    model = _lora_model(tok)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prompts = _prompts(tok)
    greedy = SamplingParams(max_new_tokens=10, do_sample=False)
    gen = HFGenerator(tok, batch_size=5, dtype=torch.bfloat16).generate(model, prompts, greedy, num_generations=2,
                                                                        record_logps=True)
    with linears_in(model, torch.bfloat16):
        hf = _hf_generate(model, tok, prompts, greedy, G=2)
    assert _same_tokens(gen.response_ids, hf, tok.pad_token_id)
    gap = (gen.sampling_logps - _rollout_logps(model, tok, gen, 1.0)).abs()[gen.response_mask]
    assert 0 < gap.mean() < 0.01 and gap.max() < 0.1
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any("forward" in vars(m) for m in model.modules())
    assert all(p.dtype == torch.float32 for p in model.parameters())


# ---- helpers and bad input --------------------------------------------------------------------------------

def test_compaction_worked_example():
    """Rows 0..5, rows 1 and 4 finished: 4 stay. Places 0, 2, 3 keep their rows; place 1 (a
    finished row) receives row 5, the only unfinished row beyond place 3."""
    done = torch.tensor([False, True, False, False, True, False])
    order, holes, movers = compaction(done)
    assert order.tolist() == [0, 5, 2, 3]
    assert holes.tolist() == [1] and movers.tolist() == [5]
    order, holes, movers = compaction(torch.tensor([False, False, True, True]))
    assert order.tolist() == [0, 1] and holes.numel() == movers.numel() == 0


def test_length_groups_worked_example():
    """Lengths 100, 95, 10, 9, 50 (slack 1/8, allowance 32 tokens), longest first: {100}; 95 joins
    (padded 2 x 100 = 200 <= real 195 x 1.125 + 32 = 251.4); 50 joins (300 <= 245 x 1.125 + 32 =
    307.6); 10 does not (400 > 255 x 1.125 + 32 = 318.9) and starts a group; 9 joins it (20 <= 53.4)."""
    assert length_groups([100, 95, 10, 9, 50]) == [[0, 1, 4], [2, 3]]
    assert length_groups([7]) == [[0]]


@pytest.mark.parametrize("params,G,match", [
    (SamplingParams(), 0, "num_generations"),
    (SamplingParams(max_new_tokens=0), 1, "max_new_tokens"),
    (SamplingParams(temperature=0.0), 1, "temperature"),
    (SamplingParams(top_p=0.0), 1, "top_p"),
    (SamplingParams(top_k=-1), 1, "top_k"),
])
def test_bad_parameters_are_named(tiny_model, tiny_tokenizer, params, G, match):
    with pytest.raises(ValueError, match=match):
        HFGenerator(tiny_tokenizer).generate(tiny_model, [[5, 6]], params, num_generations=G)


def test_empty_prompt_is_an_error(tiny_model, tiny_tokenizer):
    with pytest.raises(ValueError, match="prompt_ids"):
        HFGenerator(tiny_tokenizer).generate(tiny_model, [[5, 6], []], SamplingParams())
