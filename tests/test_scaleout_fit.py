"""rm and kto under the parameter-sharding engines on 2 CPU processes (gloo, OMP_NUM_THREADS=1):
`accelerate launch --config_file configs/accelerate/{zero3,fsdp2}.yaml`, each checked against one
process with the same global batch (the launches, tolerances and helpers of tests/test_scaleout.py).
Under DDP rm runs in test_rm.py (kto's z0, reduced across processes, is checked here under both
engines); ZeRO-2 (the optimizer state partitioned, nothing stage-specific) is launched with dpo and
ppo (the table in tests/test_scaleout.py).

One run per (engine, stage), in the engine's launch (`helpers.launched_run`), LoRA or full
fine-tuning so that each stage runs both under the engines that shard parameters (`VARIANT`): rm
LoRA under fsdp2, full under zero3; kto full under fsdp2, LoRA under zero3. Each: 4 optimizer
steps of 2 per device x 2 accumulation x 2 processes (the single process: 8 x 1 x 1), clipping at
1.0, a checkpoint at step 2, an evaluation at the end (rm: every rank scores the evaluation set
under ZeRO-3/FSDP2; kto: z0 over the whole evaluation set). Checked per run:
- summary.json names the engine; what each rank held: ZeRO-3 / FSDP2 about half of the parameters,
  ZeRO-2 all parameters and half of the optimizer state (ZeRO-3 / FSDP2 half of it too);
- the metric curve (kto: its z0 `kl` pre-pass over the global batch) equals the single process's
  within test_scaleout's tolerance (rel 1e-4 / abs 1e-5);
- rm: the normalisation statistics (31 reference responses: the ranks' shares differ by one, the
  short one scores a repeat) equal the single process's; the saved directory loads with plain
  transformers as AutoModelForSequenceClassification (peft on top for LoRA) and its mean / std over
  the same reference responses are the normalisation the run computed from its training weights;
  its scores equal the single run's saved model's;
- kto: the saved model (or adapter over its base) gives the single run's logits.
One interrupted run (zero3 rm) resumes from its step-2 checkpoint to the same metrics, normalisation
and weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import build_once, launched_run, read_metrics, read_summary, register_launched, run_once, write_jsonl
from test_scaleout import (
    COMMON,
    LAUNCHED,
    SINGLE,
    assert_halved,
    assert_same_curve,
    interrupted_copy,
    needs_deepspeed,
)

from rlhfkit.config import build_config
from rlhfkit.tasks import get_task

pytestmark = pytest.mark.slow

VARIANT = {("zero3", "rm"): "full", ("fsdp2", "rm"): "lora", ("zero3", "kto"): "lora", ("fsdp2", "kto"): "full"}
LORA = dict(finetuning_type="lora", lora_rank=8)
N_REFERENCE = 31
"""Reference responses of the rm normalisation: odd, so 2 ranks' shares differ by one."""


def fit_data(tmp_path_factory, model_dir: Path) -> dict:
    """The rm / kto config values; the data files written once per session (shared by the workers)."""

    def write(d: Path) -> None:
        task = get_task("sentiment")
        for name, n, seed in (("train", 32, 0), ("eval", 16, 1)):
            rows = task.make("preference", n, seed=seed)
            write_jsonl(d / f"{name}.jsonl", rows)

    d = build_once(tmp_path_factory, "scaleout_fit_data", write)
    common = dict(model_name_or_path=str(model_dir), dataset=str(d / "train.jsonl"),
                  eval_dataset=str(d / "eval.jsonl"), eval_steps=4, max_length=48)
    return {"rm": dict(common, normalization_samples=N_REFERENCE), "kto": dict(common)}


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_model_dir) -> dict:
    return fit_data(tmp_path_factory, tiny_model_dir)


def stage_config(data: dict, stage: str, variant: str, out: Path, **kw):
    lora = LORA if variant == "lora" else {}
    return build_config(stage, dict(data[stage], output_dir=str(out), **COMMON, **lora, **kw))


