"""`rlhfkit pipeline`: validation and wiring (no training), then one tiny real pipeline (pt -> sft -> rm ->
ppo, and dpo from sft side by side; a few steps each on a few hundred rows) re-run to check skip, re-run
because of a config / input / upstream change, resume after an interruption, and report.html."""

from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from rlhfkit.errors import ConfigError
from rlhfkit.pipeline import STATE_FILE, load_pipeline, plan, resolve_pipeline, run_pipeline

REPO = Path(__file__).resolve().parents[1]
SIZES = {"pt": 200, "pt_eval": 16, "sft": 128, "sft_eval": 16, "preference": 64, "preference_eval": 16,
         "prompt": 32, "prompt_eval": 16}


def tiny_pipeline(out: Path, dpo_data: Path | None = None) -> dict:
    """pt -> sft -> rm -> ppo and dpo (from sft), 2-3 steps each; dpo reads `dpo_data` when given."""
    dpo = {"max_steps": 3, "save_steps": 1}
    if dpo_data is not None:
        dpo["dataset"] = str(dpo_data)
    return {
        "output_dir": str(out),
        "data": {"task": "sentiment", "seed": 0, "sizes": SIZES},
        "defaults": {"seed": 0, "max_length": 40, "max_new_tokens": 8, "eval_num_prompts": 8, "logging_steps": 1,
                     "per_device_train_batch_size": 16, "learning_rate": 1e-3, "report_to": [],
                     "disable_tqdm": True},
        "stages": {
            "pt": {"model_name_or_path": "preset:tiny", "max_steps": 2},
            "sft": {"max_steps": 2},
            "rm": {"max_steps": 2, "normalization_samples": 16},
            "ppo": {"max_steps": 2, "rollout_batch_size": 8, "per_device_train_batch_size": 8,
                    "num_mini_batches": 1, "num_ppo_epochs": 1, "eval_steps": 1},
            "dpo": dpo,
        },
        "report": {"num_prompts": 8, "num_samples": 3, "max_new_tokens": 8},
    }


# ---- validation and wiring (no training) ---------------------------------------------------------

def test_wiring_feeds_each_stage_the_previous_output(tmp_path):
    p = resolve_pipeline(tiny_pipeline(tmp_path / "p"))
    out = tmp_path / "p"
    assert [s.name for s in p.stages] == ["pt", "sft", "rm", "ppo", "dpo"]
    c = {s.name: s.config for s in p.stages}
    assert c["sft"].model_name_or_path == str(out / "pt")
    assert c["rm"].model_name_or_path == str(out / "sft")
    assert c["ppo"].model_name_or_path == str(out / "sft") and c["ppo"].reward_model == str(out / "rm")
    assert c["ppo"].ref_model is None  # reference = the policy's initial model = SFT
    assert c["dpo"].model_name_or_path == str(out / "sft")
    assert c["dpo"].dataset == str(out / "data" / "preference_train.jsonl")
    assert c["ppo"].dataset == str(out / "data" / "prompt_train.jsonl") and c["ppo"].task == "sentiment"
    assert c["pt"].output_dir == str(out / "pt") and c["pt"].learning_rate == 1e-3  # shared default
    assert p.stage("ppo").upstream == {"model_name_or_path": "sft", "reward_model": "rm"}


@pytest.mark.parametrize("kind", ["online_dpo", "xpo", "nash_md"])
def test_online_preference_stages_are_wired_like_ppo(tmp_path, kind):
    """online_dpo, xpo and nash_md build on sft, take the task's prompt file and, without reward_funcs, the
    last rm."""
    spec = tiny_pipeline(tmp_path / "p")
    spec["stages"][kind] = {"max_steps": 1, "rollout_batch_size": 8, "per_device_train_batch_size": 8}
    p = resolve_pipeline(spec)
    out = tmp_path / "p"
    assert p.stage(kind).upstream == {"model_name_or_path": "sft", "reward_model": "rm"}
    c = p.stage(kind).config
    assert c.dataset == str(out / "data" / "prompt_train.jsonl") and c.reward_model == str(out / "rm")


