"""The `Task` base class: prompts, a demonstration sampler and a gold reward -> every data kind.

A task supplies four things (the abstract methods below):

- ``all_prompts()``: every distinct prompt, in a fixed order;
- ``demo(rng, prompt)``: one response from the demonstration distribution. This is
  what the SFT policy learns to generate, so preference candidates come from it too;
- ``rough(rng, prompt)``: one low-quality response (degenerate text, bad format)
  that the gold reward penalises;
- ``score(prompt, response, ended)``: the gold reward of one response.

From these the base class builds every data kind (``make``), the Bayes ceiling of
simulated preference labels (``bayes_accuracy``) and the files on disk (``write``).

Simulated labels follow Bradley-Terry with the task's ``label_temperature`` T:
for responses a, b with gold scores ga, gb, ``P(a preferred) = sigmoid((ga - gb) / T)``.

Held-out prompts: every prompt belongs to exactly one split, chosen by a stable
hash of its text (``split_of``), so ``*_eval`` files never share a prompt with
``*_train`` files. The pretraining corpus (``pt``) is the exception: it plays
the role of world knowledge and draws from every prompt (documents are still
sampled with a different seed per split).

Pure Python: this package imports neither torch nor the models.
"""

from __future__ import annotations

import json
import math
import random
import zlib
from pathlib import Path

from rlhfkit.data.formats import fill_judge_template

KINDS = ("pt", "sft", "preference", "ranking", "unpaired", "prompt", "judge")
SPLITS = ("train", "eval")

# Rows per kind for `write()`; override with sizes={"sft": 500, "sft_eval": 64, ...}.
DEFAULT_SIZES = {
    "pt": 4000,
    "sft": 2000,
    "preference": 2000,
    "ranking": 500,
    "unpaired": 2000,
    "prompt": 512,
    "judge": 2000,
    "pt_eval": 256,
    "sft_eval": 256,
    "preference_eval": 256,
    "ranking_eval": 128,
    "unpaired_eval": 256,
    "prompt_eval": 256,
    "judge_eval": 256,
}

# Seed offset for the eval split in `write()`, on top of the split name in the rng key.
EVAL_SEED_OFFSET = 1_000_003


