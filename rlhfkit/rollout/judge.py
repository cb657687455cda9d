"""An LLM as the judge (LLM-as-a-judge, Zheng et al. 2023; Yuan et al. 2024's self-rewarding models):
a generative model scores a response by writing a judgement, from which a number is read.

    judge prompt   `template` with `{prompt}` (the request: a string as-is, a conversation one turn per
                   line, "<role>: <content>") and `{response}` replaced; the prompt takes the form of the
                   request: through the chat template (one user turn) when the request is a conversation,
                   plain text when it is a string
    judgements     `samples` judgements sampled per response (`SamplingParams`)
    score          each judgement's score: the one group of the last match of `pattern`, read as a
                   number in [0, max_score] (else unread); a response's score is the mean of its read
                   judgements, NaN when none could be read

`self_reward` judges with the policy itself.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from rlhfkit.data.formats import fill_judge_template, request_text
from rlhfkit.rollout.generate import HFGenerator, SamplingParams


def judge_prompt(template: str, prompt, response: str):
    """The judge's prompt for one response, in the form of the request (see the module docstring)."""
    text = fill_judge_template(template, request_text(prompt), response)
    return text if isinstance(prompt, str) else [{"role": "user", "content": text}]


def read_score(judgement: str, pattern: re.Pattern, max_score: float) -> float | None:
    """The score a judgement ends with (the last match's group), or None when it has none or it lies
    outside [0, max_score]. Worked: "... Score: 4" -> 4.0; "Score: 2 ... Score: 3.5" -> 3.5;
    "Score: 7" with max_score 5 -> None."""
    matches = pattern.findall(judgement)
    if not matches:
        return None
    try:
        value = float(matches[-1])
    except ValueError:
        return None
    return value if 0 <= value <= max_score and math.isfinite(value) else None


@dataclass
class Judged:
    """Scores (N,) (NaN: no judgement read), per response the judgements' texts and scores (None:
    unread), and the judge prompts' token counts (N,)."""

    scores: torch.Tensor
    judgements: list[list[str]]
    judgement_scores: list[list[float | None]]
    prompt_lengths: list[int]

    @property
    def unread(self) -> torch.Tensor:
        """(N,) the share of each response's judgements whose score could not be read."""
        return torch.tensor([sum(s is None for s in ss) / len(ss) for ss in self.judgement_scores])


def judge_responses(model, tokenizer, generator: HFGenerator, prompts: list, responses: list[str], *,
                    template: str, samples: int, params: SamplingParams, pattern: str, max_score: float,
                    seed: int) -> Judged:
    """`model` judges each (prompt, response) `samples` times (the caller sets the model's mode and
    precision; the sampler takes no gradients); see the module docstring."""
    from rlhfkit.data.encode import encode_prompt

    ids = [encode_prompt(tokenizer, judge_prompt(template, p, r)) for p, r in zip(prompts, responses)]
    gen = generator.generate(model, ids, params, generator_seed=seed, num_generations=samples)
    compiled = re.compile(pattern)
    texts = [gen.texts[i * samples:(i + 1) * samples] for i in range(len(ids))]
    read = [[read_score(t, compiled, max_score) for t in ts] for ts in texts]
    scores = torch.tensor([sum(v for v in r if v is not None) / sum(v is not None for v in r)
                           if any(v is not None for v in r) else math.nan for r in read])
    return Judged(scores, texts, read, [len(x) for x in ids])
