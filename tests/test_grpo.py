"""GRPO / RLOO stage on tiny untrained models: exact first ratio, every parameter trained, flat groups
train nothing, dynamic sampling, resume (also after SIGKILL), config errors before loading, bf16
precision, 2 processes = 1 process. The learning tests live in tests/test_grpo_learning.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import (
    assert_same_weights,
    build_once,
    launched_run,
    load_weights,
    read_metrics,
    register_launched,
    write_tiny_policy,
)
from safetensors.torch import load_file

from rlhfkit.config import build_config, dump_config
from rlhfkit.errors import ConfigError, RewardFunctionError
from rlhfkit.train.grpo import train_grpo

PROMPTS = ["The movie was", "This film is", "My friend said", "The plot", "What is 2 + 3?", "The cat",
           "Our trip was", "The book"]
ROOT = Path(__file__).resolve().parents[1]


def words_reward(prompts, completions, **kwargs):
    """More words score higher (varied within a group, so advantages are not all 0)."""
    return [len(c.split()) / 10 for c in completions]


def constant_reward(prompts, completions, **kwargs):
    """Every response scores 1: every group is flat."""
    return [1.0] * len(completions)


def slow_words_reward(prompts, completions, **kwargs):
    time.sleep(0.4)  # long enough to kill the process between two checkpoints
    return words_reward(prompts, completions)


def short_reward(prompts, completions, **kwargs):
    return [0.0] * (len(completions) - 1)


def grpo_fixtures(tmp_path_factory, tokenizer) -> Path:
    """An (untrained) tiny 'SFT' model and a prompt file; written once per session (shared by the
    xdist workers and the ddp launch of `launched_run`)."""
    return build_once(tmp_path_factory, "grpo_fx", lambda out: write_tiny_policy(out, tokenizer, PROMPTS))


@pytest.fixture(scope="module")
def fx(tmp_path_factory, tiny_tokenizer):
    return grpo_fixtures(tmp_path_factory, tiny_tokenizer)


TINY_RUN = dict(max_steps=1, max_new_tokens=6, report_to=[], disable_tqdm=True, learning_rate=1e-3, seed=0)
WORDS = dict(reward_funcs=["test_grpo:words_reward"])


def online_config(stage: str, model: Path, dataset: Path, out: Path, defaults: dict, overrides: dict):
    """The config of an online stage's tiny test run: `TINY_RUN` (one step, 6 new tokens, no trackers, no
    bar), then the test module's `defaults`, then the test's `overrides`."""
    return build_config(stage, {"model_name_or_path": str(model), "dataset": str(dataset), "output_dir": str(out),
                                **TINY_RUN, **defaults, **overrides})


def grpo_config(fx: Path, out: Path, stage: str = "grpo", **kw):
    return online_config(stage, fx / "sft", fx / "prompts.jsonl", out,
                         dict(WORDS, rollout_batch_size=4, num_generations=4, per_device_train_batch_size=8,
                              num_mini_batches=1), kw)


def initial_weights(c):
    from rlhfkit.models.load import apply_lora, load_causal_lm
    from rlhfkit.models.load import load_tokenizer

    tok = load_tokenizer(c.model_name_or_path)
    torch.manual_seed(c.seed)
    model = load_causal_lm(c.model_name_or_path, tok)
    if c.finetuning_type == "lora":
        model = apply_lora(model, rank=c.lora_rank, alpha=c.lora_alpha, dropout=0.0, target=c.lora_target)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kw", [dict(), dict(finetuning_type="lora", beta=0.04, num_iterations=2, num_mini_batches=2),
                                dict(importance_sampling_level="sequence", loss_aggregation="sequence", beta=0.04,
                                     num_iterations=2)],
                         ids=["full", "lora_beta_iterations", "gspo"])
def test_first_ratio_is_one_and_every_parameter_trains(fx, tmp_path, kw):
    """Two steps (LoRA's A matrices move once B is non-zero): the first ratio is exactly 1 (no old
    pass with num_iterations 1; the old pass in the training micro-batches otherwise) and every
    trained tensor changed."""
    c = grpo_config(fx, tmp_path / "run", max_steps=2, save_steps=1, **kw)
    initial = initial_weights(c)
    result = train_grpo(c)
    step1 = next(r for r in result.history if r["step"] == 1)
    assert step1["policy/first_ratio_dev"] == 0.0  # mean |ratio - 1| of the first update: every ratio is 1
    assert step1["policy/first_ratio"] == pytest.approx(1.0, abs=1e-7)
    after = load_file(str(tmp_path / "run" / "checkpoints" / "step-000001" / "model.safetensors"))
    assert set(after) == set(initial)
    unchanged = [n for n in initial if torch.equal(initial[n], after[n])]
    assert not unchanged, unchanged[:5]
    for key in ("rewards/mean", "rewards/flat_groups", "gen/length", "gen/eos_rate", "gen/truncated_rate", "loss",
                "policy/entropy", "grad_norm", "policy/clipfrac_low", "policy/clipfrac_high"):
        assert key in step1 and step1[key] == step1[key], key
    if c.beta > 0:
        assert step1["objective/kl"] == pytest.approx(0.0, abs=1e-6)  # the first batch comes from the reference
    assert (tmp_path / "run" / "summary.json").is_file()


def test_flat_groups_train_nothing_and_dynamic_sampling_is_bounded(fx, tmp_path):
    """A constant reward makes every group flat: zero advantages, zero gradient, unchanged weights;
    dynamic sampling draws max_sampling_rounds batches, then fills the batch with flat groups."""
    c = grpo_config(fx, tmp_path / "run", reward_funcs=["test_grpo:constant_reward"], dynamic_sampling=True,
                    max_sampling_rounds=3, max_steps=1, save_steps=None)
    initial = initial_weights(c)
    result = train_grpo(c)
    step1 = next(r for r in result.history if r["step"] == 1)
    assert step1["rewards/flat_groups"] == 1.0
    assert step1["rollout/sampling_rounds"] == 3 and step1["rollout/filled_flat_groups"] == 4
    assert step1["grad_norm"] == 0.0
    after = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert all(torch.equal(initial[n], after[n]) for n in initial)


def test_rloo_folds_the_kl_into_the_reward(fx, tmp_path):
    c = grpo_config(fx, tmp_path / "run", stage="rloo", max_steps=2, finetuning_type="lora")
    assert c.advantage_estimator == "rloo" and c.kl_goes_to_reward and c.beta == 0.05
    result = train_grpo(c)
    step1 = next(r for r in result.history if r["step"] == 1)
    assert step1["objective/kl"] == 0.0 and step1["policy/first_ratio_dev"] == 0.0
    assert "policy/kl_loss" not in step1  # the KL is in the reward, not the loss
    from peft import AutoPeftModelForCausalLM

    AutoPeftModelForCausalLM.from_pretrained(tmp_path / "run")


@pytest.mark.parametrize("stage", ["rloo", "reinforce_pp"])
def test_single_update_reads_old_logps_from_its_training_forward(fx, tmp_path, stage):
    """KL in the reward, one pass, one minibatch, one micro-batch per step: the old log-probs come from
    the training forward (no separate pass). The same runs with the batch accumulated over 2 and 4
    micro-batches (a separate old pass) give the same metrics and weights up to summation order."""
    kw = dict(advantage_estimator="reinforce_pp", beta=0.05, kl_in_reward=True) if stage == "reinforce_pp" else {}
    out = {}
    for micro in (16, 8, 4):
        out[micro] = tmp_path / f"micro{micro}"
        train_grpo(grpo_config(fx, out[micro], stage="grpo" if kw else stage, max_steps=2, logging_steps=1,
                               finetuning_type="lora", per_device_train_batch_size=micro, **kw))
    runs = {k: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for k, d in out.items()}
    step1 = next(r for r in runs[16] if r["step"] == 1 and "loss" in r)
    assert step1["objective/kl"] == 0.0 and step1["policy/first_ratio_dev"] == 0.0
    assert next(r for r in runs[16] if r["step"] == 2 and "loss" in r)["objective/kl"] != 0.0
    for micro in (8, 4):
        for a, b in zip(runs[16], runs[micro], strict=True):
            assert a.keys() == b.keys()
            for k in a:
                if not k.startswith("time/"):
                    assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (micro, a["step"], k)
    w16, w4 = (load_file(str(out[k] / "adapter_model.safetensors")) for k in (16, 4))
    for k in w16:
        # Adam divides a gradient by its own size: an element whose gradient is ~0 may differ by a
        # fraction of a step, so the tensors are compared in norm
        assert (w16[k] - w4[k]).norm() <= 1e-2 * w16[k].norm() + 1e-6, k


def test_resume_gives_the_same_weights(fx, tmp_path):
    kw = dict(max_steps=3, finetuning_type="lora", beta=0.04, num_iterations=2, dynamic_sampling=True)
    train_grpo(grpo_config(fx, tmp_path / "a", save_steps=2, **kw))
    ckpt = tmp_path / "a" / "checkpoints" / "step-000002"
    train_grpo(grpo_config(fx, tmp_path / "b", resume_from_checkpoint=str(ckpt), **kw))
    assert_same_weights(tmp_path / "a", tmp_path / "b", "adapter_model.safetensors")


@pytest.mark.slow
def test_resume_after_sigkill(fx, tmp_path):
    """`rlhfkit grpo` killed with SIGKILL during step 3 (checkpoint of step 2 on disk), then run again
    with resume_from_checkpoint: true, ends with the same weights and metrics as an uninterrupted run."""
    kw = dict(max_steps=4, save_steps=1, reward_funcs=["test_grpo:slow_words_reward"], logging_steps=1)
    cfg = tmp_path / "grpo.yaml"
    dump_config(grpo_config(fx, tmp_path / "killed", resume_from_checkpoint=True, **kw), cfg)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT / 'tests'}:{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "rlhfkit", "grpo", str(cfg)]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = tmp_path / "killed" / "checkpoints" / "step-000002" / "trainer_state.json"
    deadline = time.time() + 300
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert state.exists() and not (tmp_path / "killed" / "summary.json").exists(), proc.stderr.read()[-2000:]
    resumed = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    straight = train_grpo(grpo_config(fx, tmp_path / "straight", **kw))
    assert_same_weights(tmp_path / "straight", tmp_path / "killed")
    killed = [json.loads(line) for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in killed] == [1, 2, 3, 4]
    for a_rec, b_rec in zip(straight.history, killed):
        assert a_rec["rewards/mean"] == b_rec["rewards/mean"]


def test_config_errors_before_any_model_loads(fx, tmp_path):
    with pytest.raises(ConfigError, match="num_generations must be >= 2"):
        grpo_config(fx, tmp_path, num_generations=1, per_device_train_batch_size=4)
    with pytest.raises(ConfigError, match="must be divisible by per_device_train_batch_size"):
        grpo_config(fx, tmp_path, rollout_batch_size=3, num_generations=4, per_device_train_batch_size=8)
    with pytest.raises(ConfigError, match="kl_in_reward is set but beta is 0"):
        grpo_config(fx, tmp_path, kl_in_reward=True)
    with pytest.raises(ConfigError, match="scale_rewards applies to advantage_estimator grpo only"):
        grpo_config(fx, tmp_path, advantage_estimator="rloo", scale_rewards="batch")
    with pytest.raises(ConfigError, match="unknown reward function .exact_answr.*Did you mean .exact_answer"):
        grpo_config(fx, tmp_path, reward_funcs=["exact_answr"])
    with pytest.raises(ConfigError, match="gradient_accumulation_steps is derived in grpo"):
        grpo_config(fx, tmp_path, gradient_accumulation_steps=2)
    with pytest.raises(ConfigError, match="cannot import"):
        train_grpo(grpo_config(fx, tmp_path, reward_funcs=["no_such_module:f"]))
    assert not (tmp_path / "config.yaml").exists()  # failed before the run started


def test_trl_grpo_names_translate(fx, tmp_path, capsys):
    """TRL GRPOConfig habits: max_completion_length is max_new_tokens; loss_type names our
    loss_aggregation (grpo: per sequence, dapo/bnpo: per token, dr_grpo: constant). In dpo
    `loss_type` stays DPO's own key."""
    values = grpo_config(fx, tmp_path).model_dump(exclude_unset=True)
    del values["max_new_tokens"]
    c = build_config("grpo", {**values, "max_completion_length": 5, "loss_type": "dr_grpo"})
    assert (c.max_new_tokens, c.loss_aggregation) == (5, "constant")
    assert "loss_type: dr_grpo -> loss_aggregation: constant" in capsys.readouterr().out
    for theirs, ours in (("grpo", "sequence"), ("dapo", "token"), ("bnpo", "token")):
        assert grpo_config(fx, tmp_path, stage="rloo", loss_type=theirs).loss_aggregation == ours
    with pytest.raises(ConfigError, match="loss_type: 'sigmoid' is not one of TRL's"):
        grpo_config(fx, tmp_path, loss_type="sigmoid")
    with pytest.raises(ConfigError, match="disagree"):
        grpo_config(fx, tmp_path, max_completion_length=5, max_new_tokens=6)
    with pytest.raises(ConfigError, match="disagree"):
        grpo_config(fx, tmp_path, loss_type="grpo", loss_aggregation="token")
    with pytest.raises(ConfigError, match="unknown key 'max_completion_len'.*max_completion_length"):
        grpo_config(fx, tmp_path, max_completion_len=5)


