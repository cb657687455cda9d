"""LLaMA-Factory's common template names as chat templates, written here as data.

`template: NAME` in a config selects one of TEMPLATES instead of the tokenizer's own chat template.
Each entry gives the text around a system, user and assistant turn the way LLaMA-Factory's template
of that name writes it (its `format_*` slots, default system prompt and stop word), and is turned
into a Jinja template that `tokenizer.apply_chat_template` renders. `{content}` is the message,
`{eos}` / `{bos}` the tokenizer's EOS / BOS text. As in LLaMA-Factory, the user turn ends with the
assistant header, so a prompt (ending with a user turn) is ready for generation as rendered.

The template's text is tokenised by the model's own tokenizer: pick the template the model was
trained with (`qwen` / `chatml` for Qwen and SmolLM2, `llama3` for Llama 3, ...). When the
template's end-of-turn marker (`stop`) is one token of the tokenizer, it becomes the EOS (LLaMA-
Factory's `replace_eos`), so a reply's end is learned and sampling stops there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass(frozen=True)
class ChatFormat:
    description: str
    user: str
    assistant: str = "{content}{eos}"
    system: str = "{content}"
    prefix: str = ""
    default_system: str = ""
    stop: str | None = None
    """End-of-turn marker that replaces the tokenizer's EOS when it is one of its tokens."""
    system_in_first_user: bool = False
    """Llama-2 style: the formatted system text is put in front of the first user message."""

    @property
    def jinja(self) -> str:
        return _to_jinja(self)


_CHATML = dict(user="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
               assistant="{content}<|im_end|>\n", system="<|im_start|>system\n{content}<|im_end|>\n",
               stop="<|im_end|>")

