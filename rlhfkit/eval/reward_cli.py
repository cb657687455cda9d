"""`rlhfkit eval-rm MODEL DATA` and `rlhfkit score MODEL DATA`: the reward-model commands.

Both load MODEL with `load_reward_model` (full or LoRA directory; the stored normalisation is
applied) and encode like training did: `max_length` / `max_prompt_length` / `max_response_length`
default to the values in MODEL/config.yaml (written by `rlhfkit rm`), else 512 / none / none. Rows
whose prompt or response was cut are counted and reported, rows with no room for a response too.
Scoring is padding-free (packed, a row's responses sharing their prompt) unless
`--no-padding-free` or the model fails the check against the padded pass.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from rlhfkit.data.formats import to_canonical
from rlhfkit.data.groups import describe_truncation, encode_group, truncation_counts
from rlhfkit.data.sources import load_rows
from rlhfkit.errors import ConfigError, DataError


def _training_lengths(model_dir: Path) -> tuple[int, int | None, int | None]:
    path = model_dir / "config.yaml"
    if path.is_file():
        values = yaml.safe_load(path.read_text()) or {}
        return (int(values.get("max_length") or 512), values.get("max_prompt_length"),
                values.get("max_response_length"))
    return 512, None, None


def _common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="reward model directory (output_dir of `rlhfkit rm`)")
    parser.add_argument("data", help="data file (.jsonl/.json/.csv/.parquet) or saved dataset")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=None, help="default: the RM's training value")
    parser.add_argument("--max-prompt-length", type=int, default=None, help="default: the RM's training value")
    parser.add_argument("--max-response-length", type=int, default=None, help="default: the RM's training value")
    parser.add_argument("--no-padding-free", dest="padding_free", action="store_false",
                        help="pad every batch instead of packing it")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")


def _load(args):
    import torch

    from rlhfkit.models.reward import load_reward_model

    model_dir = Path(args.model)
    max_length, max_prompt_length, max_response_length = _training_lengths(model_dir)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return (load_reward_model(model_dir, device), args.max_length or max_length,
            args.max_prompt_length or max_prompt_length, args.max_response_length or max_response_length)


def _check_padding_free(scorer, groups, want: bool) -> None:
    """Pack only when asked and the packed pass matches the padded one on the first rows."""
    from rlhfkit.data.groups import collate_groups
    from rlhfkit.models.reward import padding_free_rewards_match

    if not want or not groups:
        return
    batch = collate_groups(groups[:4], scorer.tokenizer.pad_token_id)
    device = scorer.device
    if padding_free_rewards_match(scorer.model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                  batch["prefix_groups"]):
        scorer.padding_free = True
    else:
        print("WARNING: this model's packed forward pass does not match its padded one: padding instead")


def _task_for(data: str, name: str | None):
    """The built-in task named by --task, or by a task.json next to DATA (`rlhfkit data` writes it)."""
    from rlhfkit.tasks import get_task

    if name is None:
        meta = Path(data).parent / "task.json"
        if not meta.is_file():
            return None
        name = json.loads(meta.read_text()).get("name")
    try:
        return get_task(name)
    except ValueError as e:
        raise ConfigError(f"--task: {e}") from None


def run_eval_rm(argv: list[str]) -> int:
    from rlhfkit.eval.reward import evaluate_rewards, format_metrics
    from rlhfkit.train.common import row_format
    from rlhfkit.train.tracking import write_summary

    parser = argparse.ArgumentParser(prog="rlhfkit eval-rm", description=(
        "accuracy, margin, Bayes ceiling (built-in tasks), calibration, length bias and missing-EOS "
        "sensitivity of a reward model on preference or ranking data"))
    _common_args(parser)
    parser.add_argument("--task", default=None, help="built-in task for the Bayes ceiling "
                        "(default: from a task.json next to DATA)")
    parser.add_argument("--bins", type=int, default=10, help="calibration bins")
    parser.add_argument("--output-dir", default=None, help="where summary.json and the reliability "
                        "plot go (default: MODEL/eval-DATA_NAME)")
    args = parser.parse_args(argv)
    # 1. data and task first: bad rows fail before the model loads
    rows = to_canonical(load_rows(args.data))
    fmt = row_format(rows[0])
    if fmt not in ("preference", "ranking"):
        raise DataError(f"rows are in '{fmt}' format; eval-rm needs preference or ranking rows", source=args.data)
    task = _task_for(args.data, args.task)
    # 2. model, encoding
    scorer, max_length, max_prompt_length, max_response_length = _load(args)
    tok = scorer.tokenizer
    groups, skipped = [], 0
    for i, row in enumerate(rows):
        group = encode_group(tok, row, max_length, max_prompt_length, i, max_response_length)
        if group is None:
            skipped += 1
        else:
            groups.append(group)
    if not groups:
        raise DataError(f"no row fits max_length={max_length}", source=args.data)
    truncation = truncation_counts(groups, skipped)
    print(describe_truncation("eval-rm", len(groups), truncation, max_length))
    _check_padding_free(scorer, groups, args.padding_free)
    # 3. metrics, plot, summary, table
    out = Path(args.output_dir or Path(args.model) / f"eval-{Path(args.data).stem}")
    out.mkdir(parents=True, exist_ok=True)
    metrics = evaluate_rewards(scorer.score, groups, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id,
                               dataset_format=fmt, rows=rows, task=task, batch_size=args.batch_size,
                               device=scorer.device, bins=args.bins, plot_path=out / "reliability.png",
                               share_prompts=scorer.padding_free)
    write_summary(out, {"model": str(args.model), "data": str(args.data), "rows": len(groups),
                        "skipped": skipped, "truncation": truncation, "padding_free": scorer.padding_free,
                        **{f"eval/{k}": v for k, v in metrics.items()}})
    print(format_metrics(metrics, title=f"{args.model} on {args.data} ({len(groups)} rows"
                         + (f", {skipped} skipped" if skipped else "") + ", normalised rewards)"))
    print(f"summary and reliability plot in {out}")
    return 0


def items_of(canonical: list[dict]) -> list[dict]:
    return [{"prompt": c["prompt"], "response": c["completion"]} for c in canonical]


def run_score(argv: list[str]) -> int:
    from rlhfkit.eval.reward import score_rows

    parser = argparse.ArgumentParser(prog="rlhfkit score", description=(
        "score prompt/response rows with a reward model; writes them back as JSONL with a `reward` field"))
    _common_args(parser)
    parser.add_argument("--output", default=None, help="output JSONL (default: DATA_NAME.scored.jsonl "
                        "next to DATA)")
    args = parser.parse_args(argv)
    # 1. rows: prompt + response (or completion), validated before the model loads
    rows = load_rows(args.data)
    check = [{"prompt": r.get("prompt"), "completion": r.get("response", r.get("completion")),
              "_source": r.get("_source")} for r in rows]
    canonical = to_canonical(check, "prompt_completion")
    scorer, max_length, max_prompt_length, max_response_length = _load(args)
    # 2. packed scoring when the model passes the check on the first rows
    probe = [g for r in items_of(canonical)[:4] if (g := encode_group(
        scorer.tokenizer, {"prompt": r["prompt"], "responses": [r["response"]]}, max_length, max_prompt_length, 0,
        max_response_length))]
    _check_padding_free(scorer, probe, args.padding_free)
    # 3. score (batched, progress bar), 4. write back
    items = items_of(canonical)
    counts: dict = {}
    rewards = score_rows(scorer, items, max_length=max_length, max_prompt_length=max_prompt_length,
                         max_response_length=max_response_length, batch_size=args.batch_size, counts=counts)
    data = Path(args.data)
    output = Path(args.output) if args.output else data.with_name(f"{data.stem}.scored.jsonl")
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w", encoding="utf-8") as f:
        for row, reward in zip(rows, rewards):
            f.write(json.dumps({**{k: v for k, v in row.items() if k != "_source"}, "reward": reward},
                               ensure_ascii=False) + "\n")
    missing = sum(r is None for r in rewards)
    scored = [r for r in rewards if r is not None]
    mean = sum(scored) / len(scored) if scored else float("nan")
    print(f"scored {len(scored)} rows (mean reward {mean:+.4f})"
          + (f"; {missing} rows with no response token within max_length={max_length} got reward null" if missing else "")
          + (f"; {counts['prompt_cut']} with the start of the prompt cut, {counts['response_cut']} with the "
             "response cut before its end" if counts['prompt_cut'] or counts['response_cut'] else "")
          + f" -> {output}")
    return 0