def test_reward_function_of_the_wrong_length_names_it(fx, tmp_path):
    with pytest.raises(RewardFunctionError, match="short_reward.* returned 15 values for 16 completions"):
        train_grpo(grpo_config(fx, tmp_path, reward_funcs=["test_grpo:short_reward"]))


@pytest.mark.parametrize("stage", ["grpo", "ppo"])
def test_bf16_first_ratio_is_one(fx, tmp_path, stage):
    """Under bf16 autocast every pass (sampling, old, reference, training) runs in the same precision
    context, so the first ratio is still exactly 1 and the KL at the first step exactly 0."""
    if stage == "grpo":
        result = train_grpo(grpo_config(fx, tmp_path, bf16=True, beta=0.04, num_iterations=2, max_new_tokens=4))
    else:
        from rlhfkit.train.ppo import train_ppo

        result = train_ppo(build_config("ppo", dict(
            model_name_or_path=str(fx / "sft"), dataset=str(fx / "prompts.jsonl"), output_dir=str(tmp_path),
            reward_funcs=["test_grpo:words_reward"], rollout_batch_size=4, per_device_train_batch_size=2,
            num_mini_batches=2, num_ppo_epochs=1, max_steps=1, max_new_tokens=4, report_to=[], disable_tqdm=True,
            bf16=True, seed=0)))
    step1 = next(r for r in result.history if r["step"] == 1)
    assert step1.get("policy/first_ratio_dev", 0.0) == 0.0 and step1["policy/first_ratio"] == pytest.approx(1.0, abs=1e-7)
    assert step1["objective/kl"] == 0.0