TEMPLATES: dict[str, ChatFormat] = {
    "default": ChatFormat("LLaMA-Factory's `default` (Human: ... Assistant: ..., EOS after every turn)",
                          user="Human: {content}{eos}\nAssistant:", assistant="{content}{eos}\n",
                          system="System: {content}{eos}\n"),
    "empty": ChatFormat("LLaMA-Factory's `empty` (the messages' text only)", user="{content}",
                        assistant="{content}"),
    "alpaca": ChatFormat("Alpaca (### Instruction: / ### Response:)",
                         user="### Instruction:\n{content}\n\n### Response:\n", assistant="{content}{eos}\n\n",
                         default_system="Below is an instruction that describes a task. Write a response that "
                         "appropriately completes the request.\n\n"),
    "vicuna": ChatFormat("Vicuna (USER: ... ASSISTANT: ...)", user="USER: {content} ASSISTANT:",
                         default_system="A chat between a curious user and an artificial intelligence assistant. "
                         "The assistant gives helpful, detailed, and polite answers to the user's questions."),
    "chatml": ChatFormat("ChatML (<|im_start|>role ... <|im_end|>)", **_CHATML),
    "qwen": ChatFormat("ChatML with Qwen's default system prompt", **_CHATML,
                       default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant."),
    "llama3": ChatFormat("Llama 3 (<|start_header_id|>role<|end_header_id|> ... <|eot_id|>)",
                         user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>"
                         "<|start_header_id|>assistant<|end_header_id|>\n\n",
                         assistant="{content}<|eot_id|>",
                         system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
                         prefix="{bos}", stop="<|eot_id|>"),
    "llama2": ChatFormat("Llama 2 ([INST] <<SYS>> ... <</SYS>> ... [/INST])", user="{bos}[INST] {content} [/INST]",
                         system="<<SYS>>\n{content}\n<</SYS>>\n\n", system_in_first_user=True),
    "mistral": ChatFormat("Mistral ([INST] ... [/INST])", user="[INST] {content}[/INST]",
                          assistant=" {content}{eos}", system="{content}\n\n", prefix="{bos}",
                          system_in_first_user=True),
    "gemma": ChatFormat("Gemma (<start_of_turn>user ... <end_of_turn>)",
                        user="<start_of_turn>user\n{content}<end_of_turn>\n<start_of_turn>model\n",
                        assistant="{content}<end_of_turn>\n", system="{content}\n\n", prefix="{bos}",
                        stop="<end_of_turn>", system_in_first_user=True),
    "phi": ChatFormat("Phi-3 (<|user|> ... <|end|>)", user="<|user|>\n{content}<|end|>\n<|assistant|>\n",
                      assistant="{content}<|end|>\n", system="<|system|>\n{content}<|end|>\n", stop="<|end|>"),
    "zephyr": ChatFormat("Zephyr (<|user|> ... EOS)", user="<|user|>\n{content}{eos}<|assistant|>\n",
                         system="<|system|>\n{content}{eos}", default_system="You are Zephyr, a helpful assistant."),
}
"""LLaMA-Factory template name -> its turn formats."""


def _expr(fmt: str, content: str) -> str:
    """A format string as a Jinja expression: `{content}` -> the `content` expression, `{eos}` /
    `{bos}` -> the tokenizer's tokens, everything else a string literal."""
    parts = []
    rest = fmt
    while rest:
        cut = min((i for i in (rest.find("{content}"), rest.find("{eos}"), rest.find("{bos}")) if i >= 0),
                  default=len(rest))
        if cut:
            parts.append(json.dumps(rest[:cut]))
            rest = rest[cut:]
            continue
        for marker, expr in (("{content}", content), ("{eos}", "eos_token"), ("{bos}", "bos_token")):
            if rest.startswith(marker):
                parts.append(expr)
                rest = rest[len(marker):]
                break
    return " + ".join(parts) if parts else '""'


def _to_jinja(f: ChatFormat) -> str:
    """Jinja for `apply_chat_template`: system message (or the default system prompt) first, then
    the turns; roles other than system/user/assistant raise."""
    system = _expr(f.system, "ns.system")
    if f.system_in_first_user:
        first_user = f"({_expr(f.user, f'({system}) + message[{chr(39)}content{chr(39)}]')})"
    else:
        first_user = _expr(f.user, "message['content']")
    return "".join([
        "{%- set ns = namespace(system=" + json.dumps(f.default_system) + ") -%}",
        "{%- if messages and messages[0]['role'] == 'system' -%}{%- set ns.system = messages[0]['content'] -%}",
        "{%- set turns = messages[1:] -%}{%- else -%}{%- set turns = messages -%}{%- endif -%}",
        "{{- " + _expr(f.prefix, "''") + " -}}" if f.prefix else "",
        "" if f.system_in_first_user else "{%- if ns.system -%}{{- " + system + " -}}{%- endif -%}",
        "{%- for message in turns -%}",
        "{%- if message['role'] == 'user' -%}",
        ("{%- if loop.first and ns.system -%}{{- " + first_user + " -}}{%- else -%}{{- "
         + _expr(f.user, "message['content']") + " -}}{%- endif -%}"),
        "{%- elif message['role'] == 'assistant' -%}{{- " + _expr(f.assistant, "message['content']") + " -}}",
        "{%- else -%}{{- raise_exception('this template takes system, user and assistant turns, not ' "
        "+ message['role']) -}}{%- endif -%}",
        "{%- endfor -%}",
    ])


def use_stop_as_eos(tokenizer, template: ChatFormat) -> str | None:
    """LLaMA-Factory's `replace_eos`: make the template's end-of-turn marker the tokenizer's EOS
    when it is one token of the tokenizer (then a reply's end is learned and sampling stops there).
    Returns the new EOS, or None when nothing changed. A marker the tokenizer splits into pieces is
    left as text, with a warning: the model then learns no single stop token from it."""
    import logging

    stop = template.stop
    if not stop or tokenizer.eos_token == stop:
        return None
    ids = tokenizer(stop, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        logging.getLogger("rlhfkit").warning(
            "template's end-of-turn marker %r is not one token of this tokenizer (%d pieces): the template "
            "probably does not match the model; EOS stays %r", stop, len(ids), tokenizer.eos_token)
        return None
    tokenizer.eos_token = stop
    return stop
