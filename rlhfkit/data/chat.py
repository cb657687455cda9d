"""Chat templates: render a conversation with the tokenizer's template and find, character by
character, which spans are the assistant replies the model should learn.

The template is the tokenizer's own (`apply_chat_template`), or rlhfkit's ChatML default
(`rlhfkit.models.presets.DEFAULT_CHAT_TEMPLATE`) when the tokenizer has none. A reply's span is
its content plus the EOS token when the template writes EOS right after it (ChatML's
`<|im_end|>`), so the model learns to stop.
"""

from __future__ import annotations

from rlhfkit.errors import DataError

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}


def render(tokenizer, messages: list[Message], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def render_with_spans(tokenizer, messages: list[Message], train_indices: list[int],
                      source: str | None = None) -> tuple[str, list[tuple[int, int]], bool]:
    """Render `messages`; return (text, [(start, end) char spans of the trained replies],
    whether the last trained reply's span already ends with EOS).

    `train_indices` are indices of assistant messages to learn (SFT: all of them; preference
    data: only the final reply).
    """
    text = render(tokenizer, messages)
    eos = tokenizer.eos_token
    spans: list[tuple[int, int]] = []
    ends_with_eos = False
    for i in train_indices:
        if messages[i]["role"] != "assistant":
            raise ValueError(f"message {i} is not an assistant turn")
        prefix = render(tokenizer, messages[:i], add_generation_prompt=True) if i > 0 else ""
        if not text.startswith(prefix):
            # Templates that rewrite earlier turns (e.g. strip reasoning) break prefix matching.
            prefix = render(tokenizer, messages[:i]) if i > 0 else ""
            if not text.startswith(prefix):
                raise DataError("the chat template renders earlier turns differently once a later "
                                "turn is added, so the assistant reply cannot be located",
                                source=source, field="messages")
        content = messages[i]["content"]
        needle = content.strip() or content
        start = text.find(needle, len(prefix))
        if start < 0:
            raise DataError(f"assistant reply {i} does not appear in the rendered chat template",
                            source=source, field="messages")
        end = start + len(needle)
        trail = content[len(content.rstrip()):]
        if trail and text.startswith(trail, end):
            end += len(trail)
        ends_with_eos = bool(eos) and text.startswith(eos, end)
        if ends_with_eos:
            end += len(eos)
        spans.append((start, end))
    return text, spans, ends_with_eos
