"""Learning tests: an algorithm must improve a gold metric on a built-in task, by a stated margin.

SFT (sentiment): a tiny model trained from scratch on the demonstrations.
- held-out loss starts near ln(vocab) ~ 5.7 for a random model and must end below 2.0 (the
  demonstrations are random word choices, so their entropy keeps the floor near 1.6; measured
  1.66 after 3 epochs and 1.83 after 1 epoch with seed 0);
- sampled continuations of held-out prompts must end with EOS in >= 90% of samples
  (measured 100% with seed 0).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhfkit.config import build_config
from rlhfkit.tasks import get_task
from rlhfkit.train.sft import train_sft

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sentiment_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sentiment")
    get_task("sentiment").write(out, seed=0, sizes={"sft": 2000, "sft_eval": 200})
    return out


def test_sft_learns_sentiment_demonstrations(sentiment_data, tmp_path):
    config = build_config("sft", dict(
        model_name_or_path="preset:tiny", dataset=str(sentiment_data / "sft_train.jsonl"),
        eval_dataset=str(sentiment_data / "sft_eval.jsonl"), output_dir=str(tmp_path / "sft"),
        max_length=64, per_device_train_batch_size=32, num_train_epochs=2, learning_rate=2e-3,
        warmup_ratio=0.05, lr_scheduler_type="cosine", logging_steps=20, eval_steps=60,
        task="sentiment", eval_num_prompts=64, max_new_tokens=24, report_to=[], disable_tqdm=True,
        seed=0))
    result = train_sft(config)
    history = [r for r in result.history if "eval/loss" in r]
    first, last = history[0], history[-1]
    print(json.dumps({"first_eval": first, "final": result.summary}, indent=1))
    assert result.summary["skipped_train"] == 0
    assert last["eval/loss"] < 2.0, last
    assert first["eval/loss"] > last["eval/loss"]
    assert last["eval/eos_rate"] >= 0.9, last
