"""vLLM as the rollout engine (`use_vllm`, rollout/vllm_engine.py): against rlhfkit's own sampler on the
arithmetic SFT model, token for token and log-prob for log-prob; weights that follow the model (full,
LoRA merged, adapters disabled); errors; and GRPO learning through it.

vLLM runs under its own interpreter: `make vllm` builds .venv-vllm (`make test` does), or set
RLHFKIT_VLLM_PYTHON. Without one these tests skip (`make unit`); `.ci/run` builds it, so CI runs them.
One engine serves the unit tests of this module (start-up ~30 s); the stage runs start their own.
"""

from __future__ import annotations

import copy
import json
import os
import signal
from pathlib import Path

import pytest
import torch
from helpers import REPO, assert_same_weights, read_summary

from rlhfkit.config import build_config
from rlhfkit.errors import ConfigError
from rlhfkit.models.load import load_causal_lm, load_tokenizer
from rlhfkit.rollout.generate import HFGenerator, SamplingParams

VLLM_PYTHON = os.environ.get("RLHFKIT_VLLM_PYTHON") or str(REPO / ".venv-vllm" / "bin" / "python")

pytestmark = pytest.mark.skipif(not Path(VLLM_PYTHON).exists(),
                                reason=f"no vLLM interpreter at {VLLM_PYTHON} (`make vllm`, or RLHFKIT_VLLM_PYTHON)")


@pytest.fixture(scope="module")
def arith(arithmetic_sft):
    """(model, tokenizer, held-out prompt ids) of the arithmetic SFT model: it answers in a few tokens
    and ends with EOS, so ends, pads and masks are exercised."""
    from rlhfkit.rollout.rollout import encode_prompts
    from rlhfkit.tasks import get_task

    path = str(arithmetic_sft["sft"])
    tok = load_tokenizer(path)
    model = load_causal_lm(path, tok).eval()
    rows = get_task("arithmetic").make("prompt", 24, seed=0, split="eval")
    ids, _, skipped = encode_prompts(tok, rows, 64)
    assert len(ids) == 24 and not skipped
    return model, tok, ids


@pytest.fixture(scope="module")
def engine(arith, tmp_path_factory):
    from rlhfkit.rollout.vllm_engine import VLLMGenerator

    _, tok, _ = arith
    gen = VLLMGenerator(tok, python=VLLM_PYTHON, max_model_len=128,
                        log_path=str(tmp_path_factory.mktemp("vllm") / "vllm.log"))
    yield gen
    gen.close()


GREEDY = SamplingParams(max_new_tokens=8, do_sample=False)


def _same(a, b) -> None:
    assert torch.equal(a.response_ids, b.response_ids)
    assert torch.equal(a.response_mask, b.response_mask)
    assert torch.equal(a.ended, b.ended)
    assert a.texts == b.texts


def test_greedy_equals_rlhfkit_sampler(arith, engine):
    model, tok, prompts = arith
    ours = HFGenerator(tok).generate(model, prompts, GREEDY)
    theirs = engine.generate(model, prompts, GREEDY)
    _same(theirs, ours)
    assert theirs.ended.all() and (theirs.response_mask.sum(-1) < GREEDY.max_new_tokens).all()
    assert all(r[m][-1] == tok.eos_token_id for r, m in zip(theirs.response_ids, theirs.response_mask))  # EOS kept
    assert (theirs.response_ids[~theirs.response_mask] == tok.pad_token_id).all()  # then pad


