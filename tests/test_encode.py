"""Encoding: canonical rows -> token ids + response masks -> padded batches.

RLHF_NOTES items 2 (a response ends with EOS) and 4 (loss on every assistant turn only; prompt,
template and pad tokens masked out).
"""

from __future__ import annotations

import copy

import pytest
import torch

from rlhfkit.data.collate import collate_encoded, pad_batch
from rlhfkit.data.encode import (
    encode_responses,
    truncate_group,
    truncate_prompt_response,
    Encoded,
    encode_messages,
    encode_prompt,
    encode_prompt_completion,
    encode_sft_row,
    encode_text,
    pack,
    truncate_keep_start,
)
from rlhfkit.data.formats import to_canonical

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "It is 5."},
    {"role": "user", "content": "What is 4 + 4?"},
    {"role": "assistant", "content": "It is 8, my friend."},
]

# No EOS after assistant turns: "role: content\n" lines.
PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] + ':\n' + m['content'] + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant:\n' }}{% endif %}"
)


def learned_spans(tok, enc: Encoded) -> list[str]:
    """Decoded text of each maximal run of tokens with response_mask True."""
    assert len(enc.input_ids) == len(enc.response_mask)
    spans, current = [], []
    for token, learned in zip(enc.input_ids, enc.response_mask):
        if learned:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    return [tok.decode(s, skip_special_tokens=False) for s in spans]


def with_template(tok, template: str):
    tok = copy.deepcopy(tok)
    tok.chat_template = template
    return tok


# ---- standard (string) prompt/completion ----------------------------------------------------------

def test_string_prompt_completion_learns_completion_and_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    prompt, completion = "What is 2 + 3?", " It is 5."
    enc = encode_prompt_completion(tok, prompt, completion, source="f.jsonl:1")
    p = tok(prompt, add_special_tokens=True)["input_ids"]
    c = tok(completion, add_special_tokens=False)["input_ids"]
    assert enc.input_ids == p + c + [tok.eos_token_id]
    assert enc.response_mask == [False] * len(p) + [True] * (len(c) + 1)
    assert enc.source == "f.jsonl:1"
    assert learned_spans(tok, enc) == [completion + tok.eos_token]


# ---- conversational ----------------------------------------------------------------------------------

def test_multi_turn_learns_every_assistant_turn_and_its_eos_only(tiny_tokenizer):
    tok = tiny_tokenizer
    enc = encode_messages(tok, CONVERSATION)
    assert enc.input_ids == tok(tok.apply_chat_template(CONVERSATION, tokenize=False),
                                add_special_tokens=False)["input_ids"]
    assert learned_spans(tok, enc) == ["It is 5.<|im_end|>", "It is 8, my friend.<|im_end|>"]
    # Nothing from the system or user turns, nor the role headers, is learned.
    learned_text = "".join(learned_spans(tok, enc))
    for word in ("helpful", "What", "assistant", "user", "<|im_start|>"):
        assert word not in learned_text


def test_prompt_messages_train_only_the_completion_turn(tiny_tokenizer):
    tok = tiny_tokenizer
    prompt, completion = CONVERSATION[:4], CONVERSATION[4:]
    enc = encode_prompt_completion(tok, prompt, completion)
    assert learned_spans(tok, enc) == ["It is 8, my friend.<|im_end|>"]
    # Same tokens as the whole conversation; only the masks differ.
    assert enc.input_ids == encode_messages(tok, CONVERSATION).input_ids


def test_template_without_eos_gets_eos_appended_and_learned(tiny_tokenizer):
    tok = with_template(tiny_tokenizer, PLAIN_TEMPLATE)
    messages = CONVERSATION[1:3]
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert tok.eos_token not in rendered
    enc = encode_messages(tok, messages)
    assert enc.input_ids[-1] == tok.eos_token_id and enc.response_mask[-1]
    assert enc.input_ids[:-1] == tok(rendered, add_special_tokens=False)["input_ids"]
    spans = learned_spans(tok, enc)
    assert spans[0] == "It is 5." and spans[-1] == tok.eos_token


def test_first_reply_word_learned_when_template_puts_a_space_before_it(tiny_tokenizer):
    """With a 'role: content' template, byte-level BPE merges the separator space into the reply's
    first token (' movie'); that token must still be learned."""
    tok = with_template(tiny_tokenizer, "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}"
                                        "{% endfor %}")
    enc = encode_messages(tok, [{"role": "user", "content": "hi"},
                                {"role": "assistant", "content": "movie was great."}])
    assert "".join(learned_spans(tok, enc)).strip() == "movie was great." + tok.eos_token


def test_reply_with_trailing_whitespace_learns_the_template_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "It is 5.\n"}]
    enc = encode_messages(tok, messages)
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert enc.input_ids == tok(rendered, add_special_tokens=False)["input_ids"]  # no extra EOS
    assert learned_spans(tok, enc)[-1].endswith(tok.eos_token)


