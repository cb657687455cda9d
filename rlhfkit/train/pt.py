"""Pretraining: causal language modelling on raw text, every real token a target."""

from __future__ import annotations

from rlhfkit.config import PTConfig
from rlhfkit.data.encode import Encoded, encode_text, pack
from rlhfkit.train.common import load_split, setup_model
from rlhfkit.train.lm import run_causal_lm
from rlhfkit.train.loop import Result, start_run
from rlhfkit.train.tracking import progress


def encode_documents(tokenizer, rows: list[dict], max_length: int, packing: bool, quiet) -> list[Encoded]:
    """Each document + EOS; packed into `max_length` blocks, or cut to `max_length` each."""
    docs = [encode_text(tokenizer, r["text"]) for r in progress(rows, disable=quiet, desc="tokenize")]
    if packing:
        return pack(docs, max_length)
    return [Encoded(d[:max_length], [True] * min(len(d), max_length)) for d in docs if len(d) > 1]


def train_pt(config: PTConfig) -> Result:
    # 1. validate every row before loading anything heavy
    train_rows, eval_rows = load_split(config, ("text",))
    run = start_run(config, "pt")
    # 2. tokenizer and model (a preset trains its tokenizer on the corpus)
    model, tokenizer = setup_model(run, lambda: (r["text"] for r in train_rows))
    # 3. encode (and pack) documents
    train = encode_documents(tokenizer, train_rows, config.max_length, config.packing, run.quiet)
    evaluation = encode_documents(tokenizer, eval_rows, config.max_length, config.packing, run.quiet)
    # 4. train, evaluate, save
    return run_causal_lm(run, model, tokenizer, train, evaluation, {})
