"""Sampling behind a small interface that a faster engine plugs into (`rollout/vllm_engine.py`: vLLM).

`HFGenerator.generate(model, prompt_ids, params, generator_seed, num_generations=G)` samples G
responses per prompt, rows prompt-major (row p*G + g is sample g of prompt p), with its own
KV-cache decode loop over a transformers `DynamicCache`, built for online RL (several samples per
prompt, responses of very different lengths). What it does that HF
`generate(num_return_sequences=G)` does not:

- shared prefill: each prompt goes through the model once and its cache is laid out G times
  (HF prefills all P x G rows); prompts of similar length are prefilled together, so little
  compute goes to padding (`length_groups`);
- finished rows leave the batch: a row that samples EOS (or completes a stop string) costs
  nothing in the remaining steps (HF keeps decoding it, as pad, until the last row ends);
  cache columns that are padding in every remaining row are cut off;
- the cache is preallocated (`SlabLayer`): a step writes one column where `DynamicLayer`
  concatenates (copies) the whole cache, and dropping rows copies only the rows that move.

The tokens are HF's for the same settings (tests compare greedy and top_k=1 outputs token for
token): left-padded prompts with position ids `cumsum(mask) - 1`, so padding never changes a
row's logits; float32 logits through HF's own processors in HF's order (pad suppressed, so it is
never sampled; then temperature, top-k, top-p), softmax + `torch.multinomial`, or argmax with
`do_sample=False`; stop strings matched by HF's `StopStringCriteria` on prompt + response so far.
Only `SamplingParams` apply: a model's own `generation_config` (e.g. a repetition penalty in a
downloaded checkpoint) does not. A response ends at its first EOS (kept) or at the token that
completes a stop string (kept); everything after is pad; `ended` says which rows did either.
`generator_seed` seeds a private `torch.Generator` (same seed and batch size, same samples; the
global RNG is left alone); without it the global RNG is used. `sample_seeds` (one per output row)
gives every row a generator of its own instead, so a row's samples do not depend on which rows
share its batch (`rlhfkit generate`: a resumed run samples what an uninterrupted one did). A LoRA model samples with its
active adapters merged into the base weights (`merged_lora`: faster, and restored bit-exactly
afterwards). Models whose cache has other layer types (e.g. sliding windows) use their own cache
with one padded prefill per chunk and no column cutting; everything else is the same.

`HFGenerator(dtype=torch.bfloat16)` runs the model's linear layers (the LM head too) in bfloat16
from a copy of their weights made once per `generate` call, after the LoRA merge (`linears_in`; the
model itself is untouched; attention, norms and the KV cache stay float32): decoding a few rows
reads every weight once per token, so on a CPU it is bound by weight bytes, and bf16 matmuls are
native on AVX512-BF16/AMX cores (measured on the 135M shape, 8 rows: 64 against 124 ms per
decode step, 1 thread). The samples then come from a slightly different distribution than
the float32 model the trainer scores; `record_logps=True` returns each sampled token's log-prob
under the sampler's own distribution (`Generation.sampling_logps`: pad suppressed, divided by the
temperature, as the trainer computes its log-probs; top-k/top-p are not applied to it, like there),
which an importance-sampling correction needs (losses/policy.py `truncated_importance_weights`).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from rlhfkit.data.collate import pad_batch
from rlhfkit.models.load import merged_lora
from rlhfkit.models.logprobs import position_ids_from_mask, sampling_scores, token_logps


@dataclass
class SamplingParams:
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    do_sample: bool = True
    stop: tuple[str, ...] = ()

    @classmethod
    def with_greedy_at_zero(cls, *, temperature: float, **kw) -> "SamplingParams":
        """The user-facing convention of `generate` and `chat`: temperature 0 means greedy decoding."""
        greedy = temperature == 0
        return cls(temperature=1.0 if greedy else temperature, do_sample=not greedy, **kw)


@dataclass
class Generation:
    """A batch of responses, prompt-major: row p * G + g is sample g of prompt p (G samples per
    prompt), and `prompt_ids[i]` is row i's prompt. `response_ids` (N, T) is right-padded with pad
    after the first EOS (or the token completing a stop string); `response_mask` is True on real
    response tokens (EOS included); `ended` says whether the row produced an EOS or a stop string
    (False: it ran out of `max_new_tokens`)."""

    prompt_ids: list[list[int]]
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    ended: torch.Tensor
    texts: list[str]
    sampling_logps: torch.Tensor | None = None
    """(N, T) with `record_logps`: each sampled token's log-prob under the sampler's distribution
    (its dtype's logits, pad suppressed, / temperature), 0 after the end; else None."""


def truncate_after_eos(tokens: torch.Tensor, eos_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Replace everything after the first EOS with pad. Returns (tokens, mask, ended).

    tokens: (B, T). mask is True up to and including the first EOS (all True when there is none).
    """
    is_eos = tokens == eos_id
    ended = is_eos.any(-1)
    after_first = (is_eos.long().cumsum(-1) - is_eos.long()) > 0  # strictly after the first EOS
    mask = ~after_first
    return tokens.masked_fill(after_first, pad_id), mask, ended


def check_sampling_params(params: SamplingParams, num_generations: int) -> None:
    """ValueError naming the first bad field."""
    if not isinstance(num_generations, int) or num_generations < 1:
        raise ValueError(f"num_generations must be an integer >= 1, got {num_generations!r}")
    if params.max_new_tokens < 1:
        raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got {params.max_new_tokens}")
    if params.do_sample:
        if not params.temperature > 0:
            raise ValueError(f"SamplingParams.temperature must be > 0 when sampling, got {params.temperature} "
                             "(use do_sample=False for greedy decoding)")
        if params.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be >= 0 (0: off), got {params.top_k}")
        if not 0 < params.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {params.top_p}")


def check_generate_args(who: str, prompt_ids: list[list[int]], params: SamplingParams, num_generations: int,
                        sample_seeds: list[int] | None) -> None:
    """The checks every sampler's `generate` makes on its arguments (`who` names it in the ValueError):
    the sampling settings, non-empty prompts, one seed per output row."""
    check_sampling_params(params, num_generations)
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise ValueError(f"{who}: prompt_ids must be a non-empty list of non-empty prompts")
    if sample_seeds is not None and len(sample_seeds) != len(prompt_ids) * num_generations:
        raise ValueError(f"{who}: {len(sample_seeds)} sample_seeds for {len(prompt_ids) * num_generations} rows")


def token_chooser(params: SamplingParams, pad_id: int, device, generator: torch.Generator | None,
                  row_generators: list[torch.Generator] | None = None):
    """(n, V) logits -> (n,) next tokens, as HF `generate` picks them: float32 logits, pad
    suppressed, then (sampling only) temperature, top-k, top-p, softmax and multinomial; greedy
    is argmax. HF's own processor classes, in the order HF's `_get_logits_processor` builds them.
    With `row_generators`, `choose(logits, rows)` draws row k's token from `row_generators[rows[k]]`."""
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        SuppressTokensLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    processors = LogitsProcessorList([SuppressTokensLogitsProcessor([pad_id], device=device)])
    if params.do_sample:
        if params.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(float(params.temperature)))
        if params.top_k != 0:
            processors.append(TopKLogitsWarper(top_k=int(params.top_k), min_tokens_to_keep=1))
        if params.top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p=float(params.top_p), min_tokens_to_keep=1))

    def choose(logits: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        scores = processors(None, logits.float())  # HF's processors here ignore input_ids
        if not params.do_sample:
            return scores.argmax(-1)
        probs = torch.softmax(scores, dim=-1)
        if row_generators is not None:  # one draw per row from its own stream
            return torch.cat([torch.multinomial(probs[k], num_samples=1, generator=row_generators[r])
                              for k, r in enumerate(rows.tolist())])
        return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)

    return choose


