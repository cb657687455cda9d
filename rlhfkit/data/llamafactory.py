"""LLaMA-Factory datasets: `dataset_dir/dataset_info.json` entries -> rlhfkit's raw rows.

An entry (LLaMA-Factory's format) names a file and how to read it:

    "train_clean": {"file_name": "train.json", "formatting": "alpaca",
                    "columns": {"prompt": "instruction", "query": "input", "response": "output"}},
    "rw_data":     {"file_name": "pairs.json", "ranking": true,
                    "columns": {"prompt": "instruction", "query": "input",
                                "chosen": "chosen", "rejected": "rejected"}}

Keys read: `file_name` (a file, or a directory whose data files are all read), `hf_hub_url` (a hub
dataset, needs internet; with `split`), `formatting` (`alpaca`, default, or `sharegpt`), `ranking`
(preference pairs), `columns` (alpaca: prompt, query, response, history, system, chosen, rejected,
kto_tag; sharegpt: messages, system, chosen, rejected, kto_tag), `tags` (sharegpt: role_tag,
content_tag, user_tag, assistant_tag, system_tag), `num_samples`. Multimodal columns, tools and
other hubs are errors.

As in LLaMA-Factory, an alpaca row's user turn is `instruction + "\\n" + input`, `history` pairs and
`system` come before it; a sharegpt conversation alternates user and assistant after an optional
system turn. The rows become what the stage trains on (`to_stage_rows`):

    text (pt)               {"text": the prompt column}
    messages (sft)          {"messages": system, history, user, assistant}   every reply trains
    preference (rm, dpo)    {"prompt": messages up to the user turn, "chosen", "rejected"}   ranking: true
    unpaired (kto)          {"prompt", "completion", "label": kto_tag}   (kto also takes ranking pairs)
    prompt (ppo, grpo)      {"prompt": messages up to the last user turn}   any entry
"""

from __future__ import annotations

import json
import os
import random

from rlhfkit.data.sources import load_rows
from rlhfkit.errors import ConfigError, DataError

INFO_FILE = "dataset_info.json"
_ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "history": None,
                   "system": None, "chosen": None, "rejected": None, "kto_tag": None}
_SHAREGPT_COLUMNS = {"messages": "conversations", "system": None, "chosen": None, "rejected": None,
                     "kto_tag": None}
_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
         "system_tag": "system", "observation_tag": "observation", "function_tag": "function_call"}
