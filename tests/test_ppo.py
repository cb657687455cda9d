"""PPO stage: roles and memory, rollout exactness, parameter updates, resume, config errors.

Tiny untrained models (built offline in about a second); the learning test lives in
tests/test_ppo_learning.py.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import torch
from helpers import assert_same_weights, build_once, launched_run, read_metrics, register_launched, write_tiny_policy
from safetensors.torch import load_file

from rlhfkit.config import build_config
from rlhfkit.errors import ConfigError
from rlhfkit.losses.masked import masked_sum
from rlhfkit.losses.policy import clipped_policy_loss
from rlhfkit.losses.ppo import score_index
from rlhfkit.models.logprobs import response_logps
from rlhfkit.models.reward import (
    Normalization,
    apply_reward_lora,
    build_reward_model,
    load_reward_model,
    save_normalization,
)
from rlhfkit.rollout.generate import HFGenerator, SamplingParams
from rlhfkit.train.ppo import (
    critic_values,
    generate_rollout,
    minibatch_plan,
    policy_logps,
    score_rollout,
    train_ppo,
)
from rlhfkit.train.ppo_roles import build_roles

PROMPTS = ["The movie was", "This film is", "My friend said", "The plot", "What is 2 + 3?", "The cat",
           "Our trip was", "The book"]


def length_reward(prompts, completions, ended, **columns):
    """A Python reward function (TRL convention): longer completions score higher."""
    assert len(columns["extra"]) == len(prompts)  # other dataset columns are passed through
    return [len(c.split()) / 10 for c in completions]


def ppo_fixtures(tmp_path_factory, tokenizer) -> Path:
    """An (untrained) tiny 'SFT' model, a full RM and a LoRA RM over it, and a prompt file; written once
    per session (shared by the xdist workers and the ddp launch of `launched_run`)."""
    def build(out: Path) -> None:
        write_tiny_policy(out, tokenizer, PROMPTS)
        rm = build_reward_model(str(out / "sft"), tokenizer)
        rm.save_pretrained(out / "rm_full")
        tokenizer.save_pretrained(out / "rm_full")
        save_normalization(out / "rm_full", Normalization(mean=0.3, std=2.0, divide_by_std=True))
        lora = apply_reward_lora(build_reward_model(str(out / "sft"), tokenizer),
                                 base_model_name_or_path=str((out / "sft").resolve()), rank=4, alpha=8,
                                 dropout=0.0, target="all-linear")
        with torch.no_grad():  # a trained-looking adapter (peft initialises B = 0)
            for name, p in lora.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
        lora.save_pretrained(out / "rm_lora")
        tokenizer.save_pretrained(out / "rm_lora")
        save_normalization(out / "rm_lora", Normalization(mean=-0.1, std=1.0))

    return build_once(tmp_path_factory, "ppo_fx", build)


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory, tiny_tokenizer):
    return ppo_fixtures(tmp_path_factory, tiny_tokenizer)


def ppo_config(fx: Path, out: Path, **kw):
    values = dict(model_name_or_path=str(fx / "sft"), dataset=str(fx / "prompts.jsonl"), output_dir=str(out),
                  reward_model=str(fx / "rm_full"), rollout_batch_size=8, per_device_train_batch_size=2,
                  num_mini_batches=2, num_ppo_epochs=2, max_steps=1, max_new_tokens=6, report_to=[],
                  disable_tqdm=True, learning_rate=1e-3, seed=0)
    values.update(kw)
    return build_config("ppo", values)


def make_rollout(roles, tok, c, n=8):
    ids = [tok(p)["input_ids"] for p in PROMPTS[:n]]
    rows = [{"prompt": p} for p in PROMPTS[:n]]
    params = SamplingParams(max_new_tokens=c.max_new_tokens, temperature=c.temperature)
    return generate_rollout(roles.policy, tok, HFGenerator(tok), ids, rows, params, seed=1, device="cpu",
                            score_slot=True)


@pytest.mark.parametrize("finetuning_type", ["full", "lora"])
def test_ratio_is_exactly_one_before_the_first_update(fixtures, tmp_path, tiny_tokenizer, finetuning_type):
    c = ppo_config(fixtures, tmp_path, finetuning_type=finetuning_type, reward_model=str(fixtures / "rm_lora"),
                   temperature=0.7)
    roles = build_roles(c, tiny_tokenizer, "cpu", printer=lambda *a: None)
    ro = make_rollout(roles, tiny_tokenizer, c)
    plan = minibatch_plan(8, c, step=0, epoch=0)
    data = score_rollout(roles, ro, c, [mb for mini in plan for mb in mini])
    roles.policy.train()  # training mode: dropout is off, so nothing may change
    for mb in plan[0]:  # the first minibatch of the first epoch, in its micro-batches
        logps, _ = policy_logps(roles.policy, ro, mb, c, with_entropy=True)
        m = ro.response_mask[mb]
        out = clipped_policy_loss(logps, data["logps"][mb], torch.randn_like(logps), m, epsilon=c.cliprange)
        assert (out["ratio"][m] == 1.0).all()
        assert masked_sum(out["clipped_low"] + out["clipped_high"], m) == 0
        values = critic_values(roles, ro, mb, c)
        assert torch.equal(values, data["values"][mb])
    # policy = reference at the start: the KL is exactly 0
    assert torch.equal(data["logps"], data["ref_logps"])


@pytest.mark.plots
def test_train_logs_first_ratio_one_and_metrics(fixtures, tmp_path):
    result = train_ppo(ppo_config(fixtures, tmp_path, task="sentiment", eval_num_prompts=4,
                                  missing_eos_score=-1.0))
    step = next(r for r in result.history if r["step"] == 1)
    assert step["policy/first_ratio"] == 1.0 and step["policy/first_clipfrac"] == 0.0
    for key in ("objective/kl", "objective/scores", "objective/rlhf_reward", "objective/entropy",
                "policy/clipfrac", "policy/approxkl", "val/clipfrac", "val/error", "gen/length",
                "gen/eos_rate", "lr", "eval/gold_reward", "eval/kl"):
        assert key in step and step[key] == step[key], key  # present and not NaN
    assert step["objective/kl"] == 0.0  # the first rollout comes from the reference policy itself
    assert (tmp_path / "summary.json").is_file() and (tmp_path / "plots" / "loss.png").is_file()
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert {"prompt", "response", "score"} <= set(samples[0])
    assert (tmp_path / "model.safetensors").is_file()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path)  # the policy; the critic in a subdirectory
    assert load_reward_model(tmp_path / "critic").score(torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.bool)).shape == (1,)


def test_lora_one_base_model_serves_four_roles(fixtures, tmp_path, tiny_tokenizer):
    """Parameters held in memory, each tensor counted once across all roles: under LoRA with a
    LoRA reward model on the same base they are the base + 3 adapters + 2 heads (< 1.1 x base);
    full fine-tuning holds 4 copies (policy, reference, critic, reward)."""
    lora = build_roles(ppo_config(fixtures, tmp_path, finetuning_type="lora", reward_model=str(fixtures / "rm_lora")),
                       tiny_tokenizer, "cpu", printer=lambda *a: None)
    full = build_roles(ppo_config(fixtures, tmp_path, reward_model=str(fixtures / "rm_full")),
                       tiny_tokenizer, "cpu", printer=lambda *a: None)
    n_base = sum(p.numel() for p in full.policy.parameters())
    lora_total, lora_roles = lora.unique_parameters()
    full_total, _ = full.unique_parameters()
    assert set(lora_roles) == {"policy", "reference", "critic", "reward"}
    assert lora_total < 1.1 * n_base, (lora_total, n_base)
    assert full_total > 3.9 * n_base, (full_total, n_base)
    assert lora.ref_model is None and lora.reward_scorer is None  # no second model anywhere

    # the shared-base reward equals the stand-alone LoRA reward model (normalised), and the critic
    # starts as that reward model: its value one past the last token is the normalised score
    c = ppo_config(fixtures, tmp_path)
    ro = make_rollout(lora, tiny_tokenizer, c)
    rows = torch.arange(8)
    scorer = load_reward_model(fixtures / "rm_lora")
    expected = scorer.score(ro.input_ids, ro.attention_mask)
    torch.testing.assert_close(lora.reward(ro.input_ids, ro.attention_mask), expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        values = critic_values(lora, ro, rows, c)
    at_score = values.gather(1, score_index(ro.response_mask)[:, None]).squeeze(1)
    torch.testing.assert_close(at_score, expected, atol=1e-5, rtol=1e-5)
    # the reference (adapters disabled) is the untouched SFT model
    sft = full.ref_model
    with lora.reference() as ref, torch.no_grad():
        a = policy_logps(ref, ro, rows, c)[0]
        b = policy_logps(sft, ro, rows, c)[0]
    torch.testing.assert_close(a, b)
    # switching adapters leaves the trainable set intact
    trained = lora._trainable_names[id(lora.policy)]  # by name: FSDP2 swaps the parameter objects
    assert trained and all(p.requires_grad == (n in trained) for n, p in lora.policy.named_parameters())
    assert not any(p.requires_grad for n, p in lora.policy.named_parameters() if ".reward." in n)


def test_full_rm_critic_starts_at_normalised_score(fixtures, tmp_path, tiny_tokenizer):
    c = ppo_config(fixtures, tmp_path)
    roles = build_roles(c, tiny_tokenizer, "cpu", printer=lambda *a: None)
    ro = make_rollout(roles, tiny_tokenizer, c)
    scores = roles.reward(ro.input_ids, ro.attention_mask)
    raw = load_reward_model(fixtures / "rm_full").raw_score(ro.input_ids, ro.attention_mask)
    torch.testing.assert_close(scores, (raw - 0.3) / 2.0)
    with torch.no_grad():
        values = critic_values(roles, ro, torch.arange(8), c)
    torch.testing.assert_close(values.gather(1, score_index(ro.response_mask)[:, None]).squeeze(1), scores,
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["full", "lora", "lora_separate_rm", "funcs"])
def test_every_trainable_parameter_changes(fixtures, tmp_path, tiny_tokenizer, mode):
    """One PPO step of 4 optimizer steps (2 epochs x 2 minibatches; LoRA's A matrices move from
    the second step on, once B is non-zero) changes every trained tensor; frozen ones stay."""
    kw = {"full": {}, "lora": dict(finetuning_type="lora", reward_model=str(fixtures / "rm_lora")),
          "lora_separate_rm": dict(finetuning_type="lora"),
          "funcs": dict(reward_model=None, reward_funcs=["test_ppo:length_reward"])}[mode]
    c = ppo_config(fixtures, tmp_path / "run", max_steps=2, save_steps=1, **kw)
    before = build_roles(c, tiny_tokenizer, "cpu", printer=lambda *a: None)
    initial = {n: p.detach().clone() for n, p in before.trainable.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in before.trainable.named_parameters() if not p.requires_grad}
    train_ppo(c)
    after = load_file(str(tmp_path / "run" / "checkpoints" / "step-000001" / "model.safetensors"))
    assert set(after) == set(initial)
    unchanged = [n for n in initial if torch.equal(initial[n], after[n])]
    assert not unchanged, unchanged[:5]
    assert bool(frozen) == mode.startswith("lora")  # LoRA: the base (and reward adapter) stay frozen


@pytest.mark.parametrize("mode", ["full", "lora", "lora_separate_rm", "funcs", "lora_funcs"])
def test_saved_critic_loads_as_a_reward_model(fixtures, tmp_path, tiny_tokenizer, mode):
    """output_dir/critic (every role layout) loads with load_reward_model, and its normalised score
    equals the (perturbed, i.e. trained-looking) critic's value read at the last real token."""
    from rlhfkit.train.ppo_roles import save_critic

    kw = {"full": {}, "lora": dict(finetuning_type="lora", reward_model=str(fixtures / "rm_lora")),
          "lora_separate_rm": dict(finetuning_type="lora"),
          "funcs": dict(reward_model=None, reward_funcs=["test_ppo:length_reward"]),
          "lora_funcs": dict(finetuning_type="lora", reward_model=None, reward_funcs=["test_ppo:length_reward"])}[mode]
    c = ppo_config(fixtures, tmp_path, **kw)
    roles = build_roles(c, tiny_tokenizer, "cpu", printer=lambda *a: None)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in roles.trainable.named_parameters():
            if p.requires_grad and (not name.startswith("policy.") or ".critic." in name):
                p.add_(torch.randn_like(p) * 0.05)
    ro = make_rollout(roles, tiny_tokenizer, c)
    with torch.no_grad():
        values = critic_values(roles, ro, torch.arange(8), c)
    expected = values.gather(1, score_index(ro.response_mask)[:, None]).squeeze(1)
    out = save_critic(tmp_path / "critic", roles, c, tiny_tokenizer)
    adapter = mode in ("lora", "lora_funcs")  # critic adapter on the policy's (reloadable) base
    assert (out / "adapter_config.json").is_file() == adapter and (out / "config.json").is_file() != adapter
    scorer = load_reward_model(out)
    torch.testing.assert_close(scorer.score(ro.input_ids, ro.attention_mask), expected, atol=1e-5, rtol=1e-5)


