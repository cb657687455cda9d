"""`rlhfkit eval-dpo RUN [DATA]`: a DPO run's implicit reward model on preference pairs.

A DPO policy defines the reward r(x, y) = beta * log(pi(y|x) / pi_ref(y|x)) (SimPO / ORPO: their own
reference-free rewards). This scores every pair of DATA with it, as the run's own evaluation does,
so it can be re-run later, on other data, and pair by pair:

    rewards/accuracies         share of pairs with r(chosen) > r(rejected) (a tie counts as wrong)
    rewards/accuracies_stderr  its binomial standard error sqrt(acc (1 - acc) / pairs)
    rewards/margins            mean r(chosen) - r(rejected); rewards/chosen, rewards/rejected
    loss                       mean per-pair loss of the run's loss_type (weights, sft_weight)
    logps/chosen, logps/rejected   policy log-probs summed over response tokens
    margin_length_corr         Pearson correlation of the margin and (chosen - rejected) response
                               tokens: how much the implicit reward follows length
    length_corr                Pearson correlation of reward and response tokens over all responses
                               (as `eval-rm` reports it for a reward model)
    ties                       pairs with margin exactly 0

Everything the run trained with comes from RUN/config.yaml (which `rlhfkit dpo` writes): loss_type and
its hyper-parameters, beta, max_length, max_prompt_length, padding_free and the reference. The
reference is the one training used: a LoRA run's base with the adapters disabled (the adapter is
loaded unmerged), `ref_model`, or for full fine-tuning `model_name_or_path` loaded again;
`--ref-model` overrides it. Without DATA the run's own held-out pairs are evaluated (the
`eval_dataset`, or the `val_size` split rebuilt from `dataset` and `seed`), which reproduces the
run's final `eval/` metrics. Rows whose responses keep no token are skipped and counted. Forward
passes run under bf16 autocast when the run trained with it and the device computes bf16 natively,
else in float32 (`--bf16 true/false` decides).

Writes OUTPUT_DIR/summary.json (the metrics with an `eval/` prefix, as in the run's summary) and
OUTPUT_DIR/pairs.jsonl (one line per pair: its row in the data and source line, both rewards, margin,
loss, log-probs, token counts), OUTPUT_DIR defaulting to RUN/eval-DATA_NAME (RUN/eval-heldout
without DATA). `--compare RUN2` evaluates a second run on the same pairs with its own settings and
adds the paired comparison (`paired_comparison`): is one run better than the other on these pairs,
beyond the noise of which pairs were drawn?

Unlike the rest of eval/, this module imports train/: the implicit reward is the dpo stage's own
pair scoring and loss (`rlhfkit.train.dpo.encode_pair`, `dpo_pair_loss`), which are used as they are
rather than written a second time here.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from rlhfkit.errors import ConfigError, DataError

HELD_OUT = "heldout"


def _run_config(run_dir: Path, overrides: dict):
    """The run's DPOConfig from RUN/config.yaml with `overrides` (flags that were given) applied."""
    from rlhfkit.config import build_config, read_yaml

    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no config.yaml; eval-dpo needs the directory a `rlhfkit dpo` run wrote "
                          "(it reads loss_type, beta, lengths and the reference from its config.yaml)")
    summary = run_dir / "summary.json"
    stage = json.loads(summary.read_text()).get("stage") if summary.is_file() else None
    if stage not in (None, "dpo"):
        raise ConfigError(f"{run_dir} is a `rlhfkit {stage}` run; eval-dpo evaluates dpo runs"
                          + (" (eval-rm evaluates reward models)" if stage == "rm" else ""))
    values = {**read_yaml(path), **{k: v for k, v in overrides.items() if v is not None}}
    return build_config("dpo", values, source=str(path))


def _rows(config, data: str | None) -> tuple[list[dict], str]:
    """(canonical preference rows, what they are) of DATA, or of the run's held-out split."""
    from rlhfkit.data.formats import to_canonical
    from rlhfkit.data.sources import load_rows
    from rlhfkit.train.common import check_format, load_split

    if data is not None:
        rows = to_canonical(load_rows(data))
        check_format(rows, ("preference",), data)
        return rows, data
    if config.eval_dataset is None and not config.val_size:
        raise ConfigError("the run held out no pairs (no eval_dataset, val_size 0): give DATA")
    try:
        _, rows = load_split(config, ("preference",))
    except DataError as e:
        raise DataError(f"{e} (the run's data as its config.yaml names it; run eval-dpo where the run "
                        "was started, or give DATA)") from None
    return rows, f"the run's held-out pairs ({config.eval_dataset or f'val_size={config.val_size:g} of {config.dataset}'})"


