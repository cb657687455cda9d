"""Validate raw rows and convert them to canonical rows, one shape per format.

A raw row is a dict from `rlhfkit.data.sources.load_rows` (with `_source`). A
canonical row has one of these shapes (plus `_source` and every column the
format did not consume, so later stages can hand them to reward functions):

    text               {"text": str}
    alpaca, messages   {"messages": [{"role", "content"}, ...]}
    prompt             {"prompt": P}
    prompt_completion  {"prompt": P, "completion": C}
    preference         {"prompt": P, "chosen": C, "rejected": C[, "margin": float]}
    ranking            {"prompt": P, "responses": [C, C, ...]}       best first
    unpaired           {"prompt": P, "completion": C, "label": bool}

P and C are either both strings (raw text, no chat template applied, as TRL's
"standard" form) or both message lists (TRL's "conversational" form: P a list
of messages ending with a user turn, C a list starting with an assistant turn).
A string response to a message-list prompt becomes one assistant message; a
message-list response to a string prompt is an error.

Roles are `system`, `user`, `assistant`; ShareGPT `{"from", "value"}` messages
with `human`/`gpt`/`system` are converted.

Preference rows without a `prompt` column are accepted in two forms:
  * HH-RLHF transcripts ("\\n\\nHuman: ... \\n\\nAssistant: ...") - see
    `_split_hh`;
  * message lists whose longest common prefix is the prompt (TRL's "implicit
    prompt").

Every problem raises `DataError(source=row["_source"], field=...)`.
"""

from __future__ import annotations

import math
import re

from rlhfkit.errors import DataError

FORMATS = ("text", "alpaca", "messages", "prompt", "prompt_completion", "preference", "ranking", "unpaired")

REQUIRED_COLUMNS = {
    "text": ("text",),
    "alpaca": ("instruction", "output"),
    "messages": ("messages",),  # or ShareGPT "conversations"
    "prompt": ("prompt",),
    "prompt_completion": ("prompt", "completion"),
    "preference": ("chosen", "rejected"),  # plus "prompt" unless implicit
    "ranking": ("prompt", "responses"),
    "unpaired": ("prompt", "completion", "label"),
}
"""Columns each format needs, for error messages and docs."""

ROLES = ("system", "user", "assistant")
_ROLE_ALIASES = {"human": "user", "gpt": "assistant"}  # ShareGPT `from` values
_HH_MARKER = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


