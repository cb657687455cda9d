"""Generation metrics: sample from held-out prompts and score with a built-in task's gold reward."""

from __future__ import annotations

from rlhfkit.data.encode import encode_prompt
from rlhfkit.rollout.generate import HFGenerator, SamplingParams


def sample_and_score(model, tokenizer, task, *, n_prompts: int, max_new_tokens: int, seed: int,
                     temperature: float = 1.0, batch_size: int = 64) -> tuple[dict, list[dict]]:
    """Sample one response per held-out prompt of `task` (its eval split) and score it.

    Returns (metrics, samples): metrics `gold_reward` (mean gold), `eos_rate` (share of responses
    that ended with EOS) and `length` (mean response tokens, EOS included); samples are dicts
    with prompt, response, ended and gold.
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
    samples = [{"prompt": p, "response": t, "ended": e, "gold": g}
               for p, t, e, g in zip(prompts, gen.texts, ended, gold)]
    return metrics, samples