def _load_models(run_dir: Path, config, tokenizer, device):
    """(policy in eval mode, Reference) as the run trained them."""
    from rlhfkit.losses.dpo import needs_reference
    from rlhfkit.models.load import load_causal_lm
    from rlhfkit.models.presets import preset_name
    from rlhfkit.train.preference import Reference, load_reference

    adapter = run_dir / "adapter_config.json"
    if adapter.is_file():
        from peft import PeftModel

        base = json.loads(adapter.read_text()).get("base_model_name_or_path")
        if not base or preset_name(base) is not None:
            raise ConfigError(f"{run_dir}: the LoRA adapter's base ({base!r}) is a random preset that exists only "
                              "in the run; it cannot serve as the reference")
        model = load_causal_lm(base, tokenizer, gguf_file=config.gguf_file,
                               trust_remote_code=config.trust_remote_code, load_in_4bit=config.load_in_4bit)
        model = PeftModel.from_pretrained(model, str(run_dir))
    else:
        model = load_causal_lm(str(run_dir), tokenizer, trust_remote_code=config.trust_remote_code)
    if not config.load_in_4bit:  # a 4-bit model is placed at load time
        model.to(device)
    model.eval().requires_grad_(False)
    pf = config.padding_free
    if not needs_reference(config.loss_types, config.reference_free):
        return model, Reference("none")
    if config.ref_model is not None and config.ref_model != config.model_name_or_path:
        return model, load_reference(config.ref_model, tokenizer, model, device=device,
                                     trust_remote_code=config.trust_remote_code, padding_free=pf)
    if adapter.is_file():
        return model, Reference("adapters_disabled", model, padding_free=pf)
    if preset_name(config.model_name_or_path) is not None:
        raise ConfigError(f"the run's reference is its initial model, the random preset {config.model_name_or_path} "
                          "that exists only in the run: pass --ref-model")
    return model, load_reference(config.model_name_or_path, tokenizer, model, device=device, gguf_file=config.gguf_file,
                                 trust_remote_code=config.trust_remote_code, padding_free=pf)


def evaluate_pairs(config, reference, model, items, pad_id: int, *, batch_size: int, device,
                   quiet: bool | None = None) -> tuple[dict, list[dict]]:
    """(metrics of the module docstring, one record per item) of `items` (DPO pair items; an item's
    `index` is its row's position in the data, `row` in its record)."""
    import torch

    from rlhfkit.eval.reward import pearson
    from rlhfkit.train.common import to_device
    from rlhfkit.train.dpo import dpo_pair_loss, make_pair_batch
    from rlhfkit.train.preference import pair_metric_sums
    from rlhfkit.train.tracking import progress

    sums: dict[str, float] = {}
    records: list[dict] = []
    with torch.no_grad():
        for i in progress(range(0, len(items), batch_size), disable=quiet, desc="eval-dpo"):
            chunk = items[i:i + batch_size]
            batch = to_device(make_pair_batch(pad_id, chunk, None), device)
            p, out = dpo_pair_loss(config, reference, model, batch)
            for k, v in {"loss": out.losses.sum(), **pair_metric_sums(out.chosen_rewards, out.rejected_rewards,
                                                                      p.chosen, p.rejected)}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            columns = [t.float().cpu().tolist() for t in (out.chosen_rewards, out.rejected_rewards, out.losses,
                                                           p.chosen, p.rejected, p.n_chosen, p.n_rejected)]
            for item, (rc, rr, loss, lc, lr, nc, nr) in zip(chunk, zip(*columns)):
                records.append({"row": item.index, "source": item.sequences[0].source, "chosen_reward": rc,
                                "rejected_reward": rr, "margin": rc - rr, "correct": rc > rr, "loss": loss,
                                "chosen_logp": lc, "rejected_logp": lr, "chosen_tokens": int(nc),
                                "rejected_tokens": int(nr)})
    n = len(records)
    metrics = {k: v / n for k, v in sorted(sums.items())}
    acc = metrics["rewards/accuracies"]
    metrics["rewards/accuracies_stderr"] = math.sqrt(acc * (1 - acc) / n)
    margins = torch.tensor([r["margin"] for r in records], dtype=torch.float64)
    length_gap = torch.tensor([r["chosen_tokens"] - r["rejected_tokens"] for r in records], dtype=torch.float64)
    metrics["margin_length_corr"] = pearson(margins, length_gap)
    rewards = torch.tensor([r[k] for k in ("chosen_reward", "rejected_reward") for r in records], dtype=torch.float64)
    lengths = torch.tensor([r[k] for k in ("chosen_tokens", "rejected_tokens") for r in records], dtype=torch.float64)
    metrics["length_corr"] = pearson(rewards, lengths)
    metrics["ties"] = int((margins == 0).sum())
    metrics["pairs"] = n
    return metrics, records