def test_sampled_logps_are_the_trainers_and_seeds_fix_samples(arith, engine):
    """Each sampled token's recorded log-prob (temperature applied, pad excluded) equals the trainer's
    recomputation; the same seeds give the same samples, row by row whatever shares the batch."""
    from rlhfkit.models.logprobs import response_logps
    from rlhfkit.rollout.rollout import lay_out

    model, tok, prompts = arith
    params = SamplingParams(max_new_tokens=8, temperature=1.5)
    gen = engine.generate(model, prompts, params, generator_seed=3, num_generations=4, record_logps=True)
    assert gen.sampling_logps is not None and len(set(gen.texts)) > len(prompts)  # samples, not copies
    assert not (gen.response_ids[gen.response_mask] == tok.pad_token_id).any()
    ro = lay_out(gen.prompt_ids, gen.response_ids, gen.response_mask, gen.ended, ~gen.ended, gen.texts,
                 [{}] * len(gen.texts), tok.pad_token_id, "cpu")
    trainer, _ = response_logps(model, ro.input_ids, ro.attention_mask, ro.context_length, params.temperature,
                                suppress_ids=[tok.pad_token_id])
    diff = (trainer - gen.sampling_logps)[gen.response_mask].abs()
    assert diff.max() < 1e-4, diff.max()
    again = engine.generate(model, prompts, params, generator_seed=3, num_generations=4)
    assert torch.equal(again.response_ids, gen.response_ids)
    other = engine.generate(model, prompts, params, generator_seed=4, num_generations=4)
    assert not torch.equal(other.response_ids, gen.response_ids)
    seeds = list(range(100, 100 + 4 * len(prompts)))
    whole = engine.generate(model, prompts, params, num_generations=4, sample_seeds=seeds)
    part = engine.generate(model, prompts[5:7], params, num_generations=4, sample_seeds=seeds[20:28])
    assert part.texts == whole.texts[20:28]


def test_engine_weights_follow_the_model(arith, engine):
    """Before every call the engine gets the model's current weights: a perturbed copy samples what
    rlhfkit's sampler samples from it, and the original afterwards its own answers again."""
    model, tok, prompts = arith
    changed = copy.deepcopy(model)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in changed.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3 * p.std().nan_to_num(0.02))
    base = HFGenerator(tok).generate(model, prompts, GREEDY)
    ours = HFGenerator(tok).generate(changed, prompts, GREEDY)
    assert ours.texts != base.texts
    _same(engine.generate(changed, prompts, GREEDY), ours)
    _same(engine.generate(model, prompts, GREEDY), base)


def test_lora_is_merged_and_the_reference_is_the_base(arith, engine):
    """A LoRA policy samples with its adapters merged; with them disabled (the reference under LoRA) it
    is the base; the policy's own weights are left bit-exactly as they were."""
    from rlhfkit.models.load import apply_lora
    from rlhfkit.train.online import adapters_disabled

    model, tok, prompts = arith
    policy = apply_lora(copy.deepcopy(model), rank=8, alpha=16, dropout=0.0, target="all-linear")
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    base = HFGenerator(tok).generate(model, prompts, GREEDY)
    ours = HFGenerator(tok).generate(policy, prompts, GREEDY)
    assert ours.texts != base.texts
    _same(engine.generate(policy, prompts, GREEDY), ours)
    with adapters_disabled(policy) as reference:
        _same(engine.generate(reference, prompts, GREEDY), base)
    assert all(torch.equal(before[k], v) for k, v in policy.state_dict().items())


def test_a_batch_longer_than_a_scheduling_step_keeps_per_row_seeds(arith, engine):
    """64 prompts of 120 tokens (more prompt tokens than vLLM's 4096 per scheduling step): sampled with
    per-row seeds without error (chunked prefill rewinds a seeded generator, which vLLM's CPU build
    cannot: without rlhfkit turning chunking off on a CPU, "CPU Generator does not use offset"), each
    row as it is when sampled in a smaller batch."""
    model, tok, prompts = arith
    long = [(prompts[i % len(prompts)] * 40)[:120] for i in range(64)]
    params = SamplingParams(max_new_tokens=4, temperature=1.5)
    seeds = list(range(500, 500 + len(long)))
    whole = engine.generate(model, long, params, sample_seeds=seeds)
    part = engine.generate(model, long[56:], params, sample_seeds=seeds[56:])
    assert part.texts == whole.texts[56:]