def test_encode_prompt_ends_with_generation_prompt(tiny_tokenizer):
    tok = tiny_tokenizer
    ids = encode_prompt(tok, CONVERSATION[:2])
    text = tok.decode(ids, skip_special_tokens=False)
    assert text.endswith("<|im_start|>assistant\n")
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    # Generation prompt ids are a prefix of the full conversation's ids.
    assert encode_messages(tok, CONVERSATION).input_ids[:len(ids)] == ids
    assert encode_prompt(tok, "the movie was") == tok("the movie was")["input_ids"]


def test_alpaca_rows_learn_only_the_output(tiny_tokenizer):
    tok = tiny_tokenizer
    rows = to_canonical([{"instruction": "Add the numbers.", "input": "2 and 3", "output": "It is 5.",
                          "_source": "a.json:1"}], "alpaca")
    enc = encode_sft_row(tok, rows[0])
    assert learned_spans(tok, enc) == ["It is 5.<|im_end|>"]
    assert enc.source == "a.json:1"
    pc = encode_sft_row(tok, {"prompt": "What is 2 + 3?", "completion": " It is 5."})
    assert learned_spans(tok, pc) == [" It is 5.<|im_end|>"]


# ---- truncation, packing -------------------------------------------------------------------------------

def test_truncate_keep_start():
    enc = Encoded([1, 2, 3, 4, 5, 6], [False, False, False, True, True, True], "s")
    assert truncate_keep_start(enc, 3) is None  # no response token left
    assert truncate_keep_start(enc, 4) == Encoded([1, 2, 3, 4], [False, False, False, True], "s")
    assert truncate_keep_start(enc, 100) == enc
    # A response token at position 0 has nothing to be predicted from.
    assert truncate_keep_start(Encoded([1, 2], [True, False]), 2) is None
    assert enc.input_ids == [1, 2, 3, 4, 5, 6]  # input not mutated


def test_pack_keeps_every_token_in_order(tiny_tokenizer):
    docs = [encode_text(tiny_tokenizer, t) for t in ["the movie was great.", "a dog", "It is 5 today."]]
    assert all(d[-1] == tiny_tokenizer.eos_token_id for d in docs)
    stream = [t for d in docs for t in d]
    # Block sizes with a tail of 1 token are covered by test_pack_keeps_a_one_token_tail.
    sizes = [b for b in range(2, len(stream) + 2) if len(stream) % b != 1]
    assert len(sizes) > 5
    for block in sizes:
        blocks = pack(docs, block)
        assert [t for b in blocks for t in b.input_ids] == stream
        assert all(len(b.input_ids) == block for b in blocks[:-1]) and len(blocks[-1].input_ids) <= block
        assert all(all(b.response_mask) and len(b.response_mask) == len(b.input_ids) for b in blocks)


def test_pack_keeps_a_one_token_tail():
    blocks = pack([[1, 2, 3, 0], [4, 0, 5, 6, 0]], 4)  # 9 tokens in blocks of 4: tail of 1
    assert [t for b in blocks for t in b.input_ids] == [1, 2, 3, 0, 4, 0, 5, 6, 0]


# ---- padded batches ---------------------------------------------------------------------------------

@pytest.mark.parametrize("side", ["left", "right"])
def test_pad_batch(side):
    seqs = [[5, 6, 7], [8], [1, 2]]
    masks = [[False, True, True], [True], [False, True]]
    batch = pad_batch(seqs, pad_id=0, side=side, masks=masks)
    assert batch["input_ids"].shape == (3, 3) and batch["input_ids"].dtype == torch.long
    attn, resp, ids = batch["attention_mask"], batch["response_mask"], batch["input_ids"]
    assert attn.dtype == torch.bool and resp.dtype == torch.bool
    assert attn.sum(-1).tolist() == [3, 1, 2]
    assert (ids[~attn] == 0).all()
    assert not resp[~attn].any()
    for i, s in enumerate(seqs):
        assert ids[i][attn[i]].tolist() == s
        assert resp[i][attn[i]].tolist() == masks[i]
    if side == "left":
        assert attn[:, -1].all() and ids.tolist()[1] == [0, 0, 8]
    else:
        assert attn[:, 0].all() and ids.tolist()[1] == [8, 0, 0]
    assert "response_mask" not in pad_batch(seqs, 0, side)


def test_collate_encoded_right_pads_with_pad_id(tiny_tokenizer):
    tok = tiny_tokenizer
    examples = [encode_messages(tok, CONVERSATION), encode_prompt_completion(tok, "hi", " It is 5.")]
    batch = collate_encoded(examples, tok.pad_token_id)
    n = [len(e.input_ids) for e in examples]
    assert batch["input_ids"].shape == (2, max(n))
    assert batch["attention_mask"].sum(-1).tolist() == n
    assert batch["attention_mask"][:, 0].all()  # right-padded
    assert (batch["input_ids"][~batch["attention_mask"]] == tok.pad_token_id).all()
    assert tok.pad_token_id != tok.eos_token_id
    for i, e in enumerate(examples):
        assert batch["input_ids"][i, :n[i]].tolist() == e.input_ids
        assert batch["response_mask"][i, :n[i]].tolist() == e.response_mask
    assert not batch["response_mask"][~batch["attention_mask"]].any()


