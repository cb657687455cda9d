"""Generation metrics: sample from held-out prompts and score with a built-in task's gold reward."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from rlhfkit.data.encode import encode_prompt
from rlhfkit.losses.masked import masked_sum
from rlhfkit.models.logprobs import response_logps
from rlhfkit.rollout.generate import HFGenerator, SamplingParams
from rlhfkit.rollout.rollout import Rollout, generate_rollout


def sample_and_score(model, tokenizer, task, *, n_prompts: int, max_new_tokens: int, seed: int,
                     temperature: float = 1.0, batch_size: int = 64, reference=None) -> tuple[dict, list[dict]]:
    """Sample one response per held-out prompt of `task` (its eval split) and score it.

    Returns (metrics, samples): metrics `gold_reward` (mean gold), `eos_rate` (share of responses
    that ended with EOS) and `length` (mean response tokens, EOS included), and with a
    `reference` model `kl` (`rollout_kl`, mean over prompts); samples are dicts with prompt,
    response, ended and gold.
    """
    rows = task.make("prompt", n_prompts, seed=seed, split="eval")
    prompts = [r["prompt"] for r in rows]
    device = next(model.parameters()).device
    ro = generate_rollout(model, tokenizer, HFGenerator(tokenizer, batch_size=batch_size),
                          [encode_prompt(tokenizer, p) for p in prompts], rows,
                          SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature), seed, device)
    ended = ro.ended.tolist()
    gold = task.gold_reward(prompts, ro.texts, ended)
    metrics = {
        "gold_reward": sum(gold) / len(gold),
        "eos_rate": sum(ended) / len(ended),
        "length": ro.lengths.float().mean().item(),
    }
    if reference is not None:
        metrics["kl"] = rollout_kl(model, reference, ro, temperature, batch_size).mean().item()
    samples = [{"prompt": p, "response": t, "ended": e, "gold": g}
               for p, t, e, g in zip(prompts, ro.texts, ended, gold)]
    return metrics, samples


@torch.no_grad()
def rollout_kl(model, reference, ro: Rollout, temperature: float = 1.0, batch_size: int = 64,
               padding_free: bool = False) -> torch.Tensor:
    """(B,) KL(model || reference) estimated on the responses of `ro` (sampled from `model`): per
    response the sum over its tokens of log p_model(y_t) - log p_ref(y_t) (k1), both from
    `response_logps`, the online passes' one log-prob function (logits / temperature, the pad token
    removed from the distribution as the sampler never emits it). `reference` is a model, or a
    callable returning a context manager that yields one (a LoRA policy's base, adapters disabled).
    The one KL of every held-out evaluation: the online stages', the demo's and `rlhfkit eval`'s."""
    enter = reference if callable(reference) and not isinstance(reference, torch.nn.Module) else (
        lambda: nullcontext(reference))
    suppress = [ro.pad_id]
    kl = torch.zeros(len(ro.texts), device=ro.input_ids.device)
    for start in range(0, len(ro.texts), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(ro.texts)), device=ro.input_ids.device)
        ids, mask = ro.input_ids[idx], ro.attention_mask[idx]
        lp, _ = response_logps(model, ids, mask, ro.context_length, temperature, padding_free=padding_free,
                               suppress_ids=suppress)
        with enter() as ref:
            rp, _ = response_logps(ref, ids, mask, ro.context_length, temperature, padding_free=padding_free,
                                   suppress_ids=suppress)
        kl[idx] = masked_sum(lp - rp, ro.response_mask[idx], dim=1)
    return kl