_UNSUPPORTED_COLUMNS = ("tools", "images", "videos", "audios")
_ENTRY_KEYS = {"file_name", "hf_hub_url", "formatting", "ranking", "columns", "tags", "split", "num_samples",
               "subset", "folder", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name"}


def names_of(spec: str | list[str]) -> list[str]:
    names = [n.strip() for n in spec.split(",")] if isinstance(spec, str) else [str(n).strip() for n in spec]
    return [n for n in names if n]


def read_info(dataset_dir: str) -> dict:
    path = os.path.join(os.path.expanduser(dataset_dir), INFO_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"dataset_dir {dataset_dir}: no {INFO_FILE} there (looked for {os.path.abspath(path)})")
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:line {e.lineno}: not valid JSON: {e.msg}") from None
    if not isinstance(info, dict):
        raise ValueError(f"{path}: expected a JSON object of dataset name -> entry")
    return info


def check_names(spec: str | list[str], dataset_dir: str) -> None:
    """Raise ValueError unless every name of `spec` is a readable entry of dataset_dir's info file."""
    import difflib

    info = read_info(dataset_dir)
    names = names_of(spec)
    if not names:
        raise ValueError("no dataset names given")
    for name in names:
        if name not in info:
            close = difflib.get_close_matches(name, list(info), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ValueError(f"'{name}' is not in {os.path.join(dataset_dir, INFO_FILE)}{hint}; "
                             f"it has: {', '.join(info) or 'nothing'}")
        _entry(info, name, dataset_dir)


def _entry(info: dict, name: str, dataset_dir: str) -> dict:
    entry = info[name]
    where = f"{os.path.join(dataset_dir, INFO_FILE)} entry '{name}'"
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected an object, got {type(entry).__name__}")
    unknown = sorted(set(entry) - _ENTRY_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}")
    for key in ("ms_hub_url", "om_hub_url", "script_url", "cloud_file_name"):
        if entry.get(key) and not (entry.get("file_name") or entry.get("hf_hub_url")):
            raise ValueError(f"{where}: {key} is not supported by rlhfkit; give file_name (a local file) or "
                             "hf_hub_url")
    if not entry.get("file_name") and not entry.get("hf_hub_url"):
        raise ValueError(f"{where}: needs file_name (or hf_hub_url)")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt"):
        raise ValueError(f"{where}: formatting '{formatting}' must be alpaca or sharegpt")
    defaults = _ALPACA_COLUMNS if formatting == "alpaca" else _SHAREGPT_COLUMNS
    columns = entry.get("columns") or {}
    if not isinstance(columns, dict):
        raise ValueError(f"{where}: columns must be an object")
    for key, value in columns.items():
        if key in _UNSUPPORTED_COLUMNS:
            if value:
                raise ValueError(f"{where}: column '{key}' ({'tool calls' if key == 'tools' else 'multimodal data'})"
                                 " is not supported by rlhfkit")
        elif key not in defaults:
            raise ValueError(f"{where}: '{key}' is not a {formatting} column; they are: {', '.join(defaults)}")
    tags = entry.get("tags") or {}
    unknown_tags = sorted(set(tags) - set(_TAGS))
    if formatting == "alpaca" and tags:
        raise ValueError(f"{where}: tags apply to formatting: sharegpt only")
    if unknown_tags:
        raise ValueError(f"{where}: unknown tags {unknown_tags}; they are: {', '.join(_TAGS)}")
    return {"name": name, "formatting": formatting, "ranking": bool(entry.get("ranking", False)),
            "columns": {**defaults, **{k: v for k, v in columns.items() if k in defaults}},
            "tags": {**_TAGS, **tags}, "file_name": entry.get("file_name"), "hf_hub_url": entry.get("hf_hub_url"),
            "split": entry.get("split", "train"), "num_samples": entry.get("num_samples"),
            "subset": entry.get("subset"), "where": where}


def _files(dataset_dir: str, entry: dict) -> list[str]:
    if entry["file_name"]:
        path = os.path.join(os.path.expanduser(dataset_dir), entry["file_name"])
        if os.path.isdir(path) and not os.path.exists(os.path.join(path, "dataset_info.json")) \
                and not os.path.exists(os.path.join(path, "dataset_dict.json")):
            files = sorted(os.path.join(path, f) for f in os.listdir(path)
                           if f.lower().endswith((".json", ".jsonl", ".csv", ".parquet")))
            if not files:
                raise ConfigError(f"{entry['where']}: directory {path} holds no .json/.jsonl/.csv/.parquet files")
            return files
        return [path]
    if entry["subset"]:
        raise ConfigError(f"{entry['where']}: subset (a hub dataset's config name) is not supported")
    return [f"{entry['hf_hub_url']}:{entry['split']}"]


def load_stage_rows(spec: str | list[str], dataset_dir: str, formats: tuple[str, ...],
                    seed: int = 0) -> tuple[list[dict], str]:
    """Rows of the named entries (mixed in order) in the first of the stage's `formats` that the
    entries can give; returns (raw rows in that format, the format)."""
    info = read_info(dataset_dir)
    entries = [_entry(info, name, dataset_dir) for name in names_of(spec)]
    fmt = _target(entries, formats)
    rows: list[dict] = []
    for entry in entries:
        raw = load_rows(_files(dataset_dir, entry))
        if entry["num_samples"] is not None:
            raw = _sample(raw, int(entry["num_samples"]), seed)
        rows += [to_stage_row(row, entry, fmt) for row in raw]
    return rows, fmt


def _sample(rows: list[dict], n: int, seed: int) -> list[dict]:
    """LLaMA-Factory's `num_samples`: a seeded sample of n rows, repeated rows when n > len(rows)."""
    rng = random.Random(seed)
    order = list(range(len(rows)))
    rng.shuffle(order)
    order = order[:n] + [rng.randrange(len(rows)) for _ in range(max(0, n - len(rows)))]
    return [rows[i] for i in order]


def _target(entries: list[dict], formats: tuple[str, ...]) -> str:
    """The rlhfkit format the stage trains on that every entry can give."""
    def gives(entry: dict) -> set[str]:
        if entry["ranking"]:
            return {"preference", "prompt"}
        kto = entry["columns"]["kto_tag"] is not None
        return {"text", "prompt"} | ({"unpaired"} if kto else {"messages", "prompt_completion"})

    for fmt in formats:
        if all(fmt in gives(e) for e in entries):
            return fmt
    kinds = ", ".join(f"{e['name']} ({'ranking: true' if e['ranking'] else e['formatting']})" for e in entries)
    raise ConfigError(f"dataset {kinds}: this stage trains on {', '.join(formats)} rows, which these entries do not "
                      "give (preference stages need `ranking: true` entries with chosen/rejected columns; kto "
                      "needs a kto_tag column or ranking pairs)")


# --------------------------------------------------------------------------- rows


def to_stage_row(row: dict, entry: dict, fmt: str) -> dict:
    """One raw LLaMA-Factory row -> a raw rlhfkit row of format `fmt` (checked later by formats.py)."""
    source = row.get("_source")
    try:
        if entry["formatting"] == "alpaca":
            prompt, responses = _alpaca(row, entry, fmt)
        else:
            prompt, responses = _sharegpt(row, entry, fmt)
    except _Bad as e:
        raise DataError(str(e), source=source, field=e.field) from None
    cols = entry["columns"]
    consumed = {v for v in cols.values() if v} | ({cols["chosen"] or "chosen", cols["rejected"] or "rejected"}
                                                   if entry["ranking"] else set())
    extras = {k: v for k, v in row.items() if k not in consumed}
    if fmt == "text":
        return {**extras, "text": prompt[-1]["content"]}
    if fmt == "prompt":
        return {**extras, "prompt": prompt}
    if fmt == "preference":
        return {**extras, "prompt": prompt, "chosen": responses["chosen"], "rejected": responses["rejected"]}
    if fmt == "unpaired":
        return {**extras, "prompt": prompt, "completion": responses["response"], "label": row.get(cols["kto_tag"])}
    return {**extras, "messages": prompt + responses["response"]}


class _Bad(Exception):
    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def _get(row: dict, column: str | None, required: bool = True):
    if column is None:
        return None
    value = row.get(column)
    if required and (value is None or value == ""):
        present = ", ".join(k for k in row if k != "_source")
        raise _Bad(f"missing column '{column}' (the row has: {present}); check the entry's columns", column)
    return value


def _text(value, field: str) -> str:
    if not isinstance(value, str):
        raise _Bad(f"expected a string, got {type(value).__name__}", field)
    return value


def _alpaca(row: dict, entry: dict, fmt: str) -> tuple[list[dict], dict]:
    cols = entry["columns"]
    messages = []
    system = _get(row, cols["system"], required=False)
    if system:
        messages.append({"role": "system", "content": _text(system, cols["system"])})
    for i, pair in enumerate(_get(row, cols["history"], required=False) or []):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise _Bad(f"history[{i}]: expected a [user, assistant] pair", cols["history"])
        messages += [{"role": "user", "content": _text(pair[0], cols["history"])},
                     {"role": "assistant", "content": _text(pair[1], cols["history"])}]
    query = [_text(_get(row, cols["prompt"]), cols["prompt"])]
    extra = _get(row, cols["query"], required=False)
    if extra:
        query.append(_text(extra, cols["query"]))
    messages.append({"role": "user", "content": "\n".join(query)})
    responses: dict = {}
    if fmt == "preference":
        for side in ("chosen", "rejected"):
            column = cols[side] or side
            responses[side] = [{"role": "assistant", "content": _text(_get(row, column), column)}]
    elif fmt in ("messages", "prompt_completion", "unpaired"):
        column = cols["response"]
        responses["response"] = [{"role": "assistant", "content": _text(_get(row, column), column)}]
    return messages, responses


def _sharegpt(row: dict, entry: dict, fmt: str) -> tuple[list[dict], dict]:
    cols, tags = entry["columns"], entry["tags"]
    column = cols["messages"]
    raw = _get(row, column)
    if not isinstance(raw, list):
        raise _Bad(f"expected a list of messages, got {type(raw).__name__}", column)
    roles = {tags["user_tag"]: "user", tags["assistant_tag"]: "assistant", tags["system_tag"]: "system"}
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or tags["role_tag"] not in m or tags["content_tag"] not in m:
            raise _Bad(f"message {i}: expected an object with '{tags['role_tag']}' and '{tags['content_tag']}'",
                       column)
        role = roles.get(m[tags["role_tag"]])
        if role is None:
            raise _Bad(f"message {i}: role '{m[tags['role_tag']]}' is not {tags['user_tag']}, "
                       f"{tags['assistant_tag']} or {tags['system_tag']} (tool turns are not supported)", column)
        messages.append({"role": role, "content": _text(m[tags["content_tag"]], column)})
    system = _get(row, cols["system"], required=False)
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    for i, m in enumerate(messages):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            raise _Bad(f"turn {i + 1} is {m['role']} but must be {want}: after the system turn, a conversation "
                       "alternates user and assistant", column)
    head = [{"role": "system", "content": system}] if system else []
    if fmt == "preference":
        if len(messages) % 2 != 1:
            raise _Bad("a preference conversation must end with a user turn (the replies are chosen/rejected)",
                       column)
        responses = {}
        for side in ("chosen", "rejected"):
            side_col = cols[side] or side
            value = _get(row, side_col)
            content = value.get(tags["content_tag"]) if isinstance(value, dict) else value
            responses[side] = [{"role": "assistant", "content": _text(content, side_col)}]
        return head + messages, responses
    if fmt in ("prompt", "text"):
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
        if last_user is None:
            raise _Bad("the conversation has no user turn", column)
        return head + messages[:last_user + 1], {}
    if len(messages) % 2 != 0 or not messages:
        raise _Bad("the conversation must end with an assistant turn", column)
    return head + messages[:-1], {"response": messages[-1:]}