def new_cache(model):
    """An empty KV cache for `model`: its own `new_cache()` when it has one (`rollout.mixture.GeometricMixture`:
    the layers of both of its models in one cache), else transformers' `DynamicCache` for its config."""
    from transformers import DynamicCache

    make = getattr(model, "new_cache", None)
    return make() if make is not None else DynamicCache(config=model.config)


def _is_plain(cache) -> bool:
    """Every layer a full-attention `DynamicLayer` (keys/values (rows, heads, T, head_dim) and
    nothing else, e.g. no sliding window): then its tensors can be moved into `SlabLayer`s."""
    from transformers.cache_utils import DynamicLayer

    return len(cache.layers) > 0 and all(type(layer) is DynamicLayer for layer in cache.layers)


@functools.cache
def _slab_layer_class():
    """`SlabLayer`, defined on first use (transformers is imported lazily)."""
    from transformers.cache_utils import DynamicLayer

    class SlabLayer(DynamicLayer):
        """A `DynamicLayer` whose keys/values live in two fixed buffers (rows, heads, capacity,
        head_dim): `keys`/`values` are the views [:rows, :, first:first + length]. A decode step
        writes its token into the next free column, where `DynamicLayer.update` concatenates
        (copies) the whole cache every step; dropping rows copies only the rows that move into
        the holes (`compact`), and dropping leading columns only moves `first`. Only `update`
        and `compact` keep the buffers in step (the inherited batch/crop methods do not): such a
        cache never leaves `HFGenerator`."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int):
            super().__init__()
            self.dtype, self.device = keys.dtype, keys.device
            self.is_initialized = True
            self.buffers = (keys, values)
            self.rows, self.first, self.length = keys.shape[0], 0, length
            self._view()

        def _view(self) -> None:
            self.keys, self.values = (b[:self.rows, :, self.first:self.first + self.length] for b in self.buffers)

        def update(self, key_states, value_states, *args, **kwargs):
            end = self.first + self.length + key_states.shape[-2]
            if end > self.buffers[0].shape[2]:
                raise RuntimeError(f"SlabLayer: {end} columns needed, capacity {self.buffers[0].shape[2]}")
            for b, states in zip(self.buffers, (key_states, value_states)):
                b[:self.rows, :, self.first + self.length:end] = states
            self.length = end - self.first
            self._view()
            return self.keys, self.values

        def compact(self, holes: torch.Tensor, movers: torch.Tensor, rows: int, first_column: int) -> None:
            """Copy rows `movers` into rows `holes`, keep the first `rows` rows and the columns
            from `first_column` on (see `compaction`)."""
            for view in (self.keys, self.values):
                view[holes] = view[movers]
            self.rows = rows
            self.first += first_column
            self.length -= first_column
            self._view()

    return SlabLayer


def compaction(done: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where the unfinished rows go when the `done` rows (n,) leave the batch, copying as few
    rows as possible: the m unfinished rows end up in places 0..m-1, those already there stay,
    those beyond m move into the finished rows' places below m. Returns (order (m,): the old row
    in each new place, holes: the places that receive a row, movers: the rows they receive)."""
    alive = ~done
    m = int(alive.sum())
    holes = done[:m].nonzero().squeeze(1)
    movers = alive[m:].nonzero().squeeze(1) + m
    order = torch.arange(m, device=done.device)
    order[holes] = movers
    return order, holes, movers