DPO_METRIC_ORDER = ["rewards/accuracies", "rewards/accuracies_stderr", "rewards/margins", "loss", "rewards/chosen",
                    "rewards/rejected", "logps/chosen", "logps/rejected", "margin_length_corr", "length_corr", "ties",
                    "pairs"]


def precision_context(bf16: bool, device: str):
    """bf16 autocast (as a run with `bf16: true` evaluated), or float32."""
    import contextlib

    import torch

    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast("cuda" if str(device).startswith("cuda") else "cpu", dtype=torch.bfloat16)


def use_bf16(choice: str, run_bf16: bool, run_dir: Path) -> bool:
    """--bf16 auto: bf16 autocast when the run trained with it and this device computes bf16
    natively (else float32, said once); true / false as given."""
    if choice != "auto":
        return choice == "true"
    if not run_bf16:
        return False
    from rlhfkit.train.loop import bf16_is_native

    if bf16_is_native():
        return True
    print(f"{run_dir} trained with bf16 autocast; this device has no native bf16, so the evaluation runs in "
          "float32 (--bf16 true matches the run's precision exactly, with emulated bf16 matmuls)")
    return False


def evaluate_run(run_dir: Path, config, rows: list[dict], *, device, batch_size: int | None,
                 source: str | None = None, bf16: bool = False) -> dict:
    """One run's implicit reward on preference `rows`: {reference, skipped, padding_free, metrics,
    records}. Rows are encoded as the run's training encoded them; a row whose responses keep no
    token is skipped and counted. Forward passes in float32, or under bf16 autocast with `bf16`."""
    from rlhfkit.models.load import load_tokenizer
    from rlhfkit.train.common import encode_all
    from rlhfkit.train.dpo import encode_pair
    from rlhfkit.train.preference import packed_pass_matches

    # 1. tokenizer (the run's), pairs encoded as training encoded them, each keeping its row's position
    tokenizer = load_tokenizer(str(run_dir), trust_remote_code=config.trust_remote_code)

    def encode(indexed: tuple[int, dict]):
        item = encode_pair(tokenizer, config.max_length, config.max_prompt_length, indexed[1])
        if item is not None:
            item.index = indexed[0]
        return item

    items, skipped = encode_all(list(enumerate(rows)), encode, desc="tokenize", quiet=None)
    if not items:
        raise DataError(f"{run_dir}: no pair keeps a response token within max_length={config.max_length}, "
                        f"max_prompt_length={config.max_prompt_length}", source=source)
    # 2. policy and reference; packed passes unless this model cannot take them
    model, reference = _load_models(run_dir, config, tokenizer, device)
    pad = tokenizer.pad_token_id
    with precision_context(bf16, device):
        if config.padding_free and not packed_pass_matches(model, items, pad, device):
            print(f"WARNING: {run_dir}: this model's packed forward pass does not match its padded one: padding "
                  "instead")
            config.padding_free = reference.padding_free = False
        # 3. metrics and per-pair records
        metrics, records = evaluate_pairs(config, reference, model, items, pad, device=device,
                                          batch_size=batch_size or config.per_device_eval_batch_size)
    return {"reference": reference.kind, "skipped": skipped, "padding_free": config.padding_free,
            "bf16": bf16, "metrics": metrics, "records": records}


def paired_comparison(records: list[dict], other: list[dict]) -> dict:
    """Two runs' records on the same data, matched by row: their accuracies on the rows both kept,
    the difference with its paired standard error sqrt(var(c - c') / n) (c, c' the 0/1 correctness
    of each pair), the pairs only one of them gets right, and the correlation of their margins."""
    import torch

    from rlhfkit.eval.reward import pearson

    by_row = {r["row"]: r for r in other}
    common = [(r, by_row[r["row"]]) for r in records if r["row"] in by_row]
    if not common:
        raise DataError("the two runs kept no pair in common")
    n = len(common)
    c = torch.tensor([[float(a["correct"]), float(b["correct"])] for a, b in common], dtype=torch.float64)
    d = c[:, 0] - c[:, 1]
    margins = torch.tensor([[a["margin"], b["margin"]] for a, b in common], dtype=torch.float64)
    return {"pairs": n, "accuracy": float(c[:, 0].mean()), "other_accuracy": float(c[:, 1].mean()),
            "difference": float(d.mean()), "difference_stderr": math.sqrt(float(d.var(unbiased=False)) / n),
            "only_this_correct": int((d > 0).sum()), "only_other_correct": int((d < 0).sum()),
            "margin_corr": pearson(margins[:, 0], margins[:, 1])}


