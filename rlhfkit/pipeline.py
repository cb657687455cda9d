"""`rlhfkit pipeline CONFIG.yaml`: several stages from one YAML, in one process, each stage's output
feeding the next, re-runs that redo only what changed, and an HTML report at the end.

    output_dir: runs/sentiment_pipeline
    data: {task: sentiment, seed: 0}          # optional: a built-in task's data under output_dir/data
    defaults: {seed: 0, max_new_tokens: 24}   # every stage whose config has the key
    stages:                                   # run in this order
      pt:  {model_name_or_path: "preset:tiny", num_train_epochs: 4}
      sft: {learning_rate: 1.0e-3}            # model: pt's output (automatic)
      rm:  {}                                 # model: sft's output
      ppo: {max_steps: 30}                    # policy and reference: sft; reward_model: rm
      dpo: {stage: dpo, from: sft}            # a stage's type is its name or `stage:`; `from:` its model
    report: {num_prompts: 128}

Wiring (the user writes no paths between stages): a stage's model is the output of the last earlier
stage of the kind it builds on (`UPSTREAM_KINDS`: sft on pt; rm, dpo, kto, ppo, grpo, rloo, online_dpo, xpo,
nash_md, spin, self_reward on sft, else pt), or of the stage named by `from:`; ppo's, online_dpo's, xpo's and
nash_md's `reward_model` is the last earlier rm stage (unless `reward_model` or `reward_funcs` is given); and any of `MODEL_KEYS` whose value is the name of an
earlier stage means that stage's output. With `data`, each stage's `dataset` / `eval_dataset` default
to the task's files for its kind (`TASK_FILES`) and `task` to the task (gold-reward evaluation);
self_reward's `judge_template` to the task's (the template of its `judge` rows).

Re-running (`plan`): each stage directory holds `pipeline_state.json` with the stage's fingerprint
(sha256 of its resolved config, the contents of its input files and its upstream stages'
fingerprints) and whether it finished. A finished stage with the same fingerprint is skipped; an
unfinished one with the same fingerprint resumes from its latest checkpoint (`resume_from_checkpoint:
true`; set `save_steps` to have checkpoints); anything else runs from scratch in a cleared directory,
and so does every stage after one that runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from rlhfkit.config import STAGES, BaseConfig, _suggest, build_config, parse_overrides, read_yaml
from rlhfkit.errors import ConfigError

STATE_FILE = "pipeline_state.json"

POLICY_KINDS = ("pt", "sft", "dpo", "kto", "ppo", "grpo", "rloo", "online_dpo", "xpo", "nash_md", "spin", "self_reward")
"""Stage kinds whose output is a causal LM (a model in the report's table and samples)."""

UPSTREAM_KINDS: dict[str, tuple[str, ...]] = {
    "pt": (), "sft": ("pt",), "rm": ("sft", "pt"), "dpo": ("sft", "pt"), "kto": ("sft", "pt"),
    "ppo": ("sft", "pt"), "grpo": ("sft", "pt"), "rloo": ("sft", "pt"), "online_dpo": ("sft", "pt"),
    "xpo": ("sft", "pt"), "nash_md": ("sft", "pt"), "spin": ("sft", "pt"), "self_reward": ("sft", "pt"),
}
"""Kind -> the kinds whose output becomes its `model_name_or_path` without `from:`, in order of preference
(the last earlier stage of the first kind present)."""

TASK_FILES: dict[str, tuple[str, str | None]] = {
    "pt": ("pt_train", "pt_eval"), "sft": ("sft_train", "sft_eval"),
    "rm": ("preference_train", "preference_eval"), "dpo": ("preference_train", "preference_eval"),
    "kto": ("unpaired_train", "unpaired_eval"), "ppo": ("prompt_train", None),
    "grpo": ("prompt_train", None), "rloo": ("prompt_train", None), "online_dpo": ("prompt_train", None),
    "xpo": ("prompt_train", None), "nash_md": ("prompt_train", None), "spin": ("sft_train", None), "self_reward": ("prompt_train", None),
}
"""Kind -> (dataset, eval_dataset) file stems of a built-in task's data (`rlhfkit data`)."""

REWARD_MODEL_KINDS = ("ppo", "online_dpo", "xpo", "nash_md")
"""Kinds whose `reward_model` defaults to the last earlier rm stage (unless reward_model or reward_funcs is given)."""

MODEL_KEYS = ("model_name_or_path", "tokenizer_name_or_path", "ref_model", "reward_model", "judge_reward_model")
"""Keys whose value may name an earlier stage (meaning that stage's output directory)."""

PATH_KEYS = (*MODEL_KEYS, "dataset", "eval_dataset", "normalization_dataset")
"""Keys whose local files and directories are fingerprinted (their contents, not their names)."""

PIPELINE_OWNED = ("output_dir", "overwrite_output_dir", "resume_from_checkpoint")
"""Stage keys the pipeline sets itself."""

UNHASHED = ("output_dir", "overwrite_output_dir", "resume_from_checkpoint", "disable_tqdm", "report_to",
            "save_total_limit")
"""Config keys that do not change what a stage computes (left out of its fingerprint)."""

CONTROL_KEYS = ("stage", "from", "description")
"""Keys of a stage entry that are the pipeline's, not the stage config's."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class DataSpec(_Strict):
    """A built-in task's data, written to `output_dir/data` (as `rlhfkit data TASK DIR` does)."""

    task: str
    """Built-in task name (`sentiment`, `arithmetic`)."""
    seed: int = 0
    """Seed of the generated data."""
    sizes: dict[str, int] = {}
    """Rows per data kind (`pt`, `sft`, `preference`, `prompt`, ...); the task's defaults otherwise."""


class ReportSpec(_Strict):
    """`report.html`: per-model metrics and samples on the same held-out prompts."""

    enabled: bool = True
    """Write output_dir/report.html after the stages."""
    num_prompts: int = 128
    """Held-out prompts sampled once per model for the metrics table (gold reward, RM score, KL, ...)."""
    num_samples: int = 6
    """Prompts whose responses are shown side by side."""
    max_new_tokens: int = 24
    """Tokens generated per prompt."""
    temperature: float = 0.7
    """Sampling temperature."""
    seed: int = 0
    """Sampling seed (the same prompts and random stream for every model)."""
    reference: str | None = None
    """Stage whose model is the KL reference and the baseline (default: the last sft stage, else the first
    policy stage)."""
    prompts: str | None = None
    """A file of rows with a `prompt` column to sample from when the pipeline has no built-in task."""


class PipelineConfig(_Strict):
    """The pipeline YAML."""

    output_dir: str
    """Every stage writes to output_dir/<stage name>; the report to output_dir/report.html."""
    data: DataSpec | None = None
    """A built-in task's data (and gold reward) for every stage."""
    defaults: dict[str, Any] = {}
    """Config keys for every stage whose config has them (a stage's own entry wins)."""
    stages: dict[str, dict[str, Any] | None]
    """Stage name -> its config keys, run in this order. The name is the stage kind unless `stage:` says
    otherwise; `from:` names the stage whose output is its model; `description:` is printed before it."""
    report: ReportSpec = ReportSpec()
    """The HTML report."""


@dataclass
class Stage:
    """One resolved stage: its validated config and where its inputs come from."""

    name: str
    kind: str
    config: BaseConfig
    upstream: dict[str, str]
    """config key -> the earlier stage whose output it is."""
    description: str | None = None
    data: dict | None = None
    """The pipeline's `data` spec (task, seed, sizes) when it has one: part of the fingerprint, so that a
    dry run sees a data change before the files are rewritten."""

    @property
    def output_dir(self) -> Path:
        return Path(self.config.output_dir)


@dataclass
class Pipeline:
    config: PipelineConfig
    stages: list[Stage]
    source: str = "pipeline"

    @property
    def output_dir(self) -> Path:
        return Path(self.config.output_dir)

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)


