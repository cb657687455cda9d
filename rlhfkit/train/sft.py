"""Supervised fine-tuning: next-token loss on assistant replies / completions only."""

from __future__ import annotations

from functools import partial

from rlhfkit.config import SFTConfig
from rlhfkit.data.encode import encode_sft_row, truncate_keep_start
from rlhfkit.train.common import encode_all, load_split, row_texts, setup_model
from rlhfkit.train.lm import run_causal_lm
from rlhfkit.train.loop import Result, start_run

SFT_FORMATS = ("messages", "prompt_completion")  # alpaca rows arrive as messages


def encode_sft(tokenizer, max_length: int, row: dict):
    return truncate_keep_start(encode_sft_row(tokenizer, row), max_length)


def train_sft(config: SFTConfig) -> Result:
    # 1. validate every row before loading anything heavy
    train_rows, eval_rows = load_split(config, SFT_FORMATS)
    run = start_run(config, "sft")
    # 2. tokenizer and model (a preset trains its tokenizer on these rows)
    model, tokenizer = setup_model(run, lambda: row_texts(train_rows))
    # 3. encode: prompt tokens masked out, responses + EOS learned; too-long rows skipped, counted
    encode = partial(encode_sft, tokenizer, config.max_length)
    train, skipped_train = encode_all(train_rows, encode, desc="tokenize train", quiet=run.quiet)
    evaluation, skipped_eval = encode_all(eval_rows, encode, desc="tokenize eval", quiet=run.quiet)
    # 4. train, evaluate, save
    return run_causal_lm(run, model, tokenizer, train, evaluation,
                         {"train": skipped_train, "eval": skipped_eval})