# ---- preference / ranking truncation: keep the prompt's end and the response's start ----------

def test_truncate_prompt_response_keeps_prompt_end_and_response_start():
    ex = Encoded(list(range(10)), [False] * 6 + [True] * 4)  # prompt 0..5, response 6..9
    assert truncate_prompt_response(ex, 10) == ex
    cut = truncate_prompt_response(ex, 8, max_prompt_length=3)
    assert cut.input_ids == [3, 4, 5, 6, 7, 8, 9] and cut.response_mask == [False] * 3 + [True] * 4
    cut = truncate_prompt_response(ex, 8)  # prompt kept whole, response cut at its end
    assert cut.input_ids == [0, 1, 2, 3, 4, 5, 6, 7] and cut.response_mask == [False] * 6 + [True] * 2
    assert truncate_prompt_response(ex, 6) is None  # no response token fits


def test_truncate_prompt_response_drops_template_tokens_after_the_reply():
    ex = Encoded([1, 2, 3, 4, 5], [False, False, True, True, False])  # 5 = "\n" after EOS
    assert truncate_prompt_response(ex, 10).input_ids == [1, 2, 3, 4]


def _pair(prompt, *responses):
    return [Encoded(prompt + r, [False] * len(prompt) + [True] * len(r)) for r in responses]


def test_truncate_group_keeps_the_end_of_the_conversation_and_the_start_of_the_replies():
    """Prompt 1..6 (6 tokens), replies A = 10 11 12 13 2 (5 tokens, EOS 2) and B = 20 21 2 (3).
    max_length 8, max_response_length 4: A keeps 10 11 12 13, B whole; the longest kept reply (4)
    leaves 8 - 4 = 4 prompt tokens, its last ones 3 4 5 6, the same for both."""
    pair = _pair([1, 2, 3, 4, 5, 6], [10, 11, 12, 13, 2], [20, 21, 2])
    fit = truncate_group(pair, 8, max_response_length=4)
    assert [e.input_ids for e in fit.sequences] == [[3, 4, 5, 6, 10, 11, 12, 13], [3, 4, 5, 6, 20, 21, 2]]
    assert [e.response_mask for e in fit.sequences] == [[False] * 4 + [True] * 4, [False] * 4 + [True] * 3]
    assert fit.prompt_cut and fit.response_cut
    # room for everything: 5 + 6 <= 12, nothing cut
    fit = truncate_group(pair, 12, max_response_length=5)
    assert [e.input_ids for e in fit.sequences] == [e.input_ids for e in pair]
    assert not fit.prompt_cut and not fit.response_cut
    # short replies leave the prompt more room: only B, 3 + 6 <= 9, nothing cut
    fit = truncate_group(pair[1:], 9, max_response_length=4)
    assert fit.sequences[0].input_ids == pair[1].input_ids and not fit.prompt_cut
    # max_prompt_length still caps the prompt: its last 2 tokens
    fit = truncate_group(pair, 20, max_prompt_length=2, max_response_length=8)
    assert [e.input_ids for e in fit.sequences] == [[5, 6, 10, 11, 12, 13, 2], [5, 6, 20, 21, 2]]
    assert fit.prompt_cut and not fit.response_cut
    # without max_response_length: truncate_prompt_response on each (prompt whole, A loses 13 and 2)
    fit = truncate_group(pair, 10)
    assert [e.input_ids for e in fit.sequences] == [[1, 2, 3, 4, 5, 6, 10, 11, 12, 13], [1, 2, 3, 4, 5, 6, 20, 21, 2]]
    assert fit.response_cut and not fit.prompt_cut
    assert [truncate_prompt_response(e, 10) for e in pair] == fit.sequences
    # no room for the prompt, no response token, or no prompt at all: skipped (None)
    assert truncate_group(pair, 4, max_response_length=4).sequences is None
    assert truncate_group(pair, 6, max_prompt_length=6).sequences is None
    assert truncate_group(_pair([], [1, 2]), 10).sequences is None


def test_encode_responses_share_the_prompt_and_end_with_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    for prompt, responses in (("The movie was", [" great.", " awful and slow."]),
                              ([{"role": "user", "content": "Hello"}],
                               [[{"role": "assistant", "content": "The cat is great."}],
                                [{"role": "assistant", "content": "Sad."}]])):
        pair = encode_responses(tok, prompt, responses, max_length=64)
        starts = [e.response_mask.index(True) for e in pair]
        assert starts[0] == starts[1] and pair[0].input_ids[:starts[0]] == pair[1].input_ids[:starts[1]]
        for e in pair:
            assert e.input_ids[-1] == tok.eos_token_id and e.response_mask[-1]
    assert encode_responses(tok, "The movie was", [" great.", " a b c d e f g h"], max_length=4,
                            max_prompt_length=3) is not None
    assert encode_responses(tok, "The movie was", [" great."], max_length=3, max_prompt_length=3) is None