def run_eval_dpo(argv: list[str]) -> int:
    import torch

    from rlhfkit.eval.reward import format_metrics
    from rlhfkit.train.tracking import write_summary

    parser = argparse.ArgumentParser(prog="rlhfkit eval-dpo", description=(
        "implicit-reward accuracy (with its standard error), margins and loss of a DPO run on preference "
        "pairs, pair by pair; settings from RUN/config.yaml"))
    parser.add_argument("run", help="output_dir of `rlhfkit dpo` (LoRA adapter or full model, with config.yaml)")
    parser.add_argument("data", nargs="?", default=None, help="preference data file (.jsonl/.json/.csv/.parquet) "
                        "or saved dataset; default: the run's own held-out pairs")
    parser.add_argument("--compare", default=None, metavar="RUN2", help="another dpo run, evaluated on the same "
                        "pairs with its own settings: the accuracy difference with its paired standard error")
    parser.add_argument("--ref-model", default=None, help="reference model (default: the run's)")
    parser.add_argument("--beta", type=float, default=None, help="default: the run's")
    parser.add_argument("--max-length", type=int, default=None, help="default: the run's")
    parser.add_argument("--max-prompt-length", type=int, default=None, help="default: the run's")
    parser.add_argument("--batch-size", type=int, default=None, help="pairs per forward pass (default: the "
                        "run's per_device_eval_batch_size)")
    parser.add_argument("--no-padding-free", dest="padding_free", action="store_const", const=False, default=None,
                        help="pad every batch instead of packing it")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--bf16", choices=["auto", "true", "false"], default="auto", help="bf16 autocast; "
                        "auto (default): when the run trained with it and the device computes bf16 natively")
    parser.add_argument("--output-dir", default=None, help="where summary.json and pairs.jsonl go (default: "
                        f"RUN/eval-DATA_NAME, RUN/eval-{HELD_OUT} without DATA)")
    args = parser.parse_args(argv)
    run_dir = Path(args.run)
    # 1. the runs' settings and the rows, validated before any model loads
    overrides = {"ref_model": args.ref_model, "beta": args.beta, "max_length": args.max_length,
                 "max_prompt_length": args.max_prompt_length, "padding_free": args.padding_free}
    config = _run_config(run_dir, overrides)
    other_config = _run_config(Path(args.compare), overrides) if args.compare else None
    rows, what = _rows(config, args.data)
    # 2. evaluate (and the other run on the same rows)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    result = evaluate_run(run_dir, config, rows, device=device, batch_size=args.batch_size, source=args.data,
                          bf16=use_bf16(args.bf16, config.bf16, run_dir))
    metrics = result["metrics"]
    compared = None
    if other_config is not None:
        other = evaluate_run(Path(args.compare), other_config, rows, device=device, batch_size=args.batch_size,
                             source=args.data, bf16=use_bf16(args.bf16, other_config.bf16, Path(args.compare)))
        compared = {"run": args.compare, "reference": other["reference"], "skipped": other["skipped"],
                    **paired_comparison(result["records"], other["records"])}
    # 3. pairs.jsonl, summary.json, table
    out = Path(args.output_dir or run_dir / f"eval-{Path(args.data).stem if args.data else HELD_OUT}")
    out.mkdir(parents=True, exist_ok=True)
    with (out / "pairs.jsonl").open("w", encoding="utf-8") as f:
        for record in result["records"]:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    n = metrics["pairs"]
    write_summary(out, {"run": str(run_dir), "data": what, "pairs": n, "skipped": result["skipped"],
                        "reference": result["reference"], "loss_type": config.loss_types, "beta": config.beta,
                        "max_length": config.max_length, "max_prompt_length": config.max_prompt_length,
                        "padding_free": result["padding_free"], "bf16": result["bf16"],
                        **{f"eval/{k}": v for k, v in metrics.items()}, **({"compare": compared} if compared else {})})
    print(format_metrics(metrics, f"{run_dir} on {what} ({n} pairs"
                       + (f", {result['skipped']} skipped" if result["skipped"] else "")
                       + f", reference: {result['reference']})", order=DPO_METRIC_ORDER))
    if compared:
        print(f"against {args.compare} on the {compared['pairs']} pairs both kept: accuracy {compared['accuracy']:.4f} "
              f"vs {compared['other_accuracy']:.4f}, difference {compared['difference']:+.4f} (paired SE "
              f"{compared['difference_stderr']:.4f}); right only here {compared['only_this_correct']}, only there "
              f"{compared['only_other_correct']}; margin correlation {compared['margin_corr']:.3f}")
    print(f"summary.json and pairs.jsonl in {out}")
    return 0