def test_resume_gives_the_same_weights(fixtures, tmp_path):
    """3 steps straight vs 2 steps, checkpoint, resume for the 3rd: identical policy weights
    (sampling seeds, minibatch order, optimizer, schedule and adaptive beta all restored)."""
    kw = dict(finetuning_type="lora", reward_model=str(fixtures / "rm_lora"), max_steps=3, target_kl=0.01,
              kl_horizon=100)
    straight = train_ppo(ppo_config(fixtures, tmp_path / "a", save_steps=2, **kw))
    ckpt = tmp_path / "a" / "checkpoints" / "step-000002"
    assert json.loads((ckpt / "trainer_state.json").read_text())["kl_coef"] != 0.05
    resumed = train_ppo(ppo_config(fixtures, tmp_path / "b", resume_from_checkpoint=str(ckpt), **kw))
    assert_same_weights(tmp_path / "a", tmp_path / "b", "adapter_model.safetensors")
    assert straight.summary["objective/kl_coef"] == resumed.summary["objective/kl_coef"]


def test_left_padding_does_not_change_logps_or_values(fixtures, tmp_path, tiny_tokenizer):
    c = ppo_config(fixtures, tmp_path)
    roles = build_roles(c, tiny_tokenizer, "cpu", printer=lambda *a: None)
    ro = make_rollout(roles, tiny_tokenizer, c)
    pad = tiny_tokenizer.pad_token_id
    ids = torch.nn.functional.pad(ro.input_ids, (3, 0), value=pad)
    mask = torch.nn.functional.pad(ro.attention_mask, (3, 0), value=False)
    with torch.no_grad():
        a = response_logps(roles.policy, ro.input_ids, ro.attention_mask, ro.context_length, 0.7)[0]
        b = response_logps(roles.policy, ids, mask, ro.context_length + 3, 0.7)[0]
        va = roles.values(ro.input_ids, ro.attention_mask, ro.context_length)
        vb = roles.values(ids, mask, ro.context_length + 3)
    m = ro.response_mask
    torch.testing.assert_close(a[m], b[m], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(va[m], vb[m], atol=1e-5, rtol=1e-5)


def test_config_errors_before_any_model_loads(fixtures, tmp_path):
    with pytest.raises(ConfigError, match="reward_model .* and/or reward_funcs"):
        ppo_config(fixtures, tmp_path, reward_model=None)
    with pytest.raises(ConfigError, match="reward_weights has 1 entries but there are 2"):
        ppo_config(fixtures, tmp_path, reward_funcs=["m:f"], reward_weights=[1.0])
    with pytest.raises(ConfigError, match="missing_eos_penalty or missing_eos_score"):
        ppo_config(fixtures, tmp_path, missing_eos_penalty=1.0, missing_eos_score=-1.0)
    with pytest.raises(ConfigError, match="divisible by per_device_train_batch_size"):
        ppo_config(fixtures, tmp_path, rollout_batch_size=12, num_mini_batches=2, per_device_train_batch_size=4)
    with pytest.raises(ConfigError, match="gradient_accumulation_steps is derived"):
        ppo_config(fixtures, tmp_path, gradient_accumulation_steps=2)
    with pytest.raises(ConfigError, match="cannot import 'no_such_module:f'"):
        train_ppo(ppo_config(fixtures, tmp_path, reward_funcs=["no_such_module:f"]))
    assert not (tmp_path / "config.yaml").exists()  # failed before the run started


DDP_COMMON = dict(rollout_batch_size=8, per_device_train_batch_size=2, num_mini_batches=1, num_ppo_epochs=2,
                  max_steps=2, top_k=1, logging_steps=1)


def ddp_config(fx: Path, out: Path, finetuning_type: str):
    # LoRA: one base serving all four roles, in each process
    extra = {"reward_model": str(fx / "rm_lora")} if finetuning_type == "lora" else {}
    return ppo_config(fx, out, finetuning_type=finetuning_type, **DDP_COMMON, **extra)


def ddp_job(finetuning_type: str):
    """The DDP runs of test_two_processes_match_one (in the ddp launch of `launched_run`)."""

    def job(tmp_path_factory, model_dir: Path, out: Path):
        from transformers import AutoTokenizer

        fx = ppo_fixtures(tmp_path_factory, AutoTokenizer.from_pretrained(model_dir))
        return "ppo", ddp_config(fx, out, finetuning_type), None

    return job


for _tuning in ("full", "lora"):
    register_launched("ddp", f"ppo_ddp_{_tuning}", ddp_job(_tuning))


@pytest.mark.slow
@pytest.mark.parametrize("finetuning_type", ["full", "lora"])
def test_two_processes_match_one(fixtures, tmp_path_factory, tiny_model_dir, tmp_path, finetuning_type):
    """DDP on 2 CPU processes (gloo; `accelerate launch` with configs/accelerate/ddp.yaml) x 4 episodes
    follows the same PPO updates as one process x 8 episodes: global advantage whitening, global token
    counts, gradients summed across processes. Sampling with top_k 1 makes every rollout a function of
    its prompt alone, and one minibatch per epoch makes the minibatches the same rows in both runs."""
    (tmp_path / "ddp").symlink_to(launched_run(tmp_path_factory, tiny_model_dir, "ddp", f"ppo_ddp_{finetuning_type}"))
    train_ppo(ddp_config(fixtures, tmp_path / "single", finetuning_type))
    def steps(out: Path) -> list[dict]:
        return [r for r in read_metrics(out) if "objective/kl" in r]

    ddp, single = steps(tmp_path / "ddp"), steps(tmp_path / "single")
    assert len(ddp) == len(single) == 2
    for a, b in zip(ddp, single):
        for k in ("objective/scores", "objective/kl", "policy/loss", "val/loss", "grad_norm", "gen/length"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), k
        assert a["policy/first_ratio"] == b["policy/first_ratio"] == 1.0
    name = "adapter_model.safetensors" if finetuning_type == "lora" else "model.safetensors"
    w_ddp = load_file(str(tmp_path / "ddp" / name))
    w_single = load_file(str(tmp_path / "single" / name))
    if finetuning_type == "full":
        initial = load_file(str(fixtures / "sft" / "model.safetensors"))
        assert any(not torch.equal(w_single[k], v) for k, v in initial.items())  # it trained
    else:  # peft starts lora_B at 0
        assert any(v.abs().max() > 0 for k, v in w_single.items() if "lora_B" in k)
    for name, value in w_single.items():
        torch.testing.assert_close(w_ddp[name], value, atol=1e-5, rtol=1e-4, msg=name)


def test_lora_policy_reloads_from_another_directory(fixtures, tmp_path, monkeypatch):
    """A LoRA PPO run given a RELATIVE model path records its base absolutely (one save path for every
    stage), so the adapter loads from anywhere."""
    import os

    from peft import AutoPeftModelForCausalLM

    monkeypatch.chdir(fixtures.parent)
    c = ppo_config(fixtures, tmp_path / "run", finetuning_type="lora",
                   model_name_or_path=os.path.relpath(fixtures / "sft", fixtures.parent))
    train_ppo(c)
    saved = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert Path(saved["base_model_name_or_path"]).is_absolute()
    monkeypatch.chdir(tmp_path)
    model = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "run")
    assert set(model.peft_config) == {"default"}  # the policy adapter only, not the critic's


