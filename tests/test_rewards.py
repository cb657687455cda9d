"""Reward-function layer (rlhfkit/rollout/rewards.py): specs, calling convention, value checks,
None handling, combining, the built-ins and the reasoning-gym adapter. No models; all on tiny inputs."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from rlhfkit.cli import main
from rlhfkit.errors import ConfigError, RewardFunctionError
from rlhfkit.rollout.rewards import (
    BUILTIN_REWARDS,
    RewardFunction,
    builtin_reward_names,
    check_reward_spec,
    combine_rewards,
    describe_builtins,
    load_reward_funcs,
    score_completions,
)
from rlhfkit.tasks import get_task

# ---- module-level reward functions (imported by spec as "test_rewards:NAME") -------------------------


def scaled_length(prompts, completions, factor=1.0, **kwargs):
    return [factor * len(c) for c in completions]


def strict_signature(prompts, completions):
    """No **kwargs: cannot take completion_ids / ended / columns."""
    return [0.0] * len(completions)


NOT_A_FUNCTION = 3


def _score(funcs, completions, prompts=None, rows=None, ended=None, ids=None):
    n = len(completions)
    prompts = prompts if prompts is not None else ["p"] * n
    return score_completions(
        funcs if isinstance(funcs, list) else [funcs],
        prompts=prompts, completions=completions,
        completion_ids=ids if ids is not None else [[1] * len(c) for c in completions],
        ended=ended if ended is not None else [True] * n,
        rows=rows if rows is not None else [{"prompt": p} for p in prompts])


def _rf(fn, name=None):
    return RewardFunction(name or fn.__name__, fn)


# ---- specs ------------------------------------------------------------------------------------------

def test_good_specs_pass():
    for spec in ("exact_answer", "my_rewards:exact_match", "pkg.mod:f",
                 {"name": "exact_answer", "column": "target"}, {"name": "regex_format", "pattern": r"^ \d+$"},
                 {"name": "regex_format", "pattern": "x", "full_match": False},
                 {"name": "length_penalty", "target_tokens": 8, "scale": 4.0}, {"name": "mod:f", "k": 1}):
        assert check_reward_spec(spec) is None, spec


def test_unknown_builtin_suggests_close_match():
    msg = check_reward_spec("exact_anwser")
    assert "unknown reward function 'exact_anwser'" in msg and "Did you mean 'exact_answer'?" in msg
    assert "regex_format" in msg  # lists the built-ins
    assert "Did you mean" not in check_reward_spec("zzzzzz")


@pytest.mark.parametrize("spec, words", [
    ("a:b:c", ["'a:b:c'", "module:function"]),
    ("mod:", ["module:function"]),
    ("my-mod:f", ["module:function"]),
    (3, ["3", "int", "mapping with `name`"]),
    ({"pattern": "x"}, ["needs `name`"]),
    ({"name": 5}, ["`name` must be a string"]),
])
def test_malformed_specs(spec, words):
    msg = check_reward_spec(spec)
    assert msg is not None and msg.startswith("reward_funcs entry")
    for w in words:
        assert w in msg, (w, msg)


def test_bad_options_are_named():
    msg = check_reward_spec({"name": "regex_format", "patern": "x"})
    assert "unknown option 'patern' (did you mean 'pattern'?)" in msg and "missing option 'pattern'" in msg
    assert "its options: pattern, full_match" in msg
    msg = check_reward_spec({"name": "exact_answer", "colum": "a", "foo": 1})
    assert "'colum'" in msg and "'foo'" in msg
    assert "missing option 'target_tokens'" in check_reward_spec({"name": "length_penalty", "scale": 1})
    # the task is injected by load_reward_funcs, never an option
    assert "unknown option 'task'" in check_reward_spec({"name": "gold", "task": "arithmetic"})


@pytest.mark.parametrize("spec, words", [
    ({"name": "regex_format", "pattern": "("}, ["'('", "not a valid regular expression"]),
    ({"name": "regex_format", "pattern": 3}, ["pattern", "3 (int)"]),
    ({"name": "regex_format", "pattern": "x", "full_match": "yes"}, ["full_match", "'yes'"]),
    ({"name": "length_penalty", "target_tokens": -1, "scale": 1}, ["target_tokens must be >= 0"]),
    ({"name": "length_penalty", "target_tokens": 4, "scale": 0}, ["scale", "> 0, got 0"]),
    ({"name": "length_penalty", "target_tokens": True, "scale": 1}, ["target_tokens", "True"]),
    ({"name": "length_penalty", "target_tokens": 4.5, "scale": 1}, ["target_tokens", "4.5"]),
    ({"name": "exact_answer", "require_ended": 1}, ["require_ended", "1 (int)"]),
])
def test_bad_option_values(spec, words):
    msg = check_reward_spec(spec)
    assert msg is not None and msg.startswith("reward_funcs entry")
    for w in words:
        assert w in msg, (w, msg)


def test_gold_needs_a_task():
    assert check_reward_spec("gold") is None  # the validator may not know yet
    assert check_reward_spec("gold", has_task=True) is None
    msg = check_reward_spec("gold", has_task=False)
    assert "`gold`" in msg and "set `task`" in msg
    with pytest.raises(ConfigError, match="set `task`"):
        load_reward_funcs(["gold"])


def test_import_errors_name_the_spec():
    with pytest.raises(ConfigError, match=r"cannot import 'no_such_module_xyz:f'.*PYTHONPATH"):
        load_reward_funcs(["no_such_module_xyz:f"])
    with pytest.raises(ConfigError, match=r"'test_rewards:scaled_lenght'.*Did you mean 'scaled_length'"):
        load_reward_funcs(["test_rewards:scaled_lenght"])
    with pytest.raises(ConfigError, match=r"'test_rewards:NOT_A_FUNCTION' is a int, not a function"):
        load_reward_funcs(["test_rewards:NOT_A_FUNCTION"])
    with pytest.raises(ConfigError, match="unknown reward function 'exact_anwser'"):
        load_reward_funcs(["exact_anwser"])


def test_import_failure_inside_the_module_names_the_spec(tmp_path, monkeypatch):
    (tmp_path / "broken_rewards_mod.py").write_text("x = 1 / 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=r"importing 'broken_rewards_mod:f' failed: ZeroDivisionError"):
        load_reward_funcs(["broken_rewards_mod:f"])


def test_mapping_spec_passes_options_to_a_user_function():
    funcs = load_reward_funcs(["test_rewards:scaled_length",
                               {"name": "test_rewards:scaled_length", "factor": 2.0}])
    assert [f.name for f in funcs] == ["scaled_length", "scaled_length_2"]  # repeated names kept apart
    out = _score(funcs, ["ab", "abcd"])
    assert out["scaled_length"].tolist() == [2.0, 4.0] and out["scaled_length_2"].tolist() == [4.0, 8.0]


def test_user_function_options_are_checked():
    with pytest.raises(ConfigError, match=r"takes no option\(s\) \['factor'\]"):
        load_reward_funcs([{"name": "test_rewards:strict_signature", "factor": 2}])
    with pytest.raises(ConfigError, match="clash with the arguments"):
        load_reward_funcs([{"name": "test_rewards:scaled_length", "ended": True}])
    funcs = load_reward_funcs([{"name": "test_rewards:scaled_length", "answer": 1}])
    with pytest.raises(ConfigError, match=r"option\(s\) \['answer'\] clash with dataset column"):
        _score(funcs, ["a"], rows=[{"prompt": "p", "answer": "1"}])


def test_builtins_are_documented():
    text = describe_builtins()
    for name in builtin_reward_names():
        assert text.count(f"\n{name}(") + text.startswith(f"{name}(") == 1
        assert len(BUILTIN_REWARDS[name].__doc__) > 80
    assert "regex_format(pattern, full_match=True)" in text
    assert "task" not in text.split("gold(")[1].split(")")[0]  # the injected task is not an option


# ---- the calling convention ---------------------------------------------------------------------------

def test_call_arguments_and_columns():
    seen = {}

    def spy(prompts, completions, completion_ids, ended, **columns):
        seen.update(prompts=prompts, completions=completions, completion_ids=completion_ids, ended=ended,
                    columns=columns)
        return [1.0, 2.0]

    rows = [{"prompt": "a", "answer": "1", "_source": "f:1", "meta": {"k": 1}},
            {"prompt": "b", "answer": "2", "_source": "f:2", "extra": 5}]
    out = _score(_rf(spy), ["x", "yy"], prompts=["a", "b"], rows=rows, ended=torch.tensor([True, False]),
                 ids=[[7], [8, 9]])
    assert seen["prompts"] == ["a", "b"] and seen["completions"] == ["x", "yy"]
    assert seen["completion_ids"] == [[7], [8, 9]] and seen["ended"] == [True, False]
    assert all(type(e) is bool for e in seen["ended"])
    # every column but `prompt` and `_*`, a list per column, None where a row lacks it
    assert seen["columns"] == {"answer": ["1", "2"], "meta": [{"k": 1}, None], "extra": [None, 5]}
    assert out["spy"].dtype == torch.float32 and out["spy"].tolist() == [1.0, 2.0]


def test_message_prompts_get_message_completions():
    seen = {}

    def spy(prompts, completions, **_):
        seen["completions"] = completions
        return [0.0] * len(completions)

    chat = [{"role": "user", "content": "2+2?"}]
    _score(_rf(spy), [" 4", " 5"], prompts=[chat, "2+3="])
    assert seen["completions"] == [[{"role": "assistant", "content": " 4"}], " 5"]


def test_function_without_kwargs_gets_a_clear_error():
    with pytest.raises(RewardFunctionError, match=r"`strict_signature` cannot be called .*add \*\*kwargs"):
        _score(_rf(strict_signature), ["a"])


def test_column_named_like_an_argument_is_an_error():
    with pytest.raises(ConfigError, match=r"column\(s\) \['ended'\] clash"):
        _score(_rf(scaled_length), ["a"], rows=[{"prompt": "p", "ended": 1}])


def test_input_lengths_are_checked():
    with pytest.raises(ValueError, match="1 ended for 2 completions"):
        _score(_rf(scaled_length), ["a", "b"], ended=[True])
    with pytest.raises(ValueError, match="without padding"):
        _score(_rf(scaled_length), ["a", "b"], ids=torch.ones(2, 3, dtype=torch.long))


# ---- value checks ------------------------------------------------------------------------------------

def test_accepted_value_types():
    values = [1, 0.5, True, np.float32(0.25), np.int64(3), np.bool_(False), torch.tensor(1.5),
              torch.tensor(2, dtype=torch.int64), np.array(0.75), None]

    def mixed(completions, **_):
        return values

    out = _score(_rf(mixed), ["c"] * len(values))["mixed"]
    assert out.dtype == torch.float32 and out.shape == (len(values),)
    assert out[:-1].tolist() == [1.0, 0.5, 1.0, 0.25, 3.0, 0.0, 1.5, 2.0, 0.75]
    assert math.isnan(out[-1])  # None -> NaN (not applicable)


@pytest.mark.parametrize("values", [(0.5, 1.0), torch.tensor([0.5, 1.0]), np.array([0.5, 1.0])])
def test_sequences_and_1d_arrays_are_accepted(values):
    assert _score(_rf(lambda completions, **_: values, "f"), ["a", "b"])["f"].tolist() == [0.5, 1.0]


def test_wrong_length_names_the_function():
    def short(completions, **_):
        return [1.0, 1.0, 1.0]

    with pytest.raises(RewardFunctionError, match=r"^reward function `short` returned 3 values for 8 "
                                                  r"completions$"):
        _score(_rf(short), ["c"] * 8)


@pytest.mark.parametrize("bad, shown", [
    ("abc", "'abc' (str)"),
    ([1.0], "[1.0] (list)"),
    (torch.tensor([1.0]), "tensor([1.]) (Tensor)"),  # shape (1,), not 0-d
    (1 + 2j, "(1+2j) (complex)"),
    ({"r": 1}, "{'r': 1} (dict)"),
    (np.array("abc"), "array('abc', dtype='<U3') (ndarray)"),  # 0-d, but not a number
    (torch.tensor(1 + 1j), "(Tensor)"),
    (__import__("decimal").Decimal("0.5"), "Decimal('0.5') (Decimal)"),
])
def test_non_number_names_function_row_value_and_type(bad, shown):
    def junk(completions, **_):
        return [0.0, 1.0, bad, 0.0]

    with pytest.raises(RewardFunctionError) as info:
        _score(_rf(junk), ["c"] * 4)
    msg = str(info.value)
    assert "`junk`" in msg and "row 2" in msg and shown in msg, msg
    assert info.value.function == "junk" and info.value.row == 2


@pytest.mark.parametrize("bad", [math.nan, np.float64("nan"), torch.tensor(float("nan"))])
def test_nan_is_an_error_none_is_not_applicable(bad):
    def nanny(completions, **_):
        return [0.0, bad]

    with pytest.raises(RewardFunctionError, match=r"`nanny` returned NaN .* row 1; return None"):
        _score(_rf(nanny), ["a", "b"])


def test_infinite_is_an_error():
    with pytest.raises(RewardFunctionError, match=r"`f` returned -inf \(float\) for row 0; rewards must be"):
        _score(_rf(lambda completions, **_: [-math.inf], "f"), ["a"])


@pytest.mark.parametrize("scalar, shown", [(0.5, "a single value 0.5 (float)"), (None, "a single value None"),
                                           (np.float32(1), "a single value np.float32(1.0) (float32)"),
                                           ("1.0", "'1.0' (str)")])
def test_scalar_is_never_broadcast(scalar, shown):
    with pytest.raises(RewardFunctionError) as info:
        _score(_rf(lambda completions, **_: scalar, "f"), ["a", "b", "c"])
    msg = str(info.value)
    assert msg.startswith("reward function `f` returned ") and shown in msg, msg
    assert "for 3 completions" in msg


@pytest.mark.parametrize("scalar, shown", [(torch.tensor(0.5), "a single value"),
                                           (torch.ones(3, 1), "an array of shape (3, 1)")])
def test_tensor_of_the_wrong_shape(scalar, shown):
    with pytest.raises(RewardFunctionError, match=rf"`f` returned {re.escape(shown)}"):
        _score(_rf(lambda completions, **_: scalar, "f"), ["a", "b", "c"])


def test_exception_inside_is_reraised_naming_the_function():
    def boom(completions, **_):
        return [1 / 0 for _ in completions]

    with pytest.raises(RewardFunctionError) as info:
        _score(_rf(boom), ["a"])
    msg = str(info.value)
    assert msg.startswith("reward function `boom` raised ZeroDivisionError: division by zero (at ")
    assert "test_rewards.py:" in msg  # where it failed, for the CLI that prints no traceback
    assert isinstance(info.value.__cause__, ZeroDivisionError)


# ---- combining --------------------------------------------------------------------------------------

def test_combine_is_a_nan_aware_weighted_sum():
    """a = [1, NaN, 3], b = [0.5, 2, NaN], weights [1, 2]:
    total = [1*1 + 2*0.5, 2*2, 1*3] = [2, 4, 3];
    a over its rows {1, 3}: mean 2, population std 1; b over {0.5, 2}: mean 1.25, std 0.75."""
    nan = float("nan")
    parts = {"a": torch.tensor([1.0, nan, 3.0]), "b": torch.tensor([0.5, 2.0, nan])}
    total, metrics = combine_rewards(parts, [1.0, 2.0])
    assert total.dtype == torch.float32 and total.tolist() == [2.0, 4.0, 3.0]
    assert metrics == pytest.approx({"rewards/a/mean": 2.0, "rewards/a/std": 1.0,
                                     "rewards/b/mean": 1.25, "rewards/b/std": 0.75})
    assert math.isnan(parts["a"][1])  # inputs untouched


def test_combine_row_without_any_reward_is_an_error():
    nan = float("nan")
    parts = {"a": torch.tensor([1.0, nan, nan]), "b": torch.tensor([0.0, nan, 1.0])}
    with pytest.raises(RewardFunctionError, match=r"no reward for row\(s\) 1: every source \(a, b\)") as info:
        combine_rewards(parts, [1.0, 1.0])
    assert info.value.row == 1


def test_combine_source_that_never_applies_has_no_metrics():
    nan = float("nan")
    parts = {"rm": torch.tensor([0.5, -0.5]), "f": torch.tensor([nan, nan])}
    total, metrics = combine_rewards(parts, [2.0, 1.0])
    assert total.tolist() == [1.0, -1.0] and set(metrics) == {"rewards/rm/mean", "rewards/rm/std"}


def test_combine_checks_weights_and_shapes():
    with pytest.raises(ValueError, match="1 weights for 2 reward sources"):
        combine_rewards({"a": torch.zeros(2), "b": torch.zeros(2)}, [1.0])
    with pytest.raises(ValueError, match="source `b` has shape"):
        combine_rewards({"a": torch.zeros(2), "b": torch.zeros(3)}, [1.0, 1.0])


def test_score_then_combine_end_to_end():
    """exact_answer applies to rows 0 and 2 (row 1 has no answer), regex_format to all:
    exact = [1, NaN, 0], fmt = [1, 1, 0]; weights [1, 0.5] -> [1.5, 0.5, 0]."""
    funcs = load_reward_funcs(["exact_answer", {"name": "regex_format", "pattern": r" ?-?\d+"}])
    rows = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "hi"}, {"prompt": "2+2=", "answer": 4}]
    parts = _score(funcs, [" 2", " 7", "four"], prompts=[r["prompt"] for r in rows], rows=rows)
    total, metrics = combine_rewards(parts, [1.0, 0.5])
    assert total.tolist() == [1.5, 0.5, 0.0]
    assert metrics["rewards/exact_answer/mean"] == 0.5
    assert metrics["rewards/regex_format/mean"] == pytest.approx(2 / 3)


# ---- built-ins -------------------------------------------------------------------------------------

def test_gold_on_the_arithmetic_task():
    """arithmetic gold: 1.0 right answer + EOS, 0.1 wrong integer + EOS, 0.0 without EOS."""
    for task in ("arithmetic", get_task("arithmetic")):
        (gold,) = load_reward_funcs(["gold"], task=task)
        out = _score(gold, [" 12", " 7", " 2"], prompts=["7+5=", "2*3=", "1+1="], ended=[True, True, False])
        assert out["gold"].tolist() == pytest.approx([1.0, 0.1, 0.0])
    with pytest.raises(ConfigError, match="unknown task 'arithmetc'"):
        load_reward_funcs(["gold"], task="arithmetc")


def test_exact_answer():
    (f,) = load_reward_funcs(["exact_answer"])
    rows = [{"prompt": "p", "answer": "12"}, {"prompt": "p", "answer": None}, {"prompt": "p", "answer": 3},
            {"prompt": "p"}, {"prompt": "p", "answer": "12"}]
    out = _score(f, [" 12 ", "x", "3", "3", "012"], rows=rows)["exact_answer"]
    assert out[[0, 2, 4]].tolist() == [1.0, 1.0, 0.0] and out[[1, 3]].isnan().all()
    # no row has the column: not applicable everywhere
    assert _score(f, ["1"], rows=[{"prompt": "p"}])["exact_answer"].isnan().all()


def test_exact_answer_options():
    (f,) = load_reward_funcs([{"name": "exact_answer", "column": "target", "require_ended": True}])
    rows = [{"prompt": "p", "target": "5", "answer": "6"}] * 3
    out = _score(f, ["5", "5", "6"], rows=rows, ended=[True, False, True])
    assert out["exact_answer"].tolist() == [1.0, 0.0, 0.0]


def test_exact_answer_on_message_completions():
    (f,) = load_reward_funcs(["exact_answer"])
    chat = [{"role": "user", "content": "7+5?"}]
    out = _score(f, ["12", "13"], prompts=[chat, chat], rows=[{"prompt": chat, "answer": "12"}] * 2)
    assert out["exact_answer"].tolist() == [1.0, 0.0]


def test_regex_format_full_and_partial():
    full, part = load_reward_funcs([{"name": "regex_format", "pattern": r" \d+"},
                                    {"name": "regex_format", "pattern": r"\d+", "full_match": False}])
    assert part.name == "regex_format_2"
    out = _score([full, part], [" 12", " 12 apples", "none"])
    assert out["regex_format"].tolist() == [1.0, 0.0, 0.0]
    assert out["regex_format_2"].tolist() == [1.0, 1.0, 0.0]


def test_length_penalty():
    """target 4 tokens, scale 2: lengths 2, 5, 9 -> 0, -(5-4)/2 = -0.5, -(9-4)/2 = -2.5."""
    (f,) = load_reward_funcs([{"name": "length_penalty", "target_tokens": 4, "scale": 2}])
    out = _score(f, ["a", "b", "c"], ids=[[1, 2], [1] * 5, [1] * 9])
    assert out["length_penalty"].tolist() == [0.0, -0.5, -2.5]


# ---- reasoning-gym ---------------------------------------------------------------------------------

def test_reasoning_gym_missing_gives_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "reasoning_gym" else real(name, *a))
    msg = check_reward_spec("reasoning_gym")
    assert "needs reasoning-gym, which is not installed" in msg and "pip install 'rlhfkit[reasoning]'" in msg
    from rlhfkit.tasks import reasoning_gym as rgym

    with pytest.raises(ConfigError, match=r"pip install 'rlhfkit\[reasoning\]'"):
        rgym.write("chain_sum", "/nonexistent")


def test_imports_stay_light():
    """Config validation imports rewards.py: no torch; the adapter imports no reasoning_gym."""
    code = ("import sys, rlhfkit.rollout.rewards, rlhfkit.tasks.reasoning_gym; "
            "print('torch' in sys.modules, sys.modules.get('reasoning_gym') is not None)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


needs_rg = pytest.mark.skipif(
    importlib.util.find_spec("reasoning_gym") is None,
    reason="reasoning-gym is not installed (optional extra: pip install 'rlhfkit[reasoning]')")


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@needs_rg
def test_reasoning_gym_data_files(tmp_path):
    from rlhfkit.tasks import reasoning_gym as rgym

    paths = rgym.write("chain_sum", tmp_path / "a", size=40, eval_size=10, seed=3)
    train, evaluation = _read(paths["prompt_train"]), _read(paths["prompt_eval"])
    assert len(train) == 40 and len(evaluation) == 10
    row = train[0]
    assert set(row) == {"prompt", "answer", "rg"} and isinstance(row["prompt"], str)
    assert row["prompt"].startswith("State the final answer to the following arithmetic problem: ")
    assert row["rg"]["dataset"] == "chain_sum"
    assert row["rg"]["config"] == rgym.RECOMMENDED_CONFIGS["chain_sum"]
    assert row["rg"]["entry"]["answer"] == row["answer"] and row["rg"]["entry"]["question"] == row["prompt"]
    # the answer is the expression's value (two one-digit terms)
    a, op, b = row["rg"]["entry"]["metadata"]["expression"].split()
    assert int(row["answer"]) == (int(a) + int(b) if op == "+" else int(a) - int(b)) and 0 <= int(a) <= 9
    # held-out questions, deterministic
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evaluation}
    again = rgym.write("chain_sum", tmp_path / "b", size=40, eval_size=10, seed=3)
    assert again["prompt_train"].read_text() == paths["prompt_train"].read_text()
    other = rgym.write("chain_sum", tmp_path / "c", size=40, eval_size=10, seed=4)
    assert other["prompt_train"].read_text() != paths["prompt_train"].read_text()
    meta = json.loads(paths["meta"].read_text())
    assert meta["reasoning_gym_version"] == rgym.VERSION and meta["task"] == "chain_sum" and meta["seed"] == 3


@needs_rg
def test_reasoning_gym_scoring_right_and_wrong(tmp_path):
    from rlhfkit.tasks import reasoning_gym as rgym

    rows = _read(rgym.write("chain_sum", tmp_path, size=4, eval_size=1, seed=0)["prompt_train"])
    row = rows[0]
    right, wrong = f" {row['answer']}", f" {int(row['answer']) + 1}"
    (f,) = load_reward_funcs(["reasoning_gym"])
    batch = [row, row, {"prompt": "2+2=", "answer": "4"}]  # the last row has no `rg`: not applicable
    out = _score(f, [right, wrong, " 4"], prompts=[r["prompt"] for r in batch], rows=batch)["reasoning_gym"]
    assert out[:2].tolist() == [1.0, 0.0] and math.isnan(out[2])
    # answer tags, as reasoning-gym's own prompts ask for
    (tagged,) = load_reward_funcs([{"name": "reasoning_gym", "answer_tag": "answer", "require_ended": True}])
    completions = [f"so <answer>{row['answer']}</answer>", f"<answer>{row['answer']}</answer>", right]
    out = _score(tagged, completions, prompts=[row["prompt"]] * 3, rows=[row] * 3, ended=[True, False, True])
    assert out["reasoning_gym"].tolist() == [1.0, 0.0, 0.0]  # no EOS; no tag


@needs_rg
def test_reasoning_gym_chat_rows_and_products(tmp_path):
    from rlhfkit.tasks import reasoning_gym as rgym

    rows = _read(rgym.write("products", tmp_path, size=6, eval_size=2, chat=True)["prompt_train"])
    row = rows[0]
    assert row["prompt"] == [{"role": "user", "content": row["rg"]["entry"]["question"]}]
    (f,) = load_reward_funcs(["reasoning_gym"])
    out = _score(f, [row["answer"], "nope"], prompts=[row["prompt"]] * 2, rows=[row] * 2)
    assert out["reasoning_gym"].tolist() == [1.0, 0.0]


@needs_rg
def test_reasoning_gym_bad_rg_column():
    (f,) = load_reward_funcs(["reasoning_gym"])
    with pytest.raises(RewardFunctionError, match=r"`reasoning_gym` raised ValueError: column `rg` must be"):
        _score(f, ["1"], rows=[{"prompt": "p", "rg": {"entry": "x"}}])


@needs_rg
def test_reasoning_gym_errors(tmp_path, monkeypatch):
    from rlhfkit.tasks import reasoning_gym as rgym

    with pytest.raises(ConfigError, match=r"unknown reasoning-gym task 'chain_sun'.*reasoning-gym:chain_sum"):
        rgym.write("chain_sun", tmp_path)
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['min_term'\]; its keys: min_terms"):
        rgym.write("chain_sum", tmp_path, config={"min_term": 2})
    with pytest.raises(ConfigError, match="max_terms must be >= min_terms"):
        rgym.write("chain_sum", tmp_path, config={"min_terms": 3, "max_terms": 2})
    monkeypatch.setattr(rgym, "split_of", lambda name, question: "train")
    with pytest.raises(ConfigError, match=r"only \{'eval': 0\} rows .* too few distinct questions"):
        rgym.write("chain_sum", tmp_path, size=4, eval_size=2)


@needs_rg
def test_cli_writes_reasoning_gym_data(tmp_path, capsys):
    out = tmp_path / "rg"
    config = '{"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 1}'
    assert main(["data", "reasoning-gym:chain_sum", str(out), "--size", "12", "--eval-size", "3",
                 "--seed", "1", "--config", config]) == 0
    assert len(_read(out / "prompt_train.jsonl")) == 12 and len(_read(out / "prompt_eval.jsonl")) == 3
    assert _read(out / "prompt_train.jsonl")[0]["rg"]["config"]["max_terms"] == 3
    assert "prompt_train" in capsys.readouterr().out
    assert main(["data", "reasoning-gym:chain_sun", str(out)]) == 2
    assert "did you mean reasoning-gym:chain_sum" in capsys.readouterr().err.lower()
    assert main(["data", "reasoning-gym:chain_sum", str(out), "--config", "[1]"]) == 2
    assert "expected a JSON object" in capsys.readouterr().err


def test_cli_rejects_reasoning_gym_flags_for_builtin_tasks(tmp_path, capsys):
    assert main(["data", "arithmetic", str(tmp_path), "--size", "3"]) == 2
    assert "--size: only for reasoning-gym:TASK" in capsys.readouterr().err