@dataclass
class Step:
    """The plan for one stage: `action` is skip, resume, run or re-run; `reason` says why."""

    stage: Stage
    action: str
    reason: str
    fingerprint: str
    record: dict = field(default_factory=dict)

    def line(self) -> str:
        because = "because " if self.action == "re-run" else ""
        return f"  {self.stage.name:<10s} {self.action:<7s} {because}{self.reason}"


# ---- loading and validation ---------------------------------------------------------------------

def _set_dotted(values: dict, key: str, value) -> None:
    parts = key.split(".")
    node = values
    for part in parts[:-1]:
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: '{part}' is not a mapping")
    node[parts[-1]] = value


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> Pipeline:
    """Read the pipeline YAML, apply dotted `key=value` overrides (`stages.sft.learning_rate=1e-3`,
    `defaults.seed=1`), and validate it whole (`resolve_pipeline`)."""
    values = read_yaml(path)
    for key, value in parse_overrides(overrides or []).items():
        _set_dotted(values, key, value)
    return resolve_pipeline(values, source=str(path))


def resolve_pipeline(values: dict | PipelineConfig, source: str = "pipeline") -> Pipeline:
    """Validate the pipeline and every stage's config (wired to its upstream stages) before anything
    runs: unknown keys, stage names, references and bad values raise one ConfigError naming where."""
    if isinstance(values, PipelineConfig):
        spec = values
    else:
        try:
            spec = PipelineConfig(**values)
        except ValidationError as e:
            problems = []
            for err in e.errors():
                loc = ".".join(str(p) for p in err["loc"])
                if err["type"] == "extra_forbidden":
                    parent = PipelineConfig
                    if len(err["loc"]) > 1:
                        parent = {"data": DataSpec, "report": ReportSpec}.get(str(err["loc"][0]), PipelineConfig)
                    problems.append(f"unknown key '{loc}'{_suggest(str(err['loc'][-1]), list(parent.model_fields))}")
                elif err["type"] == "missing":
                    problems.append(f"missing required key '{loc}'")
                else:
                    problems.append(f"'{loc}': {err['msg']}")
            raise ConfigError(f"{source}: " + "; ".join(problems)) from None
    if not spec.stages:
        raise ConfigError(f"{source}: 'stages' lists no stage")
    out = Path(spec.output_dir)
    data_dir = out / "data"
    if spec.data is not None:
        from rlhfkit.tasks import get_task

        try:
            get_task(spec.data.task)
        except ValueError as e:
            raise ConfigError(f"{source}: data.task: {e}") from None

    kinds = {}
    for name, entry in spec.stages.items():
        entry = entry or {}
        if not isinstance(entry, dict):
            raise ConfigError(f"{source}: stages.{name}: expected a mapping of config keys")
        kind = entry.get("stage", name)
        if kind not in STAGES:
            hint = _suggest(str(kind), list(STAGES))
            if "stage" in entry:
                raise ConfigError(f"{source}: stages.{name}.stage: unknown stage '{kind}'{hint}; "
                                  f"choose one of {', '.join(STAGES)}")
            raise ConfigError(f"{source}: stages.{name}: '{name}' is not a stage{hint}; name it after its "
                              f"stage ({', '.join(STAGES)}) or give `stage:`")
        if not name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"{source}: stages.{name}: a stage name is letters, digits, '_' and '-' "
                              "(it becomes a directory)")
        kinds[name] = kind

    problems = []
    unknown_defaults = [k for k in spec.defaults
                        if not any(k in STAGES[kind].model_fields for kind in kinds.values())]
    all_fields = sorted({f for kind in kinds.values() for f in STAGES[kind].model_fields})
    for key in unknown_defaults:
        problems.append(f"defaults.{key}: no stage of this pipeline has this key{_suggest(key, all_fields)}")
    for key in PIPELINE_OWNED:
        if key in spec.defaults:
            problems.append(f"defaults.{key}: set by the pipeline (output_dir/<stage name>, skip/resume/re-run)")
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))

    stages: list[Stage] = []
    for name, entry in spec.stages.items():
        entry = dict(entry or {})
        kind = kinds[name]
        fields = STAGES[kind].model_fields
        where = f"{source}: stages.{name}"
        for key in PIPELINE_OWNED:
            if key in entry:
                raise ConfigError(f"{where}.{key}: set by the pipeline (output_dir/<stage name>, "
                                  "skip/resume/re-run); remove it")
        entry.pop("stage", None)
        description = entry.pop("description", None)
        earlier = {s.name: s for s in stages}
        upstream: dict[str, str] = {}

        values: dict[str, Any] = {}
        if spec.data is not None:
            train, evaluation = TASK_FILES[kind]
            values["dataset"] = str(data_dir / f"{train}.jsonl")
            if evaluation is not None:
                values["eval_dataset"] = str(data_dir / f"{evaluation}.jsonl")
            values["task"] = spec.data.task
            if kind == "self_reward":  # judge as the task's `judge` rows teach
                from rlhfkit.tasks import get_task

                values["judge_template"] = get_task(spec.data.task).judge_template
        values.update({k: v for k, v in spec.defaults.items() if k in fields})
        source_stage = entry.pop("from", None)
        if source_stage is not None:
            if source_stage not in earlier:
                raise ConfigError(f"{where}.from: '{source_stage}' is not an earlier stage"
                                  f"{_suggest(str(source_stage), list(earlier))}; earlier stages: "
                                  f"{', '.join(earlier) or '(none)'}")
            if "model_name_or_path" in entry:
                raise ConfigError(f"{where}: give `from` or `model_name_or_path`, not both")
            upstream["model_name_or_path"] = source_stage
        elif "model_name_or_path" not in entry:
            for want in UPSTREAM_KINDS[kind]:
                found = [s.name for s in stages if s.kind == want]
                if found:
                    upstream["model_name_or_path"] = found[-1]
                    break
        if (kind in REWARD_MODEL_KINDS and "reward_model" not in entry and "reward_funcs" not in entry
                and "reward_model" not in values and "reward_funcs" not in values):
            rms = [s.name for s in stages if s.kind == "rm"]
            if rms:
                upstream["reward_model"] = rms[-1]
        values.update(entry)
        for key in MODEL_KEYS:
            value = values.get(key)
            if isinstance(value, str) and value in spec.stages:
                if value not in earlier:
                    raise ConfigError(f"{where}.{key}: stage '{value}' "
                                      f"{'is this stage' if value == name else 'runs after this one'}; "
                                      "list it earlier")
                upstream[key] = value
        for key, up in upstream.items():
            values[key] = str(out / up)
        if "model_name_or_path" not in values:
            wanted = " or ".join(UPSTREAM_KINDS[kind]) or "none"
            raise ConfigError(f"{where}: no model: give model_name_or_path (e.g. preset:tiny) or `from:` an "
                              f"earlier stage (stages run in the order listed; a {kind} stage builds on an earlier "
                              f"{wanted} stage)")
        values["output_dir"] = str(out / name)
        values["overwrite_output_dir"] = True
        config = build_config(kind, values, source=where)
        stages.append(Stage(name, kind, config, upstream, description,
                            spec.data.model_dump(mode="json") if spec.data is not None else None))

    if spec.report.reference is not None and spec.report.reference not in kinds:
        raise ConfigError(f"{source}: report.reference: '{spec.report.reference}' is not a stage"
                          f"{_suggest(spec.report.reference, list(kinds))}")
    return Pipeline(spec, stages, source)