@pytest.mark.parametrize("stage", ["grpo", "rloo"])
def test_bf16_sampling_runs_with_importance_weights(fx, tmp_path, stage):
    """sampling_dtype bfloat16: the sampler's linear layers run in bf16, so its log-probs differ a
    little from the float32 policy's (logp_gap > 0, importance weights near 1); the ratio to the
    float32 old policy is still exactly 1 at the first update."""
    result = train_grpo(grpo_config(fx, tmp_path, stage=stage, sampling_dtype="bfloat16", finetuning_type="lora",
                                    max_steps=2, max_new_tokens=8))
    for rec in result.history:
        if "loss" not in rec:
            continue
        assert 0 < rec["sampling/logp_gap"] < 0.05
        assert 0.95 < rec["sampling/is_weight"] < 1.05 and 0 <= rec["sampling/is_capped"] < 0.05
    step1 = next(r for r in result.history if r["step"] == 1)
    assert step1["policy/first_ratio_dev"] == 0.0


def test_importance_weights_multiply_each_tokens_policy_gradient(fx, tmp_path):
    """grpo_micro_loss with recorded sampling log-probs: at ratio 1 the token-aggregated loss's
    gradient in each token's log-prob is -A w / n_tokens with w = min(pi_old / pi_sampler, cap);
    here w = [0.5, 1, 2 (3 capped)] and [1.5, 1 | pad]."""
    from helpers import importance_sampling_case

    from rlhfkit.train.grpo import grpo_micro_loss

    c = grpo_config(fx, tmp_path, sampling_is_cap=2.0, loss_aggregation="token")
    logps, mask, ro, w = importance_sampling_case(group_size=2)
    advantages = torch.tensor([1.0, -2.0])
    data = {"advantages": advantages, "loss_mask": mask}
    loss, stats = grpo_micro_loss(None, ro, data, torch.arange(2), c, n_tokens=5.0, n_sequences=2.0,
                                  forward=(logps, torch.zeros(2, 3)))
    loss.backward()
    torch.testing.assert_close(logps.grad, -advantages[:, None] * w / 5.0)
    assert stats["sampling/is_capped"] == pytest.approx(1 / 5)
    assert stats["sampling/is_weight"] == pytest.approx((0.5 + 1 + 2 + 1.5 + 1) / 5)


