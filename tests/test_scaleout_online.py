"""The online stages (grpo / rloo, ppo) under DeepSpeed ZeRO-2, ZeRO-3 and FSDP2: `accelerate launch
--config_file configs/accelerate/{zero2,zero3,fsdp2}.yaml` with 2 CPU processes (gloo), each checked
against one process with the same global batch (tests/test_scaleout.py does the same for sft / dpo).
Cases: grpo full under fsdp2, rloo LoRA under zero3, ppo LoRA under zero2 and fsdp2 and full under
zero3 (rloo is grpo's code with its own estimator; the table in tests/test_scaleout.py).

Each launched run: 3 steps of 4 prompts (2 per process) x 2 responses (GRPO) or 4 episodes (PPO),
micro-batches of 2 rows, one minibatch, a checkpoint at step 2, held-out evaluation at steps 0 and 3
(every rank samples under ZeRO-3 / FSDP2). Sampling with top_k 1 makes every rollout a function of
its prompt alone, so the single process (4 prompts) draws the rollouts the two processes draw
together (the responses of a group are then equal, so grpo / rloo use the REINFORCE++ estimator,
advantages normalised over the global batch, to have a gradient at all); the stop strings `STOP`
end responses at varied lengths, and the reward function records
each rank's lengths (`RLHFKIT_TEST_LENGTHS`), so the test shows that ranks sampled different lengths
in the same step (sampling runs with the policy's parameters gathered on every rank,
`Optimization.whole`: no collective inside the sampler, no deadlock). Checked:
- summary.json names the engine asked for;
- what each rank held: ZeRO-3 and FSDP2 about half of the trained parameters, ZeRO-2 all parameters
  and half of the optimizer state;
- the metric curve (the keys in COMPARED; per-process statistics such as rewards/std are means of
  per-process values by design and differ) equals the single process's within rel 1e-4 / abs 1e-5
  (measured, largest relative difference of a value above 1e-3: 2.6e-5 for zero3 ppo full, <= 5e-6
  for the others; DeepSpeed clips and reduces in another order than torch, so not bit-identical);
- the saved policy loads with plain transformers (full fine-tuning) or peft (LoRA, adapter on the
  saved base) on one process and matches the single run's weights within 1e-4;
- per stage one run interrupted after its step-2 checkpoint and resumed under the same engine ends
  with the uninterrupted run's metrics and weights.

Every case is slow-marked (`make test` runs them; `make unit` does not).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from helpers import build_once, launched_run, read_metrics, read_summary, register_launched, run_once, write_jsonl
from safetensors.torch import load_file
from test_scaleout import assert_halved, interrupted_copy, needs_deepspeed

from rlhfkit.config import build_config

pytestmark = pytest.mark.slow

PROMPTS = ["The cat was", "A dog is", "A dog looked", "The acting is", "This film felt", "My friend was",
           "The plot looked", "The ending felt"]
STOP = ["LL", "MMM", "today", "is is is", "helpful"]
"""The random tiny model (conftest's `tiny_model`) answers the prompts above greedily with repeated
tokens; these stop strings end its first five answers after 2, 3, 1, 2, 1 tokens and leave the last
three running to max_new_tokens (8): ranks that draw different prompts sample different lengths."""


def length_reward(prompts, completions, completion_ids=None, **kwargs):
    """Longer responses score higher (varied within a group); records this rank's response lengths
    when RLHFKIT_TEST_LENGTHS names a directory."""
    out = os.environ.get("RLHFKIT_TEST_LENGTHS")
    if out and completion_ids is not None:
        with (Path(out) / f"rank-{os.environ.get('RANK', '0')}.jsonl").open("a") as f:
            f.write(json.dumps([len(c) for c in completion_ids]) + "\n")
    return [len(c) / 10 for c in completions]


COMMON = dict(max_steps=3, top_k=1, temperature=1.0, max_new_tokens=8, stop=STOP, logging_steps=1,
              per_device_train_batch_size=2, num_mini_batches=1, learning_rate=1e-3, max_grad_norm=1.0,
              save_steps=2, eval_steps=3, eval_num_prompts=4, per_device_eval_batch_size=4,
              reward_funcs=["test_scaleout_online:length_reward"], report_to=[], disable_tqdm=True, seed=0)
STAGES = {"grpo": dict(rollout_batch_size=4, num_generations=2, advantage_estimator="reinforce_pp"),
          "rloo": dict(rollout_batch_size=4, num_generations=2, advantage_estimator="reinforce_pp",
                       beta=0.05),
          "ppo": dict(rollout_batch_size=4, num_ppo_epochs=2)}
LORA = dict(finetuning_type="lora", lora_rank=4, merge_lora=False)
CASES = {  # (engine, stage, tuning)
    ("zero3", "rloo", "lora"), ("fsdp2", "grpo", "full"),
    ("zero2", "ppo", "lora"), ("zero3", "ppo", "full"), ("fsdp2", "ppo", "lora"),
}
CHECKPOINTED = {("zero3", "ppo", "full"), ("zero3", "rloo", "lora")}
"""Launched with gradient checkpointing on every role that trains (the single-process reference
without: the same curve)."""
COMPARED = {"grpo": ("rewards/mean", "loss", "grad_norm", "gen/length", "policy/entropy", "eval/scores"),
            "rloo": ("rewards/mean", "loss", "grad_norm", "gen/length", "objective/kl", "eval/scores",
                     "eval/kl"),
            "ppo": ("objective/scores", "objective/kl", "policy/loss", "val/loss", "grad_norm", "gen/length",
                    "eval/scores", "eval/kl")}


def online_data(tmp_path_factory) -> Path:
    """The prompts file, written once per session (shared by the workers)."""
    return build_once(tmp_path_factory, "online_data",
                      lambda d: write_jsonl(d / "prompts.jsonl", [{"prompt": p} for p in PROMPTS]))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return online_data(tmp_path_factory)


def online_config(data: Path, tiny_model_dir: Path, stage: str, tuning: str, out: Path, **kw):
    values = dict(model_name_or_path=str(tiny_model_dir), dataset=str(data / "prompts.jsonl"),
                  eval_dataset=str(data / "prompts.jsonl"), output_dir=str(out), **COMMON, **STAGES[stage],
                  **(LORA if tuning == "lora" else {}))
    values.update(kw)
    return build_config(stage, values)


def launched_job(engine: str, stage: str, tuning: str):
    """Launched with each rank recording its response lengths (length_reward) in `<run>_lengths`."""
    extra = {"gradient_checkpointing": True} if (engine, stage, tuning) in CHECKPOINTED else {}

    def job(tmp_path_factory, model_dir: Path, out: Path):
        lengths = out.parent / f"{out.name}_lengths"
        lengths.mkdir(parents=True)
        config = online_config(online_data(tmp_path_factory), model_dir, stage, tuning, out, **extra)
        return stage, config, {"RLHFKIT_TEST_LENGTHS": str(lengths)}

    return job


def launched_name(stage: str, tuning: str) -> str:
    return f"online_{stage}_{tuning}"


for _key in CASES:
    register_launched(_key[0], launched_name(*_key[1:]), launched_job(*_key))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data, tiny_model_dir):
    """Launched runs (one launch per engine: `launched_run`) and single-process references, each made
    once per session on first use, by whichever xdist worker asks first (the other waits for it)."""

    def get(engine: str, stage: str, tuning: str) -> Path:
        if engine != "single":
            return launched_run(tmp_path_factory, tiny_model_dir, engine, launched_name(stage, tuning))
        return run_once(tmp_path_factory, f"scaleout_online/single_{stage}_{tuning}", stage,
                        lambda out: online_config(data, tiny_model_dir, stage, tuning, out))

    return get


def assert_same_curve(a: Path, b: Path, keys, rel: float = 1e-4, abs_: float = 1e-5) -> None:
    ma, mb = read_metrics(a), read_metrics(b)
    assert [r["step"] for r in ma] == [r["step"] for r in mb] == [0, 1, 2, 3]
    for ra, rb in zip(ma, mb):
        assert ra.keys() == rb.keys(), (ra["step"], set(ra) ^ set(rb))
        for k in keys:
            if k in ra:
                assert ra[k] == pytest.approx(rb[k], rel=rel, abs=abs_), (ra["step"], k, ra[k], rb[k])


def policy_weights(out: Path, tuning: str) -> dict[str, torch.Tensor]:
    return load_file(str(out / ("adapter_model.safetensors" if tuning == "lora" else "model.safetensors")))


def engine_case(e, s, t):
    marks = needs_deepspeed if e.startswith("zero") else ()
    return pytest.param(e, s, t, marks=marks, id=f"{e}-{s}-{t}")


@pytest.mark.parametrize("engine, stage, tuning", [engine_case(*k) for k in sorted(CASES)])
def test_online_stage_under_engine_matches_one_process(runs, tiny_model_dir, engine, stage, tuning):
    launched, single = runs(engine, stage, tuning), runs("single", stage, tuning)
    s, ref = read_summary(launched), read_summary(single)
    # 1. the engine asked for
    assert (s["engine"], s["world_size"]) == (engine, 2)
    assert (ref["engine"], ref["world_size"]) == ("single", 1)
    # 2. what each rank held (the trained models: the policy; PPO: + critic and value head)
    total, state = ref["local_parameters"][0], ref["local_optimizer_state"][0]
    params, optim = s["local_parameters"], s["local_optimizer_state"]
    if engine in ("zero3", "fsdp2"):
        assert_halved(params, total, spread=0.1)
        assert sum(params) == pytest.approx(total, rel=0.02)
    else:
        assert params == [total, total]
    assert_halved(optim, state, spread=0.1)
    # 3. ranks sampled different lengths in the same step (no deadlock), the same curve as one process
    lengths = launched.parent / f"{launched.name}_lengths"
    per_rank = [[json.loads(x) for x in (lengths / f"rank-{r}.jsonl").read_text().splitlines()]
                for r in (0, 1)]
    if len(per_rank[0]) == len(per_rank[1]) + 2:  # zero2: only the main process evaluates (steps 0 and 3)
        per_rank[0] = per_rank[0][1:-1]
    assert len(per_rank[0]) == len(per_rank[1]) >= 3
    assert any(max(a) != max(b) for a, b in zip(*per_rank)), per_rank
    assert_same_curve(launched, single, COMPARED[stage])
    first = read_metrics(launched)[0]
    assert first["step"] == 0 and "eval/scores" in first  # evaluated before training, every rank sampling
    # 4. the saved policy: plain transformers / peft on one process, the single run's weights
    a, b = policy_weights(launched, tuning), policy_weights(single, tuning)
    # FSDP2's gathered state also writes the lm_head tied to the input embedding (equal values)
    assert set(b) <= set(a) <= set(b) | {"lm_head.weight"} and b
    for k in b:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-4, msg=k)
    if tuning == "full":
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(launched)
    else:
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(launched)
        assert set(model.peft_config) == {"default"}
    if stage == "ppo":
        assert (launched / "critic").is_dir()


RESUMED = [("fsdp2", "grpo", "full"), ("zero3", "ppo", "full")]


def resumed_job(engine: str, stage: str, tuning: str):
    """What the run killed after its step-2 checkpoint leaves, resumed with `resume_from_checkpoint:
    true` under the same engine (in the `<engine>-resume` launch of `launched_run`)."""
    extra = {"gradient_checkpointing": True} if (engine, stage, tuning) in CHECKPOINTED else {}

    def job(tmp_path_factory, model_dir: Path, out: Path):
        full = launched_run(tmp_path_factory, model_dir, engine, launched_name(stage, tuning))
        interrupted_copy(full, out, "critic", "generation_config.json", "adapter_config.json")
        assert (out / "checkpoints" / "step-000002" / "trainer_state.json").is_file()
        config = online_config(online_data(tmp_path_factory), model_dir, stage, tuning, out,
                               resume_from_checkpoint=True, **extra)
        return stage, config, None

    return job


for _key in RESUMED:
    register_launched(f"{_key[0]}-resume", launched_name(*_key[1:]), resumed_job(*_key))


@pytest.mark.parametrize("engine, stage, tuning", [engine_case(*k) for k in RESUMED])
def test_interrupted_online_run_resumes_under_the_same_engine(runs, tmp_path_factory, tiny_model_dir, engine,
                                                              stage, tuning):
    """The resumed run (`resumed_job`): the uninterrupted run's metrics (step 3) and weights."""
    full = runs(engine, stage, tuning)
    out = launched_run(tmp_path_factory, tiny_model_dir, f"{engine}-resume", launched_name(stage, tuning))
    assert f"[{stage}] resumed from" in (out.parents[1] / "launch.log").read_text()
    ma, mb = read_metrics(out), read_metrics(full)
    assert [r["step"] for r in ma] == [r["step"] for r in mb]
    for k, v in mb[-1].items():
        # diag/: the diagnostics registry fires on a window of steps, which a resumed run starts afresh
        if not k.startswith(("time/", "diag/")):
            assert ma[-1][k] == pytest.approx(v, rel=1e-6, abs=1e-7), k
    a, b = policy_weights(out, tuning), policy_weights(full, tuning)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-6, msg=k)
