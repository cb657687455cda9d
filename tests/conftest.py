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
from helpers import build_once, shared_dir

# Tiny models on CPU: one intra-op thread per pytest worker. `pytest -n 2` on 2 cores with torch's
# default threads oversubscribes the CPU and makes small forward passes ~50x slower.
_THREADS = os.environ.get("RLHFKIT_TEST_THREADS", "1")
torch.set_num_threads(int(_THREADS))
# The same for the processes the tests start (the launched runs set their own): the vLLM engine binds
# an OpenMP thread to every core by default, where the other worker's test needs one of them
# (tests/test_vllm.py on 2 workers: 5m39s -> 4m19s, its GRPO learning run 192 s -> 92 s, measured).
os.environ.setdefault("OMP_NUM_THREADS", _THREADS)
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")

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


@pytest.fixture(scope="session", autouse=True)
def _no_loss_plots():
    """Stage runs in this process do not render plots/loss.png (`MetricsLogger.plot`: ~0.7 s of
    matplotlib per run, measured as 21% of the time of the grpo, dpo, ppo, rm and kto test files)
    unless the test is marked `plots` (the tests that look at the file; `_loss_plots_when_marked`).
    Launched processes (torchrun / accelerate) still render theirs."""
    from rlhfkit.train.tracking import MetricsLogger

    original = MetricsLogger.plot
    MetricsLogger.plot = lambda self, keys=None: None
    yield original
    MetricsLogger.plot = original


@pytest.fixture(autouse=True)
def _loss_plots_when_marked(request, _no_loss_plots, monkeypatch):
    if request.node.get_closest_marker("plots") is not None:
        from rlhfkit.train.tracking import MetricsLogger

        monkeypatch.setattr(MetricsLogger, "plot", _no_loss_plots)


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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_model, tiny_tokenizer):
    """`tiny_model` + `tiny_tokenizer` saved as an HF directory (what an SFT stage writes), for
    stages that load their model by path. One directory shared by the xdist workers (the same path in
    every worker, so that a run launched by one worker names the base every worker loads). Read-only."""

    def save(out):
        tiny_model.save_pretrained(out, safe_serialization=True)
        tiny_tokenizer.save_pretrained(out)

    return build_once(tmp_path_factory, "tiny_model_dir", save)


@pytest.fixture(scope="session", autouse=True)
def gguf_cache(tmp_path_factory):
    """GGUF files (the SmolLM2 tests) are converted once per session into a directory shared by the
    xdist workers ($RLHFKIT_GGUF_CACHE, inherited by launched processes): a GGUF load takes ~28 s of
    one core, a converted one ~1 s. test_models compares the two and tests the direct load."""
    from rlhfkit.models.load import GGUF_CACHE_ENV

    os.environ[GGUF_CACHE_ENV] = str(shared_dir(tmp_path_factory, "gguf_cache"))
    yield
    os.environ.pop(GGUF_CACHE_ENV, None)


# ---- a trained sentiment pipeline, shared by the learning tests of later stages ----------------

SENTIMENT_SIZES = {"pt": 3000, "pt_eval": 64, "sft": 2000, "sft_eval": 128, "preference": 2000,
                   "preference_eval": 256, "ranking": 500, "ranking_eval": 128, "unpaired": 2000,
                   "unpaired_eval": 256, "prompt": 512, "prompt_eval": 256}


def _build_sentiment_sft(out):
    from rlhfkit.config import build_config
    from rlhfkit.tasks import get_task
    from rlhfkit.train.pt import train_pt
    from rlhfkit.train.sft import train_sft

    data = out / "data"
    get_task("sentiment").write(data, seed=0, sizes=SENTIMENT_SIZES)
    common = dict(seed=0, report_to=[], disable_tqdm=True, logging_steps=50, lr_scheduler_type="cosine",
                  warmup_ratio=0.05)
    train_pt(build_config("pt", dict(common, model_name_or_path="preset:tiny",
                                     dataset=str(data / "pt_train.jsonl"), output_dir=str(out / "pt"),
                                     max_length=128, per_device_train_batch_size=16, num_train_epochs=1,
                                     learning_rate=2e-3)))
    train_sft(build_config("sft", dict(common, model_name_or_path=str(out / "pt"),
                                       dataset=str(data / "sft_train.jsonl"), output_dir=str(out / "sft"),
                                       max_length=64, per_device_train_batch_size=32, num_train_epochs=1,
                                       learning_rate=1e-3)))


@pytest.fixture(scope="session")
def sentiment_sft(tmp_path_factory):
    """`{"data": dir, "sft": dir}`: the sentiment task's files (`*_train.jsonl`, `*_eval.jsonl`,
    sizes in SENTIMENT_SIZES) and a preset:tiny model pretrained 1 epoch on its corpus, then
    SFT'd 1 epoch on its demonstrations (an HF directory). Built once per session (~1 min).
    Read-only: stages that start from it write to their own output_dir."""
    out = build_once(tmp_path_factory, "sentiment_sft", _build_sentiment_sft)
    return {"data": out / "data", "sft": out / "sft"}