def test_bf16_sampling_config_errors(fx, tmp_path):
    with pytest.raises(ConfigError, match="sampling_is_cap must be >= 1"):
        grpo_config(fx, tmp_path, sampling_dtype="bfloat16", sampling_is_cap=0.5)
    with pytest.raises(ConfigError, match="sampling_dtype: bfloat16 is offered by grpo, rloo and ppo only"):
        build_config("online_dpo", dict(model_name_or_path=str(fx / "sft"), dataset=str(fx / "prompts.jsonl"),
                                        output_dir=str(tmp_path), reward_funcs=["test_grpo:words_reward"],
                                        sampling_dtype="bfloat16"))
    with pytest.raises(ConfigError, match="sampling_dtype"):
        grpo_config(fx, tmp_path, sampling_dtype="float16")


DDP_STAGE = "rloo"
DDP_COMMON = dict(max_steps=2, top_k=1, temperature=1.0, logging_steps=1, num_generations=2,
                  per_device_train_batch_size=2, finetuning_type="lora", num_mini_batches=2)


def ddp_job(tmp_path_factory, model_dir: Path, out: Path):
    """The DDP run of test_two_processes_match_one (in the ddp launch of `launched_run`; tests/ is on
    the launched processes' path: the reward function lives in this module)."""
    from transformers import AutoTokenizer

    fx = grpo_fixtures(tmp_path_factory, AutoTokenizer.from_pretrained(model_dir))
    return DDP_STAGE, grpo_config(fx, out, stage=DDP_STAGE, **DDP_COMMON), None