def test_spin_builds_on_sft_with_its_demonstrations_and_no_reward(tmp_path):
    """spin builds on sft and imitates the task's SFT file; no reward model is wired in (it needs none)."""
    spec = tiny_pipeline(tmp_path / "p")
    spec["stages"]["spin"] = {"max_steps": 1, "rollout_batch_size": 8, "per_device_train_batch_size": 8}
    p = resolve_pipeline(spec)
    out = tmp_path / "p"
    assert p.stage("spin").upstream == {"model_name_or_path": "sft"}
    c = p.stage("spin").config
    assert c.dataset == str(out / "data" / "sft_train.jsonl") and c.reward_model is None and c.task == "sentiment"


def test_self_reward_builds_on_sft_and_judges_with_the_tasks_template(tmp_path):
    """self_reward builds on sft, samples for the task's prompts, judges with the task's judge template
    (that of its `judge` rows, which the pipeline's data writes) and needs no reward model."""
    from rlhfkit.tasks import get_task

    spec = tiny_pipeline(tmp_path / "p")
    spec["stages"]["self_reward"] = {"max_steps": 1, "rollout_batch_size": 8, "per_device_train_batch_size": 8}
    p = resolve_pipeline(spec)
    out = tmp_path / "p"
    assert p.stage("self_reward").upstream == {"model_name_or_path": "sft"}
    c = p.stage("self_reward").config
    assert c.dataset == str(out / "data" / "prompt_train.jsonl") and c.reward_model is None
    assert c.judge_template == get_task("sentiment").judge_template != type(c).model_fields["judge_template"].default
    spec["stages"]["self_reward"]["judge_template"] = "Rate {prompt} {response}"  # the user's wins
    assert resolve_pipeline(spec).stage("self_reward").config.judge_template == "Rate {prompt} {response}"


def test_named_stages_from_and_stage_references(tmp_path):
    spec = tiny_pipeline(tmp_path / "p")
    spec["stages"]["dpo_ipo"] = {"stage": "dpo", "from": "sft", "loss_type": "ipo"}
    spec["stages"]["grpo"] = {"reward_model": "rm", "reward_funcs": ["gold"], "max_steps": 1}
    spec["stages"]["rm_judge"] = {"stage": "rm", "num_shards": 2, "shard_index": 1}
    spec["stages"]["ppo_judged"] = {"stage": "ppo", "reward_model": "rm", "judge_reward_model": "rm_judge"}
    p = resolve_pipeline(spec)
    assert p.stage("dpo_ipo").kind == "dpo" and p.stage("dpo_ipo").config.loss_type == "ipo"
    assert p.stage("grpo").upstream == {"model_name_or_path": "sft", "reward_model": "rm"}
    assert p.stage("ppo_judged").upstream == {"model_name_or_path": "sft", "reward_model": "rm",
                                              "judge_reward_model": "rm_judge"}
    assert p.stage("ppo_judged").config.judge_reward_model == str(tmp_path / "p" / "rm_judge")
    assert p.stage("dpo").config.beta != 0  # defaults of the stage itself untouched


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update(stagez={}), "unknown key 'stagez' (did you mean 'stages'?)"),
    (lambda s: s["stages"].update(sfft={}), "stages.sfft: 'sfft' is not a stage (did you mean 'sft'?)"),
    (lambda s: s["stages"]["sft"].update(learning_rat=1), "stages.sft (sft): unknown key 'learning_rat'"),
    (lambda s: s["stages"]["dpo"].update(beta="x"), "stages.dpo (dpo): key 'beta'"),
    (lambda s: s["stages"]["rm"].update({"from": "ppo"}), "stages.rm.from: 'ppo' is not an earlier stage"),
    (lambda s: s["stages"]["sft"].update(output_dir="x"), "stages.sft.output_dir: set by the pipeline"),
    (lambda s: s["defaults"].update(bta=0.1), "defaults.bta: no stage of this pipeline has this key"),
    (lambda s: s["stages"]["rm"].update(model_name_or_path="dpo"), "stages.rm.model_name_or_path: stage 'dpo' "
                                                                  "runs after this one"),
    (lambda s: s["stages"]["dpo"].update(stage="dpoo"), "stages.dpo.stage: unknown stage 'dpoo'"),
    (lambda s: s["data"].update(task="sentimen"), "data.task"),
    (lambda s: s["report"].update(num_prompt=3), "unknown key 'report.num_prompt' (did you mean 'num_prompts'?)"),
    (lambda s: s.update(stages={"dpo": {}, **s["stages"]}), "stages.dpo: no model: give model_name_or_path"),
])
def test_bad_pipelines_fail_naming_where(tmp_path, edit, message):
    spec = tiny_pipeline(tmp_path / "p")
    edit(spec)
    with pytest.raises(ConfigError) as e:
        resolve_pipeline(spec, source="p.yaml")
    assert message in str(e.value)
    assert not (tmp_path / "p").exists()  # nothing written before the whole pipeline validates