class _RowError(Exception):
    """A problem with one row; `to_canonical` turns it into a DataError with the row's source."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field


# --------------------------------------------------------------------------- public API


def detect_format(row: dict) -> str:
    """Name the format of `row` from its column names (`_source` and extra columns are ignored).

    First match wins: chosen+rejected -> preference; responses -> ranking;
    completion+label -> unpaired; prompt+completion -> prompt_completion;
    messages or conversations -> messages; instruction+output -> alpaca;
    chosen or rejected alone -> preference (a pair with one side missing: the preference
    converter then names the missing field, instead of the row passing as a bare prompt);
    prompt -> prompt; text -> text.
    """
    cols = set(row) - {"_source"}
    if {"chosen", "rejected"} <= cols:
        return "preference"
    if "responses" in cols:
        return "ranking"
    if {"completion", "label"} <= cols:
        return "unpaired"
    if {"prompt", "completion"} <= cols:
        return "prompt_completion"
    if "messages" in cols or "conversations" in cols:
        return "messages"
    if {"instruction", "output"} <= cols:
        return "alpaca"
    if cols & {"chosen", "rejected"}:
        return "preference"
    if "prompt" in cols:
        return "prompt"
    if "text" in cols:
        return "text"
    expected = "; ".join(f"{name} ({', '.join(cols)})" for name, cols in REQUIRED_COLUMNS.items())
    raise DataError(
        f"cannot tell the data format from the columns [{', '.join(sorted(cols))}]; "
        f"expected the columns of one of: {expected}. Rename columns with column_map or set the format",
        source=row.get("_source"),
    )


def to_canonical(rows: list[dict], fmt: str | None = None) -> list[dict]:
    """Validate every row and return new canonical rows (see the module docstring).

    `fmt` is one of FORMATS; None detects it from the first row. Raises DataError
    for the first invalid row, saying how many others are invalid too.
    """
    canonical, problems = _convert_all(rows, fmt)
    if problems:
        message, source, field = problems[0]
        if len(problems) > 1:
            others = ", ".join(p[1] for p in problems[1:4]) + (", ..." if len(problems) > 4 else "")
            message += f" [{len(problems) - 1} more invalid rows: {others}]"
        raise DataError(message, source=source, field=field)
    return canonical


def split_valid_rows(rows: list[dict], fmt: str | None = None) -> tuple[list[dict], list[DataError]]:
    """Convert the rows that are valid and collect a DataError for each row that is not.

    The same checks as `to_canonical`, for callers that choose to drop bad rows
    (and report them) instead of stopping; order is kept in both lists.
    """
    canonical, problems = _convert_all(rows, fmt)
    return canonical, [DataError(message, source=source, field=field) for message, source, field in problems]


def _convert_all(rows: list[dict], fmt: str | None) -> tuple[list[dict], list[tuple[str, str, str | None]]]:
    """Canonical rows and (message, source, field) for each invalid row."""
    if not rows:
        raise DataError("no rows to convert")
    if fmt is None:
        first = rows[0]
        if not isinstance(first, dict):
            raise DataError(f"a row must be a dict, got {type(first).__name__}", source="row 1")
        fmt = detect_format(first)
        note = f" (format detected as '{fmt}' from the first row)"
    elif fmt not in FORMATS:
        raise DataError(f"unknown format '{fmt}'; expected one of: {', '.join(FORMATS)}", field="format")
    else:
        note = f" (format '{fmt}')"
    convert = _CONVERTERS[fmt]
    canonical, problems = [], []
    for i, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            problems.append((f"a row must be a dict, got {type(row).__name__}", f"row {i}", None))
            continue
        source = row.get("_source") or f"row {i}"
        try:
            out = convert(row)
        except _RowError as e:
            problems.append((e.message + note, source, e.field))
            continue
        out["_source"] = source
        canonical.append(out)
    return canonical, problems


def _split_hh(chosen: str, rejected: str) -> tuple[list[dict], list[dict], list[dict]]:
    """Split an HH-RLHF pair of transcripts into (prompt, chosen, rejected) messages.

    Each transcript is "\\n\\nHuman: ...\\n\\nAssistant: ..."; it is split on those
    markers, each turn stripped, and consecutive turns of the same speaker
    merged with "\\n\\n" (a few HH transcripts repeat a marker mid-reply). Both
    must end with a non-empty Assistant reply and agree on every turn before
    it. The prompt is the shared turns (ending with a user turn); each response
    is `[{"role": "assistant", "content": last reply}]`.

    Raises `_RowError` (field `chosen` or `rejected`) saying why a pair cannot be split.
    """
    c_turns = _parse_hh(chosen, "chosen")
    r_turns = _parse_hh(rejected, "rejected")
    c_prompt, r_prompt = c_turns[:-1], r_turns[:-1]
    if c_prompt != r_prompt:
        k = next((i for i, (a, b) in enumerate(zip(c_prompt, r_prompt)) if a != b), min(len(c_prompt), len(r_prompt)))
        raise _RowError(
            f"the chosen and rejected transcripts must share every turn before the final Assistant reply, "
            f"but they differ at turn {k + 1}: chosen has {_describe_turn(c_prompt, k)}, "
            f"rejected has {_describe_turn(r_prompt, k)}",
            "rejected",
        )
    return c_prompt, c_turns[-1:], r_turns[-1:]


# --------------------------------------------------------------------------- per-format converters


def _convert_text(row: dict) -> dict:
    return {"text": _text(row, "text"), **_extras(row, ("text",))}


def _convert_alpaca(row: dict) -> dict:
    messages = []
    system = _optional_text(row, "system")
    if system:
        messages.append({"role": "system", "content": system})
    history = row.get("history")
    if history is not None:
        if not isinstance(history, (list, tuple)):
            raise _RowError(f"expected a list of [user, assistant] pairs, got {_type(history)}", "history")
        for i, pair in enumerate(history):
            field = f"history[{i}]"
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise _RowError(f"expected a [user, assistant] pair, got {_short(pair)}", field)
            user = _check_text(pair[0], f"{field}[0]")
            assistant = _check_text(pair[1], f"{field}[1]")
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    instruction = _text(row, "instruction")
    extra_input = _optional_text(row, "input")
    user = f"{instruction}\n\n{extra_input}" if extra_input and extra_input.strip() else instruction
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": _text(row, "output")}]
    return {"messages": messages, **_extras(row, ("instruction", "input", "output", "system", "history"))}


def _convert_messages(row: dict) -> dict:
    field = "messages" if row.get("messages") is not None or "conversations" not in row else "conversations"
    messages = _messages(_require(row, field), field)
    if not any(m["role"] == "assistant" for m in messages):
        raise _RowError("the conversation has no assistant turn, so there is nothing to train on", field)
    return {"messages": messages, **_extras(row, (field,))}


def _convert_prompt(row: dict) -> dict:
    return {"prompt": _prompt(row), **_extras(row, ("prompt",))}


def _convert_prompt_completion(row: dict) -> dict:
    prompt = _prompt(row)
    completion = _response(_require(row, "completion"), "completion", prompt)
    return {"prompt": prompt, "completion": completion, **_extras(row, ("prompt", "completion"))}


def _convert_preference(row: dict) -> dict:
    if "prompt" in row:
        prompt = _prompt(row)
        chosen = _response(_require(row, "chosen"), "chosen", prompt)
        rejected = _response(_require(row, "rejected"), "rejected", prompt)
    else:
        prompt, chosen, rejected = _implicit_prompt(_require(row, "chosen"), _require(row, "rejected"))
    out = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    margin = row.get("margin")
    if margin is not None:
        out["margin"] = _number(margin, "margin")
    return {**out, **_extras(row, ("prompt", "chosen", "rejected", "margin"))}


def _convert_ranking(row: dict) -> dict:
    prompt = _prompt(row)
    responses = _require(row, "responses")
    if not isinstance(responses, (list, tuple)):
        raise _RowError(f"expected a list of responses (best first), got {_type(responses)}", "responses")
    if len(responses) < 2:
        raise _RowError(f"a ranking needs at least 2 responses, got {len(responses)}", "responses")
    ranked = [_response(r, f"responses[{i}]", prompt) for i, r in enumerate(responses)]
    return {"prompt": prompt, "responses": ranked, **_extras(row, ("prompt", "responses"))}


def _convert_unpaired(row: dict) -> dict:
    prompt = _prompt(row)
    completion = _response(_require(row, "completion"), "completion", prompt)
    label = _bool(_require(row, "label"), "label")
    return {"prompt": prompt, "completion": completion, "label": label, **_extras(row, ("prompt", "completion", "label"))}


_CONVERTERS = {
    "text": _convert_text,
    "alpaca": _convert_alpaca,
    "messages": _convert_messages,
    "prompt": _convert_prompt,
    "prompt_completion": _convert_prompt_completion,
    "preference": _convert_preference,
    "ranking": _convert_ranking,
    "unpaired": _convert_unpaired,
}


# --------------------------------------------------------------------------- prompts and responses


def _prompt(row: dict) -> str | list[dict]:
    """A non-empty string, or a message list that ends with a user turn."""
    value = _require(row, "prompt")
    if isinstance(value, str):
        return _check_text(value, "prompt")
    messages = _messages(value, "prompt")
    if not messages:
        raise _RowError("is an empty message list", "prompt")
    if messages[-1]["role"] != "user":
        raise _RowError(f"a prompt's messages must end with a user turn, not {messages[-1]['role']}", "prompt")
    return messages


def _response(value, field: str, prompt: str | list[dict]) -> str | list[dict]:
    """A response in the same form as the prompt: a string, or messages starting with an assistant turn."""
    if isinstance(prompt, str):
        if isinstance(value, (list, tuple)):
            raise _RowError(
                "is a message list but the prompt is a string; give both as strings or both as message lists",
                field,
            )
        return _check_text(value, field)
    if isinstance(value, str):
        return [{"role": "assistant", "content": _check_text(value, field)}]
    messages = _messages(value, field, empty_reply_ok=True)
    if not messages:
        raise _RowError("is an empty message list", field)
    if messages[0]["role"] != "assistant":
        raise _RowError(f"a response must start with an assistant turn, not {messages[0]['role']}", field)
    return messages


JUDGE_SLOTS = re.compile(r"\{prompt\}|\{response\}")


def fill_judge_template(template: str, request: str, response: str) -> str:
    """An LLM judge's prompt: `template` with `{prompt}` -> `request` and `{response}` -> `response`, in
    one pass, so that what is inserted for one slot is never read as the other (a request may itself
    contain "{response}"). Used by rollout/judge.py and by the tasks' `judge` rows."""
    return JUDGE_SLOTS.sub(lambda m: request if m.group() == "{prompt}" else response, template)