register_launched("ddp", "rloo_ddp", ddp_job)


@pytest.mark.slow
def test_two_processes_match_one(fx, tmp_path_factory, tiny_model_dir, tmp_path):
    """DDP on 2 CPU processes (gloo; `accelerate launch` with configs/accelerate/ddp.yaml) x 2 prompts
    follows the same updates as one process x 4 prompts: groups stay whole on one process, the
    advantages are per group, the loss is normalised by the token counts of the whole batch, gradients
    are summed. Sampling with top_k 1 makes every rollout a function of its prompt alone. rloo (grpo's
    code with its own estimator) with LoRA and 2 minibatches; full fine-tuning under DDP is launched by
    the dpo, rm and ppo tests, and grpo itself under fsdp2 in test_scaleout_online.py."""
    (tmp_path / "ddp").symlink_to(launched_run(tmp_path_factory, tiny_model_dir, "ddp", "rloo_ddp"))
    train_grpo(grpo_config(fx, tmp_path / "single", stage=DDP_STAGE, **DDP_COMMON))

    ddp, single = read_metrics(tmp_path / "ddp"), read_metrics(tmp_path / "single")
    assert len(ddp) == len(single) == 2
    for a, b in zip(ddp, single):
        for k in ("rewards/mean", "loss", "grad_norm", "gen/length", "policy/entropy"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k
    w_ddp, w_single = (load_weights(tmp_path / d, "adapter_model.safetensors") for d in ("ddp", "single"))
    for n, value in w_single.items():
        torch.testing.assert_close(w_ddp[n], value, atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.slow
def test_arithmetic_demo_runs_sft_then_grpo(tmp_path):
    """`rlhfkit demo --task arithmetic --quick`: pt -> sft -> grpo, a report with held-out accuracy
    before and after (quick: too few steps to expect learning; tests/test_grpo_learning.py measures it)."""
    from rlhfkit.cli import main

    assert main(["demo", "--task", "arithmetic", "--quick", "--output-dir", str(tmp_path / "demo")]) == 0
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert set(report) == {"initial_eval/accuracy", "eval/accuracy", "initial_eval/gold_reward", "eval/gold_reward"}
    assert all(0.0 <= report[k] <= 1.0 for k in ("initial_eval/accuracy", "eval/accuracy"))
    text = (tmp_path / "demo" / "report.md").read_text()
    assert "| SFT (GRPO step 0) |" in text and "| GRPO (4 steps) |" in text
    assert (tmp_path / "demo" / "grpo" / "model.safetensors").is_file()


def test_gradient_checkpointing_reaches_the_policy_and_changes_nothing(fx, tmp_path, monkeypatch):
    """`gradient_checkpointing: true`: every training (grad) pass of a decoder layer of the policy runs
    checkpointed (the layer's flag on, in train mode); the metrics are those of the run without."""
    import rlhfkit.train.online as online_mod  # build_roles: the policy of grpo, rloo and online_dpo

    seen = set()
    build = online_mod.build_model

    def spy(*args, **kwargs):
        model = build(*args, **kwargs)
        layer = next(m for m in model.modules() if type(m).__name__.endswith("DecoderLayer"))
        layer.register_forward_hook(lambda module, *a: seen.add(bool(module.gradient_checkpointing and module.training))
                                    if torch.is_grad_enabled() else None)
        return model

    monkeypatch.setattr(online_mod, "build_model", spy)
    out, flags = {}, {}
    for ckpt in (False, True):
        seen.clear()
        out[ckpt] = train_grpo(grpo_config(fx, tmp_path / str(ckpt), stage="rloo", finetuning_type="lora",
                                           gradient_checkpointing=ckpt, max_steps=2, logging_steps=1)).history
        flags[ckpt] = set(seen)
    assert flags == {False: {False}, True: {True}}
    for a, b in zip(out[False], out[True], strict=True):
        for k in a:
            if not k.startswith("time/"):
                assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), (a["step"], k)


SEEN_COLUMNS: list[dict] = []


def hh_reward(prompts, completions, chosen, rejected, **kwargs):
    """Records what an HH preference row passes: the conversation as the prompt, the replies as columns."""
    SEEN_COLUMNS.append({"prompts": prompts, "completions": completions, "chosen": chosen, "rejected": rejected})
    return [len(c[0]["content"].split()) / 10 for c in completions]  # conversational: TRL's message lists


def test_conversations_give_the_turns_before_their_last_reply_as_the_prompt(fx, tmp_path):
    """`messages` rows as online prompts (they used to fail with KeyError 'prompt'): the conversation
    before its last assistant reply is the prompt; that reply reaches reward functions as `completion`."""
    seen = []

    def reward(prompts, completions, completion, **kwargs):
        seen.append((prompts, completion))
        return [0.0] * len(completions)

    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": a}]}) + "\n"
                            for q, a in [("hi", "yo"), ("one", "two"), ("up", "down"), ("in", "out")]))
    import test_grpo

    test_grpo.chat_reward = reward
    train_grpo(grpo_config(fx, tmp_path / "run", dataset=str(path), dataset_format=None,
                           reward_funcs=["test_grpo:chat_reward"]))
    prompts, replies = seen[0]
    assert sorted(p[0]["content"] for p in prompts[::4]) == ["hi", "in", "one", "up"]
    assert all(len(p) == 1 and p[0]["role"] == "user" for p in prompts)
    answer = {"hi": "yo", "one": "two", "up": "down", "in": "out"}
    assert all(r == [{"role": "assistant", "content": answer[p[0]["content"]]}] for p, r in zip(prompts, replies))


