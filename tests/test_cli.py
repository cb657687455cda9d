"""Command line: clear errors with exit code 2, raised before any model is loaded."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from rlhfkit.cli import main


@pytest.fixture
def no_model_loading(monkeypatch):
    """Any attempt to load a tokenizer or model fails the test: errors must come first."""
    import rlhfkit.train.common as common

    def forbidden(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before the error was reported")

    monkeypatch.setattr(common, "load_tokenizer", forbidden)
    monkeypatch.setattr(common, "load_causal_lm", forbidden)


def _config(tmp_path, **values):
    base = {"model_name_or_path": "preset:tiny", "dataset": str(tmp_path / "sft.jsonl"),
            "output_dir": str(tmp_path / "out")}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({**base, **values}))
    return path


def _sft_data(tmp_path):
    rows = [{"prompt": "What is 2 + 3?", "completion": " It is 5."}] * 4
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_unknown_command_suggests(capsys):
    assert main(["stf", "x.yaml"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'stf'" in err and "did you mean 'sft'" in err


def test_no_arguments_prints_usage_and_fails(capsys):
    assert main([]) == 2
    assert "rlhfkit STAGE CONFIG.yaml" in capsys.readouterr().out
    assert main(["--help"]) == 0


def test_unknown_config_key(tmp_path, capsys, no_model_loading):
    _sft_data(tmp_path)
    path = _config(tmp_path, learning_rat=1e-4)
    assert main(["sft", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(path) in err
    assert "unknown key 'learning_rat'" in err and "did you mean 'learning_rate'" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_unknown_override_key(tmp_path, capsys, no_model_loading):
    _sft_data(tmp_path)
    assert main(["sft", str(_config(tmp_path)), "max_step=3"]) == 2
    assert "did you mean 'max_steps'" in capsys.readouterr().err


def test_nonexistent_config_file(tmp_path, capsys, no_model_loading):
    missing = tmp_path / "nope.yaml"
    assert main(["sft", str(missing)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "does not exist" in err


def test_missing_config_argument(capsys):
    assert main(["sft"]) == 2
    assert "usage: rlhfkit sft CONFIG.yaml" in capsys.readouterr().err


def test_nonexistent_dataset_names_the_file(tmp_path, capsys, no_model_loading):
    missing = tmp_path / "missing_train.jsonl"
    path = _config(tmp_path, dataset=str(missing))
    assert main(["sft", str(path)]) == 2
    err = capsys.readouterr().err
    assert "missing_train.jsonl" in err and "does not exist" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()  # failed before the run started


def test_wrong_dataset_format_for_stage(tmp_path, capsys, no_model_loading):
    (tmp_path / "pref.jsonl").write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n")
    path = _config(tmp_path, dataset=str(tmp_path / "pref.jsonl"))
    assert main(["sft", str(path)]) == 2
    err = capsys.readouterr().err
    assert "preference" in err and "pref.jsonl" in err


def test_data_command_writes_task_files(tmp_path, capsys):
    out = tmp_path / "sentiment"
    assert main(["data", "sentiment", str(out)]) == 0
    for name in ("sft_train.jsonl", "sft_eval.jsonl", "preference_train.jsonl", "prompt_eval.jsonl",
                 "task.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    first = json.loads((out / "sft_train.jsonl").read_text().splitlines()[0])
    assert "prompt" in first
    assert "sft_train.jsonl" in capsys.readouterr().out


def test_data_command_unknown_task(tmp_path, capsys):
    assert main(["data", "sentimnet", str(tmp_path)]) == 2
    assert "sentiment" in capsys.readouterr().err


def test_help_config_lists_keys_with_docstrings(capsys):
    assert main(["sft", "--help-config"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("SFTConfig")
    for key in ("model_name_or_path", "learning_rate", "output_dir", "lora_rank", "dataset_format"):
        assert f"  {key} " in out
    assert "output_dir (required)" in out
    assert "Peak learning rate" in out  # a docstring, not just the key


def test_python_dash_m_help():
    out = subprocess.run([sys.executable, "-m", "rlhfkit", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "rlhfkit STAGE CONFIG.yaml" in out.stdout


@pytest.mark.parametrize("stage", ["rm", "dpo", "kto"])
@pytest.mark.parametrize("row, field, message", [
    ({"prompt": "What is 2 + 3?", "chosen": " It is 5."}, "rejected", "missing field"),
    ({"prompt": "What is 2 + 3?", "rejected": " It is 6."}, "chosen", "missing field"),
    ({"prompt": "What is 2 + 3?", "chosen": " It is 5.", "rejected": 6}, "rejected",
     "expected a string, got a number"),
])
def test_bad_preference_row_names_file_line_and_field(tmp_path, capsys, no_model_loading, stage, row, field,
                                                       message):
    """Issue "Bad preference data": a pair with one side missing (or of the wrong type) in the FIRST
    row, where the format is detected, gets the same file:line + field error as any other bad row
    (it used to pass as a bare prompt row and crash later with KeyError: 'rejected'); kto converts
    pairs to unpaired examples and needs the same check."""
    good = {"prompt": "What is 1 + 1?", "chosen": " It is 2.", "rejected": " It is 3."}
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps(row) + "\n" + json.dumps(good) + "\n")
    assert main([stage, str(_config(tmp_path, dataset=str(data)))]) == 2
    err = capsys.readouterr().err
    assert f"{data}:line 1: field '{field}': {message}" in err, err
    assert "Traceback" not in err and "KeyError" not in err
    assert not (tmp_path / "out").exists()  # failed before the run started
