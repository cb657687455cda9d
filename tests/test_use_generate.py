"""Using a trained model: `load_for_use` (full, LoRA adapter, merged preset adapter, errors) and
`rlhfkit generate` (rows, finish reasons, resume = uninterrupted run, per-row seeds, bad input)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from rlhfkit.cli import main
from rlhfkit.errors import ConfigError, DataError
from rlhfkit.models.load import load_for_use
from rlhfkit.rollout.generate import HFGenerator, SamplingParams
from rlhfkit.use.generate import GenerateOptions, generate_file, sample_seed

PROMPTS = ["the movie was", "What is 2 + 3? It is", "hi", "A dog", "the book is great and the plot was slow",
           "Our trip felt lovely to me.", "my friend"]


def _write_prompts(path, chat_rows: int = 2):
    rows = [{"prompt": p, "id": k} for k, p in enumerate(PROMPTS)]
    rows += [{"prompt": [{"role": "user", "content": f"Hello, how are you? {k}"}]} for k in range(chat_rows)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


# ---- load_for_use ----------------------------------------------------------------------------------

def test_load_for_use_full_directory_matches_the_saved_model(tiny_model_dir, tiny_model, tiny_tokenizer):
    model, tok = load_for_use(str(tiny_model_dir), device="cpu")
    assert not model.training
    assert tok.chat_template == tiny_tokenizer.chat_template
    ids = tiny_tokenizer("the movie was great")["input_ids"]
    torch.testing.assert_close(_logits(model, ids), _logits(tiny_model, ids), atol=0, rtol=0)


def test_load_for_use_lora_adapter_loads_over_its_base_merged(tiny_model_dir, tiny_tokenizer, tmp_path):
    from rlhfkit.models.load import apply_lora, base_reference, load_causal_lm

    base = load_causal_lm(str(tiny_model_dir), tiny_tokenizer)
    peft_model = apply_lora(base, rank=4, alpha=8, dropout=0.0, target=["q_proj", "v_proj"])
    torch.manual_seed(1)
    with torch.no_grad():  # a non-zero adapter, so that loading it changes the logits
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    peft_model.peft_config["default"].base_model_name_or_path = base_reference(str(tiny_model_dir))
    peft_model.save_pretrained(tmp_path / "run")
    tiny_tokenizer.save_pretrained(tmp_path / "run")
    ids = tiny_tokenizer("the movie was great")["input_ids"]
    expected = _logits(peft_model.eval(), ids)
    model, _ = load_for_use(str(tmp_path / "run"), device="cpu")
    assert type(model).__name__ == "LlamaForCausalLM"  # merged: no peft layers left
    assert not model.training
    torch.testing.assert_close(_logits(model, ids), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(AssertionError):  # the adapter mattered
        torch.testing.assert_close(_logits(load_for_use(str(tiny_model_dir))[0], ids), expected)


def test_load_for_use_adapter_over_a_preset_uses_the_merged_copy(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_model_dir, run / "merged")
    adapter_config = {"base_model_name_or_path": None, "peft_type": "LORA"}
    (run / "adapter_config.json").write_text(json.dumps(adapter_config))
    model, _ = load_for_use(str(run))
    assert type(model).__name__ == "LlamaForCausalLM"
    (run / "merged" / "config.json").unlink()
    with pytest.raises(ConfigError, match="cannot be reloaded"):
        load_for_use(str(run))


def test_load_for_use_missing_or_unusable_models_name_themselves(tmp_path):
    with pytest.raises(ConfigError, match="nowhere/model"):
        load_for_use(str(tmp_path / "nowhere" / "model"))
    with pytest.raises(ConfigError, match=f"{tmp_path}: neither config.json nor adapter_config.json"):
        load_for_use(str(tmp_path))
    with pytest.raises(ConfigError, match="missing.gguf"):
        load_for_use(str(tmp_path / "missing.gguf"))
    with pytest.raises(ConfigError, match="preset"):
        load_for_use("preset:tiny")


# ---- per-row seeds in the sampler -------------------------------------------------------------------

def test_sample_seeds_make_a_row_independent_of_its_batch(tiny_model, tiny_tokenizer):
    tok = tiny_tokenizer
    prompts = [tok(t)["input_ids"] for t in PROMPTS]
    params = SamplingParams(max_new_tokens=12, temperature=1.0)
    seeds = [sample_seed(0, i, g) for i in range(len(prompts)) for g in range(2)]
    together = HFGenerator(tok, batch_size=4).generate(tiny_model, prompts, params, num_generations=2,
                                                       sample_seeds=seeds)
    alone = HFGenerator(tok, batch_size=1).generate(tiny_model, prompts[2:3], params, num_generations=2,
                                                    sample_seeds=seeds[4:6])
    assert together.texts[4:6] == alone.texts
    assert together.texts[4] != together.texts[5]  # the two samples of a prompt differ
    with pytest.raises(ValueError, match="sample_seeds"):
        HFGenerator(tok).generate(tiny_model, prompts, params, sample_seeds=seeds[:3])


# ---- rlhfkit generate -------------------------------------------------------------------------------

def test_generate_file_rows_counts_and_finish_reasons(tiny_model, tiny_tokenizer, tmp_path):
    prompts = _write_prompts(tmp_path / "prompts.jsonl")
    out = tmp_path / "out.jsonl"
    options = GenerateOptions(max_new_tokens=6, num_return_sequences=2, batch_size=3, seed=1)
    result = generate_file(tiny_model, tiny_tokenizer, str(prompts), out, options, quiet=True)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["row"] for r in rows] == list(range(9)) and result["generated"] == 9
    assert rows[0]["prompt"] == "the movie was" and rows[0]["id"] == 0  # extra columns kept
    assert rows[0]["source"] == f"{prompts}:line 1"
    assert rows[7]["prompt"] == [{"role": "user", "content": "Hello, how are you? 0"}]
    assert rows[0]["prompt_tokens"] == len(tiny_tokenizer("the movie was")["input_ids"])
    for r in rows:
        assert len(r["responses"]) == len(r["finish_reasons"]) == len(r["response_tokens"]) == 2
        for n, reason in zip(r["response_tokens"], r["finish_reasons"]):
            assert reason in ("stop", "length") and 1 <= n <= 6
            assert reason == "stop" or n == 6
    assert result["stop"] + result["length"] == 18


def test_generate_resumes_to_the_uninterrupted_result(tiny_model, tiny_tokenizer, tmp_path):
    prompts = _write_prompts(tmp_path / "prompts.jsonl")
    options = GenerateOptions(max_new_tokens=8, num_return_sequences=2, batch_size=2, seed=3, temperature=1.3)
    full = tmp_path / "full.jsonl"
    generate_file(tiny_model, tiny_tokenizer, str(prompts), full, options, quiet=True)
    lines = full.read_text().splitlines(keepends=True)
    # interrupted after 3 rows (the middle of a batch) plus half of the 4th line
    part = tmp_path / "part.jsonl"
    part.write_text("".join(lines[:3]) + lines[3][:20])
    (tmp_path / "part.jsonl.settings.json").write_text((tmp_path / "full.jsonl.settings.json").read_text())
    result = generate_file(tiny_model, tiny_tokenizer, str(prompts), part, options, quiet=True)
    assert result["resumed"] == 3 and result["generated"] == 6
    assert part.read_text() == full.read_text()
    # other settings: an error, not a silent mix
    with pytest.raises(ConfigError, match="temperature: 1.3 -> 0.7"):
        generate_file(tiny_model, tiny_tokenizer, str(prompts), part,
                      GenerateOptions(**{**options.__dict__, "temperature": 0.7}), quiet=True)


def test_generate_resume_keeps_rows_with_line_separator_characters(tiny_model, tiny_tokenizer, tmp_path):
    # generate writes with ensure_ascii=False, so a response may hold U+2028 / U+0085 as they are:
    # they do not end a line, and the resumed rows are kept as written
    prompts = _write_prompts(tmp_path / "prompts.jsonl")
    options = GenerateOptions(max_new_tokens=8, num_return_sequences=2, batch_size=2, seed=3, temperature=1.3)
    full = tmp_path / "full.jsonl"
    generate_file(tiny_model, tiny_tokenizer, str(prompts), full, options, quiet=True)
    rows = [json.loads(x) for x in full.read_text(encoding="utf-8").split("\n") if x]
    rows[0]["responses"][0] += "\u2028 and \x85 inside"
    part = tmp_path / "part.jsonl"
    part.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[:3]), encoding="utf-8")
    kept = part.read_bytes()
    (tmp_path / "part.jsonl.settings.json").write_text((tmp_path / "full.jsonl.settings.json").read_text())
    result = generate_file(tiny_model, tiny_tokenizer, str(prompts), part, options, quiet=True)
    assert result["resumed"] == 3 and result["generated"] == 6
    assert part.read_bytes().startswith(kept)
    assert [json.loads(x) for x in part.read_text(encoding="utf-8").split("\n") if x][3:] == rows[3:]


def test_generate_greedy_is_temperature_zero(tiny_model, tiny_tokenizer, tmp_path):
    prompts = _write_prompts(tmp_path / "prompts.jsonl", chat_rows=0)
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for out, seed in ((a, 0), (b, 9)):
        options = GenerateOptions(max_new_tokens=5, temperature=0, seed=seed)
        generate_file(tiny_model, tiny_tokenizer, str(prompts), out, options, quiet=True)
    assert [json.loads(x)["responses"] for x in a.read_text().splitlines()] == \
        [json.loads(x)["responses"] for x in b.read_text().splitlines()]


def test_generate_cli_bad_prompt_line_named_before_the_model_loads(tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "fine"}\n{"prompt": "broken\n')
    assert main(["generate", str(tmp_path / "no_model"), str(prompts), str(tmp_path / "out.jsonl")]) == 2
    assert f"{prompts}:line 2: invalid JSON" in capsys.readouterr().err
    prompts.write_text('{"text": "no prompt here"}\n')
    assert main(["generate", str(tmp_path / "no_model"), str(prompts), str(tmp_path / "out.jsonl")]) == 2
    assert f"{prompts}:line 1: rows in 'text' format have no prompt" in capsys.readouterr().err


def test_generate_cli_missing_model(tmp_path, capsys):
    prompts = _write_prompts(tmp_path / "prompts.jsonl")
    assert main(["generate", str(tmp_path / "no_model"), str(prompts), str(tmp_path / "out.jsonl")]) == 2
    assert f"{tmp_path / 'no_model'} does not exist" in capsys.readouterr().err


def test_generate_cli_bad_vllm_python_named_before_the_model_loads(tmp_path, capsys):
    import sys

    prompts = _write_prompts(tmp_path / "prompts.jsonl")
    args = ["generate", str(tmp_path / "no_model"), str(prompts), str(tmp_path / "out.jsonl"), "--vllm-python"]
    assert main([*args, str(tmp_path / "no-python")]) == 2
    assert "is not an executable" in capsys.readouterr().err
    assert main([*args, sys.executable]) == 2  # rlhfkit's own venv has no vLLM
    assert "vLLM is not installed" in capsys.readouterr().err


def test_generate_message_prompts_need_a_chat_template(tiny_model_dir, tmp_path, capsys):
    model_dir = tmp_path / "base"
    shutil.copytree(tiny_model_dir, model_dir)
    (model_dir / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    prompts = _write_prompts(tmp_path / "prompts.jsonl")
    out = tmp_path / "out.jsonl"
    args = ["generate", str(model_dir), str(prompts), str(out), "--max-new-tokens", "3"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{prompts}:line 8: message lists need a chat template" in err and str(model_dir) in err
    assert main([*args, "--chat-template", "chatml"]) == 0
    assert len(out.read_text().splitlines()) == 9
    assert "-> " + str(out) in capsys.readouterr().out


def test_generate_prompt_longer_than_the_context_is_an_error(tiny_model, tiny_tokenizer, tmp_path):
    prompts = tmp_path / "long.jsonl"
    prompts.write_text(json.dumps({"prompt": "the movie was great. " * 200}) + "\n")
    with pytest.raises(DataError, match=r"long.jsonl:line 1: .*exceeds the model's context of 512"):
        generate_file(tiny_model, tiny_tokenizer, str(prompts), tmp_path / "o.jsonl",
                      GenerateOptions(max_new_tokens=4), quiet=True)
    result = generate_file(tiny_model, tiny_tokenizer, str(prompts), tmp_path / "o.jsonl",
                           GenerateOptions(max_new_tokens=4, max_prompt_length=100), quiet=True)
    row = json.loads((tmp_path / "o.jsonl").read_text())
    assert row["prompt_truncated"] and row["prompt_tokens"] == 100 and result["truncated_prompts"] == 1