def test_yaml_with_dotted_overrides(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(tiny_pipeline(tmp_path / "p"), sort_keys=False))
    p = load_pipeline(path, ["stages.sft.learning_rate=5e-4", "defaults.seed=3"])
    assert p.stage("sft").config.learning_rate == 5e-4 and p.stage("pt").config.seed == 3


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("pipeline_*.yaml")), ids=lambda p: p.name)
def test_shipped_pipeline_configs_validate(path):
    assert load_pipeline(path).stages


def test_shipped_sentiment_pipeline_is_the_demo():
    """configs/pipeline_sentiment.yaml and `rlhfkit demo` run the same stages with the same keys."""
    from rlhfkit.demo import demo_pipeline

    shipped = yaml.safe_load((REPO / "configs" / "pipeline_sentiment.yaml").read_text())
    demo = demo_pipeline("runs/demo", "sentiment", seed=0, quick=False)
    assert shipped == demo
    resolve_pipeline(shipped)
    arithmetic = resolve_pipeline(demo_pipeline("runs/demo_arithmetic", "arithmetic", seed=0, quick=True))
    assert [s.kind for s in arithmetic.stages] == ["pt", "sft", "grpo"]


# ---- a real tiny pipeline, re-run ------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The tiny pipeline run once to the end (report included); tests copy it before changing it."""
    from rlhfkit.tasks import get_task

    base = tmp_path_factory.mktemp("pipeline")
    # the user's own file for dpo (inside output_dir, so the copies the tests make still skip)
    get_task("sentiment").write(base / "p" / "mydata", seed=1, sizes=SIZES)
    spec = tiny_pipeline(base / "p", dpo_data=base / "p" / "mydata" / "preference_train.jsonl")
    result = run_pipeline(resolve_pipeline(spec))
    return base, spec, result


def _copy(finished, tmp_path) -> tuple[dict, Path]:
    base, spec, _ = finished
    shutil.copytree(base, tmp_path / "c")
    spec = json.loads(json.dumps(spec).replace(str(base), str(tmp_path / "c")))
    return spec, tmp_path / "c"


def _actions(steps) -> dict[str, str]:
    return {s.stage.name: s.action for s in steps}


def test_first_run_runs_everything_and_second_skips_everything(finished, tmp_path, capsys):
    _, _, result = finished
    assert _actions(result.steps) == dict.fromkeys(["pt", "sft", "rm", "ppo", "dpo"], "run")
    assert all(s.reason == "new" for s in result.steps)
    spec, root = _copy(finished, tmp_path)  # a moved pipeline directory still counts as finished
    stamp = (root / "p" / "dpo" / "model.safetensors").stat().st_mtime_ns
    again = run_pipeline(resolve_pipeline(spec), report=False)
    assert _actions(again.steps) == dict.fromkeys(["pt", "sft", "rm", "ppo", "dpo"], "skip")
    out = capsys.readouterr().out
    assert "  dpo        skip    finished, config and inputs unchanged" in out
    assert (root / "p" / "dpo" / "model.safetensors").stat().st_mtime_ns == stamp
    assert again.summaries["ppo"]["steps"] == 2