def request_text(prompt) -> str:
    """The request an LLM judge sees: a string as-is; a conversation of one user turn its content; a
    longer one its turns, one per line, "<role>: <content>"."""
    if isinstance(prompt, str):
        return prompt
    turns = list(prompt)
    if len(turns) == 1 and turns[0]["role"] == "user":
        return turns[0]["content"]
    return "\n".join(f"{t['role']}: {t['content']}" for t in turns)


def conversation_prompt(messages: list[dict], source: str | None = None) -> tuple[list[dict], list[dict]]:
    """A conversation used as a prompt (online stages, `generate`, `eval`): (its prompt, [its reply]).
    Ending with a user turn: the whole conversation is the prompt, with no reply. Ending with an
    assistant turn: the prompt is everything before it, the reply that turn. DataError when no user
    turn comes right before the prompt's end (nothing is dropped or guessed)."""
    if messages[-1]["role"] == "user":
        return list(messages), []
    last = len(messages) - 1
    if messages[last]["role"] != "assistant" or last == 0 or messages[last - 1]["role"] != "user":
        raise DataError("a conversation used as a prompt must end with a user turn, or with an assistant reply "
                        "right after a user turn, got roles " + " -> ".join(m["role"] for m in messages),
                        source=source, field="messages")
    return messages[:last], messages[last:]