def launched_job(engine: str, stage: str):
    def job(tmp_path_factory, model_dir: Path, out: Path):
        data = fit_data(tmp_path_factory, model_dir)
        return stage, stage_config(data, stage, VARIANT[(engine, stage)], out, **LAUNCHED), None

    return job


for (_engine, _stage) in VARIANT:
    register_launched(_engine, f"fit_{_stage}", launched_job(_engine, _stage))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, data):
    """Launched runs (engine, stage), one launch per engine (`launched_run`), and single-process
    references (single, stage, variant), each made once per session on first use, by whichever
    xdist worker asks first (`build_once`)."""

    def get(engine: str, stage: str, variant: str | None = None) -> Path:
        if engine != "single":
            return launched_run(tmp_path_factory, tiny_model_dir, engine, f"fit_{stage}")
        return run_once(tmp_path_factory, f"scaleout_fit/single_{stage}_{variant}", stage,
                        lambda out: stage_config(data, stage, variant, out, **SINGLE))

    return get


# ---- plain-transformers views of a saved directory ---------------------------------------------------

def load_saved(out: Path, stage: str, base: Path):
    """The saved model with plain transformers (+ peft for an adapter), eval mode, on one process."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if stage == "rm" else AutoModelForCausalLM
    kw = {"num_labels": 1} if stage == "rm" else {}
    if (out / "adapter_config.json").is_file():
        from peft import PeftModel

        recorded = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
        assert Path(recorded) == base.resolve()
        model = PeftModel.from_pretrained(auto.from_pretrained(base, **kw), out)
    else:
        model = auto.from_pretrained(out)
    from transformers import AutoTokenizer

    model.config.pad_token_id = AutoTokenizer.from_pretrained(out).pad_token_id  # RM: pools at the last non-pad
    return model.eval()


def outputs(out: Path, stage: str, base: Path) -> torch.Tensor:
    """(2, T, V) logits of a causal LM / (2, 1) scores of a reward model on fixed ids."""
    model = load_saved(out, stage, base)
    ids = (torch.arange(3, 43).reshape(2, -1) * 7) % 300 + 5
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def reference_rewards(out: Path, base: Path) -> torch.Tensor:
    """Raw rewards of the saved RM (plain transformers, right-padded batches) on the run's own
    normalisation reference responses (the same seeded sample of the training chosen responses)."""
    import yaml
    from transformers import AutoTokenizer

    from rlhfkit.data.collate import pad_batch
    from rlhfkit.data.formats import to_canonical
    from rlhfkit.data.groups import encode_group
    from rlhfkit.data.sources import load_rows
    from rlhfkit.train.rm import reference_examples

    config = build_config("rm", yaml.safe_load((out / "config.yaml").read_text()))  # the run's resolved config
    tokenizer = AutoTokenizer.from_pretrained(out)
    rows = to_canonical(load_rows(config.dataset))
    groups = [g for i, r in enumerate(rows)
              if (g := encode_group(tokenizer, r, config.max_length, config.max_prompt_length, i,
                                    config.max_response_length)) is not None]
    examples, _ = reference_examples(config, tokenizer, groups, None)
    assert len(examples) == N_REFERENCE
    batch = pad_batch([e.input_ids for e in examples], tokenizer.pad_token_id, "right")
    with torch.no_grad():
        model = load_saved(out, "rm", base)
        scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"].long())
    return scores.logits[:, 0].double()


# ---- the matrix --------------------------------------------------------------------------------------

CASES = [pytest.param(e, s, marks=needs_deepspeed if e.startswith("zero") else ()) for e, s in VARIANT]


@pytest.mark.parametrize("engine, stage", CASES)
def test_rm_and_kto_under_a_sharded_engine_match_one_process(runs, data, tiny_model_dir, engine, stage):
    variant = VARIANT[(engine, stage)]
    launched, single = runs(engine, stage), runs("single", stage, variant)
    s, ref = read_summary(launched), read_summary(single)
    # 1. the engine asked for
    assert (s["engine"], s["world_size"]) == (engine, 2)
    assert s["distributed_type"] == ("DEEPSPEED" if engine.startswith("zero") else "MULTI_CPU")
    # 2. what each rank held (LoRA: the frozen base is partitioned too; the optimizer holds the adapters)
    total, state = ref["local_parameters"][0], ref["local_optimizer_state"][0]
    assert 0 < state < total if variant == "lora" else state == total
    params, optim = s["local_parameters"], s["local_optimizer_state"]
    if engine in ("zero3", "fsdp2"):
        assert_halved(params, total)
    else:
        assert params == [total, total]
    assert all(0.45 * state <= n <= 0.55 * state for n in optim), (optim, state)
    # 3. the curve of one process (evaluation at the end included)
    assert_same_curve(launched, single)
    assert any(k.startswith("eval/") for k in read_metrics(launched)[-1])
    # 4. the saved model, loaded with plain transformers on one process
    torch.testing.assert_close(outputs(launched, stage, tiny_model_dir), outputs(single, stage, tiny_model_dir),
                               atol=1e-4, rtol=1e-4)
    if stage == "rm":  # 5. the normalisation: the single process's, and what the saved weights give
        norm, norm_ref = s["normalization"], ref["normalization"]
        assert norm["mean"] == pytest.approx(norm_ref["mean"], rel=1e-4, abs=1e-5)
        assert norm["std"] == pytest.approx(norm_ref["std"], rel=1e-4, abs=1e-5)
        assert f"{N_REFERENCE} best (chosen)" in norm["reference"]
        raw = reference_rewards(launched, tiny_model_dir)
        assert raw.mean().item() == pytest.approx(norm["mean"], rel=1e-4, abs=1e-5)
        assert raw.std(unbiased=False).item() == pytest.approx(norm["std"], rel=1e-4, abs=1e-5)
        assert json.loads((launched / "reward_normalization.json").read_text())["mean"] == norm["mean"]


def resumed_job(tmp_path_factory, model_dir: Path, out: Path):
    """zero3 rm killed after its step-2 checkpoint (no final model, summary or normalisation), resumed
    with `resume_from_checkpoint: true` (in the zero3-resume launch of `launched_run`)."""
    full = launched_run(tmp_path_factory, model_dir, "zero3", "fit_rm")
    interrupted_copy(full, out, "reward_normalization.json")
    assert (out / "checkpoints" / "step-000002" / "deepspeed").is_dir()
    config = stage_config(fit_data(tmp_path_factory, model_dir), "rm", VARIANT[("zero3", "rm")], out,
                          resume_from_checkpoint=True, **LAUNCHED)
    return "rm", config, None


register_launched("zero3-resume", "fit_rm", resumed_job)


@needs_deepspeed
def test_interrupted_rm_resumes_under_zero3(runs, tmp_path_factory, tiny_model_dir):
    """The resumed zero3 rm run (`resumed_job`): the uninterrupted run's metrics, normalisation and
    weights."""
    full = runs("zero3", "rm")
    out = launched_run(tmp_path_factory, tiny_model_dir, "zero3-resume", "fit_rm")
    assert "[rm] resumed from" in (out.parents[1] / "launch.log").read_text()
    assert_same_curve(out, full, rel=1e-6, abs_=1e-7)
    resumed, uninterrupted = read_summary(out)["normalization"], read_summary(full)["normalization"]
    for k in ("mean", "std"):
        assert resumed[k] == pytest.approx(uninterrupted[k], rel=1e-6, abs=1e-7)
    from safetensors.torch import load_file

    a, b = load_file(str(out / "model.safetensors")), load_file(str(full / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-6, msg=k)