# ---- fingerprints and the plan --------------------------------------------------------------------

def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def path_digest(path: Path) -> str:
    """A file: sha256 of its contents. A directory (a model): sha256 of its files' names, sizes and
    contents for files up to 64 MB, names, sizes and modification times above (weights of real models)."""
    if path.is_file():
        return _file_digest(path)
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        if "checkpoints" in p.relative_to(path).parts or p.name == STATE_FILE:
            continue
        size = p.stat().st_size
        detail = _file_digest(p) if size <= 64 << 20 else str(p.stat().st_mtime_ns)
        h.update(f"{p.relative_to(path)}\0{size}\0{detail}\n".encode())
    return h.hexdigest()[:16]


def _state(stage: Stage) -> dict | None:
    path = stage.output_dir / STATE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _relative(value, root: str):
    if isinstance(value, list):
        return [_relative(v, root) for v in value]
    if isinstance(value, str) and value.startswith(root + os.sep):
        return "<output_dir>" + value[len(root):]
    return value


def stage_record(stage: Stage, upstream_ids: dict[str, str]) -> dict:
    """What a stage's fingerprint covers: its resolved config (less `UNHASHED`; upstream outputs as
    `stage:NAME`), the contents of its local input files and the ids of its upstream stages' outputs."""
    import rlhfkit

    root = str(stage.output_dir.parent)
    config = stage.config.model_dump(mode="json")
    for key in UNHASHED:
        config.pop(key, None)
    for key, up in stage.upstream.items():
        config[key] = f"stage:{up}"
    inputs: dict[str, str] = {f"stage:{up}": upstream_ids[up] for up in sorted(set(stage.upstream.values()))}
    for key in PATH_KEYS:
        if key in stage.upstream:
            continue
        value = config.get(key)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str) and Path(item).exists():
                inputs[_relative(item, root)] = path_digest(Path(item))
    # paths inside the pipeline's directory are recorded relative to it: a moved pipeline still skips
    config = {k: _relative(v, root) for k, v in config.items()}
    record = {"kind": stage.kind, "config": config, "inputs": inputs, "data": stage.data,
              "rlhfkit": rlhfkit.__version__}
    record["fingerprint"] = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]
    return record


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."