def as_prompt_row(row: dict) -> dict:
    """A canonical row as the online stages take it: a `messages` row becomes a prompt row
    (`conversation_prompt`), its last reply, if any, the `completion`; other rows unchanged."""
    if "messages" not in row:
        return row
    prompt, reply = conversation_prompt(row["messages"], row.get("_source"))
    out = {k: v for k, v in row.items() if k != "messages"}
    out["prompt"] = prompt
    if reply:
        out["completion"] = reply
    return out


def _implicit_prompt(chosen, rejected) -> tuple[list[dict], list[dict], list[dict]]:
    """Prompt for a preference row with no `prompt` column: HH transcripts or a shared message prefix."""
    if isinstance(chosen, str) and isinstance(rejected, str):
        c_hh, r_hh = _is_hh(chosen), _is_hh(rejected)
        if c_hh and r_hh:
            return _split_hh(chosen, rejected)
        if c_hh or r_hh:
            field = "rejected" if c_hh else "chosen"
            raise _RowError(
                "is not an HH-RLHF transcript ('\\n\\nHuman: ...\\n\\nAssistant: ...') but the other response is",
                field,
            )
        raise _RowError(
            "preference rows need a prompt: add a 'prompt' column, or give chosen and rejected as full "
            "conversations (message lists or HH-RLHF '\\n\\nHuman: ...\\n\\nAssistant: ...' transcripts)",
            "prompt",
        )
    if isinstance(chosen, str) or isinstance(rejected, str):
        field = "chosen" if isinstance(chosen, str) else "rejected"
        raise _RowError(
            "is a string while the other response is a message list, and there is no 'prompt' column", field
        )
    c_msgs, r_msgs = _messages(chosen, "chosen", True), _messages(rejected, "rejected", True)
    k = 0
    while k < min(len(c_msgs), len(r_msgs)) and c_msgs[k] == r_msgs[k]:
        k += 1
    prompt = c_msgs[:k]
    if not prompt:
        raise _RowError(
            "no 'prompt' column and chosen/rejected share no leading messages, so there is no prompt", "prompt"
        )
    for field, rest in (("chosen", c_msgs[k:]), ("rejected", r_msgs[k:])):
        if not rest:
            raise _RowError("is empty after removing the prompt shared with the other response", field)
        if rest[0]["role"] != "assistant":
            raise _RowError(
                f"after the shared prompt the response must start with an assistant turn, not {rest[0]['role']}",
                field,
            )
    if prompt[-1]["role"] != "user":
        raise _RowError(f"the shared prompt must end with a user turn, not {prompt[-1]['role']}", "prompt")
    return prompt, c_msgs[k:], r_msgs[k:]


# --------------------------------------------------------------------------- HH-RLHF transcripts


def _is_hh(text: str) -> bool:
    return "\n\nHuman:" in "\n\n" + text.lstrip() and "\n\nAssistant:" in text


def _parse_hh(text: str, field: str) -> list[dict]:
    """Turns of one transcript; same-speaker runs merged; must end with a non-empty Assistant reply."""
    parts = _HH_MARKER.split("\n\n" + text.lstrip())
    if parts[0].strip():
        raise _RowError(f"has text before the first 'Human:' marker: {_short(parts[0])}", field)
    turns: list[dict] = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        role, content = _HH_ROLES[speaker], content.strip()
        if turns and turns[-1]["role"] == role:
            turns[-1] = {"role": role, "content": f"{turns[-1]['content']}\n\n{content}".strip()}
        else:
            turns.append({"role": role, "content": content})
    if turns[-1]["role"] != "assistant":
        raise _RowError("the transcript ends with a Human turn; it must end with the Assistant's reply", field)
    # An empty final reply is kept: in HH-RLHF annotators sometimes prefer silence (4 of the
    # 1,800 harmless-base pairs); the response is then EOS alone.
    if len(turns) < 2:
        raise _RowError("the transcript has no Human turn before the Assistant's reply", field)
    return turns