def test_stop_strings_end_responses(arith, engine):
    """A response ends at the token that completes a stop string (kept), counted as ended."""
    model, tok, prompts = arith
    params = SamplingParams(max_new_tokens=8, temperature=1.5, stop=("1",))
    gen = engine.generate(model, prompts, params, generator_seed=0, num_generations=4)
    stopped = [i for i, t in enumerate(gen.texts) if "1" in t]
    assert stopped
    for i in stopped:
        ids = gen.response_ids[i][gen.response_mask[i]]
        assert gen.ended[i] and "1" not in tok.decode(ids[:-1], skip_special_tokens=True)


def test_refused_inputs(arith, engine, tmp_path):
    from rlhfkit.rollout.vllm_engine import check_vllm_python

    model, tok, prompts = arith
    with pytest.raises(ValueError, match="top_k / top_p"):
        engine.generate(model, prompts, SamplingParams(max_new_tokens=4, top_k=5), record_logps=True)
    with pytest.raises(ValueError, match="max_model_len"):
        engine.generate(model, [prompts[0] * 40], GREEDY)
    with pytest.raises(ConfigError, match="vllm_python: .* is not an executable"):
        check_vllm_python(str(tmp_path / "no-python"))
    with pytest.raises(ConfigError, match="vLLM is not installed"):
        check_vllm_python(None)  # this interpreter (rlhfkit's venv) has no vllm


def test_generate_file_runs_its_own_engine_and_a_dead_engine_is_a_clear_error(arith, tmp_path, monkeypatch):
    """`generate_file` with `vllm_python` (the CLI's path) starts its own engine (the model's dtype, its
    log next to OUT); the engine killed before the second batch: a VLLMError, the engine closed and
    cleaned up, and the first batch kept in OUT for a resume."""
    from helpers import write_jsonl

    from rlhfkit.rollout import vllm_engine
    from rlhfkit.tasks import get_task
    from rlhfkit.use.generate import GenerateOptions, generate_file

    model, tok, _ = arith
    started, real = [], vllm_engine.VLLMGenerator.generate

    def generate(self, *args, **kwargs):
        started.append(self)
        if len(started) == 2:
            os.kill(self._proc.pid, signal.SIGKILL)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(vllm_engine.VLLMGenerator, "generate", generate)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", get_task("arithmetic").make("prompt", 8, seed=1, split="eval"))
    out = tmp_path / "out.jsonl"
    with pytest.raises(vllm_engine.VLLMError, match="exited with code"):
        generate_file(model, tok, str(prompts), out, GenerateOptions(max_new_tokens=8, temperature=0, batch_size=5,
                                                                     vllm_python=VLLM_PYTHON), quiet=True)
    gen = started[0]
    assert gen is started[1] and gen.engine_dtype == "float32" and gen.vllm_version
    assert gen._proc is None and gen._scratch is None  # closed and cleaned up: a next call starts a new engine
    assert [json.loads(line)["row"] for line in open(out)] == [0, 1, 2, 3, 4]
    assert "vllm" in (tmp_path / "out.jsonl.vllm.log").read_text().lower()


def test_an_engine_that_cannot_start_is_a_clear_error(arith, tmp_path):
    """The server run by an interpreter without vLLM (bypassing `check_vllm_python`): its start-up error
    comes back with the hint to set vllm_python."""
    import sys

    from rlhfkit.rollout.vllm_engine import VLLMError, VLLMGenerator

    model, tok, prompts = arith
    gen = VLLMGenerator(tok, python=sys.executable, max_model_len=64, log_path=str(tmp_path / "vllm.log"))
    with pytest.raises(VLLMError, match="(?s)failed to start.*No module named 'vllm'.*set vllm_python"):
        gen.generate(model, prompts[:2], GREEDY)
    assert gen._proc is None