def _what_changed(old: dict, new: dict) -> str:
    changes = []
    old_config, new_config = old.get("config", {}), new["config"]
    for key in sorted(set(old_config) | set(new_config)):
        if old_config.get(key) != new_config.get(key):
            changes.append(f"{key} {_short(old_config.get(key))} -> {_short(new_config.get(key))}")
    old_inputs, new_inputs = old.get("inputs", {}), new["inputs"]
    for key in sorted(set(old_inputs) | set(new_inputs)):
        if old_inputs.get(key) != new_inputs.get(key):
            what = f"upstream stage '{key[6:]}' output" if key.startswith("stage:") else f"input {key}"
            changes.append(f"{what} changed")
    old_data, new_data = old.get("data") or {}, new["data"] or {}
    for key in sorted(set(old_data) | set(new_data)):
        if old_data.get(key) != new_data.get(key):
            changes.append(f"data.{key} {_short(old_data.get(key))} -> {_short(new_data.get(key))}")
    if old.get("kind") != new["kind"]:
        changes.append(f"stage kind {old.get('kind')} -> {new['kind']}")
    if old.get("rlhfkit") != new["rlhfkit"]:
        changes.append(f"rlhfkit {old.get('rlhfkit')} -> {new['rlhfkit']}")
    if not changes:
        return "its fingerprint changed"
    more = f" (+{len(changes) - 3} more)" if len(changes) > 3 else ""
    return "; ".join(changes[:3]) + more


