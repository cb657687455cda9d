"""Generation metrics: sample from held-out prompts and score with a built-in task's gold reward."""

from __future__ import annotations

import torch

from rlhfkit.data.collate import pad_batch
from rlhfkit.data.encode import encode_prompt
from rlhfkit.losses.masked import masked_sum
from rlhfkit.models.logprobs import response_token_logps
from rlhfkit.rollout.generate import HFGenerator, SamplingParams


def sample_and_score(model, tokenizer, task, *, n_prompts: int, max_new_tokens: int, seed: int,
                     temperature: float = 1.0, batch_size: int = 64, reference=None) -> tuple[dict, list[dict]]:
    """Sample one response per held-out prompt of `task` (its eval split) and score it.

    Returns (metrics, samples): metrics `gold_reward` (mean gold), `eos_rate` (share of responses
    that ended with EOS) and `length` (mean response tokens, EOS included), and with a
    `reference` model `kl` (`sample_kl`); samples are dicts with prompt, response, ended and gold.
    """
    rows = task.make("prompt", n_prompts, seed=seed, split="eval")
    prompts = [r["prompt"] for r in rows]
    gen = HFGenerator(tokenizer, batch_size=batch_size).generate(
        model, [encode_prompt(tokenizer, p) for p in prompts],
        SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature), generator_seed=seed)
    ended = gen.ended.tolist()
    gold = task.gold_reward(prompts, gen.texts, ended)
    metrics = {
        "gold_reward": sum(gold) / len(gold),
        "eos_rate": sum(ended) / len(ended),
        "length": gen.response_mask.sum(-1).float().mean().item(),
    }
    if reference is not None:
        metrics["kl"] = sample_kl(model, reference, gen, tokenizer.pad_token_id, temperature, batch_size)
    samples = [{"prompt": p, "response": t, "ended": e, "gold": g}
               for p, t, e, g in zip(prompts, gen.texts, ended, gold)]
    return metrics, samples


@torch.no_grad()
def sample_kl(model, reference, gen, pad_id: int, temperature: float = 1.0, batch_size: int = 64) -> float:
    """KL(model || reference) on the sampled responses `gen` (drawn from `model`): the mean over
    samples of sum_t [log p_model(y_t) - log p_ref(y_t)] over response tokens (the k1 estimator,
    log-probs from logits / temperature, as at sampling)."""
    device = next(model.parameters()).device
    total = 0.0
    for start in range(0, len(gen.prompt_ids), batch_size):
        seqs, masks = [], []
        for i in range(start, min(start + batch_size, len(gen.prompt_ids))):
            response = gen.response_ids[i][gen.response_mask[i]].tolist()
            seqs.append(list(gen.prompt_ids[i]) + response)
            masks.append([False] * len(gen.prompt_ids[i]) + [True] * len(response))
        batch = {k: v.to(device) for k, v in pad_batch(seqs, pad_id, "right", masks).items()}
        logps, mask = response_token_logps(model, batch, temperature)
        ref_logps, _ = response_token_logps(reference, batch, temperature)
        total += masked_sum(logps - ref_logps, mask).item()
    return total / max(len(gen.prompt_ids), 1)