def test_generate_command_through_vllm(arith, engine, tmp_path):
    """`rlhfkit generate --vllm-python`: greedy answers equal rlhfkit's sampler's; resuming the file with
    the other engine is refused; top-k sampling is taken when no log-probs are recorded (generate's case)."""
    from helpers import write_jsonl

    from rlhfkit.tasks import get_task
    from rlhfkit.use.generate import GenerateOptions, generate_file

    model, tok, ids = arith
    prompts = write_jsonl(tmp_path / "prompts.jsonl", get_task("arithmetic").make("prompt", 12, seed=1, split="eval"))
    greedy = GenerateOptions(max_new_tokens=8, temperature=0, batch_size=5)
    generate_file(model, tok, str(prompts), tmp_path / "hf.jsonl", greedy, quiet=True)
    through_vllm = GenerateOptions(**{**greedy.__dict__, "vllm_python": VLLM_PYTHON})
    generate_file(model, tok, str(prompts), tmp_path / "vllm.jsonl", through_vllm, quiet=True,
                  sampler=engine)  # the module's engine (the CLI's own is started by test_cli_generate_...)
    assert engine._proc is not None  # a sampler given is left running
    rows = [[json.loads(line) for line in open(tmp_path / f"{side}.jsonl")] for side in ("hf", "vllm")]
    assert [r["responses"] for r in rows[0]] == [r["responses"] for r in rows[1]]
    assert [r["finish_reasons"] for r in rows[1]] == [["stop"]] * 12
    with pytest.raises(ConfigError, match="other settings"):
        generate_file(model, tok, str(prompts), tmp_path / "vllm.jsonl", greedy, quiet=True)
    with pytest.raises(ConfigError, match="name different engines"):
        generate_file(model, tok, str(prompts), tmp_path / "other.jsonl", greedy, quiet=True, sampler=engine)
    gen = engine.generate(model, ids[:4], SamplingParams(max_new_tokens=8, temperature=1.0, top_k=1), generator_seed=0)
    assert gen.sampling_logps is None  # none recorded unless asked (generate's case, a stage without correction)
    _same(gen, engine.generate(model, ids[:4], GREEDY))  # top_k 1 is greedy: the setting reaches the engine


@pytest.mark.parametrize("stage,extra,match", [
    ("nash_md", {"reward_funcs": ["gold"], "task": "arithmetic"}, "use_vllm is offered by grpo, rloo, ppo"),
    ("rloo", {"reward_funcs": ["gold"], "task": "arithmetic", "top_k": 5}, "top_k / top_p with use_vllm"),
    ("grpo", {"reward_funcs": ["gold"], "task": "arithmetic", "top_p": 0.9}, "top_k / top_p with use_vllm"),
    ("grpo", {"reward_funcs": ["gold"], "task": "arithmetic", "vllm_gpu_memory_utilization": 0},
     "vllm_gpu_memory_utilization"),
])
def test_config_refuses(stage, extra, match):
    with pytest.raises(ConfigError, match=match):
        build_config(stage, dict(model_name_or_path="m", dataset="d.jsonl", output_dir="o", use_vllm=True, **extra))


def _arith_run(stage: str, arithmetic_sft, out: Path, **overrides):
    from test_grpo_learning import _run

    return _run(stage, dict(overrides, use_vllm=True, vllm_python=VLLM_PYTHON), arithmetic_sft, out)


@pytest.mark.slow
def test_grpo_through_vllm_raises_held_out_accuracy(arithmetic_sft, tmp_path):
    """test_grpo_learning's GRPO run with rollouts and evaluation sampled by vLLM (float32), each token's
    loss weighted by truncated importance sampling against vLLM's recorded log-probs: it learns like
    rlhfkit's own sampler (measured in the README, "vLLM rollouts")."""
    from test_grpo_learning import GRPO_LEARNING, _check_learned

    result = _arith_run("grpo", arithmetic_sft, tmp_path / "grpo", **GRPO_LEARNING)
    _check_learned(result)
    s = result.summary
    assert s["rollout_engine"].startswith("vllm ") and s["rollout_engine/sync_s"] > 0
    gaps = [r["sampling/logp_gap"] for r in result.history if "sampling/logp_gap" in r]
    assert gaps and all(0 <= g < 1e-3 for g in gaps)  # float32 kernels: the two distributions agree closely
    assert (tmp_path / "grpo" / "vllm.log").stat().st_size > 0