def plan(pipeline: Pipeline, force: tuple[str, ...] = ()) -> list[Step]:
    """Decide for every stage, in order: skip (finished, same fingerprint, every upstream stage skipped),
    resume (unfinished, same fingerprint, a checkpoint exists), run (new or no usable output) or re-run
    (its config, an input or an upstream stage changed; or `force`d)."""
    from rlhfkit.train.checkpoint import list_checkpoints

    steps: list[Step] = []
    ids: dict[str, str] = {}
    by_name: dict[str, Step] = {}
    for stage in pipeline.stages:
        # an upstream stage that will train has no output id yet: its plan fingerprint stands in
        upstream_ids = {up: ids[up] for up in stage.upstream.values()}
        record = stage_record(stage, upstream_ids)
        state = _state(stage)
        training_upstream = sorted({up for up in stage.upstream.values() if by_name[up].action != "skip"})
        finished = (state is not None and state.get("complete") and (stage.output_dir / "summary.json").is_file())
        if stage.name in force:
            step = Step(stage, "re-run" if state else "run", "asked to (--force)", record["fingerprint"], record)
        elif state is None:
            reason = ("output directory has no pipeline record" if stage.output_dir.exists()
                      and any(stage.output_dir.iterdir()) else "new")
            step = Step(stage, "run", reason, record["fingerprint"], record)
        elif training_upstream:
            step = Step(stage, "re-run", f"upstream stage {', '.join(map(repr, training_upstream))} trains",
                        record["fingerprint"], record)
        elif state.get("fingerprint") != record["fingerprint"]:
            step = Step(stage, "re-run", _what_changed(state, record), record["fingerprint"], record)
        elif finished:
            step = Step(stage, "skip", "finished, config and inputs unchanged", record["fingerprint"], record)
        else:
            ckpts = list_checkpoints(stage.output_dir)
            if ckpts:
                step = Step(stage, "resume", f"interrupted; resuming from {ckpts[-1].name}", record["fingerprint"],
                            record)
            else:
                step = Step(stage, "run", "interrupted before its first checkpoint (set save_steps to resume)",
                            record["fingerprint"], record)
        steps.append(step)
        by_name[stage.name] = step
        ids[stage.name] = (f"{record['fingerprint']}:{state.get('run_id')}" if step.action == "skip"
                           else f"{record['fingerprint']}:pending")
    return steps


# ---- running ----------------------------------------------------------------------------------

@dataclass
class PipelineResult:
    output_dir: Path
    steps: list[Step]
    summaries: dict[str, dict]
    """stage name -> its summary.json."""
    report: Path | None
    evals: dict | None = None
    """The report's per-model metrics and samples (eval.json's shape), when a report was written."""


def write_data(pipeline: Pipeline) -> None:
    """The built-in task's data files under output_dir/data (unchanged content keeps stages skipping)."""
    spec = pipeline.config.data
    if spec is None:
        return
    from rlhfkit.tasks import get_task

    data_dir = pipeline.output_dir / "data"
    print(f"== data: task '{spec.task}' (seed {spec.seed}) -> {data_dir}")
    get_task(spec.task).write(data_dir, seed=spec.seed, sizes=spec.sizes or None)