def length_groups(lengths: list[int], slack: float = 0.125, allowance: int = 32) -> list[list[int]]:
    """Indices grouped for a padded prefill: longest first, a prompt joins the current group while
    the group's padding stays within `slack` of its real tokens plus `allowance` tokens (one
    forward per group; one batch for all would pay the longest prompt's length for every row)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups:
            group = groups[-1]
            real = sum(lengths[j] for j in group) + lengths[i]
            if lengths[group[0]] * (len(group) + 1) <= real * (1 + slack) + allowance:
                group.append(i)
                continue
        groups.append([i])
    return groups


def _empty_slab(like: torch.Tensor, rows: int, width: int, new_tokens: int) -> torch.Tensor:
    """(rows, heads, width + new_tokens, head_dim) like `like`; the first `width` columns zero
    (padding there is masked, but must be finite: 0 x NaN is NaN), the rest left uninitialised
    (each column is written before it is read)."""
    heads, dim = like.shape[1], like.shape[3]
    buffer = like.new_empty(rows, heads, width + new_tokens, dim)
    buffer[:, :, :width].zero_()
    return buffer


def _linear_in(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.nn.functional.linear(x.to(weight.dtype), weight, bias).to(x.dtype)


@contextmanager
def linears_in(model: torch.nn.Module, dtype: torch.dtype) -> Iterator[torch.nn.Module]:
    """`model` with every floating-point `nn.Linear` (the LM head too) computing in `dtype` from a
    copy of its weights made here: input cast to `dtype`, output cast back. Everything else (norms,
    attention, the residual stream, the KV cache) keeps the model's own dtype: on a CPU, bf16
    attention for one query row is ~10x slower than float32 (measured: 2.4 ms against 0.2 ms per
    call), while a bf16 linear layer reads half the bytes. The model's own weights are untouched;
    the copies are dropped on exit."""
    patched = []
    try:
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.weight.is_floating_point():
                bias = None if module.bias is None else module.bias.detach().to(dtype)
                module.forward = functools.partial(_linear_in, weight=module.weight.detach().to(dtype), bias=bias)
                patched.append(module)
        yield model
    finally:
        for module in patched:
            del module.forward


def sampled_logps(logits: torch.Tensor, tokens: torch.Tensor, pad_id: int, temperature: float) -> torch.Tensor:
    """(n,) log-prob of `tokens` (n,) under (n, V) `logits` with pad suppressed and divided by
    `temperature`: the trainer's own definition of a token's log-prob (models.logprobs.sampling_scores)."""
    return token_logps(sampling_scores(logits, temperature, [pad_id]), tokens)


class HFGenerator:
    """`generate(model, prompt_ids, params, generator_seed=None, num_generations=1)`; `batch_size`
    prompts per chunk (so batch_size * num_generations rows decode together); `dtype`: the linear
    layers sample in this dtype (`linears_in`; None: the model's own, the default)."""

    def __init__(self, tokenizer, batch_size: int = 32, dtype: torch.dtype | None = None):
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.dtype = dtype

    @property
    def records_logps(self) -> bool:
        """Whether `generate_rollout` records each sampled token's log-prob: when the linear layers
        sample in their own dtype, the samples come from another distribution than the trainer's."""
        return self.dtype is not None

    def close(self) -> None:
        """Nothing to stop (the sampler interface: `VLLMGenerator.close` stops its engine)."""

    def summary(self) -> dict:
        """Nothing for summary.json: the trainer's own sampler (`VLLMGenerator.summary`: the engine's timings)."""
        return {}

    @torch.no_grad()
    def generate(self, model, prompt_ids: list[list[int]], params: SamplingParams,
                 generator_seed: int | None = None, num_generations: int = 1,
                 sample_seeds: list[int] | None = None, record_logps: bool = False) -> Generation:
        check_generate_args("HFGenerator.generate", prompt_ids, params, num_generations, sample_seeds)
        tok = self.tokenizer
        device = next(model.parameters()).device
        generator = None
        if generator_seed is not None:
            generator = torch.Generator(device=device).manual_seed(generator_seed)
        rows_per_chunk = self.batch_size * num_generations
        row_generators = None
        if sample_seeds is not None:
            row_generators = [torch.Generator(device=device).manual_seed(s) for s in sample_seeds]
        stop = None
        if params.stop:
            from transformers.generation.stopping_criteria import StopStringCriteria

            stop = StopStringCriteria(tokenizer=tok, stop_strings=list(params.stop))
        was_training = model.training
        model.eval()
        tokens, ended, logps = [], [], []
        try:
            with (merged_lora(model) as sampler,
                  linears_in(sampler, self.dtype) if self.dtype is not None else nullcontext()):
                for start in range(0, len(prompt_ids), self.batch_size):
                    first = start * num_generations
                    chunk_generators = (None if row_generators is None
                                        else row_generators[first:first + rows_per_chunk])
                    choose = token_chooser(params, tok.pad_token_id, device, generator, chunk_generators)
                    chunk_tokens, chunk_ended, chunk_logps = self._sample_chunk(
                        sampler, prompt_ids[start:start + self.batch_size], params, num_generations,
                        choose, stop, device, record_logps)
                    tokens.append(chunk_tokens.cpu())
                    ended.append(chunk_ended.cpu())
                    logps.append(chunk_logps.cpu() if record_logps else None)
        finally:
            model.train(was_training)
        pad = tok.pad_token_id
        width = max(t.shape[1] for t in tokens)
        responses = torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1]), value=pad) for t in tokens])
        # Rows stop at their first EOS, so this only builds the mask; pad is never sampled, so a
        # pad inside a response is filler (after an EOS or a stop string).
        responses, mask, _ = truncate_after_eos(responses, tok.eos_token_id, pad)
        mask = mask & (responses != pad)
        texts = tok.batch_decode(responses, skip_special_tokens=True)
        rows = [p for p in prompt_ids for _ in range(num_generations)]
        sampling_logps = None
        if record_logps:
            sampling_logps = torch.cat([torch.nn.functional.pad(x, (0, width - x.shape[1])) for x in logps])
            sampling_logps = sampling_logps.masked_fill(~mask, 0.0)
        return Generation(rows, responses, mask, torch.cat(ended), texts, sampling_logps)

    def _forward_prompts(self, model, prompts: list[list[int]], device):
        """One forward pass over left-padded `prompts`: (DynamicCache, logits (P, V) at each
        prompt's last token)."""
        batch = pad_batch(prompts, self.tokenizer.pad_token_id, side="left")
        ids, attention = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        cache = new_cache(model)
        out = model(input_ids=ids, attention_mask=attention.long(), position_ids=position_ids_from_mask(attention),
                    past_key_values=cache, use_cache=True, logits_to_keep=1)
        return cache, out.logits[:, -1]

    def _prefill(self, model, prompts: list[list[int]], G: int, new_tokens: int, device):
        """Prefill each prompt once and lay its cache out G times, prompt-major (row p*G + g),
        left-padded to the longest prompt W. Returns (cache, logits (P, V), trimmable): a cache of
        `SlabLayer`s with room for `new_tokens` more columns (prompts prefilled in groups of
        similar length), or, for caches with other layer types (e.g. sliding windows), the
        model's own cache of one padded batch, repeated; `trimmable`: the former, whose all-pad
        columns can be cut."""
        from transformers import DynamicCache

        if not _is_plain(new_cache(model)):
            cache, logits = self._forward_prompts(model, prompts, device)
            cache.batch_repeat_interleave(G)
            return cache, logits, False
        lengths = [len(p) for p in prompts]
        W, P = max(lengths), len(prompts)
        SlabLayer = _slab_layer_class()
        slabs = None
        all_logits = None
        for group in length_groups(lengths):
            cache, logits = self._forward_prompts(model, [prompts[i] for i in group], device)
            if all_logits is None:
                all_logits = logits.new_empty(P, logits.shape[-1])
            if slabs is None:  # (P*G, heads, W + new_tokens, head_dim) per layer, keys and values
                slabs = [SlabLayer(*[_empty_slab(layer.keys, P * G, W, new_tokens) for _ in range(2)], W)
                         for layer in cache.layers]
            index = torch.tensor(group, device=device)
            all_logits[index] = logits
            width = cache.layers[0].keys.shape[2]
            for slab, layer in zip(slabs, cache.layers):
                for buffer, states in zip(slab.buffers, (layer.keys, layer.values)):
                    view = buffer.view(P, G, *buffer.shape[1:])
                    view[index, :, :, W - width:W] = states[:, None]  # (g, 1, H, width, D) over the G copies
        out = DynamicCache()
        out.layers = slabs
        return out, all_logits, True

    def _sample_chunk(self, model, prompts: list[list[int]], params: SamplingParams, G: int,
                      choose, stop, device, record_logps: bool = False):
        """Sample G responses to each prompt of one chunk. Returns (tokens (P*G, T) pad after each
        row's end, ended (P*G,), each token's sampling log-prob (P*G, T) with `record_logps` else
        None)."""
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        cache, logits, trimmable = self._prefill(model, prompts, G, params.max_new_tokens - 1, device)
        n = len(prompts) * G
        batch = pad_batch(prompts, pad, side="left")
        logits = logits.repeat_interleave(G, 0)
        attention = batch["attention_mask"].to(device).repeat_interleave(G, 0)  # (n, W) True on real cached tokens
        positions = attention.sum(-1)  # (n,) the position id of each row's next token
        # prompt + response so far, for stop strings (matched like HF: across the prompt boundary too)
        history = batch["input_ids"].to(device).repeat_interleave(G, 0) if stop is not None else None
        row_of = torch.arange(n, device=device)  # active row -> output row
        tokens = torch.full((n, params.max_new_tokens), pad, dtype=torch.long, device=device)
        ended = torch.zeros(n, dtype=torch.bool, device=device)
        logps = torch.zeros(n, params.max_new_tokens, device=device) if record_logps else None
        width = 0
        for t in range(params.max_new_tokens):
            next_tokens = choose(logits, row_of)
            tokens[row_of, t] = next_tokens
            if logps is not None:
                logps[row_of, t] = sampled_logps(logits, next_tokens, pad, params.temperature)
            width = t + 1
            done = next_tokens == eos
            if history is not None:
                history = torch.cat([history, next_tokens[:, None]], 1)
                done = done | stop(history, None)
            ended[row_of[done]] = True
            if t + 1 == params.max_new_tokens:
                break
            if done.any():
                if done.all():
                    break
                order, holes, movers = compaction(done)
                next_tokens, positions, row_of = next_tokens[order], positions[order], row_of[order]
                attention = attention[order]
                history = history[order] if history is not None else None
                if trimmable:  # and cut the columns that are padding in every remaining row
                    first = int(attention.any(0).long().argmax())
                    attention = attention[:, first:]
                    for layer in cache.layers:
                        layer.compact(holes, movers, order.numel(), first)
                else:
                    cache.batch_select_indices(order)
            attention = torch.nn.functional.pad(attention, (0, 1), value=True)
            logits = model(input_ids=next_tokens[:, None], attention_mask=attention.long(),
                           position_ids=positions[:, None], past_key_values=cache, use_cache=True).logits[:, -1]
            positions = positions + 1
        return tokens[:, :width], ended, (logps[:, :width] if logps is not None else None)
