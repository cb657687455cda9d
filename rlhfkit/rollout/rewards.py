"""Reward functions for every online stage (PPO, GRPO, RLOO, ...): config specs, built-ins, calling
them on a batch of completions and combining the sources into one score per completion.

    funcs = load_reward_funcs(["exact_answer", {"name": "regex_format", "pattern": r"^ -?\\d+$"}])
    parts = score_completions(funcs, prompts=..., completions=texts, completion_ids=ids,
                              ended=ended, rows=rows)          # {"exact_answer": (N,), ...}
    parts = {"reward_model": rm_scores, **parts}               # the caller adds model scores
    total, metrics = combine_rewards(parts, weights)           # (N,), {"rewards/<name>/mean": ...}

Specs (a config's `reward_funcs` entries), checked by `check_reward_spec` before any model loads:

- `"module:function"`: a Python function imported from the Python path;
- `"exact_answer"`: a built-in (`BUILTIN_REWARDS`; `builtin_reward_names()` lists them);
- `{"name": "regex_format", "pattern": "^ \\d+$"}`: either of the above with keyword options. A
  built-in's options go to its factory; a `module:function`'s are passed to every call.

Calling convention (TRL's): `fn(prompts=[...], completions=[...], completion_ids=[...],
ended=[...], **columns) -> list` of one value per completion, where `columns` are the rows' other
dataset columns (every key but `prompt` and `_`-prefixed ones; one list per column, None where a
row lacks the key). A completion is the response text for a string prompt and
`[{"role": "assistant", "content": text}]` for a message-list prompt. Give the function
`**kwargs` to ignore what it does not use. Each value is a number (int, float, bool, numpy or
0-d tensor) or None: "not applicable to this row" (say, a row without a reference answer). NaN,
infinities, strings and a single scalar for the whole batch are errors, never broadcast or cast.

Combining: total_i = sum over sources s applicable to row i of w_s * r_{s,i} (None counts as not
applicable: a NaN-aware sum); a row no source applies to is an error.

torch is imported inside the functions that need it: config validation imports this module and
stays torch-free (fast `--help-config`, errors before the 1 s torch import).
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import math
import numbers
import re
import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from rlhfkit.errors import ConfigError, RewardFunctionError

if TYPE_CHECKING:
    import torch

# Keyword arguments every reward function is called with (besides the dataset columns).
CALL_ARGUMENTS = ("prompts", "completions", "completion_ids", "ended")


@dataclass
class RewardFunction:
    """One loaded reward function: `name` (metrics `rewards/<name>/...`; unique within a config),
    `fn` (called as described in the module docstring) and `options` (extra keyword arguments
    of a `module:function` spec, passed to every call)."""

    name: str
    fn: Callable[..., Any]
    options: dict[str, Any] = field(default_factory=dict)


# ---- helpers shared by the built-ins ---------------------------------------------------------------

def completion_text(completion) -> str:
    """The text of a completion: the string itself, or the contents of a message list joined."""
    if isinstance(completion, str):
        return completion
    return "".join(m["content"] for m in completion)


def _column(columns: dict, key: str, n: int) -> list:
    """Column `key` (None for each row when no row has it)."""
    return columns[key] if key in columns else [None] * n


def _check_type(fn_name: str, option: str, value, kinds: tuple[type, ...], what: str) -> None:
    """ConfigError unless `value` is one of `kinds` (a bool is not an int here unless bool is listed)."""
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise ConfigError(f"`{fn_name}`: option {option} must be {what}, "
                          f"got {value!r} ({type(value).__name__})")


# ---- built-ins: name -> factory(**options) -> reward function ---------------------------------------
# A factory validates its options (ConfigError) and returns the function. A factory with a `task`
# parameter gets the config's built-in task from `load_reward_funcs` (never from the user).

def gold(task):
    """`gold`: the gold reward of the config's built-in `task` (`task.gold_reward(prompts, texts,
    ended)`), e.g. 1.0 / 0.1 / 0.0 on `arithmetic`. Needs `task`; the task's prompts are strings."""
    if task is None:
        raise ConfigError("`gold` is the built-in task's gold reward: set `task` (e.g. task: arithmetic)")

    def gold(prompts, completions, ended, **_):
        return task.gold_reward(prompts, [completion_text(c) for c in completions], ended)

    return gold


def exact_answer(column: str = "answer", require_ended: bool = False):
    """`exact_answer`: 1.0 if completion.strip() == str(row[column]).strip(), else 0.0; None (not
    applicable) where the row has no answer (missing or null). `require_ended`: a response cut off
    by the token limit (no EOS / stop string) scores 0.0 even if its text matches."""
    _check_type("exact_answer", "column", column, (str,), "a column name")
    _check_type("exact_answer", "require_ended", require_ended, (bool,), "true or false")

    def exact_answer(completions, ended, **columns):
        answers = _column(columns, column, len(completions))
        return [None if a is None else float(completion_text(c).strip() == str(a).strip()
                                                and (e or not require_ended))
                for c, a, e in zip(completions, answers, ended)]

    return exact_answer


def regex_format(pattern: str, full_match: bool = True):
    """`regex_format`: 1.0 if the completion text matches `pattern` (Python `re`; the whole text
    with `full_match`, anywhere in it otherwise), else 0.0. A format reward, e.g.
    `pattern: '^ -?\\d+$'` (a space and an integer) or `'<answer>.*?</answer>'` with full_match false."""
    _check_type("regex_format", "pattern", pattern, (str,), "a regular expression (string)")
    _check_type("regex_format", "full_match", full_match, (bool,), "true or false")
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"`regex_format`: pattern {pattern!r} is not a valid regular expression: "
                          f"{e}") from None
    match = compiled.fullmatch if full_match else compiled.search

    def regex_format(completions, **_):
        return [float(match(completion_text(c)) is not None) for c in completions]

    return regex_format


def length_penalty(target_tokens: int, scale: float):
    """`length_penalty`: -max(0, n_tokens - target_tokens) / scale, n_tokens = len(completion_ids[i])
    (the response tokens as sampled, EOS included). 0 up to the target, then -1 per `scale` tokens."""
    _check_type("length_penalty", "target_tokens", target_tokens, (int,), "an integer >= 0")
    _check_type("length_penalty", "scale", scale, (int, float), "a number > 0")
    if target_tokens < 0:
        raise ConfigError(f"`length_penalty`: option target_tokens must be >= 0, got {target_tokens}")
    if not scale > 0 or math.isinf(scale):
        raise ConfigError(f"`length_penalty`: option scale must be a finite number > 0, got {scale}")

    def length_penalty(completion_ids, **_):
        return [-max(0, len(ids) - target_tokens) / scale for ids in completion_ids]

    return length_penalty


def reasoning_gym(column: str = "rg", answer_tag: str | None = None, require_ended: bool = False):
    """`reasoning_gym`: reasoning-gym's own `score_answer` for the row's task entry (rows written by
    `rlhfkit data reasoning-gym:TASK`, which carry the entry in column `rg`); None where the row has
    no such entry. The answer is the completion text stripped, or with `answer_tag: answer` the
    content of the last `<answer>...</answer>` (reasoning-gym's prompts ask for it; no tag: 0.0).
    Scores are in [0, 1] (some tasks give partial credit). `require_ended`: no EOS -> 0.0.
    Needs the optional extra: pip install 'rlhfkit[reasoning]'."""
    from rlhfkit.tasks import reasoning_gym as rgym

    _check_type("reasoning_gym", "column", column, (str,), "a column name")
    _check_type("reasoning_gym", "require_ended", require_ended, (bool,), "true or false")
    if answer_tag is not None:
        _check_type("reasoning_gym", "answer_tag", answer_tag, (str,), "a tag name such as 'answer'")
    rgym.check_installed("the `reasoning_gym` reward function")

    def reasoning_gym(completions, ended, **columns):
        entries = _column(columns, column, len(completions))
        out = []
        for c, rg, e in zip(completions, entries, ended):
            if rg is None:
                out.append(None)
            elif require_ended and not e:
                out.append(0.0)
            else:
                out.append(rgym.score(rg, rgym.extract_answer(completion_text(c), answer_tag)))
        return out

    return reasoning_gym


BUILTIN_REWARDS: dict[str, Callable[..., Callable]] = {
    "gold": gold,
    "exact_answer": exact_answer,
    "regex_format": regex_format,
    "length_penalty": length_penalty,
    "reasoning_gym": reasoning_gym,
}
# Factory parameters filled in by `load_reward_funcs`, not by the spec.
_INJECTED = ("task",)


def builtin_reward_names() -> list[str]:
    """Names of the built-in reward functions, sorted."""
    return sorted(BUILTIN_REWARDS)


def describe_builtins() -> str:
    """One paragraph per built-in: its name, options (with defaults) and docstring."""
    parts = []
    for name in builtin_reward_names():
        factory = BUILTIN_REWARDS[name]
        opts = [p.name if p.default is inspect.Parameter.empty else f"{p.name}={p.default!r}"
                for p in inspect.signature(factory).parameters.values() if p.name not in _INJECTED]
        doc = inspect.cleandoc(factory.__doc__ or "")
        parts.append(f"{name}({', '.join(opts)})\n    " + doc.replace("\n", "\n    "))
    return "\n".join(parts)


# ---- specs -----------------------------------------------------------------------------------------

def _parse(spec) -> tuple[str, dict]:
    """spec -> (name, options). ConfigError when the spec has the wrong shape."""
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, dict):
        if "name" not in spec:
            raise ConfigError(f"reward_funcs entry {spec!r}: a mapping needs `name` (a built-in or "
                              "'module:function') plus its options")
        name = spec["name"]
        if not isinstance(name, str):
            raise ConfigError(f"reward_funcs entry {spec!r}: `name` must be a string, "
                              f"got {type(name).__name__}")
        options = {k: v for k, v in spec.items() if k != "name"}
        bad = [k for k in options if not isinstance(k, str)]
        if bad:
            raise ConfigError(f"reward_funcs entry {spec!r}: option names must be strings, got {bad}")
        return name, options
    raise ConfigError(f"reward_funcs entry {spec!r}: expected a string ('module:function' or a built-in "
                      f"name) or a mapping with `name`, got {type(spec).__name__}")


def _is_import_path(name: str) -> bool:
    return ":" in name


def _check_import_path(name: str) -> None:
    module, _, attr = name.partition(":")
    if not (all(p.isidentifier() for p in module.split(".")) and attr.isidentifier()):
        raise ConfigError(f"reward function {name!r} must look like 'module:function' (e.g. "
                          "'my_rewards:exact_match'), or be a built-in: " + ", ".join(builtin_reward_names()))


def _unknown_builtin(name: str) -> ConfigError:
    close = difflib.get_close_matches(name, builtin_reward_names(), n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown reward function {name!r}; built-ins: {', '.join(builtin_reward_names())} "
                       f"(or give 'module:function').{hint}")


def _check_options(name: str, factory: Callable, options: dict) -> None:
    """Unknown or missing options of a built-in -> ConfigError naming them (with close matches)."""
    params = {p.name: p for p in inspect.signature(factory).parameters.values() if p.name not in _INJECTED}
    unknown = [k for k in options if k not in params]
    missing = [k for k, p in params.items() if p.default is inspect.Parameter.empty and k not in options]
    problems = []
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, list(params), n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        problems.append("unknown option " + ", ".join(hints))
    if missing:
        problems.append("missing option " + ", ".join(repr(k) for k in missing))
    if problems:
        listed = ", ".join(params) or "none"
        raise ConfigError(f"`{name}`: {'; '.join(problems)}; its options: {listed}")


def check_reward_spec(spec, *, has_task: bool | None = None) -> str | None:
    """A problem with one `reward_funcs` entry, as a message naming the entry, or None when it is
    fine. Checks the shape, built-in names (with a close-match suggestion), built-in options
    (unknown, missing, bad values) and that reasoning-gym is installed when used; `has_task`
    False also flags `gold` (it needs the config's `task`). Imports nothing of the user's: a
    'module:function' is checked for form here and imported by `load_reward_funcs`."""
    try:
        name, options = _parse(spec)
        if _is_import_path(name):
            _check_import_path(name)
            return None
        if name not in BUILTIN_REWARDS:
            raise _unknown_builtin(name)
        factory = BUILTIN_REWARDS[name]
        _check_options(name, factory, options)
        if "task" in inspect.signature(factory).parameters:
            if has_task is False:
                factory(task=None, **options)  # raises the "needs task" error
            return None
        factory(**options)  # validates the option values
    except ConfigError as e:
        text = str(e)
        return text if text.startswith("reward_funcs entry") else f"reward_funcs entry {spec!r}: {text}"
    return None


def _import(name: str) -> Callable:
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        hint = " (is its directory on PYTHONPATH?)" if e.name and module_name.startswith(e.name) else ""
        raise ConfigError(f"reward_funcs: cannot import {name!r}: {e}{hint}") from e
    except Exception as e:  # any error while importing the user's module (SyntaxError, ...)
        raise ConfigError(f"reward_funcs: importing {name!r} failed: {type(e).__name__}: {e}") from e
    try:
        fn = getattr(module, attr)
    except AttributeError:
        names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        close = difflib.get_close_matches(attr, names, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"reward_funcs: cannot import {name!r}: module {module_name!r} has no "
                          f"attribute {attr!r}.{hint}") from None
    if not callable(fn):
        raise ConfigError(f"reward_funcs: {name!r} is a {type(fn).__name__}, not a function")
    return fn


def _check_user_options(name: str, fn: Callable, options: dict) -> None:
    clash = [k for k in options if k in CALL_ARGUMENTS]
    if clash:
        raise ConfigError(f"reward_funcs entry {name!r}: option(s) {clash} clash with the arguments every "
                          f"reward function gets ({', '.join(CALL_ARGUMENTS)})")
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # some builtins and C functions have no signature
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = [k for k in options if k not in params]
    if unknown:
        raise ConfigError(f"reward_funcs entry {name!r}: the function takes no option(s) {unknown}; its "
                          f"parameters: {', '.join(params)}")


def load_reward_funcs(specs: list, task=None) -> list[RewardFunction]:
    """Build the reward functions of a config's `reward_funcs` (same order). `task`: the config's
    built-in task (a Task or its name), for `gold`. Names are the built-in name or the function
    part of 'module:function'; a repeated name gets `_2`, `_3`, ... (metrics stay apart).
    ConfigError naming the spec on any problem (unknown name, bad options, failed import)."""
    if isinstance(task, str):
        from rlhfkit.tasks import get_task

        try:
            task = get_task(task)
        except ValueError as e:
            raise ConfigError(f"task: {e}") from None
    funcs: list[RewardFunction] = []
    taken: set[str] = set()
    for spec in specs:
        problem = check_reward_spec(spec, has_task=task is not None)
        if problem:
            raise ConfigError(problem)
        name, options = _parse(spec)
        if _is_import_path(name):
            fn = _import(name)
            _check_user_options(name, fn, options)
            short = name.partition(":")[2]
        else:
            factory = BUILTIN_REWARDS[name]
            injected = {"task": task} if "task" in inspect.signature(factory).parameters else {}
            fn, options, short = factory(**injected, **options), {}, name
        unique, k = short, 1
        while unique in taken:
            k += 1
            unique = f"{short}_{k}"
        taken.add(unique)
        funcs.append(RewardFunction(unique, fn, dict(options)))
    return funcs


# ---- scoring ---------------------------------------------------------------------------------------

def _where(exc: BaseException) -> str:
    """' (at file.py:12 in fn)': the innermost frame of an exception, for messages without traceback."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    f = frames[-1]
    return f" (at {f.filename}:{f.lineno} in {f.name})"


def _values_list(name: str, values, n: int) -> list:
    """The function's return value as a Python list of n items, or RewardFunctionError."""
    import numpy as np
    import torch

    if isinstance(values, (torch.Tensor, np.ndarray)):
        if values.ndim != 1:
            what = "a single value" if values.ndim == 0 else f"an array of shape {tuple(values.shape)}"
            raise RewardFunctionError(f"reward function `{name}` returned {what} for {n} completions; "
                                      "return one value per completion (a list, or a 1-d tensor/array)",
                                      function=name)
        values = values.tolist()
    elif not isinstance(values, (list, tuple)):
        kind = "a single value " if values is None or isinstance(values, (numbers.Number, np.generic)) else ""
        raise RewardFunctionError(f"reward function `{name}` returned {kind}{values!r} "
                                  f"({type(values).__name__}) for {n} completions; return a list with one "
                                  "value per completion (a single value is never broadcast)", function=name)
    if len(values) != n:
        raise RewardFunctionError(f"reward function `{name}` returned {len(values)} values for {n} "
                                  "completions", function=name)
    return list(values)


def _as_float(name: str, i: int, v) -> float:
    """One returned value -> float (NaN for None). Anything but a finite real number is an error."""
    import numpy as np
    import torch

    if v is None:
        return math.nan
    # A 0-d tensor or array: its Python scalar goes through the same checks (complex, str: errors).
    item = v.item() if isinstance(v, (torch.Tensor, np.ndarray)) and v.ndim == 0 else v
    # bool and numpy bool, int, float, Fraction, numpy ints and floats (not complex, str, Decimal)
    if not isinstance(item, (bool, np.bool_, numbers.Real)):
        raise RewardFunctionError(
            f"reward function `{name}` returned {v!r} ({type(v).__name__}) for row {i}; expected a number "
            "(int, float, bool, numpy or 0-d tensor) or None (not applicable)", function=name, row=i)
    x = float(item)
    if math.isnan(x):
        raise RewardFunctionError(f"reward function `{name}` returned NaN ({type(v).__name__}) for row {i}; "
                                  "return None for 'not applicable'", function=name, row=i)
    if math.isinf(x):
        raise RewardFunctionError(f"reward function `{name}` returned {x} ({type(v).__name__}) for row {i}; "
                                  "rewards must be finite", function=name, row=i)
    return x


def _check_callable_with(rf: RewardFunction, kwargs: dict) -> None:
    """The function must accept the call's keywords: a clear error instead of a TypeError from
    inside (which would be indistinguishable from a bug in the function)."""
    try:
        sig = inspect.signature(rf.fn)
    except (TypeError, ValueError):
        return
    try:
        sig.bind(**kwargs)
    except TypeError as e:
        raise RewardFunctionError(
            f"reward function `{rf.name}` cannot be called with ({', '.join(kwargs)}): {e}. Reward "
            "functions are called with prompts, completions, completion_ids, ended and every dataset "
            "column as keywords; add **kwargs to ignore the ones it does not use", function=rf.name) from None


def score_completions(funcs: list[RewardFunction], *, prompts: list, completions: list[str],
                      completion_ids: list[list[int]], ended, rows: list[dict]) -> dict[str, "torch.Tensor"]:
    """Call each reward function on a batch of N completions -> {name: float32 (N,)} on the CPU,
    NaN where the function returned None (not applicable).

    prompts: N prompts (strings or message lists); completions: N response texts;
    completion_ids: N lists of response token ids (as sampled, EOS included, no padding);
    ended: N bools (list or tensor), finished with EOS or a stop string; rows: N dataset rows
    (their columns other than `prompt` and `_*` are passed through, one list per column).
    RewardFunctionError (naming the function, and the row and value where one is at fault) for:
    an exception inside a function (chained), a return value that is not one value per completion,
    a value that is not a finite number or None."""
    import torch

    n = len(completions)
    if isinstance(completion_ids, torch.Tensor):
        raise ValueError("score_completions: completion_ids must be one list of token ids per completion, "
                         "without padding (a padded tensor would count pad tokens)")
    ended = ended.tolist() if hasattr(ended, "tolist") else list(ended)
    inputs = (("prompts", prompts), ("completion_ids", completion_ids), ("ended", ended), ("rows", rows))
    for what, seq in inputs:
        if len(seq) != n:
            raise ValueError(f"score_completions: {len(seq)} {what} for {n} completions")
    ended = [bool(e) for e in ended]
    # TRL's convention: a conversation gets a conversation back (one assistant message).
    wrapped = [c if isinstance(p, str) else [{"role": "assistant", "content": c}]
               for p, c in zip(prompts, completions)]
    keys: dict[str, None] = {}
    for r in rows:
        keys.update((k, None) for k in r if k != "prompt" and not k.startswith("_"))
    clash = [k for k in keys if k in CALL_ARGUMENTS]
    if clash:
        raise ConfigError(f"dataset column(s) {clash} clash with the arguments every reward function gets "
                          f"({', '.join(CALL_ARGUMENTS)}); rename them (column_map)")
    columns = {k: [r.get(k) for r in rows] for k in keys}
    base = dict(prompts=list(prompts), completions=wrapped, completion_ids=completion_ids, ended=ended)

    out: dict[str, torch.Tensor] = {}
    for rf in funcs:
        clash = [k for k in rf.options if k in columns]
        if clash:
            raise ConfigError(f"reward function `{rf.name}`: option(s) {clash} clash with dataset "
                              "column(s) of the same name")
        kwargs = {**base, **columns, **rf.options}
        _check_callable_with(rf, kwargs)
        try:
            values = rf.fn(**kwargs)
        except Exception as e:
            raise RewardFunctionError(f"reward function `{rf.name}` raised {type(e).__name__}: "
                                      f"{e}{_where(e)}", function=rf.name) from e
        values = _values_list(rf.name, values, n)
        floats = [_as_float(rf.name, i, v) for i, v in enumerate(values)]
        out[rf.name] = torch.tensor(floats, dtype=torch.float32)
    return out


def combine_rewards(parts: dict[str, "torch.Tensor"], weights: list[float]) -> tuple["torch.Tensor", dict]:
    """Weighted sum of reward sources -> (total float32 (N,), metrics).

    total_i = sum_s w_s * r_{s,i} over the sources s with r_{s,i} not NaN (NaN = not applicable;
    a NaN-aware sum). Example: parts {a: [1, NaN], b: [0.5, 2]}, weights [1, 2] -> [2, 4].
    A row where every source is NaN has no reward: RewardFunctionError naming the row(s).
    metrics: `rewards/<name>/mean` and `rewards/<name>/std` (population std) over the rows the
    source applies to (absent when it applies to none). On the device of the first part."""
    import torch

    if not parts:
        raise ValueError("combine_rewards: no reward sources")
    if len(weights) != len(parts):
        raise ValueError(f"combine_rewards: {len(weights)} weights for {len(parts)} reward sources "
                         f"({', '.join(parts)})")
    names = list(parts)
    first = next(iter(parts.values()))
    for name, x in parts.items():
        if x.ndim != 1 or x.shape != first.shape:
            raise ValueError(f"combine_rewards: source `{name}` has shape {tuple(x.shape)}; every source "
                             f"must be (N,) with the same N ({tuple(first.shape)} for `{names[0]}`)")
    scores = torch.stack([x.to(first.device, torch.float32) for x in parts.values()])  # (S, N)
    applicable = ~torch.isnan(scores)                                                   # (S, N)
    none = (~applicable.any(0)).nonzero().flatten().tolist()
    if none:
        shown = ", ".join(map(str, none[:10])) + (", ..." if len(none) > 10 else "")
        raise RewardFunctionError(
            f"no reward for row(s) {shown}: every source ({', '.join(names)}) returned None (not applicable) "
            "there; add a reward source that applies to these rows", row=none[0])
    w = torch.tensor(weights, dtype=torch.float32, device=first.device)[:, None]       # (S, 1)
    total = torch.where(applicable, w * scores, torch.zeros_like(scores)).sum(0)        # (N,)
    metrics = {}
    for name, x, ok in zip(names, scores, applicable):
        vals = x[ok]
        if vals.numel():
            metrics[f"rewards/{name}/mean"] = vals.mean().item()
            metrics[f"rewards/{name}/std"] = vals.std(correction=0).item()
    return total, metrics