SENTIMENT_RM_CONFIG = dict(max_length=64, per_device_train_batch_size=32, num_train_epochs=1, learning_rate=3e-4,
                           lr_scheduler_type="cosine", warmup_ratio=0.05, logging_steps=20,
                           normalization_samples=512, task="sentiment", seed=0, report_to=[], disable_tqdm=True)
"""The reward-model run of `sentiment_rm` (full fine-tuning of the SFT model, 63 steps)."""


def _build_sentiment_rm(sft: dict, out):
    from rlhfkit.config import build_config
    from rlhfkit.train.rm import train_rm

    train_rm(build_config("rm", dict(SENTIMENT_RM_CONFIG, model_name_or_path=str(sft["sft"]),
                                     dataset=str(sft["data"] / "preference_train.jsonl"),
                                     eval_dataset=str(sft["data"] / "preference_eval.jsonl"),
                                     output_dir=str(out / "rm"))))


@pytest.fixture(scope="session")
def sentiment_rm(tmp_path_factory, sentiment_sft):
    """The reward-model directory (`load_reward_model(path)`) trained from `sentiment_sft` on the
    task's 2000 preference pairs for 1 epoch (SENTIMENT_RM_CONFIG); its `summary.json` holds the
    held-out metrics on the 256 `preference_eval` pairs (`eval/accuracy`, `eval/bayes_accuracy`).
    Built once per session (~1 min after `sentiment_sft`). Read-only."""
    out = build_once(tmp_path_factory, "sentiment_rm", lambda d: _build_sentiment_rm(sentiment_sft, d))
    return out / "rm"


# ---- a trained arithmetic pipeline, for the learning tests of the critic-free online stages --------

ARITHMETIC_ONLY = {"pt_eval": 0, "sft_eval": 0, "preference": 0, "preference_eval": 0, "ranking": 0,
                   "ranking_eval": 0, "unpaired": 0, "unpaired_eval": 0, "prompt_eval": 0}
"""Beside the arithmetic demo's sizes (pt 30000, sft 3000, prompt 512), only the kinds the arithmetic
learning tests use (held-out prompts come from the task itself)."""


def _build_arithmetic_sft(out):
    from rlhfkit.config import build_config
    from rlhfkit.demo import ARITHMETIC_PT, ARITHMETIC_SFT, ARITHMETIC_SIZES
    from rlhfkit.tasks import get_task
    from rlhfkit.train.pt import train_pt
    from rlhfkit.train.sft import train_sft

    data = out / "data"
    get_task("arithmetic").write(data, seed=0, sizes={**ARITHMETIC_SIZES, **ARITHMETIC_ONLY})
    common = dict(seed=0, report_to=[], disable_tqdm=True, logging_steps=200, lr_scheduler_type="cosine",
                  warmup_ratio=0.05)
    # the arithmetic demo's pt and sft settings: one document per row (no packing; a document is ~6
    # tokens, so 16-token rows cost ~3x less than packed 64-token blocks) in ~1900 small steps. Half as
    # many steps of 32 (lr 3e-4 or 4e-4, 2026-12-01) learned less: the SFT model's held-out T=1 accuracy
    # 0.44-0.48, and from there GRPO gained 0.06-0.08 (seeds 0, 1) and RLOO 0.05 (seed 0), at or under
    # the tests' 0.08
    train_pt(build_config("pt", dict(common, **ARITHMETIC_PT, model_name_or_path="preset:tiny",
                                     dataset=str(data / "pt_train.jsonl"), output_dir=str(out / "pt"))))
    train_sft(build_config("sft", dict(common, **ARITHMETIC_SFT, model_name_or_path=str(out / "pt"),
                                       dataset=str(data / "sft_train.jsonl"), output_dir=str(out / "sft"))))


@pytest.fixture(scope="session")
def arithmetic_sft(tmp_path_factory):
    """`{"data": dir, "sft": dir}`: the arithmetic task's files (the demo's sizes: 30000 pretraining
    documents over all 492 prompts, 3000 demonstrations and 512 prompt rows on the 386 train prompts)
    and a preset:tiny model pretrained 1 epoch on the documents (one per row, batch 16, lr 2e-4),
    then SFT'd 1 epoch on the demonstrations (lr 1e-4): `rlhfkit demo --task arithmetic`'s data and
    models. Built once per session (~80 s of one core with AVX512, ~130 s with AVX2 only).

    What it knows (exact probabilities over the 106 held-out prompts): after pretraining the greedy
    answer is right on all of them and a T=1 sample on 59%; SFT on the 70%-correct demonstrations
    of the train prompts blurs that to 89% greedy and 53% at T=1 - the room RL has on held-out
    prompts. Read-only: stages that start from it write to their own output_dir."""
    out = build_once(tmp_path_factory, "arithmetic_sft", _build_arithmetic_sft)
    return {"data": out / "data", "sft": out / "sft"}