def test_scoring_log_probs_use_the_sampling_distribution(tiny_model, tiny_tokenizer):
    """The sampler never emits pad, so the scored distribution is softmax over every token but pad
    (renormalised): response_logps with suppress_ids equals log-softmax of the logits with pad removed;
    the entropy is of that same distribution, and stays out of the graph unless it is trained."""
    pad = tiny_tokenizer.pad_token_id
    ids = torch.tensor([[pad, 5, 6, 7, 8, 9], [10, 11, 12, 13, 14, pad]])
    mask = ids != pad
    model = tiny_model
    logits = model(input_ids=ids, attention_mask=mask.long(),
                   position_ids=(mask.long().cumsum(-1) - 1).clamp(min=0)).logits.float() / 0.7
    logits[..., pad] = float("-inf")
    expected = torch.log_softmax(logits, -1)[:, 2:-1].gather(-1, ids[:, 3:].unsqueeze(-1)).squeeze(-1)
    params = [p.requires_grad_(True) for p in model.parameters()]
    try:
        logps, entropy = response_logps(model, ids, mask, 3, 0.7, suppress_ids=[pad], with_entropy=True)
    finally:
        for p in params:
            p.requires_grad_(False)
    real = mask[:, 3:]
    torch.testing.assert_close(logps[real], expected[real], atol=1e-5, rtol=1e-5)
    assert logps.requires_grad and not entropy.requires_grad
    probs = torch.softmax(logits, -1)[:, 2:-1]
    ent = -(probs * torch.log_softmax(logits, -1)[:, 2:-1]).nan_to_num().sum(-1)
    torch.testing.assert_close(entropy[real], ent[real], atol=1e-4, rtol=1e-4)