def test_xpo_lora_through_vllm_samples_policy_and_reference(arithmetic_sft, tmp_path):
    """XPO under LoRA samples the policy and the reference (adapters disabled) through one engine,
    alternating weights every step; a short run completes and reports the engine's timings."""
    from test_grpo_learning import COMMON

    result = _arith_run("xpo", arithmetic_sft, tmp_path / "xpo", **dict(
        COMMON, max_steps=3, rollout_batch_size=16, per_device_train_batch_size=32, eval_num_prompts=32,
        eval_steps=3, finetuning_type="lora", lora_rank=4, learning_rate=1e-3))
    s = read_summary(tmp_path / "xpo")
    assert s["rollout_engine"].startswith("vllm ") and s["steps"] == 3
    assert 0 < s["initial_eval/accuracy"] and "eval/accuracy" in s
    assert result.history[-1]["scores/reference"] is not None


def test_ppo_lora_through_vllm_with_four_roles_on_one_base(tmp_path_factory, tiny_tokenizer, tmp_path):
    """PPO under LoRA with the reward model an adapter on the same base (the usual pipeline: the base
    also holds adapters `critic` and `reward`): the engine samples the policy adapter alone; each token's
    policy loss is weighted by the truncated importance weight against vLLM's log-probs (near 1 in
    float32); the first ratio is still exactly 1. Resumed from its step-1 checkpoint (a new engine, given
    the checkpoint's weights and the same per-row seeds), it ends with the same adapters, bit for bit."""
    from test_ppo import ppo_config, ppo_fixtures

    from rlhfkit.train.ppo import train_ppo

    fx = ppo_fixtures(tmp_path_factory, tiny_tokenizer)
    kw = dict(finetuning_type="lora", reward_model=str(fx / "rm_lora"), max_steps=2, use_vllm=True,
              vllm_python=VLLM_PYTHON)
    result = train_ppo(ppo_config(fx, tmp_path / "a", save_steps=1, **kw))
    assert result.summary["rollout_engine"].startswith("vllm ") and result.summary["steps"] == 2
    records = [r for r in result.history if "loss" in r]
    assert [r["step"] for r in records] == [1, 2] and records[0]["policy/first_ratio"] == 1.0
    for r in records:
        assert 0 <= r["sampling/logp_gap"] < 1e-3 and r["sampling/is_weight"] == pytest.approx(1.0, abs=1e-3)
    ckpt = tmp_path / "a" / "checkpoints" / "step-000001"
    resumed = train_ppo(ppo_config(fx, tmp_path / "b", resume_from_checkpoint=str(ckpt), **kw))
    assert resumed.summary["rollout_engine"].startswith("vllm ")
    assert_same_weights(tmp_path / "a", tmp_path / "b", "adapter_model.safetensors")
    assert_same_weights(tmp_path / "a" / "critic", tmp_path / "b" / "critic", "adapter_model.safetensors")


def test_spin_through_vllm_plays_the_same_greedy_opponent(tmp_path_factory, tiny_tokenizer, tmp_path):
    """spin with top_k 1 (taken: spin's loss does not use the sampler's probabilities): the opponent's
    responses through vLLM are rlhfkit's sampler's, so the pool and the step's loss are the same."""
    from test_spin import pool_lines, spin_config, spin_fixtures

    from rlhfkit.train.spin import train_spin

    fx = spin_fixtures(tmp_path_factory, tiny_tokenizer)
    runs = {}
    for side, extra in (("hf", {}), ("vllm", dict(use_vllm=True, vllm_python=VLLM_PYTHON))):
        runs[side] = train_spin(spin_config(fx, tmp_path / side, top_k=1, **extra))
        assert runs[side].history
    assert pool_lines(tmp_path / "vllm", 0) == pool_lines(tmp_path / "hf", 0)
    assert runs["vllm"].summary["rollout_engine"].startswith("vllm ")
    assert runs["vllm"].summary["loss"] == pytest.approx(runs["hf"].summary["loss"], abs=1e-6)


