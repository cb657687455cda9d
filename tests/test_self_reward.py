"""self_reward on tiny untrained models: judge prompts and score reading (rollout/judge.py), each pair the
best- and the worst-judged candidate of its prompt, ties trained with weight 0, the first update at
policy = reference (implicit rewards 0, loss log 2), each iteration judged by the policy at its start,
resume inside an iteration exact, the real judge end to end (conversations through the chat template),
config errors before any model loads; on 2 processes (DDP, ZeRO-3 and FSDP2 against DDP). The loop is
train/iterative.py's (also spin's, tested in test_spin.py); the pair loss online_dpo's (test_online_dpo.py);
the learning test is in tests/test_learning.py (the sentiment task, a model SFT'd to judge)."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from helpers import (
    assert_every_trained_tensor_changed,
    assert_same_weights,
    assert_sharded_follows_ddp,
    launched_run,
    read_metrics,
    register_launched,
    write_jsonl,
)
from test_grpo import grpo_fixtures, initial_weights, online_config
from test_scaleout import needs_deepspeed

from rlhfkit.config import DEFAULT_JUDGE_TEMPLATE
from rlhfkit.errors import ConfigError
from rlhfkit.data.formats import request_text
from rlhfkit.rollout.judge import Judged, judge_prompt, judge_responses, read_score
from rlhfkit.train import self_reward as self_reward_module
from rlhfkit.train.self_reward import train_self_reward

PROMPTS = ["The movie was", "This film is", "My friend said", "The plot", "What is 2 + 3?", "The cat"]


@pytest.fixture(scope="module")
def fx(tmp_path_factory, tiny_tokenizer):
    return self_reward_fixtures(tmp_path_factory, tiny_tokenizer)


def self_reward_fixtures(tmp_path_factory, tiny_tokenizer):
    """{"sft": the tiny SFT model, "data": prompts.jsonl (strings) and chat.jsonl (conversations)}."""
    out = grpo_fixtures(tmp_path_factory, tiny_tokenizer)
    data = tmp_path_factory.mktemp("self_reward_data")
    write_jsonl(data / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    write_jsonl(data / "chat.jsonl", [{"prompt": [{"role": "user", "content": p}]} for p in PROMPTS])
    return {"sft": out / "sft", "data": data}


def sr_config(fx, out, **kw):
    return online_config("self_reward", fx["sft"], fx["data"] / "prompts.jsonl", out,
                         dict(rollout_batch_size=4, num_generations=3, per_device_train_batch_size=8, num_iterations=1,
                              judge_max_new_tokens=8), kw)


def pool_lines(out, iteration: int, rank: int = 0) -> list[dict]:
    path = out / "self_reward" / f"iteration-{iteration}-rank-{rank}.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()]


def by_length(model, tokenizer, generator, prompts, responses, **kw) -> Judged:
    """A stand-in judge: the score of a response is its character count (ties where lengths are equal);
    it records the model's parameter sum at each call."""
    by_length.calls.append(sum(p.detach().double().sum().item() for p in model.parameters()))
    scores = torch.tensor([float(len(r)) for r in responses])
    return Judged(scores, [[f"Score: {len(r)}"] for r in responses], [[float(len(r))] for r in responses],
                  [1] * len(responses))


@pytest.fixture
def length_judge(monkeypatch):
    by_length.calls = []
    monkeypatch.setattr(self_reward_module, "judge_responses", by_length)
    return by_length


def test_scores_are_read_from_the_last_match_in_range():
    pattern = re.compile(r"Score:\s*([0-9]+(?:\.[0-9]+)?)")
    assert read_score("Relevant, clear. Score: 4", pattern, 5.0) == 4.0
    assert read_score("Score: 2 at first ... Score: 3.5", pattern, 5.0) == 3.5
    assert read_score("Score: 7", pattern, 5.0) is None  # outside [0, max_score]
    assert read_score("no score here", pattern, 5.0) is None
    assert read_score("Score: 0", pattern, 5.0) == 0.0