def test_roles_have_no_active_dropout_even_with_lora_dropout(fixtures, tmp_path, tiny_tokenizer):
    """ppo rejects lora_dropout > 0 in its config; a config that slipped past validation still gets
    every dropout module of every role (policy, critic and reward adapters) switched off."""
    c = ppo_config(fixtures, tmp_path, finetuning_type="lora", reward_model=str(fixtures / "rm_lora"))
    roles = build_roles(c.model_copy(update={"lora_dropout": 0.5}), tiny_tokenizer, "cpu", printer=lambda *a: None)
    dropouts = [m for mods in roles.modules.values() for mod in mods for m in mod.modules()
                if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(m.p == 0 for m in dropouts)


# ---- a reward model on another tokenizer -----------------------------------------------------------

@pytest.fixture(scope="module")
def other_vocab_rm(tmp_path_factory, corpus):
    """A reward model built on a second BPE tokenizer (another corpus, 320 tokens instead of the
    policy's 512) and a tiny backbone of its own: the policy's token ids mean nothing to it, and
    most are past the end of its embedding table."""
    from rlhfkit.models.presets import build_preset_model, train_tokenizer

    other_corpus = [" ".join(reversed(s.split())).upper() for s in corpus] + ["zebra quartz fjord"] * 5
    tok = train_tokenizer(other_corpus, vocab_size=320)
    out = tmp_path_factory.mktemp("other_vocab")
    torch.manual_seed(2)
    build_preset_model("tiny", tok).save_pretrained(out / "base")
    tok.save_pretrained(out / "base")
    rm = build_reward_model(str(out / "base"), tok)
    rm.save_pretrained(out / "rm")
    tok.save_pretrained(out / "rm")
    save_normalization(out / "rm", Normalization(mean=0.1, std=1.0))
    return out / "rm"


@pytest.mark.parametrize("finetuning_type", ["full", "lora"])
def test_reward_model_on_another_tokenizer_scores_its_own_encoding_and_critic_runs_on_policy_ids(
        fixtures, other_vocab_rm, tmp_path, tiny_tokenizer, finetuning_type):
    """The RM scores the responses re-encoded with its own tokenizer; the critic is built on the
    POLICY backbone (a copy / adapter `critic` on the policy base) with a zero value head, so it
    runs on the policy's token ids (on the RM's backbone it raised IndexError), and the run says
    which critic it built and why."""
    from rlhfkit.data.collate import pad_batch
    from rlhfkit.data.encode import encode_prompt_completion
    from rlhfkit.train.ppo import roles_scorer

    rm_tok = load_reward_model(other_vocab_rm).tokenizer
    assert rm_tok.get_vocab() != tiny_tokenizer.get_vocab() and len(rm_tok) < len(tiny_tokenizer)
    c = ppo_config(fixtures, tmp_path, finetuning_type=finetuning_type, reward_model=str(other_vocab_rm))
    printed: list[str] = []
    roles = build_roles(c, tiny_tokenizer, "cpu", printer=printed.append)
    assert not roles.reward_same_vocab
    ro = make_rollout(roles, tiny_tokenizer, c)
    assert ro.input_ids.max() >= len(rm_tok)  # policy ids the RM's embedding table does not have
    # 1. scores: the RM on the texts re-encoded with ITS tokenizer
    scores, parts = roles_scorer(c, roles, tiny_tokenizer, [])(ro)
    enc = [encode_prompt_completion(rm_tok, r["prompt"], t) for r, t in zip(ro.rows, ro.texts)]
    seqs = [e.input_ids if ended else e.input_ids[:-1] for e, ended in zip(enc, ro.ended.tolist())]
    batch = pad_batch(seqs, rm_tok.pad_token_id, side="right")
    expected = load_reward_model(other_vocab_rm).score(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    # 2. the critic on the policy's ids: runs, and starts at exactly 0
    with torch.no_grad():
        values = critic_values(roles, ro, torch.arange(len(ro.texts)), c)
    assert values.shape == ro.responses.shape and torch.equal(values, torch.zeros_like(values))
    # 3. where the critic lives, and the run says so
    assert not roles.critic_on_reward_model
    n_policy = roles.policy.get_input_embeddings().num_embeddings
    assert roles.critic_backbone.get_input_embeddings().num_embeddings == n_policy
    assert roles.value_head.weight.abs().sum() == 0 and roles.value_head.bias.item() == 0.0
    if finetuning_type == "lora":
        assert roles.critic_peft is roles.policy and "critic" in roles.policy.peft_config
    assert any("critic:" in line and "another tokenizer" in line and "zero value head" in line for line in printed)


@pytest.mark.parametrize("finetuning_type", ["full", "lora"])
def test_ppo_with_a_reward_model_on_another_tokenizer_trains_and_saves_a_policy_critic(
        fixtures, other_vocab_rm, tmp_path, tiny_tokenizer, finetuning_type):
    """One PPO step end to end; the saved critic is a reward-model directory on the policy's
    tokenizer and backbone that scores policy token ids."""
    result = train_ppo(ppo_config(fixtures, tmp_path, finetuning_type=finetuning_type,
                                  reward_model=str(other_vocab_rm)))
    step = next(r for r in result.history if r["step"] == 1)
    assert step["policy/first_ratio"] == 1.0 and step["val/error"] == step["val/error"]
    critic = load_reward_model(tmp_path / "critic")
    assert critic.tokenizer.get_vocab() == tiny_tokenizer.get_vocab()
    ids = torch.tensor([[len(tiny_tokenizer) - 1, 5, 6, 7]])
    assert critic.score(ids, torch.ones_like(ids, dtype=torch.bool)).shape == (1,)


def test_value_init_reward_model_with_another_tokenizer_is_a_config_error(fixtures, other_vocab_rm, tmp_path,
                                                                         tiny_tokenizer, monkeypatch):
    import rlhfkit.train.ppo_roles as ppo_roles

    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded before the error was reported")

    monkeypatch.setattr(ppo_roles, "load_causal_lm", forbidden)
    for finetuning_type in ("full", "lora"):
        c = ppo_config(fixtures, tmp_path, finetuning_type=finetuning_type, reward_model=str(other_vocab_rm),
                       value_init="reward_model")
        with pytest.raises(ConfigError, match="value_init: reward_model: the reward model .* uses another "
                                              "tokenizer than the policy .* use value_init: zero"):
            build_roles(c, tiny_tokenizer, "cpu", printer=lambda *a: None)


@pytest.mark.parametrize("finetuning_type", ["full", "lora"])
def test_single_update_reads_old_logps_and_values_from_its_training_forward(fixtures, tmp_path, finetuning_type):
    """One epoch, one minibatch, one micro-batch per step: the old log-probs and values come from the
    training forward (no separate pass). The same run with the minibatch accumulated over 2 and 4
    micro-batches (separate no-grad passes) gives the same metrics and weights up to summation order
    (measured: ~1e-7), and the first ratio is exactly 1, the first KL exactly 0."""
    common = dict(finetuning_type=finetuning_type, num_ppo_epochs=1, num_mini_batches=1, max_steps=2,
                  logging_steps=1, kl_coef=0.2)
    out = {}
    for micro in (8, 4, 2):
        out[micro] = tmp_path / f"micro{micro}"
        train_ppo(ppo_config(fixtures, out[micro], per_device_train_batch_size=micro, **common))
    runs = {k: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for k, d in out.items()}
    first = next(r for r in runs[8] if r["step"] == 1 and "policy/first_ratio" in r)
    assert first["policy/first_ratio"] == 1.0 and first["policy/first_clipfrac"] == 0.0
    assert first["objective/kl"] == 0.0
    second = next(r for r in runs[8] if r["step"] == 2 and "objective/kl" in r)
    assert second["objective/kl"] != 0.0  # the policy moved: the KL term is live in step 2's rewards
    for micro in (4, 2):
        for a, b in zip(runs[8], runs[micro], strict=True):
            assert a.keys() == b.keys()
            for k in a:
                if not k.startswith("time/"):
                    assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (micro, a["step"], k)
    name = "adapter_model.safetensors" if finetuning_type == "lora" else "model.safetensors"
    w8, w2 = (load_file(out[k] / name) for k in (8, 2))
    assert w8.keys() == w2.keys()
    for k in w8:
        # Adam divides a gradient by its own size: an element whose gradient is ~0 may differ by a
        # fraction of a step, so the tensors are compared in norm
        assert (w8[k] - w2[k]).norm() <= 1e-2 * w8[k].norm() + 1e-6, k


@pytest.mark.parametrize("finetuning_type", ["full", "lora"])
def test_gradient_checkpointing_reaches_policy_and_critic_and_changes_nothing(fixtures, tmp_path,
                                                                            finetuning_type, monkeypatch):
    """`gradient_checkpointing: true` reaches every role that trains: every training (grad) pass of a
    decoder layer of the policy and of the critic's backbone runs checkpointed (the layer's flag on, in
    train mode), no pass does without it; the metrics are those of the run without."""
    import rlhfkit.train.ppo as ppo_mod

    seen: dict = {}
    build = ppo_mod.build_roles

    def spy(*args, **kwargs):
        roles = build(*args, **kwargs)
        for role, model in (("policy", roles.policy), ("critic", roles.critic_backbone)):
            layer = next(m for m in model.modules() if type(m).__name__.endswith("DecoderLayer"))

            def record(module, inputs, output, role=role):
                if torch.is_grad_enabled():  # a training pass
                    seen.setdefault(role, set()).add(bool(module.gradient_checkpointing and module.training))
            layer.register_forward_hook(record)
        return roles

    monkeypatch.setattr(ppo_mod, "build_roles", spy)
    out, flags = {}, {}
    for ckpt in (False, True):
        seen.clear()
        out[ckpt] = train_ppo(ppo_config(fixtures, tmp_path / str(ckpt), finetuning_type=finetuning_type,
                                         gradient_checkpointing=ckpt, max_steps=2, logging_steps=1)).history
        flags[ckpt] = dict(seen)
    assert flags == {False: {"policy": {False}, "critic": {False}}, True: {"policy": {True}, "critic": {True}}}
    for a, b in zip(out[False], out[True], strict=True):
        for k in a:
            if not k.startswith("time/"):
                assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), (a["step"], k)


@pytest.mark.parametrize("finetuning_type, rm", [("lora", "rm_lora"), ("full", "rm_full"), ("lora", "rm_full")],
                         ids=["shared_base", "separate_full", "separate_lora_critic"])
def test_packed_reward_pass_equals_the_padded_one(fixtures, tmp_path, tiny_tokenizer, finetuning_type, rm):
    """The reward model scores a rollout (left-padded prompts, right-padded responses) packed,
    padding-free, with the padded pass's scores, on every reward layout."""
    c = ppo_config(fixtures, tmp_path, finetuning_type=finetuning_type, reward_model=str(fixtures / rm))
    roles = build_roles(c, tiny_tokenizer, "cpu", printer=lambda *a: None)
    ro = make_rollout(roles, tiny_tokenizer, c)
    assert ro.attention_mask.sum(-1).unique().numel() > 2  # varied lengths: packing moves rows
    padded = roles.reward(ro.input_ids, ro.attention_mask)
    roles.pack_rewards(True)
    packed = roles.reward(ro.input_ids, ro.attention_mask)
    torch.testing.assert_close(packed, padded, rtol=0, atol=1e-5)
    assert not torch.equal(padded, torch.zeros_like(padded))
    assert roles.packed_rewards_match(ro.input_ids, ro.attention_mask) and roles.reward_padding_free


def test_gradient_checkpointing_with_the_critic_on_the_policy_base_is_refused(fixtures, tmp_path):
    """LoRA with reward functions only puts the critic on the policy's own base as a second adapter: a
    checkpointed backward would recompute the policy's layers under the critic's adapter (measured:
    step 2's policy loss -0.0356 instead of -0.0350). A clear error, before any training."""
    with pytest.raises(ConfigError, match="critic on the policy's own base"):  # reward functions: the config
        ppo_config(fixtures, tmp_path, finetuning_type="lora", reward_model=None,
                   reward_funcs=["test_ppo:length_reward"], gradient_checkpointing=True)
    # a LoRA reward model over the same base: known once the roles are built, still before any training
    c = ppo_config(fixtures, tmp_path, finetuning_type="lora", reward_model=str(fixtures / "rm_lora"),
                   gradient_checkpointing=True)
    with pytest.raises(ConfigError, match="critic.*policy's own base"):
        train_ppo(c)
    assert not (tmp_path / "metrics.jsonl").exists()



def test_win_rate_and_its_standard_error():
    from rlhfkit.train.online import win_rate_and_se

    rate, se = win_rate_and_se([1.0, 2.0, 3.0], [0.0, 2.0, 4.0])  # a win, a tie, a loss
    assert rate == 0.5 and se == pytest.approx(math.sqrt(0.25 / 3))


def test_judge_reward_model_scores_evaluation_and_win_rates(fixtures, tmp_path):
    """judge_reward_model: eval/judge_score is the judge's mean on the held-out responses (checked against
    a run that trains on that model: its step-0 eval/scores, the same responses), and eval/win_rate /
    eval/judge_win_rate compare each response with step 0's on the same prompt."""
    kw = dict(eval_dataset=str(fixtures / "prompts.jsonl"), eval_num_prompts=8, eval_steps=2, max_steps=2,
              num_sample_generations=8)
    judged = train_ppo(ppo_config(fixtures, tmp_path / "judged", judge_reward_model=str(fixtures / "rm_lora"), **kw))
    as_reward = train_ppo(ppo_config(fixtures, tmp_path / "as_reward", reward_model=str(fixtures / "rm_lora"), **kw))
    first = next(r for r in judged.history if r["step"] == 0)
    assert first["eval/judge_score"] == pytest.approx(
        next(r for r in as_reward.history if r["step"] == 0)["eval/scores"], abs=1e-5)
    assert first["eval/judge_score"] != pytest.approx(first["eval/scores"], abs=1e-3)  # two different models
    samples = [json.loads(line) for line in (tmp_path / "judged" / "samples.jsonl").read_text().splitlines()]
    at = {step: [s for s in samples if s["split"] == "eval" and s["step"] == step] for step in (0, 2)}
    baseline = json.loads((tmp_path / "judged" / "eval_initial_scores.json").read_text())
    assert baseline == {"score": [s["score"] for s in at[0]], "judge": [s["judge"] for s in at[0]]}
    last = next(r for r in judged.history if r["step"] == 2)
    for key, name in (("score", "eval/win_rate"), ("judge", "eval/judge_win_rate")):
        outcomes = [1.0 if a[key] > b[key] else 0.5 if a[key] == b[key] else 0.0 for a, b in zip(at[2], at[0])]
        assert last[name] == pytest.approx(sum(outcomes) / 8)
        assert last[f"{name}_se"] == pytest.approx(statistics.stdev(outcomes) / math.sqrt(8))
        diffs = [a[key] - b[key] for a, b in zip(at[2], at[0])]
        diff = "judge_score_diff" if key == "judge" else "score_diff"
        assert last[f"eval/{diff}"] == pytest.approx(sum(diffs) / 8)
        assert last[f"eval/{diff}_se"] == pytest.approx(statistics.stdev(diffs) / math.sqrt(8))
    with pytest.raises(ConfigError, match="judge_reward_model is the training reward_model"):
        ppo_config(fixtures, tmp_path / "x", judge_reward_model=str(fixtures / "rm_full"))


def test_win_rate_of_no_comparable_prompt_is_nan():
    from rlhfkit.train.online import win_rate_and_se

    assert all(math.isnan(v) for v in win_rate_and_se([float("nan")], [1.0]))


def test_importance_weights_multiply_the_policy_loss_not_the_value_loss(fixtures, tmp_path):
    """ppo_micro_loss on a rollout sampled by other kernels (recorded sampling log-probs): at ratio 1
    each token's policy-gradient in its log-prob is -A w / n_tokens with w = min(pi_old / pi_sampler,
    cap) (here [0.5, 1, 2 (3 capped)] and [1.5, 1 | pad]); the value loss's gradient is the plain one."""
    from helpers import importance_sampling_case

    from rlhfkit.losses.ppo import value_loss
    from rlhfkit.train.ppo import ppo_micro_loss

    c = ppo_config(fixtures, tmp_path, sampling_is_cap=2.0, entropy_coef=0.0)
    logps, mask, ro, w = importance_sampling_case(group_size=1)
    values = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.0]], requires_grad=True)
    advantages = torch.tensor([[1.0, 1.0, 1.0], [-2.0, -2.0, 0.0]])
    data = {"logps": logps.detach(), "advantages": advantages, "values": values.detach() + 0.05,
            "returns": torch.ones(2, 3), "value_mask": mask}
    loss, stats = ppo_micro_loss(None, ro, data, torch.arange(2), c, n_tokens=5.0, n_values=5.0,
                                 forward=(logps, torch.zeros(2, 3), values))
    loss.backward()
    torch.testing.assert_close(logps.grad, -advantages * w / 5.0)
    plain = values.detach().requires_grad_()
    (c.vf_coef * masked_sum(value_loss(plain, data["values"], data["returns"], c.cliprange_value)["loss"], mask)
     / 5.0).backward()
    torch.testing.assert_close(values.grad, plain.grad)
    assert stats["sampling/is_capped"] == pytest.approx(1 / 5)
    assert stats["sampling/is_weight"] == pytest.approx((0.5 + 1 + 2 + 1.5 + 1) / 5)


def test_bf16_sampling_runs_with_importance_weights(fixtures, tmp_path):
    """ppo with sampling_dtype bfloat16 (LoRA): the sampler's log-probs differ a little from the
    float32 policy's (logp_gap > 0, importance weights near 1); the first ratio is still exactly 1."""
    from rlhfkit.train.ppo import train_ppo

    result = train_ppo(ppo_config(fixtures, tmp_path, finetuning_type="lora", reward_model=str(fixtures / "rm_lora"),
                                  sampling_dtype="bfloat16", max_steps=2))
    records = [r for r in result.history if "loss" in r]
    assert [r["step"] for r in records] == [1, 2] and records[0]["policy/first_ratio"] == 1.0
    for r in records:
        assert 0 < r["sampling/logp_gap"] < 0.05
        assert 0.95 < r["sampling/is_weight"] < 1.05 and 0 <= r["sampling/is_capped"] < 0.05
