"""spin on tiny untrained models: the data's responses are encoded as the policy would sample them, the
chosen of every pair is the data's response and the rejected the opponent's sample, the first update is
at policy = reference (implicit rewards 0, loss log 2), each iteration's reference log-probs are those of
the policy at the iteration's start (checked against the checkpoint at the boundary), resume inside an
iteration is exact, messages / preference rows, config and data errors before any model loads; on 2
processes (DDP). The pair loss itself is online_dpo's (train/pairs.py, tested in test_online_dpo.py);
the learning test lives in tests/test_grpo_learning.py (the arithmetic SFT fixture)."""

from __future__ import annotations

import json
import math

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
from safetensors.torch import load_file
from test_grpo import grpo_fixtures, initial_weights, online_config
from test_scaleout import needs_deepspeed

from rlhfkit.errors import ConfigError, DataError
from rlhfkit.rollout.rollout import data_rollout, reply_ids
from rlhfkit.train.pairs import identical_pairs
from rlhfkit.train.spin import train_spin

PAIRS = [("The movie was", " great fun"), ("This film is", " a bore"), ("My friend said", " hello"),
         ("The plot", " is thin"), ("What is 2 + 3?", " 5"), ("The cat", " sat down")]


@pytest.fixture(scope="module")
def fx(tmp_path_factory, tiny_tokenizer):
    return spin_fixtures(tmp_path_factory, tiny_tokenizer)


def spin_fixtures(tmp_path_factory, tiny_tokenizer):
    """{"sft": the tiny SFT model, "data": sft.jsonl (prompt_completion) and chat.jsonl (conversations)}."""
    out = grpo_fixtures(tmp_path_factory, tiny_tokenizer)
    data = tmp_path_factory.mktemp("spin_data")
    write_jsonl(data / "sft.jsonl", [{"prompt": p, "completion": c} for p, c in PAIRS])
    write_jsonl(data / "chat.jsonl", [{"messages": [{"role": "user", "content": p.strip()},
                                                    {"role": "assistant", "content": c.strip()}]} for p, c in PAIRS])
    return {"sft": out / "sft", "data": data}


def spin_config(fx, out, **kw):
    return online_config("spin", fx["sft"], fx["data"] / "sft.jsonl", out,
                         dict(rollout_batch_size=4, per_device_train_batch_size=8, num_iterations=1), kw)


def pool_lines(out, iteration: int, rank: int = 0) -> list[dict]:
    return [json.loads(x) for x in (out / "spin" / f"iteration-{iteration}-rank-{rank}.jsonl").read_text().splitlines()]


def test_data_responses_are_encoded_as_samples(tiny_tokenizer):
    """A string completion: its tokens + EOS after the prompt's (BOS) ids; a conversation's reply: the
    rendered tokens after the generation prompt, through the end of turn (not the template's newline
    after it). Cut to max_new_tokens: not ended, truncated."""
    tok = tiny_tokenizer
    eos = tok.eos_token_id
    assert reply_ids(tok, "The cat", " sat down") == tok(" sat down", add_special_tokens=False)["input_ids"] + [eos]
    prompt = [{"role": "user", "content": "Hi"}]
    ids = reply_ids(tok, prompt, [{"role": "assistant", "content": "hello there"}])
    assert ids[-1] == eos and eos not in ids[:-1]
    assert tok.decode(ids[:-1]).strip() == "hello there"
    with pytest.raises(DataError, match="one assistant turn"):
        reply_ids(tok, prompt, [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}])

    rows = [{"prompt": "The cat", "completion": " sat down"}, {"prompt": "The plot", "completion": " is very very thin"}]
    prompt_ids = [tok(r["prompt"])["input_ids"] for r in rows]
    full = [reply_ids(tok, r["prompt"], r["completion"]) for r in rows]
    budget = len(full[0])  # the first fits exactly, the second is longer
    assert len(full[1]) > budget
    ro = data_rollout(tok, prompt_ids, rows, budget, "cpu")
    assert ro.ended.tolist() == [True, False] and ro.truncated.tolist() == [False, True]
    assert ro.response_mask.sum(-1).tolist() == [budget, budget]
    assert ro.responses[0][ro.response_mask[0]].tolist() == full[0]
    assert ro.responses[1].tolist() == full[1][:budget]
    assert ro.texts[0] == tok.decode(full[0], skip_special_tokens=True)
    # the prompts are left-padded before the responses, as a rollout's
    assert ro.input_ids[0, ro.context_length - len(prompt_ids[0]):ro.context_length].tolist() == prompt_ids[0]


