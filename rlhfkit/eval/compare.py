"""`rlhfkit eval`: compare trained models on one prompt set, with win rates against a baseline.

Every model answers the same prompts with the same sampling settings and the same seed
(`responses_per_prompt` responses per prompt, default one), the way the demo's summary table and
the online stages' held-out evaluation sample (`HFGenerator`, one private generator seeded with
`seed`, `batch_size` prompts per chunk: same seed and batch size, same samples). Per model:

    gold_reward        mean gold reward of a built-in `task` (the demo's number)
    rm_score           mean reward-model score, normalised as stored (`load_reward_model`)
    reward/<name>      mean of each reward function (rows it applies to)
    kl_to_reference    KL(model || reference) summed over response tokens, mean over prompts:
                       the k1 estimator on the model's own samples, log-probs at the sampling
                       temperature (`eval.generation.rollout_kl`, the demo's KL)
    length, eos_rate   mean response tokens (EOS included), share ended by EOS / a stop string
    distinct_1/2       unique n-grams / all n-grams over all responses (whitespace words)
    rouge1/2/L         mean ROUGE F1 against the rows' references (`rouge-score`)

and the win rate of each model against the baseline under each judge (the gold reward, the
reward model, a reward function): per prompt 1 if the model's response scores higher than the
baseline's, 1/2 if equal, 0 if lower (with k responses per prompt: the model's j-th against the
baseline's j-th, the k outcomes averaged), averaged over the prompts both are scored on, with a
percentile bootstrap 95% interval over prompts (seeded) and its standard error; beside it the mean
paired score difference model - baseline per prompt (paired the same way) with its standard error,
which separates a small consistent gain from noise better than the share of wins (a win counts a
+0.01 and a +2 alike). Writes JSON (schema in `run_eval`'s docstring) and prints a table.

Prompts: a data file in any format with a prompt (prompt, prompt_completion, preference, ranking,
unpaired, messages/alpaca: the conversation before the last assistant reply), or the held-out
prompts of a built-in `task`: `task.make("prompt", num_prompts, seed=prompt_seed, split="eval")`,
what `sample_and_score` and the online stages' evaluation use. With `seed` and `prompt_seed` as in
a run, eval reproduces its numbers: the demo's summary table (`seed: 0`, temperature 0.7, 128
prompts, 24 new tokens) and an online stage's `eval/gold_reward` (sampled with seed + 7:
`seed: 7, prompt_seed: 0`).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

from rlhfkit.config import DatasetFormat
from rlhfkit.errors import ConfigError

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")
ROUGE_INSTALL = "pip install 'rlhfkit[eval]'  (or: pip install rouge-score)"
GOLD, REWARD_MODEL = "gold", "reward_model"


class EvalConfig(BaseModel):
    """`rlhfkit eval`: sample every model on the same prompts and compare them."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)

    models: dict[str, str]
    """Models to compare, `{name: reference}`: an output directory (full model, or LoRA adapter loaded
    over the base its adapter_config.json names), a hub id, a `.gguf` file or a `pkg:` file."""
    baseline: str | None = None
    """The model (a name in `models`) every other is compared with; default the first."""
    prompts: str | list[str] | None = None
    """Prompt data: a file / saved dataset / hub id (or a list), in any format with a prompt.
    Default: the held-out prompts of `task`."""
    column_map: dict[str, str] = {}
    """Rename columns of `prompts` before format detection: `{their_name: our_name}`."""
    dataset_format: DatasetFormat | None = None
    """Row format of `prompts`; detected from the columns when omitted."""
    task: str | None = None
    """A built-in task (e.g. `sentiment`): its gold reward is scored (judge `gold`), and without
    `prompts` its held-out prompts are used."""
    num_prompts: int | None = None
    """Prompts to evaluate: the first this-many rows of `prompts` (default all), or this many of the
    task's held-out prompts (default 128, the demo's; a task repeats its prompts to fill `n`)."""
    prompt_seed: int | None = None
    """Seed of the task's held-out prompt draw; default `seed` (as the demo's report)."""
    reference_column: str | None = "auto"
    """Column with reference responses for ROUGE: `auto` takes a `reference` column, else the
    completion of prompt_completion rows / the last assistant reply of messages rows; null: no ROUGE."""
    reward_model: str | None = None
    """A reward-model directory from `rlhfkit rm` (full or LoRA), scored with its stored normalisation
    (judge `reward_model`)."""
    reward_funcs: list[str | dict[str, Any]] = []
    """Reward functions, as in the online stages (`module:function`, a built-in name or a mapping with
    options); each is a judge under its name."""
    judges: list[str] | None = None
    """Judges of the win rates: `gold`, `reward_model` and reward-function names. Default: all of them."""
    reference: str | None = None
    """Model for `kl_to_reference`: a name in `models` or a model reference; null: no KL."""
    max_new_tokens: int = 32
    """Longest response sampled."""
    temperature: float = 0.7
    """Sampling temperature (also the temperature of the KL's log-probs)."""
    top_k: int = 0
    """Top-k sampling (0: off)."""
    top_p: float = 1.0
    """Nucleus sampling (1: off)."""
    seed: int = 0
    """Sampling seed (every model samples with it) and bootstrap seed."""
    max_prompt_length: int | None = None
    """Prompts keep their last this-many tokens; null: whole prompts."""
    batch_size: int = 64
    """Prompts per generation chunk and rows per scoring / KL pass (the samples depend on it: keep it
    equal to the run you reproduce; the demo and `sample_and_score` use 64)."""
    bootstrap_samples: int = 1000
    """Bootstrap resamples of the prompts for the win rates' 95% intervals."""
    responses_per_prompt: int = 1
    """Responses each model samples per prompt (k). A win rate compares the model's j-th response to a
    prompt with the baseline's j-th and averages the k outcomes per prompt before the bootstrap over
    prompts: k > 1 removes part of the sampling noise, the prompts stay the unit of the interval.
    Metrics average over all responses."""
    num_samples: int = 8
    """Prompts whose responses go into the JSON's `samples`."""
    output: str = "eval.json"
    """Where the JSON results go."""
    device: str | None = None
    """`cpu`, `cuda`, ...; default cuda when available."""
    vllm_python: str | None = None
    """Sample with vLLM, run by this interpreter (`make vllm`: `.venv-vllm/bin/python`), one engine per
    model in turn (its log next to `output`); default rlhfkit's own sampler. vLLM's samples are not
    rlhfkit's sampler's for the same seed: compare models sampled by the same engine."""
    trust_remote_code: bool = False
    """Allow model code from the hub to run."""
    disable_tqdm: bool | None = None
    """Hide the progress bar (default: shown only on a terminal)."""

    @model_validator(mode="after")
    def _check(self) -> "EvalConfig":
        problems = []
        if not self.models:
            problems.append("models is empty: give at least one `name: reference`")
        if self.baseline is not None and self.models and self.baseline not in self.models:
            problems.append(f"baseline '{self.baseline}' is not among models ({', '.join(self.models)})"
                            f"{_suggest(self.baseline, list(self.models))}")
        if self.prompts is None and self.task is None:
            problems.append("give prompts (a data file) or task (a built-in task's held-out prompts)")
        for key in ("num_prompts", "max_prompt_length"):
            value = getattr(self, key)
            if value is not None and value < 1:
                problems.append(f"{key} must be >= 1 (or null), got {value}")
        for key in ("max_new_tokens", "batch_size", "bootstrap_samples", "responses_per_prompt"):
            if getattr(self, key) < 1:
                problems.append(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.num_samples < 0:
            problems.append(f"num_samples must be >= 0, got {self.num_samples}")
        if self.temperature <= 0:
            problems.append(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0 or not 0 < self.top_p <= 1:
            problems.append(f"top_k must be >= 0 and top_p in (0, 1], got {self.top_k}, {self.top_p}")
        from rlhfkit.rollout.rewards import check_reward_spec

        problems += [p for p in (check_reward_spec(s, has_task=self.task is not None) for s in self.reward_funcs) if p]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def baseline_name(self) -> str:
        return self.baseline if self.baseline is not None else next(iter(self.models))


def _suggest(key: str, choices: list[str]) -> str:
    """' (did you mean 'x'?)' for the closest choice, ignoring case; '' when none is close."""
    import difflib

    lower = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(key.lower(), list(lower), n=1, cutoff=0.6)
    return f" (did you mean '{lower[close[0]]}'?)" if close else ""


def build_eval_config(values: dict[str, Any], source: str = "config") -> EvalConfig:
    """Validate `values` (unknown keys -> ConfigError with the closest key)."""
    from rlhfkit.config import build_config

    return build_config("eval", values, source=source, config_cls=EvalConfig)


# ---- pure metrics ----------------------------------------------------------------------------------

def distinct_n(texts: list[str], n: int) -> float:
    """Distinct-n (Li et al. 2016, "A Diversity-Promoting Objective Function for Neural Conversation
    Models"): unique n-grams / all n-grams over every response together, words split on whitespace
    (tokenizer-independent, so models with different tokenizers compare). 0 when there is no n-gram."""
    grams = [tuple(words[i:i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def _per_prompt(scores: list[float], baseline: list[float], group: int, pair: Callable[[float, float], float]
                ) -> list[float]:
    """Per prompt: the mean of `pair(model's j-th score, baseline's j-th)` over its GROUP consecutive
    responses, pairs where either score is NaN left out, a prompt with none left out."""
    if len(scores) != len(baseline):
        raise ValueError(f"{len(scores)} scores but {len(baseline)} baseline scores")
    if group < 1 or len(scores) % group:
        raise ValueError(f"{len(scores)} scores do not split into groups of {group}")
    out = []
    for start in range(0, len(scores), group):
        values = [pair(a, b) for a, b in zip(scores[start:start + group], baseline[start:start + group])
                  if not (math.isnan(a) or math.isnan(b))]
        if values:
            out.append(sum(values) / len(values))
    return out


def pairwise_outcomes(scores: list[float], baseline: list[float], group: int = 1) -> list[float]:
    """Per prompt: 1 if the model's score beats the baseline's, 0.5 on a tie, 0 if lower; pairs where
    either score is NaN (a reward function that does not apply) are left out. GROUP > 1: the scores
    hold GROUP consecutive responses per prompt; a prompt's outcome is the mean of its scored pairs
    (the j-th response against the baseline's j-th), a prompt with none is left out."""
    return _per_prompt(scores, baseline, group, lambda a, b: 1.0 if a > b else 0.5 if a == b else 0.0)


def paired_differences(scores: list[float], baseline: list[float], group: int = 1) -> list[float]:
    """Per prompt: the model's score minus the baseline's, paired and averaged as in `pairwise_outcomes`."""
    return _per_prompt(scores, baseline, group, lambda a, b: a - b)


def mean_and_se(values: list[float]) -> tuple[float, float]:
    """The mean of `values` and its standard error sqrt(s^2 / n) (s^2 the sample variance; 0 for one
    value); (NaN, NaN) for none."""
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1)
    return mean, math.sqrt(var / len(values))


def bootstrap_interval(outcomes: list[float], resamples: int, seed: int, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `outcomes`: `resamples` draws of len(outcomes)
    items with replacement (numpy's PCG64 seeded with `seed`), the (1 - level) / 2 and (1 + level) / 2
    quantiles (linear interpolation) of the resampled means."""
    import numpy as np

    x = np.asarray(outcomes, dtype=np.float64)
    if x.size == 0:
        raise ValueError("bootstrap_interval: no outcomes")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def win_rate(scores: list[float], baseline: list[float], *, resamples: int = 1000, seed: int = 0,
             group: int = 1) -> dict:
    """{"rate", "low", "high", "se", "n", "score_diff", "score_diff_se"}: the mean of `pairwise_outcomes`
    (ties count half; GROUP responses per prompt), its bootstrap 95% interval and its standard error over
    the n prompts, and the mean paired score difference model - baseline (`paired_differences`) with
    its standard error, which tells a small consistent gain from noise better than the win rate does;
    all None but n (0) when no prompt has both scores."""
    outcomes = pairwise_outcomes(scores, baseline, group)
    if not outcomes:
        return {"rate": None, "low": None, "high": None, "se": None, "n": 0, "score_diff": None, "score_diff_se": None}
    low, high = bootstrap_interval(outcomes, resamples, seed)
    rate, se = mean_and_se(outcomes)
    diff, diff_se = mean_and_se(paired_differences(scores, baseline, group))
    return {"rate": rate, "low": low, "high": high, "se": se, "n": len(outcomes), "score_diff": diff,
            "score_diff_se": diff_se}


def rouge_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 (rouge-score, Porter stemming as in the summarization RLHF papers' reports)."""
    scorer = _rouge_scorer()
    totals = dict.fromkeys(ROUGE_KEYS, 0.0)
    for pred, ref in zip(predictions, references):
        for key, score in scorer.score(ref, pred).items():
            totals[key] += score.fmeasure
    return {k: v / max(len(predictions), 1) for k, v in totals.items()}


def _rouge_scorer():
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise ConfigError(f"the prompts have references, and ROUGE needs the rouge-score package: {ROUGE_INSTALL}; "
                          "or set reference_column: null to skip ROUGE") from None
    return rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)


# ---- inputs --------------------------------------------------------------------------------------

def prompt_text(prompt) -> str:
    """A prompt as one string for tables and JSON (message lists as `role: content` lines)."""
    return prompt if isinstance(prompt, str) else "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def _content(response) -> str:
    return response if isinstance(response, str) else "".join(m["content"] for m in response)


def eval_row(row: dict, reference_column: str | None) -> dict:
    """A canonical row -> {prompt, [reference], other columns}: the prompt the models answer and, for
    ROUGE, its reference response (see `EvalConfig.reference_column`)."""
    from rlhfkit.data.formats import conversation_prompt

    skip = {"chosen", "rejected", "responses", "completion", "messages", "label", "margin"}
    if "messages" in row:  # a conversation: the prompt is everything before the last assistant reply
        prompt, reply = conversation_prompt(row["messages"], row.get("_source"))
        out = {"prompt": prompt, **{k: v for k, v in row.items() if k not in skip}}
        implicit = _content(reply[0]["content"]) if reply else None
    elif "prompt" in row:
        out = {k: v for k, v in row.items() if k not in skip}
        implicit = _content(row["completion"]) if "completion" in row and "label" not in row else None
    else:
        raise ConfigError(f"{row.get('_source')}: these rows have no prompt (text rows cannot be evaluated)")
    if reference_column == "auto":
        reference = row.get("reference") if row.get("reference") is not None else implicit
    elif reference_column is not None:
        if row.get(reference_column) is None:
            raise ConfigError(f"{row.get('_source')}: reference_column '{reference_column}' is missing in this row")
        reference = _content(row[reference_column])
    else:
        reference = None
    out.pop("reference", None)
    if reference is not None:
        out["reference"] = reference
    return out


def load_eval_rows(c: EvalConfig, task) -> list[dict]:
    """The prompt rows every model answers, validated (file, line and field on a bad row)."""
    if c.prompts is None:
        rows = task.make("prompt", c.num_prompts or 128, seed=c.seed if c.prompt_seed is None else c.prompt_seed,
                         split="eval")
        return [eval_row(r, None) for r in rows]
    from rlhfkit.data.formats import to_canonical
    from rlhfkit.data.sources import load_rows

    rows = to_canonical(load_rows(c.prompts, c.column_map), c.dataset_format)
    rows = [eval_row(r, c.reference_column) for r in rows[:c.num_prompts]]
    if not rows:
        raise ConfigError(f"prompts {c.prompts}: no rows")
    with_ref = sum("reference" in r for r in rows)
    if with_ref and with_ref != len(rows):
        first = next(r for r in rows if "reference" not in r)
        raise ConfigError(f"{first.get('_source')}: this row has no reference while {with_ref} of {len(rows)} "
                          "rows do; ROUGE needs one per row (or set reference_column: null)")
    return rows


def check_model_reference(label: str, reference: str) -> None:
    """A clear ConfigError when `reference` cannot be a model (checked before anything loads): a missing
    path, a directory with no model or adapter in it, a LoRA adapter whose base is missing, a `pkg:`
    file of a package that is not installed. Hub ids pass (they are looked up when loaded)."""
    from rlhfkit.models.load import package_file

    if reference.startswith("pkg:"):
        try:
            package_file(reference)
        except ConfigError as e:
            raise ConfigError(f"{label}: {str(e).removeprefix('model_name_or_path: ')}") from None
        return
    path = Path(reference).expanduser()
    if reference.endswith(".gguf"):
        if not path.is_file():
            raise ConfigError(f"{label}: GGUF file {reference} does not exist")
        return
    parent = path.parent
    looks_local = (reference.startswith((".", "/", "~")) or path.exists() or reference.count("/") != 1
                   or parent.is_dir())  # `runs/sft` next to an existing `runs/` is a path, not a hub id
    if not looks_local:
        return  # a hub id owner/name
    if not path.exists():
        raise ConfigError(f"{label}: {reference} does not exist")
    if not path.is_dir():
        raise ConfigError(f"{label}: {reference} is a file, not a model directory (or a .gguf file)")
    if (path / "config.json").is_file():
        return
    adapter = path / "adapter_config.json"
    if not adapter.is_file():
        raise ConfigError(f"{label}: {reference} holds no model (no config.json or adapter_config.json)")
    base = json.loads(adapter.read_text()).get("base_model_name_or_path")
    if not base and not (path / "merged" / "config.json").is_file():
        raise ConfigError(f"{adapter}: base_model_name_or_path is empty; cannot find the base model")
    if base and not base.startswith("preset:"):
        check_model_reference(f"{label} (the base of LoRA adapter {reference})", base)


def _judges(c: EvalConfig, func_names: list[str]) -> list[str]:
    """The judges of the win rates: the configured ones, checked, or every score source."""
    available = ([GOLD] if c.task is not None else []) + ([REWARD_MODEL] if c.reward_model else [])
    available += [n for n in func_names if n not in available]
    if c.judges is None:
        return available
    for j in c.judges:
        if j not in available:
            why = {GOLD: " (needs `task`)", REWARD_MODEL: " (needs `reward_model`)"}.get(j, "")
            raise ConfigError(f"judges: unknown judge '{j}'{why}{_suggest(j, available)}; available: "
                              f"{', '.join(available) or 'none (set task, reward_model or reward_funcs)'}")
    return list(dict.fromkeys(c.judges))


# ---- loading models ----------------------------------------------------------------------------------

def _loader() -> Callable:
    """`rlhfkit.models.load.load_for_use` (a function so that tests can forbid loading)."""
    from rlhfkit.models.load import load_for_use

    return load_for_use


# ---- evaluation ---------------------------------------------------------------------------------

def _responses(c: EvalConfig, name: str, model, tokenizer, rows: list[dict], device):
    """Sample one response per row (the seed and chunking of `sample_and_score`; with `vllm_python`
    through a vLLM engine started for this model and stopped after), as a Rollout."""
    from contextlib import closing

    from rlhfkit.rollout.generate import HFGenerator, SamplingParams
    from rlhfkit.rollout.rollout import encode_prompts, generate_rollout

    ids, kept, skipped = encode_prompts(tokenizer, rows, c.max_prompt_length or sys.maxsize)
    if skipped:
        raise ConfigError(f"{skipped} prompt(s) encode to no tokens")
    params = SamplingParams(max_new_tokens=c.max_new_tokens, temperature=c.temperature, top_k=c.top_k,
                            top_p=c.top_p)
    if c.vllm_python:
        from rlhfkit.rollout.vllm_engine import VLLMGenerator

        Path(c.output).parent.mkdir(parents=True, exist_ok=True)
        sampler = VLLMGenerator.for_model(model, tokenizer, c.vllm_python, ids, c.max_new_tokens,
                                          log_path=f"{c.output}.{name}.vllm.log", seed=c.seed)
    else:
        sampler = HFGenerator(tokenizer, batch_size=c.batch_size)
    with closing(sampler):
        ro = generate_rollout(model, tokenizer, sampler, ids, kept, params, c.seed, device)
    return ids, ro


def _kl(c: EvalConfig, model, tokenizer, reference, ref_tokenizer, ro) -> float:
    """`rollout_kl` (k1 summed over response tokens, the online stages' and the demo's KL), mean
    over prompts."""
    from rlhfkit.eval.generation import rollout_kl

    if ref_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(f"reference {c.reference}: its tokenizer differs from the model's, so the KL over "
                          "token log-probs is undefined; compare models that share a vocabulary")
    return rollout_kl(model, reference, ro, c.temperature, c.batch_size).mean().item()


def _score(c: EvalConfig, ro, tokenizer, task, funcs, rm) -> dict[str, list[float]]:
    """Per-response scores of every source: `gold`, `reward_model`, each reward function (NaN where it
    does not apply)."""
    from rlhfkit.rollout.rewards import score_completions
    from rlhfkit.rollout.rollout import Scorer

    prompts = [r["prompt"] for r in ro.rows]
    ended = ro.ended.tolist()
    out: dict[str, list[float]] = {}
    if task is not None:
        out[GOLD] = [float(x) for x in task.gold_reward(prompts, ro.texts, ended)]
    if rm is not None:
        rm_tok = rm.tokenizer if rm.tokenizer.get_vocab() != tokenizer.get_vocab() else None
        scorer = Scorer(tokenizer, [], None, reward_model=rm.score, rm_tokenizer=rm_tok, batch_size=c.batch_size)
        out[REWARD_MODEL] = scorer(ro)[1][REWARD_MODEL].cpu().tolist()
    if funcs:
        ids = [r[m].tolist() for r, m in zip(ro.responses.cpu(), ro.response_mask.cpu())]
        parts = score_completions(funcs, prompts=prompts, completions=ro.texts, completion_ids=ids, ended=ended,
                                  rows=ro.rows)  # every column reaches the functions, `reference` too
        out.update({name: v.tolist() for name, v in parts.items() if name not in out})
    return out


def _mean(values: list[float]) -> float | None:
    vals = [v for v in values if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else None


def metric_key(source: str) -> str:
    """The metrics key of a score source: gold_reward, rm_score, reward/<function>."""
    return {GOLD: "gold_reward", REWARD_MODEL: "rm_score"}.get(source, f"reward/{source}")


def run_eval(c: EvalConfig, printer=print) -> dict:
    """Evaluate every model of `c`; write and return the results:

        {"baseline": NAME, "judges": [...],
         "models": {NAME: {"path": REF,
                           "metrics": {"gold_reward", "rm_score", "reward/<fn>", "kl_to_reference", "length",
                                       "eos_rate", "distinct_1", "distinct_2", "rouge1", "rouge2", "rougeL"},
                           "win_rate": {JUDGE: {"rate", "low", "high", "se", "n",   # {} for the baseline
                                                "score_diff", "score_diff_se"}},
                           "stats": {"length": [...], METRIC: [...]}}},   # per response, for plots
         "samples": [{"prompt": str, "reference"?: str, "responses": {NAME: str}, "ended": {NAME: bool},
                      "scores": {NAME: {source: x}}}],                             # the first num_samples
         "config": {...}}

    Metrics a config does not ask for (no task, no reward model, no reference, no references in the
    data) are absent. Every check of the inputs runs before any model loads."""
    import torch

    from rlhfkit.rollout.rewards import load_reward_funcs
    from rlhfkit.train.common import config_task
    from rlhfkit.train.tracking import progress

    # ---- 0. every input checked before anything heavy loads
    task = config_task(c.task)
    for name, ref in c.models.items():
        check_model_reference(f"models.{name}", ref)
    reference_ref = c.models.get(c.reference, c.reference) if c.reference else None
    if reference_ref is not None and c.reference not in c.models:
        check_model_reference("reference", reference_ref)
    if c.reward_model is not None:
        rm_dir = Path(c.reward_model)
        if not rm_dir.is_dir() or not ((rm_dir / "config.json").is_file() or (rm_dir / "adapter_config.json").is_file()):
            raise ConfigError(f"reward_model: {c.reward_model} is not a reward-model directory (from `rlhfkit rm`)")
    rows = load_eval_rows(c, task)
    if task is not None and not all(isinstance(r["prompt"], str) for r in rows):
        first = next(r for r in rows if not isinstance(r["prompt"], str))
        raise ConfigError(f"{first.get('_source')}: task {c.task}'s gold reward scores text prompts, and this "
                          "prompt is a message list; drop `task` or use the task's own prompt files")
    if c.vllm_python:
        from rlhfkit.rollout.vllm_engine import check_vllm_python

        check_vllm_python(c.vllm_python)
    references = [r["reference"] for r in rows] if rows and "reference" in rows[0] else None
    if references is not None:
        _rouge_scorer()  # the package is there (else the install command), before any model loads
    funcs = load_reward_funcs(c.reward_funcs, task=task)
    judges = _judges(c, [f.name for f in funcs])
    baseline = c.baseline_name
    device = torch.device(c.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    load = _loader()
    per_prompt = c.responses_per_prompt
    sampled = [r for r in rows for _ in range(per_prompt)]  # response j to prompt i is at i * per_prompt + j
    printer(f"[eval] {len(c.models)} model(s) x {len(rows)} prompts"
            + (f" x {per_prompt} responses" if per_prompt > 1 else "") +
            f", baseline {baseline}, judges "
            f"{', '.join(judges) or '-'}; seed {c.seed}, temperature {c.temperature}, {c.max_new_tokens} new tokens")

    # ---- 1. the shared scorers
    rm = None
    if c.reward_model is not None:
        from rlhfkit.models.reward import load_reward_model

        rm = load_reward_model(c.reward_model, device=device)
        rm.model.requires_grad_(False).eval()
    reference = ref_tokenizer = None
    if reference_ref is not None and c.reference not in c.models:
        reference, ref_tokenizer = load(reference_ref, device=device, trust_remote_code=c.trust_remote_code)

    # ---- 2. each model: sample, score, KL
    phases = 2 + (reference_ref is not None)
    bar = progress(total=len(c.models) * phases, disable=c.disable_tqdm, desc="eval")
    results: dict[str, dict] = {}
    scores: dict[str, dict[str, list[float]]] = {}
    texts: dict[str, list[str]] = {}
    ended: dict[str, list[bool]] = {}
    order = [baseline] + [n for n in c.models if n != baseline]
    # the reference among the models: load it first and keep it for the others' KL
    if reference_ref is not None and c.reference in c.models:
        order = [c.reference] + [n for n in order if n != c.reference]
    for name in order:
        bar.set_postfix_str(f"{name}: sampling")
        model, tokenizer = load(c.models[name], device=device, trust_remote_code=c.trust_remote_code)
        with torch.no_grad():
            ids, ro = _responses(c, name, model, tokenizer, sampled, device)
        bar.update(1)
        bar.set_postfix_str(f"{name}: scoring")
        scores[name] = _score(c, ro, tokenizer, task, funcs, rm)
        texts[name], ended[name] = ro.texts, ro.ended.tolist()
        metrics = {metric_key(k): _mean(v) for k, v in scores[name].items()}
        bar.update(1)
        if reference_ref is not None:
            bar.set_postfix_str(f"{name}: KL")
            if name == c.reference:
                reference, ref_tokenizer = model, tokenizer
            metrics["kl_to_reference"] = _kl(c, model, tokenizer, reference, ref_tokenizer, ro)
            bar.update(1)
        metrics.update({"length": ro.lengths.float().mean().item(), "eos_rate": ro.ended.float().mean().item(),
                        "distinct_1": distinct_n(ro.texts, 1), "distinct_2": distinct_n(ro.texts, 2)})
        if references is not None:
            metrics.update(rouge_scores(ro.texts, [x for x in references for _ in range(per_prompt)]))
        results[name] = {"path": c.models[name], "metrics": {k: v for k, v in metrics.items() if v is not None},
                         "stats": {"length": ro.lengths.tolist(),
                                   **{metric_key(k): [_clean(x) for x in v] for k, v in scores[name].items()}}}
        if model is not reference:
            del model
    bar.close()

    # ---- 3. win rates against the baseline, the samples, the file
    for name in c.models:
        results[name]["win_rate"] = {} if name == baseline else {
            j: win_rate(scores[name][j], scores[baseline][j], resamples=c.bootstrap_samples, seed=c.seed,
                     group=per_prompt)
            for j in judges}
    samples = []
    for i, row in enumerate(rows[:c.num_samples]):
        samples.append({"prompt": prompt_text(row["prompt"]),
                        **({"reference": row["reference"]} if "reference" in row else {}),
                        "responses": {n: texts[n][i * per_prompt] for n in c.models},  # its first response
                        "ended": {n: ended[n][i * per_prompt] for n in c.models},
                        "scores": {n: {k: _clean(v[i * per_prompt]) for k, v in scores[n].items()} for n in c.models}})
    out = {"baseline": baseline, "judges": judges, "models": {n: results[n] for n in c.models}, "samples": samples,
           "config": c.model_dump(mode="json")}
    path = Path(c.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    printer(format_table(out))
    printer(f"[eval] results in {path}")
    return out


def _clean(x: float) -> float | None:
    return None if math.isnan(x) else x


def format_table(results: dict) -> str:
    """The metrics and the win rates as an aligned text table (one row per model)."""
    models = results["models"]
    keys = list(dict.fromkeys(k for m in models.values() for k in m["metrics"]))
    judges = results["judges"]
    header = ["model", *keys, *(f"win vs {results['baseline']} ({j}) [95%], score diff ± SE" for j in judges)]
    lines = []
    for name, m in models.items():
        cells = [name + (" (baseline)" if name == results["baseline"] else "")]
        cells += [f"{m['metrics'][k]:.3f}" if k in m["metrics"] else "-" for k in keys]
        for j in judges:
            w = m["win_rate"].get(j)
            cells.append("-" if not w or w["rate"] is None else f"{w['rate']:.3f} [{w['low']:.3f}, {w['high']:.3f}] "
                         f"diff {w['score_diff']:+.3f} ± {w['score_diff_se']:.3f}")
        lines.append(cells)
    widths = [max(len(str(r[i])) for r in [header, *lines]) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths))  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, lines)])


# ---- command line ----------------------------------------------------------------------------------

USAGE = """rlhfkit eval [CONFIG.yaml] [key=value ...] [--model NAME=REF ...] [--KEY VALUE ...]

Sample every model on the same prompts (same seed) and compare: gold reward, reward-model score,
reward functions, KL to a reference, length, EOS rate, distinct-n, ROUGE, and win rates against
the baseline with bootstrap 95% intervals. Every config key is also a flag (--num-prompts 64).
Example:
  rlhfkit eval --model sft=runs/demo/sft --model ppo=runs/demo/ppo --model dpo=runs/demo/dpo \\
      --task sentiment --reward-model runs/demo/rm --reference sft --max-new-tokens 24
`rlhfkit eval --help-config` lists the keys."""


def parse_eval_args(argv: list[str]) -> tuple[str | None, dict[str, Any]]:
    """(config path or None, values): `--model NAME=REF` (repeatable) adds to `models`; `--key value`,
    `--key=value` and `key=value` set a key (values parsed as YAML; a lone flag is `true`; a scalar given
    for a list key becomes a one-item list)."""
    from rlhfkit.config import parse_overrides

    path, values, models = None, {}, {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            if not eq:
                if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                    value, i = argv[i + 1], i + 1
                else:
                    value = "true"
            key = key.replace("-", "_")
            if key == "model":
                name, eq, ref = value.partition("=")
                if not eq or not name or not ref:
                    raise ConfigError(f"--model {value}: expected NAME=REFERENCE (e.g. --model sft=runs/demo/sft)")
                models[name] = ref
            else:
                values.update(parse_overrides([f"{key}={value}"]))
        elif "=" in arg:
            values.update(parse_overrides([arg]))
        elif path is None:
            path = arg
        else:
            raise ConfigError(f"unexpected argument '{arg}' (one config file, then key=value or --key value)")
        i += 1
    if path is not None:
        from rlhfkit.config import read_yaml

        values = {**read_yaml(path), **values}
    if models:
        values["models"] = {**(values.get("models") or {}), **models}
    for key in ("reward_funcs", "judges"):
        if isinstance(values.get(key), (str, dict)):
            values[key] = [values[key]]
    return path, values


def run_eval_cli(argv: list[str]) -> int:
    from rlhfkit.config import describe_config

    if "--help-config" in argv:
        print(describe_config(EvalConfig))
        return 0
    if not argv or "-h" in argv or "--help" in argv:
        print(USAGE)
        return 0 if argv else 2
    path, values = parse_eval_args(argv)
    c = build_eval_config(values, source=path or "command line")
    run_eval(c)
    return 0