def test_judge_prompts_take_the_form_of_the_request():
    assert request_text("7+5=") == "7+5="
    assert request_text([{"role": "user", "content": "Hi there"}]) == "Hi there"
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert request_text(turns) == "system: Be brief.\nuser: Hi"
    template = "Rate {prompt} -> {response}. Braces {kept}."
    assert judge_prompt(template, "2+2=", " 4") == "Rate 2+2= ->  4. Braces {kept}."
    assert judge_prompt(template, [{"role": "user", "content": "Hi"}], "Hello") == [
        {"role": "user", "content": "Rate Hi -> Hello. Braces {kept}."}]
    assert DEFAULT_JUDGE_TEMPLATE.count("{prompt}") == DEFAULT_JUDGE_TEMPLATE.count("{response}") == 1
    # one pass: a request that itself holds "{response}" keeps it (the response goes into the slot only)
    assert judge_prompt("Q: {prompt} A: {response}", "fill {response} in", "x") == "Q: fill {response} in A: x"


def test_a_responses_score_is_the_mean_of_its_read_judgements(tiny_tokenizer):
    """judge_responses with a stand-in generator: the prompts it gets are the encoded judge prompts,
    `samples` judgements per response, the mean of the read ones, NaN when none is read."""
    from rlhfkit.data.encode import encode_prompt
    from rlhfkit.rollout.generate import SamplingParams

    class Judgements:
        def __init__(self, texts):
            self.texts, self.seen = texts, None

        def generate(self, model, prompt_ids, params, generator_seed=None, num_generations=1):
            self.seen = (prompt_ids, num_generations, generator_seed)
            return type("Gen", (), {"texts": self.texts})()

    gen = Judgements(["Score: 4", "blah", "Score: 2", "no", "Score: 9", "x"])
    judged = judge_responses(None, tiny_tokenizer, gen, ["a", [{"role": "user", "content": "b"}]], [" r1", " r2"],
                             template="Q {prompt} A {response}", samples=3, params=SamplingParams(),
                             pattern=r"Score: (\d+)", max_score=5.0, seed=11)
    assert judged.scores[0].item() == 3.0 and math.isnan(judged.scores[1].item())
    assert judged.unread.tolist() == pytest.approx([1 / 3, 1.0])
    assert judged.judgement_scores == [[4.0, None, 2.0], [None, None, None]]
    ids, n, seed = gen.seen
    assert n == 3 and seed == 11
    assert ids[0] == encode_prompt(tiny_tokenizer, "Q a A  r1")
    assert ids[1] == encode_prompt(tiny_tokenizer, [{"role": "user", "content": "Q b A  r2"}])  # chat template
    assert judged.prompt_lengths == [len(ids[0]), len(ids[1])]