def test_identical_pairs():
    from rlhfkit.rollout.rollout import Rollout

    responses = torch.tensor([[5, 6, 0], [5, 6, 0], [5, 6, 0], [5, 7, 0], [5, 0, 0], [5, 6, 0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 1, 0], [1, 1, 0], [1, 0, 0], [1, 1, 0]], dtype=torch.bool)
    ro = Rollout(input_ids=responses, attention_mask=mask, responses=responses, response_mask=mask,
                 context_length=0, ended=torch.ones(6, dtype=torch.bool), texts=[""] * 6, rows=[{}] * 6, group_size=2)
    assert identical_pairs(ro).tolist() == [True, False, False]


@pytest.mark.parametrize("kw", [dict(), dict(finetuning_type="lora")], ids=["full", "lora"])
def test_first_update_is_at_the_reference_and_pairs_are_data_vs_sample(fx, tmp_path, kw):
    """One iteration, one step: every chosen is the data's completion, every rejected the opponent's
    sample; the reference log-probs, computed once for the pool, equal the training forward at the
    first update (implicit rewards 0 and loss log 2, within float error of a different packing), and
    every trained tensor changed."""
    c = spin_config(fx, tmp_path / "run", val_size=2, **kw)
    initial = initial_weights(c)
    result = train_spin(c)
    step1 = next(r for r in result.history if r["step"] == 1)
    assert step1["pairs/identical"] == 0.0 and step1["spin/iteration"] == 1
    assert step1["rewards/chosen"] == pytest.approx(0.0, abs=1e-5)
    assert step1["rewards/rejected"] == pytest.approx(0.0, abs=1e-5)
    assert step1["loss"] == pytest.approx(math.log(2), abs=1e-5)
    completions = {p: comp for p, comp in PAIRS}
    lines = pool_lines(tmp_path / "run", 0)
    assert len(lines) == 4  # the step's 4 prompts (val_size 2 held out)
    for line in lines:
        assert line["chosen"] == completions[line["prompt"]]  # the data's
        assert line["rejected"] != line["chosen"] and line["trains"] and not line["identical"]
    samples = [json.loads(x) for x in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    train = [s for s in samples if s["split"] == "train"]
    assert {s["response"] for s in train} <= {line["rejected"] for line in lines}  # samples are the opponent's
    assert_every_trained_tensor_changed(initial, tmp_path / "run", c.finetuning_type)
    s = result.summary
    assert s["stage"] == "spin" and s["iterations"] == 1 and "initial_eval/length" in s
    assert "initial_eval/scores" not in s  # no reward: nothing scored


def test_each_iteration_plays_against_the_policy_at_its_start(fx, tmp_path):
    """Two iterations of two steps, checkpoint at the boundary: iteration 2's reference log-probs are
    the checkpointed policy's (recomputed padded, unpacked), not the initial model's; its samples are
    drawn anew."""
    from rlhfkit.models.load import load_causal_lm, load_tokenizer
    from rlhfkit.train.online import rollout_logps
    from rlhfkit.train.iterative import Pool

    out = tmp_path / "run"
    c = spin_config(fx, out, num_iterations=2, max_steps=2, save_steps=2)
    result = train_spin(c)
    assert [r["spin/iteration"] for r in result.history if "loss" in r] == [1, 1, 2, 2]
    tok = load_tokenizer(str(fx["sft"]))
    first, second = (Pool.load(out / "spin" / f"iteration-{i}-rank-0", [{"prompt": p} for p, _ in PAIRS],
                               tok.pad_token_id, "cpu") for i in (0, 1))
    for pool, weights in ((first, None), (second, out / "checkpoints" / "step-000002" / "model.safetensors")):
        model = load_causal_lm(str(fx["sft"]), tok).eval()
        if weights is not None:
            keys = model.load_state_dict(load_file(str(weights)), strict=False)  # lm_head: tied to the embedding
            assert set(keys.missing_keys) <= {"lm_head.weight"} and not keys.unexpected_keys
        with torch.no_grad():
            lp = rollout_logps(model, pool.pairs, torch.arange(len(pool.pairs.texts)),
                               c.model_copy(update={"padding_free": False}))[0]
        seq = (lp * pool.pairs.response_mask).sum(-1)
        torch.testing.assert_close(seq, pool.ref_logps, atol=1e-4, rtol=1e-5)
    shared = sorted(set(first.index) & set(second.index))
    a, b = (torch.tensor([p.ref_logps[2 * p.at[i]] for i in shared]) for p in (first, second))
    assert shared and (a - b).abs().max() > 1e-3  # the reference moved with the policy


def test_resume_inside_an_iteration_is_exact(fx, tmp_path):
    """Resumed at step 1 of a 2-step iteration (its pairs and reference log-probs read back from
    spin/), and at the boundary (regenerated by the checkpoint's policy): the same adapter as the
    uninterrupted run, bit for bit."""
    kw = dict(max_steps=2, num_iterations=2, finetuning_type="lora", num_mini_batches=2, per_device_train_batch_size=4)
    train_spin(spin_config(fx, tmp_path / "a", save_steps=1, save_total_limit=3, **kw))
    for step in (1, 2):
        ckpt = tmp_path / "a" / "checkpoints" / f"step-{step:06d}"
        train_spin(spin_config(fx, tmp_path / f"b{step}", resume_from_checkpoint=str(ckpt), **kw))
        assert_same_weights(tmp_path / "a", tmp_path / f"b{step}", "adapter_model.safetensors")
        # the iteration resumed into is kept in the new directory too (a later resume reads it there)
        assert (tmp_path / f"b{step}" / "spin" / "iteration-0-rank-0.safetensors").is_file() == (step == 1)


def test_conversations_and_preference_pairs(fx, tmp_path):
    """A conversation's last reply (messages rows, through the chat template) and a preference pair's
    chosen are the responses to imitate."""
    train_spin(spin_config(fx, tmp_path / "chat", dataset=str(fx["data"] / "chat.jsonl")))
    for line in pool_lines(tmp_path / "chat", 0):
        assert line["prompt"][0]["role"] == "user" and len(line["prompt"]) == 1
        assert line["chosen"] == dict((p.strip(), c.strip()) for p, c in PAIRS)[line["prompt"][0]["content"]]
    prefs = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": p, "chosen": c, "rejected": " no"} for p, c in PAIRS])
    train_spin(spin_config(fx, tmp_path / "prefs", dataset=str(prefs)))
    assert {line["chosen"] for line in pool_lines(tmp_path / "prefs", 0)} <= {c for _, c in PAIRS}


def test_config_and_data_errors_before_any_model_loads(fx, tmp_path):
    cases = [(dict(num_iterations=0), "num_iterations must be >= 1"),
             (dict(dataset_format="prompt"), "has no response to imitate"),
             (dict(per_device_train_batch_size=3, rollout_batch_size=3), "must be even"),
             (dict(beta=0), "beta must be > 0"),
             (dict(sampling_dtype="bfloat16"), "offered by grpo, rloo and ppo only")]
    for kw, message in cases:
        with pytest.raises(ConfigError, match=message):
            spin_config(fx, tmp_path, **kw)
    assert spin_config(fx, tmp_path).reward_funcs == []  # no reward needed
    prompts_only = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p, _ in PAIRS])
    with pytest.raises(ConfigError, match="'prompt' format, which this stage cannot train on"):
        train_spin(spin_config(fx, tmp_path / "a", dataset=str(prompts_only)))
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                                 {"role": "assistant", "content": "yo"}]},
                                                   {"messages": [{"role": "user", "content": "hi"},
                                                                 {"role": "assistant", "content": "yo"},
                                                                 {"role": "user", "content": "and?"}]}])
    with pytest.raises(DataError, match="line 2.*spin needs a response to imitate"):
        train_spin(spin_config(fx, tmp_path / "b", dataset=str(mixed)))
    assert not (tmp_path / "b" / "model.safetensors").exists()


