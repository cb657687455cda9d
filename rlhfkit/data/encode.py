"""Canonical rows -> token ids + masks.

An `Encoded` example holds `input_ids` and `response_mask` of the same length:
`response_mask[t]` is True when token t belongs to a response the model learns (assistant reply or
completion, its EOS included). Prompt, template and pad tokens are False. For next-token losses
the target mask is `response_mask[1:]`.

Two text forms, as in TRL:
- standard: prompt and completion are strings; the training text is
  `prompt + completion + EOS`, prompt tokenised with the tokenizer's special tokens (BOS), the
  completion without, so the boundary between them is exact.
- conversational: message lists rendered with the chat template; only assistant replies train.

Truncation: SFT and pretraining keep the start (cut the end). Preference, ranking, unpaired and
RL data keep the *end of the prompt* and the *start of the response* (`truncate_prompt_response`).
An example that keeps no response token within `max_length` is skipped and counted, never
silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhfkit.data.chat import render, render_with_spans


@dataclass
class Encoded:
    input_ids: list[int]
    response_mask: list[bool]
    source: str | None = None


def _conversation(tokenizer, messages, train_indices, source) -> Encoded:
    text, spans, ends_with_eos = render_with_spans(tokenizer, messages, train_indices, source)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    # A token learns if it overlaps a reply (a BPE token may merge template whitespace into
    # the reply's first word).
    mask = [any(start < e and s < end for s, e in spans) for start, end in enc["offset_mapping"]]
    if train_indices and train_indices[-1] == len(messages) - 1 and not ends_with_eos:
        # The template writes no EOS after the final reply: append one and learn it.
        ids.append(tokenizer.eos_token_id)
        mask.append(True)
    return Encoded(ids, mask, source)


def encode_prompt_completion(tokenizer, prompt, completion, source: str | None = None) -> Encoded:
    """Prompt (string or messages) + completion (string or assistant messages), loss on the
    completion only, EOS appended to string completions."""
    if isinstance(prompt, str):
        p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        return Encoded(p + c, [False] * len(p) + [True] * len(c), source)
    messages = list(prompt) + list(completion)
    train = [i for i in range(len(prompt), len(messages)) if messages[i]["role"] == "assistant"]
    return _conversation(tokenizer, messages, train, source)


def encode_messages(tokenizer, messages, source: str | None = None) -> Encoded:
    """A whole conversation; every assistant turn trains."""
    train = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    return _conversation(tokenizer, messages, train, source)


def encode_prompt(tokenizer, prompt) -> list[int]:
    """Prompt ids for generation: strings as-is (with BOS if the tokenizer adds one), messages
    through the chat template with the generation prompt."""
    if isinstance(prompt, str):
        return tokenizer(prompt, add_special_tokens=True)["input_ids"]
    text = render(tokenizer, list(prompt), add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_sft_row(tokenizer, row: dict) -> Encoded:
    """Any SFT-able canonical row: `messages` or `prompt`/`completion`."""
    if "messages" in row:
        return encode_messages(tokenizer, row["messages"], row.get("_source"))
    return encode_prompt_completion(tokenizer, row["prompt"], row["completion"], row.get("_source"))


def truncate_keep_start(example: Encoded, max_length: int) -> Encoded | None:
    """Cut to `max_length` tokens from the end; None when no response token would remain."""
    ids, mask = example.input_ids[:max_length], example.response_mask[:max_length]
    # A response token at position 0 has no context to be predicted from.
    if not any(mask[1:]):
        return None
    return Encoded(ids, mask, example.source)


def encode_text(tokenizer, text: str) -> list[int]:
    """Pretraining document: its tokens (with BOS if the tokenizer adds one) + EOS."""
    return tokenizer(text, add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]


def pack(documents: list[list[int]], block_size: int) -> list[Encoded]:
    """Concatenate documents (each already ending in EOS) and cut into blocks of `block_size`.
    The final partial block is kept (shorter) so no token is dropped."""
    stream = [t for doc in documents for t in doc]
    blocks = []
    for i in range(0, len(stream), block_size):
        chunk = stream[i:i + block_size]
        blocks.append(Encoded(chunk, [True] * len(chunk)))
    return blocks


def truncate_prompt_response(example: Encoded, max_length: int,
                             max_prompt_length: int | None = None) -> Encoded | None:
    """Fit a prompt + one response into `max_length` tokens (preference/ranking/unpaired data).

    The prompt is every token before the first response token; the response runs to the last
    response token (template tokens after it, e.g. a newline after ChatML's EOS, are dropped, so
    the sequence ends on the response's EOS, where a reward model reads its score).
    1. the prompt keeps its last `max_prompt_length` tokens (when set);
    2. the response keeps its first `max_length - len(prompt)` tokens (its EOS is lost only
       when it does not fit).
    Returns None when no response token fits or the prompt is empty after truncation."""
    mask = example.response_mask
    if not any(mask):
        return None
    first = mask.index(True)
    last = len(mask) - 1 - mask[::-1].index(True)
    prompt = example.input_ids[:first]
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        prompt = prompt[len(prompt) - max_prompt_length:]
    room = max_length - len(prompt)
    if not prompt or room < 1:
        return None
    ids = example.input_ids[first:last + 1][:room]
    rmask = mask[first:last + 1][:room]
    return Encoded(prompt + ids, [False] * len(prompt) + rmask, example.source)


def encode_responses(tokenizer, prompt, responses: list, max_length: int,
                     max_prompt_length: int | None = None, source: str | None = None) -> list[Encoded] | None:
    """One prompt with several responses (chosen/rejected of a preference pair, or a ranking best
    first), each encoded as prompt + response (+ EOS) and truncated by `truncate_prompt_response`.
    None when any response leaves no token (the whole row is then skipped and counted)."""
    out = []
    for response in responses:
        example = truncate_prompt_response(encode_prompt_completion(tokenizer, prompt, response, source),
                                           max_length, max_prompt_length)
        if example is None:
            return None
        out.append(example)
    return out
