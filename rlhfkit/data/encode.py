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


@dataclass
class GroupFit:
    """A prompt's responses fitted into `max_length` (`truncate_group`), and what was cut."""

    sequences: list[Encoded] | None
    """prompt + response per response, or None when a response keeps no token (row skipped)."""
    prompt_cut: bool = False
    """The prompt (conversation) lost tokens from its start."""
    response_cut: bool = False
    """A response lost tokens from its end (its EOS among them: a reward is then read before it)."""


def _response_span(mask: list[bool]) -> tuple[int, int] | None:
    if not any(mask):
        return None
    return mask.index(True), len(mask) - 1 - mask[::-1].index(True)


def truncate_group(examples: list[Encoded], max_length: int, max_prompt_length: int | None = None,
                   max_response_length: int | None = None) -> GroupFit:
    """Fit the responses of one prompt (each example = prompt + response) into `max_length` tokens.

    The prompt is every token before the first response token; a response runs to its last
    response token (template tokens after it, e.g. a newline after ChatML's EOS, are dropped, so
    the sequence ends on the response's EOS, where a reward model reads its score).
    1. each response keeps its first `max_response_length` tokens; when that is None, its first
       `max_length - min(prompt, max_prompt_length)` tokens;
    2. the prompt keeps its LAST `max_length - longest kept response` tokens, and at most
       `max_prompt_length`: every response of the group sees the same end of the conversation.
    With `max_response_length` None this is `truncate_prompt_response` on each example.
    `sequences` is None when a response keeps no token or the prompt is empty."""
    spans = [_response_span(e.response_mask) for e in examples]
    if any(span is None for span in spans):
        return GroupFit(None)
    prompt_cap = max_length if max_prompt_length is None else max_prompt_length
    keep_response = [min(last + 1 - first, max_response_length if max_response_length is not None
                         else max_length - min(first, prompt_cap)) for first, last in spans]
    room = max_length - max(keep_response)
    keep_prompt = [min(first, prompt_cap, room) for first, _ in spans]
    if min(keep_prompt) < 1 or min(keep_response) < 1:
        return GroupFit(None)
    out = []
    for e, (first, last), p, r in zip(examples, spans, keep_prompt, keep_response):
        ids = e.input_ids[first - p:first] + e.input_ids[first:last + 1][:r]
        mask = [False] * p + e.response_mask[first:last + 1][:r]
        out.append(Encoded(ids, mask, e.source))
    return GroupFit(out, prompt_cut=any(p < first for p, (first, _) in zip(keep_prompt, spans)),
                    response_cut=any(r < last + 1 - first for r, (first, last) in zip(keep_response, spans)))


def truncate_prompt_response(example: Encoded, max_length: int,
                             max_prompt_length: int | None = None) -> Encoded | None:
    """Fit a prompt + one response into `max_length` tokens (preference/ranking/unpaired data):
    1. the prompt keeps its last `max_prompt_length` tokens (when set);
    2. the response keeps its first `max_length - len(prompt)` tokens (its EOS is lost only
       when it does not fit).
    Returns None when no response token fits or the prompt is empty after truncation
    (`truncate_group` of one example)."""
    fit = truncate_group([example], max_length, max_prompt_length)
    return None if fit.sequences is None else fit.sequences[0]


def encode_response_group(tokenizer, prompt, responses: list, max_length: int, max_prompt_length: int | None = None,
                          max_response_length: int | None = None, source: str | None = None) -> GroupFit:
    """One prompt with several responses, each encoded as prompt + response (+ EOS), fitted
    together by `truncate_group` (what reward models use)."""
    examples = [encode_prompt_completion(tokenizer, prompt, r, source) for r in responses]
    return truncate_group(examples, max_length, max_prompt_length, max_response_length)


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
