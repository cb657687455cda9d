"""Sampling behind a small interface, so a faster engine (e.g. vLLM) can plug in later.

`HFGenerator` batches left-padded prompts through `model.generate` (KV cache, no prompt
recomputation), then truncates every response after its first EOS (tokens after it become pad;
the EOS is kept). The pad token is never sampled. A LoRA model samples with its active adapters
merged into the base weights (`merged_lora`: faster, and restored bit-exactly afterwards).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhfkit.data.collate import pad_batch
from rlhfkit.models.load import merged_lora


@dataclass
class SamplingParams:
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    do_sample: bool = True
    stop: tuple[str, ...] = ()


@dataclass
class Generation:
    """A batch of responses. `response_ids` (B, T) is right-padded with pad after the first EOS;
    `response_mask` is True on real response tokens (EOS included); `ended` says whether an EOS
    was produced."""

    prompt_ids: list[list[int]]
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    ended: torch.Tensor
    texts: list[str]


def truncate_after_eos(tokens: torch.Tensor, eos_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Replace everything after the first EOS with pad. Returns (tokens, mask, ended).

    tokens: (B, T). mask is True up to and including the first EOS (all True when there is none).
    """
    is_eos = tokens == eos_id
    ended = is_eos.any(-1)
    after_first = (is_eos.long().cumsum(-1) - is_eos.long()) > 0  # strictly after the first EOS
    mask = ~after_first
    return tokens.masked_fill(after_first, pad_id), mask, ended


class HFGenerator:
    def __init__(self, tokenizer, batch_size: int = 32):
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    @torch.no_grad()
    def generate(self, model, prompt_ids: list[list[int]], params: SamplingParams,
                 generator_seed: int | None = None, num_generations: int = 1) -> Generation:
        tok = self.tokenizer
        prompt_ids = [p for p in prompt_ids for _ in range(num_generations)]
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        if generator_seed is not None:
            torch.manual_seed(generator_seed)
        chunks = []
        with merged_lora(model) as sampler:
            for start in range(0, len(prompt_ids), self.batch_size):
                batch = pad_batch(prompt_ids[start:start + self.batch_size], tok.pad_token_id, side="left")
                ids = batch["input_ids"].to(device)
                out = sampler.generate(
                    input_ids=ids,
                    attention_mask=batch["attention_mask"].long().to(device),
                    max_new_tokens=params.max_new_tokens,
                    do_sample=params.do_sample,
                    temperature=params.temperature if params.do_sample else None,
                    top_k=params.top_k if params.do_sample else None,
                    top_p=params.top_p if params.do_sample else None,
                    pad_token_id=tok.pad_token_id,
                    eos_token_id=tok.eos_token_id,
                    suppress_tokens=[tok.pad_token_id],
                    stop_strings=list(params.stop) or None,
                    tokenizer=tok if params.stop else None,
                )
                chunks.append(out[:, ids.shape[1]:].cpu())
        model.train(was_training)
        width = max(c.shape[1] for c in chunks)
        responses = torch.cat([torch.nn.functional.pad(c, (0, width - c.shape[1]), value=tok.pad_token_id)
                               for c in chunks])
        responses, mask, ended = truncate_after_eos(responses, tok.eos_token_id, tok.pad_token_id)
        # Pad is never sampled, so a pad inside a response is filler (e.g. after a stop string).
        mask = mask & (responses != tok.pad_token_id)
        texts = tok.batch_decode(responses.masked_fill(~mask, tok.pad_token_id), skip_special_tokens=True)
        return Generation(prompt_ids, responses, mask, ended, texts)