def _describe_turn(turns: list[dict], k: int) -> str:
    if k >= len(turns):
        return "no turn there"
    speaker = "Human" if turns[k]["role"] == "user" else "Assistant"
    return f"{speaker}: {_short(turns[k]['content'])}"


# --------------------------------------------------------------------------- field checks


def _require(row: dict, field: str):
    value = row.get(field)
    if value is None:
        have = ", ".join(sorted(k for k in row if k != "_source" and row[k] is not None))
        raise _RowError(f"missing field (the row has: {have or 'nothing'})", field)
    return value


def _text(row: dict, field: str) -> str:
    return _check_text(_require(row, field), field)


def _optional_text(row: dict, field: str) -> str | None:
    value = row.get(field)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _RowError(f"expected a string, got {_type(value)} {_short(value)}", field)
    return value


def _check_text(value, field: str) -> str:
    """A non-empty (not just whitespace) string."""
    if value is None:
        raise _RowError("missing field", field)
    if not isinstance(value, str):
        raise _RowError(f"expected a string, got {_type(value)} {_short(value)}", field)
    if not value.strip():
        raise _RowError("is an empty string", field)
    return value


def _messages(value, field: str, empty_reply_ok: bool = False) -> list[dict]:
    """New `{"role", "content"}` dicts; ShareGPT `{"from", "value"}` accepted and converted.
    `empty_reply_ok` (chosen / rejected): the last message may be an empty assistant reply, as an
    HH-RLHF transcript's may be, so the rows rlhfkit makes of those read back from a file."""
    if isinstance(value, str):
        raise _RowError(
            "expected a list of messages, got a string (a CSV cell is always text: use JSON Lines "
            "or parquet for message lists)",
            field,
        )
    if not isinstance(value, (list, tuple)):
        raise _RowError(f"expected a list of messages, got {_type(value)}", field)
    out = []
    for i, msg in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(msg, dict):
            raise _RowError(f"a message must be an object with 'role' and 'content', got {_type(msg)}", where)
        role_key, content_key = ("from", "value") if "role" not in msg and "from" in msg else ("role", "content")
        role = msg.get(role_key)
        if role is None:
            raise _RowError(f"message has no '{role_key}' (keys: {', '.join(map(str, msg))})", where)
        if not isinstance(role, str):
            raise _RowError(f"'{role_key}' must be a string, got {_type(role)}", f"{where}.{role_key}")
        role = _ROLE_ALIASES.get(role.strip().lower(), role.strip().lower())
        if role not in ROLES:
            raise _RowError(
                f"unknown role {msg.get(role_key)!r}; expected system, user or assistant "
                "(ShareGPT: system, human, gpt)",
                f"{where}.{role_key}",
            )
        content = msg.get(content_key)
        if not isinstance(content, str):
            raise _RowError(
                f"content must be a string, got {_type(content) if content is not None else 'nothing'}",
                f"{where}.{content_key}",
            )
        empty_reply = empty_reply_ok and role == "assistant" and i == len(value) - 1
        if role != "system" and not content.strip() and not empty_reply:
            raise _RowError(f"{role} message is empty", f"{where}.{content_key}")
        out.append({"role": role, "content": content})
    return out


def _number(value, field: str) -> float:
    """A finite float; numeric strings (CSV cells) are accepted, booleans are not."""
    if isinstance(value, bool):
        raise _RowError(f"expected a number, got a boolean ({value})", field)
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise _RowError(f"expected a number, got the string {_short(value)}", field) from None
    if not isinstance(value, (int, float)):
        raise _RowError(f"expected a number, got {_type(value)}", field)
    if not math.isfinite(value):
        raise _RowError(f"expected a finite number, got {value}", field)
    return float(value)


_TRUE = ("true", "yes", "1")
_FALSE = ("false", "no", "0")


def _bool(value, field: str) -> bool:
    """bool, 0/1, or "true"/"false"/"yes"/"no"/"1"/"0" (any case)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise _RowError(f"cannot read {_short(value)} as a boolean; use true/false, yes/no or 1/0", field)


# --------------------------------------------------------------------------- small helpers


def _extras(row: dict, consumed: tuple[str, ...]) -> dict:
    """The columns a format did not use, passed through unchanged (without `_source`)."""
    return {k: v for k, v in row.items() if k not in consumed and k != "_source"}


def _type(value) -> str:
    names = {str: "a string", list: "a list", tuple: "a list", dict: "an object", bool: "a boolean"}
    if value is None:
        return "null"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "a number"
    return names.get(type(value), type(value).__name__)


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
