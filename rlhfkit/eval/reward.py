"""Reward-model evaluation: accuracy against the Bayes ceiling, calibration, length bias and
sensitivity to a missing EOS; and batch scoring of prompt/response rows.

Every metric works on "ordered pairs": a preference row gives one (chosen, rejected); a ranking
row of K responses gives the K(K-1)/2 pairs (i, j), i ranked above j. With d = r_i - r_j:

    accuracy        mean(d > 0)
    accuracy_stderr its binomial standard error sqrt(acc (1 - acc) / pairs)
    margin          mean(d)
    loss            mean training loss per row (Bradley-Terry / Plackett-Luce, `RM_LOSSES`)
    bayes_accuracy  the task's ceiling mean(max(p, 1 - p)), p = sigmoid((g_c - g_r) / T), on
                    built-in task rows (gold columns); no model can beat it on average
    gold_accuracy   mean(sign d == sign(g_i - g_j)) over pairs with distinct gold: agreement with
                    the noise-free gold reward (can exceed bayes_accuracy)
    ece             expected calibration error (Guo et al. 2017) of P(i preferred) = sigmoid(d):
                    confidence max(p, 1 - p) in `bins` equal bins over [0.5, 1], weighted
                    |accuracy - mean confidence| per bin
    length_corr     Pearson correlation of reward and response length (tokens) over responses
    eos_sensitivity mean(r(without final EOS) - r(with)) over responses that end in EOS; a reward
                    model that reads the EOS position should see a clear change

The scoring function passed in decides raw vs normalised rewards (training evaluates raw rewards,
`rlhfkit eval-rm` the stored normalisation: margin then comes in normalised units).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from rlhfkit.data.collate import pad_batch
from rlhfkit.data.encode import Encoded, encode_response_group
from rlhfkit.data.groups import ResponseGroup, ungroup
from rlhfkit.losses.preference import RM_LOSSES
from rlhfkit.train.tracking import progress

ScoreFn = Callable[..., torch.Tensor]
"""(input_ids (B, T), attention_mask (B, T)[, groups]) -> rewards (B,); `groups` (B ints: rows
with the same id share their prompt) is passed only when `score_examples` is given groups."""


@torch.no_grad()
def score_examples(score_fn: ScoreFn, examples: list[Encoded], pad_id: int, *, batch_size: int,
                   device="cpu", quiet: bool | None = None, desc: str = "score",
                   groups: list[int] | None = None) -> torch.Tensor:
    """(N,) float32 rewards of encoded examples (right-padded batches of `batch_size`; with
    `groups`, each example's group id goes to `score_fn` so a packed pass shares prompts)."""
    out = []
    for i in progress(range(0, len(examples), batch_size), disable=quiet, desc=desc, leave=False):
        batch = pad_batch([e.input_ids for e in examples[i:i + batch_size]], pad_id, "right")
        args = (batch["input_ids"].to(device), batch["attention_mask"].to(device))
        if groups is not None:
            args = (*args, groups[i:i + batch_size])
        out.append(score_fn(*args).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def without_final_eos(example: Encoded, eos_id: int) -> Encoded | None:
    """The example with its last token removed when that is EOS (None otherwise)."""
    if len(example.input_ids) < 2 or example.input_ids[-1] != eos_id:
        return None
    return Encoded(example.input_ids[:-1], example.response_mask[:-1], example.source)


def expected_calibration_error(confidence: torch.Tensor, correct: torch.Tensor,
                               bins: int = 10) -> tuple[float, list[dict]]:
    """ECE over `bins` equal confidence bins on [0.5, 1] and the per-bin table
    (lo, hi, count, confidence, accuracy) for the reliability plot."""
    edges = torch.linspace(0.5, 1.0, bins + 1)
    which = torch.bucketize(confidence.clamp(0.5, 1.0), edges[1:-1], right=True)
    table, total, n = [], 0.0, confidence.numel()
    for b in range(bins):
        sel = which == b
        count = int(sel.sum())
        row = {"lo": edges[b].item(), "hi": edges[b + 1].item(), "count": count,
               "confidence": confidence[sel].mean().item() if count else None,
               "accuracy": correct[sel].float().mean().item() if count else None}
        if count:
            total += count / n * abs(row["accuracy"] - row["confidence"])
        table.append(row)
    return (total if n else float("nan")), table


def reliability_plot(table: list[dict], path: str | Path, title: str = "reward model calibration") -> Path:
    """Accuracy per confidence bin against the diagonal, with bin counts; saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax, ax_n) = plt.subplots(2, 1, figsize=(5, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    width = table[0]["hi"] - table[0]["lo"]
    filled = [r for r in table if r["count"]]
    ax.bar([r["lo"] for r in filled], [r["accuracy"] for r in filled], width=width, align="edge",
           edgecolor="black", alpha=0.7, label="accuracy")
    ax.plot([0.5, 1.0], [0.5, 1.0], "k--", label="perfect calibration")
    ax.plot([r["confidence"] for r in filled], [r["accuracy"] for r in filled], "o", color="C3",
            label="(confidence, accuracy)")
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(loc="upper left")
    ax_n.bar([r["lo"] for r in table], [r["count"] for r in table], width=width, align="edge",
             edgecolor="black", color="gray")
    ax_n.set_xlabel("confidence max(p, 1 - p), p = sigmoid(r_c - r_r)")
    ax_n.set_ylabel("pairs")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denom = math.sqrt(float((x * x).sum()) * float((y * y).sum()))
    return float((x * y).sum()) / denom if denom > 0 else float("nan")


def _golds(row: dict, task) -> list[float] | None:
    """Gold scores of a row's responses, best first (from gold columns, or the task)."""
    if "gold_chosen" in row and "gold_rejected" in row:
        return [float(row["gold_chosen"]), float(row["gold_rejected"])]
    if "gold_scores" in row:
        return [float(g) for g in row["gold_scores"]]
    if task is not None and isinstance(row.get("prompt"), str):
        responses = [row["chosen"], row["rejected"]] if "chosen" in row else row.get("responses")
        if responses and all(isinstance(r, str) for r in responses):
            return [task.score(row["prompt"], r) for r in responses]
    return None


def evaluate_rewards(score_fn: ScoreFn, groups: list[ResponseGroup], *, pad_id: int, eos_id: int,
                     dataset_format: str, rows: list[dict] | None = None, task=None, batch_size: int = 16,
                     device="cpu", bins: int = 10, plot_path: str | Path | None = None,
                     quiet: bool | None = None, share_prompts: bool = False) -> dict:
    """All metrics of the module docstring over `groups` (rows: their canonical source rows,
    indexed by `group.index`, for gold scores). Writes the reliability plot when `plot_path`.
    `share_prompts`: `score_fn` takes each response's group id (a packed pass then computes a
    row's prompt once)."""
    flat = [e for g in groups for e in g.responses]
    ids = [b for b, g in enumerate(groups) for _ in g.responses] if share_prompts else None
    rewards = score_examples(score_fn, flat, pad_id, batch_size=batch_size, device=device, quiet=quiet,
                             desc="eval", groups=ids)
    # rewards back into (B, K) groups, best first
    k_max = max(len(g.responses) for g in groups)
    mask = torch.zeros((len(groups), k_max), dtype=torch.bool)
    for b, g in enumerate(groups):
        mask[b, :len(g.responses)] = True
    matrix = ungroup(rewards, mask)
    margin = None
    if dataset_format == "preference" and any(g.margin is not None for g in groups):
        margin = torch.tensor([g.margin or 0.0 for g in groups])
    loss = RM_LOSSES[dataset_format](matrix, mask, margin).mean().item()

    # 1. ordered pairs i above j
    diffs, gold_agree = [], []
    for b, g in enumerate(groups):
        golds = _golds(rows[g.index], task) if rows is not None else None
        k = len(g.responses)
        for i in range(k):
            for j in range(i + 1, k):
                diffs.append(matrix[b, i] - matrix[b, j])
                if golds is not None and golds[i] != golds[j]:
                    gold_agree.append(float((matrix[b, i] > matrix[b, j]) == (golds[i] > golds[j])))
    d = torch.stack(diffs)
    accuracy = (d > 0).float().mean().item()
    metrics = {"loss": loss, "accuracy": accuracy, "accuracy_stderr": math.sqrt(accuracy * (1 - accuracy) / d.numel()),
               "margin": d.mean().item()}
    # 2. the Bayes ceiling of the labels (built-in tasks, preference rows)
    if task is not None and rows is not None and dataset_format == "preference":
        metrics["bayes_accuracy"] = task.bayes_accuracy([rows[g.index] for g in groups])
    if gold_agree:
        metrics["gold_accuracy"] = sum(gold_agree) / len(gold_agree)
    # 3. calibration of sigmoid(d)
    p = torch.sigmoid(d)
    ece, table = expected_calibration_error(torch.maximum(p, 1 - p), d > 0, bins)
    metrics["ece"] = ece
    if plot_path is not None:
        reliability_plot(table, plot_path)
    # 4. length bias
    lengths = torch.tensor([sum(e.response_mask) for e in flat], dtype=torch.float64)
    metrics["length_corr"] = pearson(rewards, lengths)
    # 5. sensitivity to a missing EOS
    pairs = [(i, s) for i, e in enumerate(flat) if (s := without_final_eos(e, eos_id)) is not None]
    if pairs:
        stripped = score_examples(score_fn, [s for _, s in pairs], pad_id, batch_size=batch_size,
                                  device=device, quiet=quiet, desc="eval (no EOS)",
                                  groups=[ids[i] for i, _ in pairs] if share_prompts else None)
        metrics["eos_sensitivity"] = (stripped - rewards[[i for i, _ in pairs]]).mean().item()
    metrics["reward_mean"] = rewards.mean().item()
    metrics["reward_std"] = rewards.std().item() if rewards.numel() > 1 else 0.0
    metrics["pairs"] = d.numel()
    return metrics


RM_METRIC_ORDER = ["accuracy", "accuracy_stderr", "bayes_accuracy", "gold_accuracy", "margin", "loss", "ece",
                   "length_corr", "eos_sensitivity", "reward_mean", "reward_std", "pairs"]


def format_metrics(metrics: dict, title: str = "reward model evaluation", order: list[str] = RM_METRIC_ORDER) -> str:
    """A short two-column table, the keys of `order` first (for a reward model: accuracy next to the
    Bayes ceiling), then the rest."""
    keys = [k for k in order if k in metrics] + [k for k in metrics if k not in order]
    width = max(18, *(len(k) + 1 for k in keys))
    lines = [title, "-" * max(len(title), 34)]
    for k in keys:
        v = metrics[k]
        lines.append(f"{k:<{width}s} {v:>14.4f}" if isinstance(v, float) else f"{k:<{width}s} {v!s:>14}")
    return "\n".join(lines)


# ---- scoring prompt/response rows ------------------------------------------------------------

def response_of(row: dict, where: str):
    for key in ("response", "completion"):
        if key in row:
            return row[key]
    raise ValueError(f"{where}: a row to score needs 'prompt' and 'response' (or 'completion'); "
                     f"got keys {sorted(k for k in row if not k.startswith('_'))}")


def score_rows(scorer, rows: list[dict], *, max_length: int, max_prompt_length: int | None = None,
               max_response_length: int | None = None, batch_size: int = 16, quiet: bool | None = None,
               counts: dict | None = None) -> list[float | None]:
    """Normalised reward of each prompt/response row (string or messages), None for rows where no
    response token fits `max_length` (truncation as `truncate_group`). Rows with the same prompt
    share it in a packed pass (`scorer.padding_free`). `counts`, when given, receives how many rows
    had their prompt / response cut and how many were skipped."""
    import json

    tok = scorer.tokenizer
    encoded: list[Encoded | None] = []
    prompt_ids: dict[str, int] = {}
    groups: list[int] = []
    cut = {"prompt_cut": 0, "response_cut": 0, "skipped": 0}
    for n, row in enumerate(rows):
        where = row.get("_source", f"row {n}")
        if "prompt" not in row:
            raise ValueError(f"{where}: a row to score needs a 'prompt'")
        fit = encode_response_group(tok, row["prompt"], [response_of(row, where)], max_length, max_prompt_length,
                                    max_response_length)
        encoded.append(fit.sequences[0] if fit.sequences else None)
        if fit.sequences is None:
            cut["skipped"] += 1
            continue
        cut["prompt_cut"] += fit.prompt_cut
        cut["response_cut"] += fit.response_cut
        key = json.dumps([row["prompt"], len(fit.sequences[0].input_ids) - sum(fit.sequences[0].response_mask)])
        groups.append(prompt_ids.setdefault(key, len(prompt_ids)))
    if counts is not None:
        counts.update(cut)
    kept = [e for e in encoded if e is not None]
    rewards = iter(score_examples(scorer.score, kept, tok.pad_token_id, batch_size=batch_size,
                                  device=scorer.device, quiet=quiet, groups=groups).tolist())
    return [next(rewards) if e is not None else None for e in encoded]