def test_preference_rows_give_their_conversation_as_the_prompt(fx, tmp_path):
    """HH-RLHF transcripts (no `prompt` column) as online prompts: the shared conversation is the prompt
    (a message list, through the chat template) and the two replies reach reward functions as columns."""
    human = ["How do I bake bread?", "What is the capital of France?", "Tell me a joke.", "Is it going to rain?"]
    path = tmp_path / "hh.jsonl"
    path.write_text("".join(json.dumps({"chosen": f"\n\nHuman: {h}\n\nAssistant: Sure, here you go.",
                                        "rejected": f"\n\nHuman: {h}\n\nAssistant: No."}) + "\n" for h in human))
    SEEN_COLUMNS.clear()
    c = grpo_config(fx, tmp_path / "run", dataset=str(path), dataset_format=None,
                    reward_funcs=["test_grpo:hh_reward"], chat_template="{% for m in messages %}<{{ m['role'] }}>"
                    "{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    train_grpo(c)
    seen = SEEN_COLUMNS[0]
    assert sorted(p[0]["content"] for p in seen["prompts"][::4]) == sorted(human)
    assert all(p == [{"role": "user", "content": p[0]["content"]}] for p in seen["prompts"])
    assert {r[0]["content"] if isinstance(r, list) else r for r in seen["chosen"]} == {"Sure, here you go."}
    assert build_config("grpo", {**c.model_dump(), "dataset_format": "preference"}).dataset_format == "preference"