def launched_job(tmp_path_factory, model_dir, out):
    """2 processes (DDP), LoRA, 2 prompts per process, two iterations of one step."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    fx = {"sft": grpo_fixtures(tmp_path_factory, tok) / "sft", "data": out.parent / "spin_data"}
    fx["data"].mkdir(parents=True, exist_ok=True)
    write_jsonl(fx["data"] / "sft.jsonl", [{"prompt": p, "completion": c} for p, c in PAIRS])
    return "spin", spin_config(fx, out, num_iterations=2, per_device_train_batch_size=2, finetuning_type="lora",
                               val_size=2), None


ENGINES = ("zero2", "zero3", "fsdp2")
register_launched("ddp", "spin_ddp", launched_job)
for _engine in ENGINES:
    register_launched(_engine, f"spin_{_engine}", launched_job)


@pytest.mark.slow
def test_two_processes_each_play_their_share(fx, tmp_path_factory, tiny_model_dir):
    """DDP on 2 CPU processes: each writes its own pool per iteration (its prompts' pairs), the first
    update's loss is log 2 (divided by the GLOBAL pair count), and the run ends with the adapter."""
    run = launched_run(tmp_path_factory, tiny_model_dir, "ddp", "spin_ddp")
    records = [r for r in read_metrics(run) if "loss" in r]
    assert [r["spin/iteration"] for r in records] == [1, 2]
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    for iteration in (0, 1):
        a, b = pool_lines(run, iteration, 0), pool_lines(run, iteration, 1)
        assert len(a) == len(b) == 2
    assert (run / "adapter_model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("engine", [pytest.param(e, marks=needs_deepspeed if e.startswith("zero") else ())
                                    for e in ENGINES])