def test_config_change_reruns_that_stage_and_everything_after(finished, tmp_path):
    spec, _ = _copy(finished, tmp_path)
    spec["stages"]["sft"]["learning_rate"] = 5e-4
    steps = plan(resolve_pipeline(spec))
    assert _actions(steps) == {"pt": "skip", "sft": "re-run", "rm": "re-run", "ppo": "re-run", "dpo": "re-run"}
    reasons = {s.stage.name: s.reason for s in steps}
    assert reasons["sft"] == "learning_rate 0.001 -> 0.0005"
    assert steps[1].line() == "  sft        re-run  because learning_rate 0.001 -> 0.0005"
    assert reasons["rm"] == "upstream stage 'sft' trains" and reasons["ppo"] == "upstream stage 'rm', 'sft' trains"


def test_changed_task_data_reruns_every_stage_in_a_dry_run(finished, tmp_path):
    spec, _ = _copy(finished, tmp_path)
    spec["data"]["seed"] = 1
    steps = run_pipeline(resolve_pipeline(spec), dry_run=True).steps
    assert _actions(steps) == {"pt": "re-run", "sft": "re-run", "rm": "re-run", "ppo": "re-run", "dpo": "re-run"}
    assert steps[0].reason == "data.seed 0 -> 1"


def test_changed_input_file_reruns_the_stage(finished, tmp_path, capsys):
    spec, root = _copy(finished, tmp_path)
    data = root / "p" / "mydata" / "preference_train.jsonl"
    data.write_text("".join(data.read_text().splitlines(keepends=True)[:-4]))  # 4 pairs fewer
    result = run_pipeline(resolve_pipeline(spec), report=False)
    assert _actions(result.steps) == {"pt": "skip", "sft": "skip", "rm": "skip", "ppo": "skip", "dpo": "re-run"}
    assert result.steps[-1].reason == "input <output_dir>/mydata/preference_train.jsonl changed"
    assert result.summaries["dpo"]["train_examples"] == SIZES["preference"] - 4
    assert json.loads((root / "p" / "dpo" / STATE_FILE).read_text())["complete"] is True
    assert _actions(plan(resolve_pipeline(spec)))["dpo"] == "skip"