def test_self_reward_judges_through_vllm_beyond_the_rollout_context(tmp_path_factory, tiny_tokenizer, tmp_path):
    """self_reward samples its candidates and their judgements (judge_top_p taken) through one engine;
    the judge prompts (template + prompt + response) are longer than max_prompt_length +
    max_new_tokens, so the engine holds the model's whole context."""
    from test_self_reward import pool_lines, self_reward_fixtures, sr_config

    from rlhfkit.train.self_reward import train_self_reward

    fx = self_reward_fixtures(tmp_path_factory, tiny_tokenizer)
    template = "Rate the reply below from 0 to 5 points.\nRequest: {prompt}\nReply: {response}\nEnd with Score: <points>"
    c = sr_config(fx, tmp_path, judge_samples=2, max_prompt_length=16, judge_template=template, use_vllm=True,
                  vllm_python=VLLM_PYTHON)
    result = train_self_reward(c)
    step1 = next(r for r in result.history if r["step"] == 1)
    assert step1["judge/prompt_length"] > c.max_prompt_length + c.max_new_tokens
    for line in pool_lines(tmp_path, 0):
        assert len(line["candidates"]) == 3 and all(len(x["judgements"]) == 2 for x in line["candidates"])
    assert result.summary["rollout_engine"].startswith("vllm ")


def test_eval_through_vllm_equals_rlhfkit_sampler_at_top_k_1(arithmetic_sft, tmp_path):
    """`rlhfkit eval` with vllm_python: the model's engine started and stopped in turn (its log next to
    the output); at top_k 1 (greedy) the responses and metrics are rlhfkit's sampler's."""
    from rlhfkit.eval.compare import build_eval_config, run_eval

    def evaluate(out: str, **extra):
        return run_eval(build_eval_config(dict(models={"sft": str(arithmetic_sft["sft"])}, task="arithmetic",
                                               num_prompts=16, max_new_tokens=8, top_k=1, num_samples=16,
                                               output=str(tmp_path / out), disable_tqdm=True, **extra)),
                        printer=lambda *a: None)

    hf, vllm = evaluate("hf.json"), evaluate("vllm.json", vllm_python=VLLM_PYTHON)
    assert [x["responses"] for x in vllm["samples"]] == [x["responses"] for x in hf["samples"]]
    assert vllm["models"]["sft"]["metrics"] == hf["models"]["sft"]["metrics"]
    assert (tmp_path / "vllm.json.sft.vllm.log").stat().st_size > 0


def test_weight_file_is_rewritten_in_place(tmp_path):
    """`WeightFile`: the first weights written by safetensors, later ones written into the mapped file in
    place, read back by safetensors as the engine reads them; other tensors need a new file."""
    from safetensors.torch import load_file

    from rlhfkit.rollout.vllm_engine import WeightFile

    a = {"x.weight": torch.randn(3, 5), "y.bias": torch.randn(7)}
    b = {k: torch.randn_like(v) for k, v in a.items()}
    f = WeightFile(str(tmp_path / "w.safetensors"), iter(a.items()), torch.bfloat16)
    assert all(torch.equal(load_file(f.path)[k], v.bfloat16()) for k, v in a.items())
    assert f.fill(iter(b.items()))
    assert all(torch.equal(load_file(f.path)[k], v.bfloat16()) for k, v in b.items())
    assert not f.fill(iter({"x.weight": torch.randn(3, 5)}.items()))  # a tensor short
    assert not f.fill(iter({**b, "x.weight": torch.randn(5, 3)}.items()))  # another shape


def test_sharded_engines_refuse_vllm():
    from rlhfkit.train.engine import check_config

    config = build_config("grpo", dict(model_name_or_path="m", dataset="d.jsonl", output_dir="o", use_vllm=True,
                                       reward_funcs=["gold"], task="arithmetic"))
    for engine in ("zero2", "zero3", "fsdp2"):
        with pytest.raises(ConfigError, match=f"use_vllm under engine '{engine}'"):
            check_config(engine, config)
    check_config("single", config)