@pytest.mark.parametrize("kw", [dict(), dict(finetuning_type="lora")], ids=["full", "lora"])
def test_pairs_are_the_best_and_worst_judged_and_the_first_update_is_at_the_reference(fx, tmp_path, kw,
                                                                                         length_judge):
    """One iteration, one step, judged by length: every pair is its prompt's longest (chosen) and
    shortest (rejected) candidate, ties train nothing; the first update is at the reference (implicit
    rewards 0, loss log 2) and every trained tensor changed."""
    c = sr_config(fx, tmp_path / "run", val_size=2, **kw)
    initial = initial_weights(c)
    result = train_self_reward(c)
    lines = pool_lines(tmp_path / "run", 0)
    assert len(lines) == 4  # the step's 4 prompts (val_size 2 held out)
    for line in lines:
        lengths = [len(x["response"]) for x in line["candidates"]]
        assert len(lengths) == 3 and line["scores"] == [float(n) for n in lengths]
        assert len(line["chosen"]) == max(lengths) and len(line["rejected"]) == min(lengths)
        assert line["trains"] == (max(lengths) > min(lengths))
    step1 = next(r for r in result.history if r["step"] == 1)
    assert step1["self_reward/iteration"] == 1
    assert step1["pairs/tied"] == pytest.approx(sum(not x["trains"] for x in lines) / 4)
    assert step1["scores/chosen"] == pytest.approx(sum(len(x["chosen"]) for x in lines) / 4)
    assert any(x["trains"] for x in lines)
    assert step1["rewards/chosen"] == pytest.approx(0.0, abs=1e-5)
    assert step1["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert_every_trained_tensor_changed(initial, tmp_path / "run", c.finetuning_type)
    s = result.summary
    assert s["stage"] == "self_reward" and s["iterations"] == 1 and s["num_generations"] == 3


def test_each_iteration_is_judged_by_the_policy_at_its_start(fx, tmp_path, length_judge):
    """Two iterations of two steps: the judge of iteration 1 is the initial model, that of iteration 2
    the step-2 checkpoint's (compared by parameter sum)."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    c = sr_config(fx, out, num_iterations=2, max_steps=2, save_steps=2)
    result = train_self_reward(c)
    assert [r["self_reward/iteration"] for r in result.history if "loss" in r] == [1, 1, 2, 2]
    initial = sum(v.double().sum().item() for v in initial_weights(c).values())
    checkpoint = load_file(str(out / "checkpoints" / "step-000002" / "model.safetensors"))
    at_step_2 = sum(v.double().sum().item() for v in checkpoint.values())
    assert length_judge.calls == [pytest.approx(initial, rel=1e-9), pytest.approx(at_step_2, rel=1e-9)]
    assert at_step_2 != pytest.approx(initial, rel=1e-6)


def test_resume_inside_an_iteration_is_exact(fx, tmp_path, length_judge):
    """Resumed at step 1 of a 2-step iteration (its pool read back, the judge not called) and at the
    boundary (judged anew by the checkpoint's policy): the same adapter as the uninterrupted run."""
    kw = dict(max_steps=2, num_iterations=2, finetuning_type="lora", num_mini_batches=2, per_device_train_batch_size=4)
    train_self_reward(sr_config(fx, tmp_path / "a", save_steps=1, save_total_limit=3, **kw))
    for step in (1, 2):
        length_judge.calls.clear()
        ckpt = tmp_path / "a" / "checkpoints" / f"step-{step:06d}"
        train_self_reward(sr_config(fx, tmp_path / f"b{step}", resume_from_checkpoint=str(ckpt), **kw))
        assert_same_weights(tmp_path / "a", tmp_path / f"b{step}", "adapter_model.safetensors")
        assert len(length_judge.calls) == 1  # iteration 2 only (step 1: iteration 1's pool is read back)


def test_the_policy_judges_conversations_through_its_chat_template(fx, tmp_path):
    """The real judge on an untrained model: every candidate is judged judge_samples times (the texts in
    the pool file), the judge prompt is the template around the conversation's request, through the
    chat template; what it writes has no readable score, so no pair trains and the step's loss is 0."""
    from rlhfkit.data.encode import encode_prompt
    from rlhfkit.models.load import load_tokenizer

    template = "Rate the reply to {prompt}: {response}"
    result = train_self_reward(sr_config(fx, tmp_path / "chat", dataset=str(fx["data"] / "chat.jsonl"),
                                         judge_template=template, judge_samples=2))
    lines = pool_lines(tmp_path / "chat", 0)
    tok = load_tokenizer(str(fx["sft"]))
    for line in lines:
        assert line["prompt"][0]["role"] == "user"
        for cand in line["candidates"]:
            assert len(cand["judgements"]) == 2
            assert cand["judgement_scores"] == [None, None]
    step1 = next(r for r in result.history if r["step"] == 1)
    assert step1["judge/unread"] == 1.0 and step1["pairs/tied"] == 1.0 and step1["loss"] == 0.0
    # the judge prompts: the template around the request and the candidate, as one user turn
    def judge_ids(line, cand):
        text = template.replace("{prompt}", line["prompt"][0]["content"]).replace("{response}", cand["response"])
        return encode_prompt(tok, [{"role": "user", "content": text}])

    per_prompt = [sum(len(judge_ids(x, cand)) for cand in x["candidates"]) / 3 for x in lines]
    assert step1["judge/prompt_length"] == pytest.approx(sum(per_prompt) / len(per_prompt))
    assert tok.decode(judge_ids(lines[0], lines[0]["candidates"][0])).count("<|im_start|>user") == 1


def test_config_errors_before_any_model_loads(fx, tmp_path):
    cases = [(dict(judge_template="Rate {response}"), r"must hold \{prompt\} exactly once"),
             (dict(judge_template="{prompt} {response} {response}"), r"\{response\} exactly once, found it 2"),
             (dict(judge_score_pattern=r"Score: \d+"), "exactly one group"),
             (dict(judge_score_pattern=r"Score: (\d+"), "is not a regular expression"),
             (dict(num_generations=1), "num_generations must be >= 2"),
             (dict(judge_samples=0), "judge_samples and judge_max_new_tokens must be >= 1"),
             (dict(judge_temperature=0), "judge_temperature must be > 0"),
             (dict(judge_max_score=0), "judge_max_score must be > 0"),
             (dict(num_iterations=0), "num_iterations must be >= 1")]
    for kw, message in cases:
        with pytest.raises(ConfigError, match=message):
            sr_config(fx, tmp_path, **kw)
    assert sr_config(fx, tmp_path).reward_funcs == []  # no reward needed


# ---- 2 processes --------------------------------------------------------------------------------------

def launched_job(tmp_path_factory, model_dir, out):
    """2 processes, LoRA, 2 prompts per process, two iterations of one step. The untrained judge's
    digits are its scores (judge_score_pattern `([0-9]+)`, any size): random, but the same under
    every engine for the same weights and seeds."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    fx = {"sft": grpo_fixtures(tmp_path_factory, tok) / "sft", "data": out.parent / "self_reward_data"}
    fx["data"].mkdir(parents=True, exist_ok=True)
    write_jsonl(fx["data"] / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    return "self_reward", sr_config(fx, out, num_iterations=2, per_device_train_batch_size=2, num_generations=2,
                                     finetuning_type="lora", val_size=2, judge_score_pattern="([0-9]+)",
                                     judge_max_score=1e9, judge_max_new_tokens=48), None


ENGINES = ("zero3", "fsdp2")
register_launched("ddp", "self_reward_ddp", launched_job)
for _engine in ENGINES:
    register_launched(_engine, f"self_reward_{_engine}", launched_job)


@pytest.mark.slow
def test_two_processes_each_judge_their_share(fx, tmp_path_factory, tiny_model_dir):
    run = launched_run(tmp_path_factory, tiny_model_dir, "ddp", "self_reward_ddp")
    records = [r for r in read_metrics(run) if "loss" in r]
    assert [r["self_reward/iteration"] for r in records] == [1, 2]
    for iteration in (0, 1):
        a, b = pool_lines(run, iteration, 0), pool_lines(run, iteration, 1)
        assert len(a) == len(b) == 2 and {x["prompt"] for x in a}.isdisjoint({x["prompt"] for x in b})
    assert (run / "adapter_model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("engine", [pytest.param(e, marks=needs_deepspeed if e.startswith("zero") else ())
                                    for e in ENGINES])
def test_sharded_engines_follow_ddp(fx, tmp_path_factory, tiny_model_dir, engine):
    """ZeRO-3 and FSDP2 (the LoRA policy sharded, gathered to sample, to judge and to take the pool's
    reference log-probs) against DDP: the same candidates, judgements and reference log-probs on each
    rank, then the same curves and adapter within 1e-4. ZeRO-2 keeps the parameters whole on every rank:
    its loop is spin's (test_spin.py runs it under ZeRO-2)."""
    ddp = launched_run(tmp_path_factory, tiny_model_dir, "ddp", "self_reward_ddp")
    sharded = launched_run(tmp_path_factory, tiny_model_dir, engine, f"self_reward_{engine}")
    trained = 0
    for iteration in (0, 1):
        for rank in (0, 1):
            a, b = pool_lines(sharded, iteration, rank), pool_lines(ddp, iteration, rank)
            assert [x["candidates"] for x in a] == [x["candidates"] for x in b]
            for x, y in zip(a, b):
                assert x["ref_logps"] == pytest.approx(y["ref_logps"], rel=1e-4, abs=1e-5)
            trained += sum(x["trains"] for x in b)
    assert trained > 0  # some pairs were decisive, so the comparison covers training
    assert_sharded_follows_ddp(sharded, ddp, engine, ("loss", "grad_norm", "rewards/margins", "scores/chosen",
                                                      "pairs/tied", "eval/kl", "eval/length"))