def sigmoid(x: float) -> float:
    """Numerically stable logistic function."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


class Task:
    """A synthetic task with a gold reward. Subclasses set the class attributes and the 4 methods."""

    name: str = ""
    description: str = ""
    label_temperature: float = 1.0
    """Bradley-Terry noise temperature T of simulated labels, on the scale of gold differences."""
    unpaired_baseline: float = 0.0
    """Gold score at which an unpaired (KTO) label is a coin flip."""
    eval_fraction: float = 0.2
    """Share of the distinct prompts held out for the eval split."""
    rough_fraction: float = 0.1
    """Share of rough (low-quality) responses among pt documents and preference/ranking/unpaired
    candidates, so a reward model also learns the gold penalties (repetition, bad format)."""
    ranking_k: int = 4
    """Responses per ranking row."""
    judge_template: str = "Judge: {prompt}{response}"
    """The LLM-as-a-judge prompt of `judge` rows: short, for the tiny models of the built-in tasks.
    `self_reward` judges with it when it runs in a pipeline on the task (its `judge_template`)."""
    judge_gold_range: tuple[float, float] = (-1.0, 1.0)
    """Gold rewards from this range map linearly onto a `judge` row's score, 0-5 (clamped)."""

    # ---- to implement -------------------------------------------------------------------
    def all_prompts(self) -> list[str]:
        """Every distinct prompt, in a fixed order."""
        raise NotImplementedError

    def demo(self, rng: random.Random, prompt: str) -> str:
        """One response from the demonstration (SFT) distribution."""
        raise NotImplementedError

    def rough(self, rng: random.Random, prompt: str) -> str:
        """One low-quality response that the gold reward penalises."""
        raise NotImplementedError

    def score(self, prompt: str, response: str, ended: bool = True) -> float:
        """Gold reward of one response (text without EOS); `ended`: it ended with EOS."""
        raise NotImplementedError

    def prompt_row(self, prompt: str) -> dict:
        """A row of kind `prompt`; tasks add columns a Python reward function needs."""
        return {"prompt": prompt}

    def correct(self, prompt: str, response: str, ended: bool = True) -> bool | None:
        """Whether a response is exactly right, for tasks with one right answer (evaluations report
        the share as `accuracy`); None for tasks graded only by degree."""
        return None

    # ---- provided ---------------------------------------------------------------------------
    def gold_reward(
        self, prompts: list[str], responses: list[str], ended: list[bool] | None = None
    ) -> list[float]:
        """Gold reward of each (prompt, response); `ended[i]`: response i ended with EOS (None: all)."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        if ended is None:
            ended = [True] * len(prompts)
        elif len(ended) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(ended)} `ended` flags")
        return [self.score(p, r, bool(e)) for p, r, e in zip(prompts, responses, ended)]

    def split_of(self, prompt: str) -> str:
        """'eval' or 'train', by a stable hash (crc32) of the prompt text."""
        bucket = zlib.crc32(f"{self.name}|{prompt}".encode()) % 10_000
        return "eval" if bucket < self.eval_fraction * 10_000 else "train"

    def prompts(self, split: str | None = None) -> list[str]:
        """The distinct prompts of one split (None: all), in a fixed order."""
        if split is None:
            return list(self.all_prompts())
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return [p for p in self.all_prompts() if self.split_of(p) == split]

    def judge_score(self, gold: float) -> int:
        """The 0-5 score a `judge` row teaches for a response of gold reward `gold`: linear over
        `judge_gold_range`, rounded half up, clamped."""
        lo, hi = self.judge_gold_range
        return min(5, max(0, math.floor(5 * (gold - lo) / (hi - lo) + 0.5)))

    def preference_prob(self, gold_a: float, gold_b: float) -> float:
        """P(a preferred over b) = sigmoid((gold_a - gold_b) / T)."""
        return sigmoid((gold_a - gold_b) / self.label_temperature)

    def candidate(self, rng: random.Random, prompt: str) -> str:
        """A preference candidate: a demo, or with prob. `rough_fraction` a rough response."""
        if rng.random() < self.rough_fraction:
            return self.rough(rng, prompt)
        return self.demo(rng, prompt)

    def pt_response(self, rng: random.Random, prompt: str) -> str:
        """The response of one pretraining document ("world knowledge"): by default a candidate
        (a demo, or with prob. `rough_fraction` a rough response). Tasks whose world knowledge is
        better than their demonstrators override it."""
        return self.candidate(rng, prompt)

    def _distinct_candidates(self, rng: random.Random, prompt: str, k: int) -> list[str]:
        out: list[str] = []
        for _ in range(200 * k):
            c = self.candidate(rng, prompt)
            if c not in out:
                out.append(c)
                if len(out) == k:
                    return out
        raise RuntimeError(f"task {self.name}: could not draw {k} distinct responses for {prompt!r}")

    def make(self, kind: str, n: int, seed: int, split: str = "train") -> list[dict]:
        """`n` rows of one data kind, deterministic given (kind, n, seed, split).

        Kinds and columns:
          pt          {"text"}: prompt + `pt_response` (by default demos mixed with
                      `rough_fraction` rough ones); drawn from all prompts (pretraining
                      knowledge), both splits.
          sft         {"prompt", "completion"}: demonstrations.
          preference  {"prompt", "chosen", "rejected", "gold_chosen", "gold_rejected"}: two
                      distinct candidates, chosen with P = sigmoid((g_a - g_b) / T).
          ranking     {"prompt", "responses", "gold_scores"}: `ranking_k` distinct candidates,
                      best first, ordered by a Plackett-Luce sample: each position picks among
                      the rest with P proportional to exp(g / T).
          unpaired    {"prompt", "completion", "label", "gold"}: label True (desirable) with
                      P = sigmoid((g - unpaired_baseline) / T).
          prompt      {"prompt", ...task columns}: each prompt of the split once (shuffled),
                      then again in a new order, until `n` rows.
          judge       {"prompt", "completion", "request", "response", "gold"}: a judgement to
                      learn (LLM-as-a-judge; the evaluation fine-tuning data of self-rewarding
                      models): `prompt` is `judge_template` around the task prompt (`request`) and
                      a candidate (`response`), `completion` " Score: <judge_score(gold)>".
        All sampling uses one `random.Random` keyed by (task, kind, split, seed).
        """
        if kind not in KINDS:
            raise ValueError(f"unknown data kind {kind!r}; expected one of {KINDS}")
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        rng = random.Random(f"{self.name}:{kind}:{split}:{seed}")
        pool = self.prompts(None if kind == "pt" else split)
        if not pool:
            raise ValueError(f"task {self.name} has no prompts in split {split!r}")
        T = self.label_temperature
        rows: list[dict] = []

        if kind == "prompt":
            order: list[str] = []
            while len(rows) < n:
                if not order:
                    order = list(pool)
                    rng.shuffle(order)
                rows.append(self.prompt_row(order.pop()))
            return rows

        for _ in range(n):
            prompt = rng.choice(pool)
            if kind == "pt":
                rows.append({"text": prompt + self.pt_response(rng, prompt)})
            elif kind == "sft":
                rows.append({"prompt": prompt, "completion": self.demo(rng, prompt)})
            elif kind == "preference":
                a, b = self._distinct_candidates(rng, prompt, 2)
                ga, gb = self.score(prompt, a), self.score(prompt, b)
                if rng.random() >= self.preference_prob(ga, gb):
                    a, b, ga, gb = b, a, gb, ga
                rows.append(
                    {"prompt": prompt, "chosen": a, "rejected": b, "gold_chosen": ga, "gold_rejected": gb}
                )
            elif kind == "ranking":
                cands = self._distinct_candidates(rng, prompt, self.ranking_k)
                golds = [self.score(prompt, c) for c in cands]
                rest = list(range(len(cands)))
                order = []
                while rest:
                    top = max(golds[i] for i in rest)
                    weights = [math.exp((golds[i] - top) / T) for i in rest]
                    pick = rng.choices(range(len(rest)), weights=weights)[0]
                    order.append(rest.pop(pick))
                rows.append(
                    {
                        "prompt": prompt,
                        "responses": [cands[i] for i in order],
                        "gold_scores": [golds[i] for i in order],
                    }
                )
            elif kind == "unpaired":
                c = self.candidate(rng, prompt)
                g = self.score(prompt, c)
                label = rng.random() < sigmoid((g - self.unpaired_baseline) / T)
                rows.append({"prompt": prompt, "completion": c, "label": label, "gold": g})
            elif kind == "judge":
                c = self.candidate(rng, prompt)
                g = self.score(prompt, c)
                rows.append({"prompt": fill_judge_template(self.judge_template, prompt, c),
                             "completion": f" Score: {self.judge_score(g)}", "request": prompt, "response": c,
                             "gold": g})
        return rows

    def bayes_accuracy(self, rows: list[dict]) -> float:
        """Best possible preference accuracy on these pairs: mean over rows of max(p, 1 - p),
        p = sigmoid((gold_chosen - gold_rejected) / T). Gold is computed from the texts
        (ended = True) when the gold columns are absent."""
        if not rows:
            raise ValueError("bayes_accuracy needs at least one row")
        total = 0.0
        for row in rows:
            if "gold_chosen" in row and "gold_rejected" in row:
                gc, gr = row["gold_chosen"], row["gold_rejected"]
            else:
                gc = self.score(row["prompt"], row["chosen"])
                gr = self.score(row["prompt"], row["rejected"])
            p = self.preference_prob(gc, gr)
            total += max(p, 1.0 - p)
        return total / len(rows)

    def write(self, out_dir: str | Path, seed: int = 0, sizes: dict | None = None) -> dict[str, Path]:
        """Write `{kind}_train.jsonl` and `{kind}_eval.jsonl` for every kind, plus `task.json`.

        `sizes` overrides `DEFAULT_SIZES`: key `kind` for the train split, `kind_eval` for
        eval. The eval split uses seed + EVAL_SEED_OFFSET and held-out prompts.
        `task.json` holds name, description, label_temperature, seed, sizes, the Bayes
        accuracy of the eval preference split and the mean gold of the SFT demos.
        Returns {"sft_train": path, ..., "task": path to task.json}.
        """
        sizes_all = dict(DEFAULT_SIZES)
        for key, value in (sizes or {}).items():
            if key not in DEFAULT_SIZES:
                raise ValueError(f"unknown size key {key!r}; expected one of {sorted(DEFAULT_SIZES)}")
            sizes_all[key] = int(value)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths: dict[str, Path] = {}
        data: dict[str, list[dict]] = {}
        for kind in KINDS:
            for split in SPLITS:
                n = sizes_all[kind if split == "train" else f"{kind}_eval"]
                split_seed = seed if split == "train" else seed + EVAL_SEED_OFFSET
                rows = self.make(kind, n, split_seed, split=split)
                key = f"{kind}_{split}"
                path = out / f"{key}.jsonl"
                with path.open("w", encoding="utf-8") as f:
                    for row in rows:
                        f.write(json.dumps(row, ensure_ascii=False) + "\n")
                paths[key] = path
                data[key] = rows
        sft = data["sft_train"]
        meta = {
            "name": self.name,
            "description": self.description,
            "label_temperature": self.label_temperature,
            "seed": seed,
            "sizes": sizes_all,
            "bayes_accuracy_eval": (
                self.bayes_accuracy(data["preference_eval"]) if data["preference_eval"] else None
            ),
            "sft_mean_gold": (
                sum(self.gold_reward([r["prompt"] for r in sft], [r["completion"] for r in sft]))
                / len(sft)
                if sft
                else None
            ),
            "files": {k: p.name for k, p in paths.items()},
        }
        task_path = out / "task.json"
        task_path.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        paths["task"] = task_path
        return paths

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, label_temperature={self.label_temperature})"