def _write_state(stage: Stage, record: dict, complete: bool, run_id: str | None) -> None:
    state = {**record, "complete": complete, "run_id": run_id, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    path = stage.output_dir / STATE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, path)


def run_pipeline(pipeline: Pipeline, *, force: tuple[str, ...] = (), dry_run: bool = False,
                 report: bool | None = None) -> PipelineResult:
    """Write the data, print the plan, run the stages that need it (through the same stage functions as
    the CLI), then write report.html. `force`: stage names to re-run (and everything after them)."""
    from rlhfkit.cli import stage_function

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("rlhfkit pipeline runs in one process; under torchrun / accelerate launch run the "
                          "stages one by one (rlhfkit STAGE CONFIG.yaml)")
    unknown = [f for f in force if f not in {s.name for s in pipeline.stages}]
    if unknown:
        raise ConfigError(f"--force {unknown[0]}: not a stage of this pipeline"
                          f"{_suggest(unknown[0], [s.name for s in pipeline.stages])}")
    out = pipeline.output_dir
    if not dry_run:
        out.mkdir(parents=True, exist_ok=True)
        write_data(pipeline)
    steps = plan(pipeline, force)
    print(f"== pipeline {pipeline.source} -> {out}: plan")
    for step in steps:
        print(step.line())
    if dry_run:
        return PipelineResult(out, steps, {}, None, None)
    (out / "pipeline.yaml").write_text(yaml.safe_dump(pipeline.config.model_dump(mode="json"),
                                                          sort_keys=False))

    summaries: dict[str, dict] = {}
    ids: dict[str, str] = {}
    for step in steps:
        stage = step.stage
        if step.action == "skip":
            state = _state(stage) or {}
            ids[stage.name] = f"{step.fingerprint}:{state.get('run_id')}"
            print(f"== {stage.name} ({stage.kind}): skipped, finished earlier in {stage.output_dir}")
            summaries[stage.name] = json.loads((stage.output_dir / "summary.json").read_text())
            continue
        # the record again, now that every upstream stage has its final output id
        record = stage_record(stage, {up: ids[up] for up in stage.upstream.values()})
        config = stage.config
        if step.action == "resume":
            config = config.model_copy(update={"resume_from_checkpoint": True})
        elif stage.output_dir.exists():
            shutil.rmtree(stage.output_dir)
        stage.output_dir.mkdir(parents=True, exist_ok=True)
        _write_state(stage, record, complete=False, run_id=None)
        title = f": {stage.description}" if stage.description else ""
        print(f"== {stage.name} ({stage.kind}, {step.action}){title}")
        result = stage_function(stage.kind)(config)
        run_id = uuid.uuid4().hex[:12]
        _write_state(stage, record, complete=True, run_id=run_id)
        ids[stage.name] = f"{record['fingerprint']}:{run_id}"
        summaries[stage.name] = result.summary
        del result

    report_path, evals = None, None
    if pipeline.config.report.enabled if report is None else report:
        from rlhfkit.report import load_evals, write_report

        evals = load_evals(pipeline)
        report_path = write_report(pipeline, steps, evals)
        print(f"== report: {report_path}")
    return PipelineResult(out, steps, summaries, report_path, evals)


def run_pipeline_cli(argv: list[str]) -> int:
    """`rlhfkit pipeline CONFIG.yaml [key=value ...] [--dry-run] [--force STAGE ...] [--no-report]`."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="rlhfkit pipeline", description="run several stages from one YAML; re-runs skip what is done "
        "and unchanged, resume what was interrupted, re-run what changed; writes report.html")
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="dotted key=value, e.g. stages.sft.learning_rate=1e-3")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the plan only")
    parser.add_argument("--force", action="append", default=[], metavar="STAGE",
                        help="re-run this stage (and every stage after it that uses it)")
    parser.add_argument("--no-report", action="store_true", help="skip report.html")
    parser.add_argument("--screenshot", action="store_true",
                        help="also save report.png next to report.html (needs chromium: apt-get install chromium)")
    args = parser.parse_args(argv)
    pipeline = load_pipeline(args.config, args.overrides)
    result = run_pipeline(pipeline, force=tuple(args.force), dry_run=args.dry_run,
                          report=False if args.no_report else None)
    if result.report is not None:
        print(f"[pipeline] done: report in {result.report}")
        if args.screenshot:
            from rlhfkit.report import screenshot

            print(f"[pipeline] screenshot: {screenshot(result.report)}")
    return 0