def test_sharded_engines_follow_ddp(fx, tmp_path_factory, tiny_model_dir, engine):
    """The same 2-process run under DeepSpeed ZeRO-2 / ZeRO-3 / FSDP2 and under DDP (ZeRO-3 and FSDP2:
    the LoRA policy sharded, its parameters gathered to sample the opponent and to take the pool's
    reference log-probs): the same pools (each rank its own prompts and seed), curves and adapter (the
    engines reduce and clip in another order: within 1e-4)."""
    ddp = launched_run(tmp_path_factory, tiny_model_dir, "ddp", "spin_ddp")
    sharded = launched_run(tmp_path_factory, tiny_model_dir, engine, f"spin_{engine}")
    for iteration in (0, 1):
        for rank in (0, 1):
            a, b = pool_lines(sharded, iteration, rank), pool_lines(ddp, iteration, rank)
            assert [x["rejected"] for x in a] == [x["rejected"] for x in b]
            for x, y in zip(a, b):
                assert x["ref_logps"] == pytest.approx(y["ref_logps"], rel=1e-4, abs=1e-5)
    assert [r["step"] for r in read_metrics(ddp)] == [0, 1, 2]
    assert_sharded_follows_ddp(sharded, ddp, engine, ("loss", "grad_norm", "rewards/margins", "logps/chosen",
                                                      "pairs/identical", "eval/kl", "eval/length"))
