"""Shared fixtures: a tiny BPE tokenizer and a tiny random Llama, built offline in about a second.

Both are session-scoped (built once per xdist worker). Tests must not mutate them: copy the
tokenizer (`copy.deepcopy`) or build a fresh model with `build_preset_model` when they need to.
"""

from __future__ import annotations

import itertools
import os
import random

import pytest
import torch

# Tiny models on CPU: one intra-op thread per pytest worker. `pytest -n 2` on 2 cores with torch's
# default threads oversubscribes the CPU and makes small forward passes ~50x slower.
torch.set_num_threads(int(os.environ.get("RLHFKIT_TEST_THREADS", "1")))

_SUBJECTS = ["the movie", "this film", "the plot", "the acting", "the ending", "my friend", "the cat",
             "a dog", "the book", "our trip"]
_VERBS = ["was", "is", "felt", "seemed", "looked", "became"]
_ADJECTIVES = ["great", "terrible", "boring", "wonderful", "fine", "awful", "lovely", "slow", "funny",
               "sad", "bright", "dark"]
_TAILS = [".", "!", " today.", " again.", " to me.", " and so was the rest."]


def tiny_corpus(n: int = 400, seed: int = 0) -> list[str]:
    """A few hundred short, deterministic English sentences (plus digits and chat words)."""
    rng = random.Random(seed)
    combos = list(itertools.product(_SUBJECTS, _VERBS, _ADJECTIVES, _TAILS))
    rng.shuffle(combos)
    sentences = [f"{s.capitalize()} {v} {a}{t}" for s, v, a, t in combos[:n]]
    sentences += [f"What is {a} + {b}? It is {a + b}." for a in range(10) for b in range(10)]
    sentences += ["system user assistant You are a helpful assistant. Hello, how are you?"] * 5
    return sentences


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    return tiny_corpus()


@pytest.fixture(scope="session")
def tiny_tokenizer(corpus):
    """Preset-style tokenizer: pad `<|pad|>` (id 0), EOS `<|im_end|>`, ChatML template."""
    from rlhfkit.models.presets import train_tokenizer

    return train_tokenizer(corpus, vocab_size=512)


@pytest.fixture(scope="session")
def tiny_model(tiny_tokenizer):
    """`build_preset_model("tiny", tok)` in eval mode, seeded. Do not train or modify it."""
    from rlhfkit.models.presets import build_preset_model

    torch.manual_seed(0)
    model = build_preset_model("tiny", tiny_tokenizer)
    model.eval()
    return model
