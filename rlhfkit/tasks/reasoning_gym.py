"""reasoning-gym adapter: prompt data from its procedural generators, scored by its own checkers.

reasoning-gym (https://github.com/open-thought/reasoning-gym, optional extra
`pip install 'rlhfkit[reasoning]'`, imported only when used) generates task entries
`{"question": str, "answer": str, "metadata": dict}` from a dataset name, a config dataclass and
a seed, and scores an answer with the dataset's `score_answer(answer, entry) -> float in [0, 1]`.

`rlhfkit data reasoning-gym:TASK OUT_DIR [--size N] [--eval-size M] [--seed S] [--chat]
[--config JSON]` writes `prompt_train.jsonl` / `prompt_eval.jsonl` with rows

    {"prompt": question (or [{"role": "user", "content": question}] with --chat),
     "answer": entry["answer"],
     "rg": {"dataset": TASK, "config": {...}, "entry": {"question", "answer", "metadata"}}}

and `reasoning_gym.json` (provenance: version, task, config, seed, sizes). The reward function
`reasoning_gym` rebuilds the dataset from `rg.dataset` + `rg.config` (cached) and calls its
`score_answer(answer, rg.entry)`; `exact_answer` works on the same rows through `answer`.

Held-out prompts: as for the built-in tasks, a question belongs to the eval split iff a stable
hash (crc32) of "TASK|question" falls in the lowest 20%, so eval questions never occur in train
(the small configs below have only 100-200 distinct questions, which would otherwise overlap).

Recommended tasks for a ~135M model (`RECOMMENDED_CONFIGS`, used when --config is not given):

- `chain_sum`, two one-digit terms with + or -: "State the final answer to the following
  arithmetic problem: 7 - 9 =" -> "-2". Short numeric answers (-9..18), the prompt ends in "=" so
  a plain LM continues with the number, and its checker compares numbers (tolerates spaces, a
  leading "+", "2.0"). Close to the built-in `arithmetic` task, which tiny models learn.
- `products`, two one-digit factors: "Solve the following multiplication: 7 * 8. Give only the
  result as your final answer." -> "56". The one-digit multiplication table: 1-2 digit answers,
  the same numeric checker; better with --chat for an instruct model.
(`basic_arithmetic` is not recommended: with its default checker a near miss like " 12" for "12"
gets partial credit, and in 0.1.25 small configs produce wrong divisions, e.g. "4 / 1" -> "2".)

This module imports neither torch nor reasoning-gym at import time.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.metadata
import importlib.util
import json
import zlib
from pathlib import Path

from rlhfkit.errors import ConfigError

PREFIX = "reasoning-gym:"
VERSION = "0.1.25"
INSTALL = f"pip install 'rlhfkit[reasoning]'  (or: pip install reasoning-gym=={VERSION})"
EVAL_FRACTION = 0.2
DEFAULT_SIZE = 512
DEFAULT_EVAL_SIZE = 256
# Generate up to this many entries per requested row before giving up (a task with too few
# distinct questions for the split cannot fill it).
_OVERSAMPLE = 4

RECOMMENDED_CONFIGS: dict[str, dict] = {
    "chain_sum": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
    "products": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
}


def check_installed(what: str = "this") -> None:
    """ConfigError with the install command when reasoning-gym is missing (no import: cheap)."""
    if importlib.util.find_spec("reasoning_gym") is None:
        raise ConfigError(f"{what} needs reasoning-gym, which is not installed: {INSTALL}")


def _rg():
    check_installed("reasoning-gym data and scoring")
    import reasoning_gym

    return reasoning_gym


def dataset_names() -> list[str]:
    """reasoning-gym's registered task names, sorted."""
    _rg()
    from reasoning_gym.factory import DATASETS

    return sorted(DATASETS)


def _check_name(name: str) -> None:
    names = dataset_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" Did you mean {PREFIX}{close[0]}?" if close else ""
        raise ConfigError(f"unknown reasoning-gym task {name!r} ({len(names)} tasks, e.g. "
                          f"{', '.join(RECOMMENDED_CONFIGS)}).{hint}")


def create(name: str, config: dict | None = None, *, seed: int = 0, size: int = 500):
    """A reasoning-gym dataset; unknown config keys or invalid values -> ConfigError naming them."""
    _check_name(name)
    from reasoning_gym.factory import DATASETS

    config = dict(config or {})
    fields = [f.name for f in dataclasses.fields(DATASETS[name][1]) if f.name not in ("seed", "size")]
    unknown = [k for k in config if k not in fields]
    if unknown:
        raise ConfigError(f"reasoning-gym task {name!r}: unknown config key(s) {unknown}; "
                          f"its keys: {', '.join(fields)}")
    try:
        return _rg().create_dataset(name, seed=seed, size=size, **config)
    except (AssertionError, ValueError, TypeError) as e:
        raise ConfigError(f"reasoning-gym task {name!r}: invalid config {config}: "
                          f"{e or type(e).__name__}") from None