def test_interrupted_stage_resumes_from_its_last_checkpoint(finished, tmp_path, monkeypatch, capsys):
    import rlhfkit.train.loop as loop

    spec, root = _copy(finished, tmp_path)
    spec["stages"]["dpo"]["beta"] = 0.2
    original = loop.save_checkpoint

    def save_then_die(output_dir, step, *args, **kwargs):
        original(output_dir, step, *args, **kwargs)
        if step == 2:
            raise KeyboardInterrupt  # killed right after the step-2 checkpoint

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(resolve_pipeline(spec), report=False)
    monkeypatch.setattr(loop, "save_checkpoint", original)
    state = json.loads((root / "p" / "dpo" / STATE_FILE).read_text())
    assert state["complete"] is False and not (root / "p" / "dpo" / "summary.json").exists()
    capsys.readouterr()
    result = run_pipeline(resolve_pipeline(spec), report=False)
    assert _actions(result.steps)["dpo"] == "resume"
    assert result.steps[-1].reason == "interrupted; resuming from step-000002"
    assert "[dpo] resumed from" in capsys.readouterr().out
    assert result.summaries["dpo"]["steps"] == 3
    steps = [json.loads(line)["step"] for line in (root / "p" / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 3  # one history, no step logged twice out of order


def test_interrupted_before_a_checkpoint_runs_again_and_force_reruns(finished, tmp_path):
    spec, root = _copy(finished, tmp_path)
    state_path = root / "p" / "rm" / STATE_FILE
    state = json.loads(state_path.read_text())
    state_path.write_text(json.dumps({**state, "complete": False}))  # as if killed during training
    (root / "p" / "rm" / "summary.json").unlink()
    steps = plan(resolve_pipeline(spec), force=("dpo",))
    assert _actions(steps) == {"pt": "skip", "sft": "skip", "rm": "run", "ppo": "re-run", "dpo": "re-run"}
    assert steps[2].reason.startswith("interrupted before its first checkpoint")
    assert steps[4].reason == "asked to (--force)"


# ---- report.html --------------------------------------------------------------------------------

class _Sections(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.images, self.external, self.tables = [], 0, [], 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "h2":
            self.ids.append(a.get("id"))
        if tag == "img":
            assert a["src"].startswith("data:image/png;base64,")
            self.images += 1
        if tag in ("script", "link") or (a.get("src") or "").startswith("http"):
            self.external.append(tag)
        if tag == "table":
            self.tables += 1


def test_report_has_every_section_inline_and_no_network(finished):
    from rlhfkit.report import SECTIONS

    _, _, result = finished
    text = result.report.read_text()
    parser = _Sections()
    parser.feed(text)
    assert parser.ids == list(SECTIONS)
    assert not parser.external
    # loss curves of 5 stages, PPO over steps + frontier, models frontier, RM accuracy + reliability + length bias
    assert parser.images >= 11
    models = result.evals["models"]
    assert list(models) == ["pt", "sft", "ppo", "dpo"] and result.evals["baseline"] == "sft"
    for name, m in models.items():
        assert set(m["metrics"]) == {"gold_reward", "rm_score", "kl_to_reference", "length", "eos_rate",
                                     "distinct_1", "distinct_2"}, name
    assert models["sft"]["metrics"]["kl_to_reference"] == 0.0
    # the table is `rlhfkit eval`'s: win rates against the reference stage by every judge
    assert result.evals["judges"] == ["gold", "reward_model"] and models["sft"]["win_rate"] == {}
    assert all(0 <= models["ppo"]["win_rate"][j]["low"] <= models["ppo"]["win_rate"][j]["high"] <= 1
               for j in ("gold", "reward_model"))
    assert "win rate vs sft (gold)" in text and len(models["ppo"]["stats"]["rm_score"]) == 8
    assert len(result.evals["samples"]) == 3 and set(result.evals["samples"][0]["responses"]) == set(models)
    for section in ("No online RL stage", "No reward-model stage", "No model to evaluate"):
        assert section not in text
    s = result.evals["samples"][0]
    assert s["prompt"] in text


def test_eval_json_takes_over_the_models_table_and_samples(finished, tmp_path):
    from rlhfkit.report import load_evals, write_report

    spec, root = _copy(finished, tmp_path)
    eval_json = {"baseline": "sft", "judges": ["gold"], "models": {
        name: {"path": str(root / "p" / name), "metrics": {"gold_reward": 0.5, "rm_score": 0.1, "kl_to_reference": 1.0,
                                                         "length": 9.0, "eos_rate": 1.0, "distinct_1": 0.5,
                                                         "distinct_2": 0.7, "rouge1": 0.25},
               "win_rate": {"gold": {"rate": 0.625, "low": 0.5, "high": 0.75, "n": 64}}}
        for name in ("sft", "ppo")}, "samples": [{"prompt": "the zebra was", "responses": {"sft": "odd .", "ppo": "great ."}}]}
    # ppo's as written now (with the paired score difference), sft's as written before it
    eval_json["models"]["ppo"]["win_rate"]["gold"].update(se=0.06, score_diff=0.12, score_diff_se=0.05)
    (root / "p" / "eval").mkdir()
    (root / "p" / "eval" / "eval.json").write_text(json.dumps(eval_json))
    pipeline = resolve_pipeline(spec)
    evals = load_evals(pipeline)
    assert evals["source"] == "eval.json"
    text = write_report(pipeline, evals=evals).read_text()
    assert "win rate vs sft (gold)" in text and "0.625 [0.500, 0.750] (n=64)</td>" in text
    assert "0.625 [0.500, 0.750] (n=64)<br>score diff +0.120 &plusmn; 0.050" in text
    assert "<th>rouge1</th>" in text  # metrics the report does not know are shown too
    assert "the zebra was" in text and "From <code>eval/eval.json</code>" in text


def test_report_plots_a_judge_where_there_is_no_gold_reward(finished, tmp_path, monkeypatch):
    """A PPO stage with `judge_reward_model` and no built-in task: the report plots the judge's held-out
    score and win rate, and puts the judge on the frontier's gold axis."""
    from rlhfkit import report
    from rlhfkit.report import render_report

    titles: list[str] = []
    points: list = []
    real_png = report._png

    def record(fig):
        titles.extend(ax.get_title() for ax in fig.axes)
        points.extend(line.get_xydata().tolist() for ax in fig.axes for line in ax.get_lines())
        return real_png(fig)

    monkeypatch.setattr(report, "_png", record)

    spec, root = _copy(finished, tmp_path)
    path = root / "p" / "ppo" / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    judged = []
    for r in records:
        if "eval/gold_reward" in r:
            r["eval/judge_score"] = r.pop("eval/gold_reward")
            r["eval/judge_win_rate"] = 0.5
        judged.append(r)
    path.write_text("".join(json.dumps(r) + "\n" for r in judged))
    render_report(resolve_pipeline(spec), {"baseline": None, "judges": [], "models": {}, "samples": []})
    assert "judge reward (held-out)\neval/judge_score" in titles and any("eval/judge_win_rate" in t for t in titles)
    assert not any("eval/gold_reward" in t for t in titles)
    frontier = [(r["eval/kl"], r["eval/judge_score"]) for r in judged if "eval/judge_score" in r]
    assert any(p == [list(x) for x in frontier] for p in points)  # the judge vs KL on the frontier


def test_report_screenshot_in_headless_chromium(finished):
    """Saves report.png next to the report (kept for a person to look at; skipped without chromium)."""
    if not shutil.which("chromium"):
        pytest.skip("chromium not installed (Debian: apt-get install chromium)")
    from PIL import Image

    from rlhfkit.report import screenshot

    _, _, result = finished
    png = screenshot(result.report)
    assert png == result.report.with_suffix(".png")
    with Image.open(png) as im:
        assert im.size[0] == 1280 and im.size[1] > 2000
        # not a blank page: many distinct colours (plots, text)
        assert len(im.convert("RGB").resize((200, 400)).getcolors(1 << 16) or []) > 50


# ---- the demo ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_sentiment_demo_is_a_pipeline_and_a_second_run_skips_it(tmp_path, capsys):
    """`rlhfkit demo --quick`: pt -> sft -> rm -> ppo, dpo as a pipeline; report.md as before, report.html
    next to it and its path printed; run again, every stage is skipped and the numbers are the same."""
    from rlhfkit.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"HTML report (loss curves, reward/KL, RM calibration, samples side by side): {out / 'report.html'}" \
        in printed
    text = (out / "report.md").read_text()
    for heading in ("## Summary: SFT vs PPO vs DPO", "## Samples (held-out prompts)", "## Reward model",
                    "## PPO (held-out prompts", "## DPO ("):
        assert heading in text
    report = json.loads((out / "report.json").read_text())
    assert set(report) == {"pt", "sft", "rm", "ppo", "dpo", "comparison"}
    assert set(report["comparison"]) == {"sft", "ppo", "dpo"} and report["comparison"]["sft"]["kl"] == 0.0
    assert (out / "report.html").is_file()
    assert main(["demo", "--quick", "--output-dir", str(out)]) == 0
    assert printed.count(" run     new") == 5 and capsys.readouterr().out.count(" skip    finished") == 5
    assert json.loads((out / "report.json").read_text()) == report


def test_report_reads_what_rlhfkit_eval_writes(finished, tmp_path):
    """`rlhfkit eval` run on the pipeline's models, its eval.json at output_dir/eval/eval.json: the report
    takes the table (win rates included) and the samples from it."""
    from rlhfkit.eval.compare import build_eval_config, run_eval
    from rlhfkit.report import load_evals, write_report

    spec, root = _copy(finished, tmp_path)
    p = root / "p"
    c = build_eval_config({"models": {n: str(p / n) for n in ("sft", "ppo", "dpo")}, "baseline": "sft",
                           "task": "sentiment", "reward_model": str(p / "rm"), "num_prompts": 8, "max_new_tokens": 8,
                           "num_samples": 2, "bootstrap_samples": 50, "output": str(p / "eval" / "eval.json")})
    run_eval(c, printer=lambda *a, **k: None)
    pipeline = resolve_pipeline(spec)
    evals = load_evals(pipeline)
    assert evals["source"] == "eval.json" and list(evals["models"]) == ["sft", "ppo", "dpo"]
    text = write_report(pipeline, evals=evals).read_text()
    assert evals["judges"]
    for judge in evals["judges"]:
        assert f"win rate vs sft ({judge})" in text
    assert evals["samples"][0]["prompt"] in text and len(evals["samples"]) == 2