def split_of(name: str, question: str) -> str:
    """'eval' or 'train', by a stable hash (crc32) of 'name|question'."""
    bucket = zlib.crc32(f"{name}|{question}".encode()) % 10_000
    return "eval" if bucket < EVAL_FRACTION * 10_000 else "train"


def _row(name: str, config: dict, entry: dict, chat: bool) -> dict:
    question = entry["question"]
    prompt = [{"role": "user", "content": question}] if chat else question
    rg = {"dataset": name, "config": config,
          "entry": {"question": question, "answer": entry["answer"], "metadata": entry.get("metadata", {})}}
    row = {"prompt": prompt, "answer": entry["answer"], "rg": rg}
    try:
        return json.loads(json.dumps(row))  # what a reader of the file gets back (tuples -> lists)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"reasoning-gym task {name!r}: an entry cannot be written as JSON: {e}") from None


def make_rows(name: str, sizes: dict[str, int], *, seed: int = 0, config: dict | None = None,
              chat: bool = False) -> dict[str, list[dict]]:
    """{"train": rows, "eval": rows} with sizes {"train": N, "eval": M}: entries 0, 1, 2, ... of the
    dataset seeded with `seed`, each routed to its question's split (`split_of`) until both are full.
    Deterministic given (name, config, seed); a split's rows do not depend on the other's size."""
    config = dict(RECOMMENDED_CONFIGS.get(name, {}) if config is None else config)
    budget = _OVERSAMPLE * sum(sizes.values()) + 64
    ds = create(name, config, seed=seed, size=budget)
    out: dict[str, list[dict]] = {split: [] for split in sizes}
    for idx in range(budget):
        if all(len(out[s]) >= n for s, n in sizes.items()):
            break
        entry = ds[idx]
        split = split_of(name, entry["question"])
        if split in out and len(out[split]) < sizes[split]:
            out[split].append(_row(name, config, entry, chat))
    short = {s: len(out[s]) for s, n in sizes.items() if len(out[s]) < n}
    if short:
        raise ConfigError(f"reasoning-gym task {name!r} with config {config}: only {short} rows after "
                          f"{budget} entries (requested {sizes}); the task has too few distinct questions "
                          "for a held-out split. Ask for fewer rows or widen the config")
    return out


def write(name: str, out_dir: str | Path, *, size: int = DEFAULT_SIZE, eval_size: int = DEFAULT_EVAL_SIZE,
          seed: int = 0, config: dict | None = None, chat: bool = False) -> dict[str, Path]:
    """Write prompt_train.jsonl, prompt_eval.jsonl and reasoning_gym.json; returns their paths."""
    if size < 1 or eval_size < 0:
        raise ConfigError(f"--size must be >= 1 and --eval-size >= 0, got {size} and {eval_size}")
    config = dict(RECOMMENDED_CONFIGS.get(name, {}) if config is None else config)
    rows = make_rows(name, {"train": size, "eval": eval_size}, seed=seed, config=config, chat=chat)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for split, split_rows in rows.items():
        path = out / f"prompt_{split}.jsonl"
        with path.open("w", encoding="utf-8") as f:
            for row in split_rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        paths[f"prompt_{split}"] = path
    # importlib.metadata: reasoning_gym.__version__ is stale in 0.1.25 (it says 0.1.19).
    meta = {"source": "reasoning-gym", "reasoning_gym_version": importlib.metadata.version("reasoning-gym"),
            "task": name, "config": config, "seed": seed, "chat": chat,
            "sizes": {"prompt_train": size, "prompt_eval": eval_size},
            "distinct_questions": {s: len({json.dumps(r["prompt"]) for r in rs}) for s, rs in rows.items()},
            "files": {k: p.name for k, p in paths.items()}}
    meta_path = out / "reasoning_gym.json"
    meta_path.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    paths["meta"] = meta_path
    return paths


# ---- scoring ---------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def _scorer(name: str, config_json: str):
    return create(name, json.loads(config_json), seed=0, size=1).score_answer


def score(rg: dict, answer: str | None) -> float:
    """reasoning-gym's score of `answer` for the entry in a row's `rg` column (see module docstring)."""
    if not (isinstance(rg, dict) and isinstance(rg.get("dataset"), str)
            and isinstance(rg.get("entry"), dict)):
        raise ValueError(f"column `rg` must be {{'dataset': name, 'config': {{...}}, 'entry': {{...}}}} "
                         f"as written by `rlhfkit data {PREFIX}TASK`, got {str(rg)[:200]}")
    config_json = json.dumps(rg.get("config") or {}, sort_keys=True)
    return float(_scorer(rg["dataset"], config_json)(answer, rg["entry"]))


def extract_answer(text: str, tag: str | None) -> str | None:
    """The answer in a completion: the stripped text (tag None), or reasoning-gym's
    `extract_answer`: the stripped content of the last `<tag>...</tag>` (None when there is none)."""
    if tag is None:
        return text.strip()
    _rg()
    from reasoning_gym.utils import extract_answer as rg_extract

    return rg_extract(text, tag_name=tag)
