"""`rlhfkit demo`: the built-in end-to-end run on a synthetic task, a few minutes on 2 CPU cores.

task data -> preset tiny model + tokenizer -> pt -> sft -> report (samples before and after SFT,
gold reward, EOS rate, held-out loss). Each stage is the same function the CLI calls, fed a
config built here; every stage's outputs land under OUTPUT_DIR/<stage>.
"""

from __future__ import annotations

import json
from pathlib import Path

from rlhfkit.config import build_config
from rlhfkit.tasks import get_task


def _stage_configs(out: Path, data: Path, task: str, seed: int, quick: bool) -> dict[str, dict]:
    common = dict(seed=seed, logging_steps=10, task=task, eval_num_prompts=64, max_new_tokens=24,
                  overwrite_output_dir=True)
    return {
        "pt": dict(common, model_name_or_path="preset:tiny", dataset=str(data / "pt_train.jsonl"),
                   eval_dataset=str(data / "pt_eval.jsonl"), output_dir=str(out / "pt"), max_length=128,
                   per_device_train_batch_size=16, num_train_epochs=1 if quick else 4,
                   learning_rate=2e-3, warmup_ratio=0.05, lr_scheduler_type="cosine", eval_steps=60),
        "sft": dict(common, model_name_or_path=str(out / "pt"), dataset=str(data / "sft_train.jsonl"),
                    eval_dataset=str(data / "sft_eval.jsonl"), output_dir=str(out / "sft"), max_length=64,
                    per_device_train_batch_size=32, num_train_epochs=1 if quick else 3,
                    learning_rate=1e-3, warmup_ratio=0.05, lr_scheduler_type="cosine", eval_steps=60),
    }


def _samples_table(before: list[dict], after: list[dict], n: int = 5) -> list[str]:
    lines = ["| prompt | before SFT (pt) | gold | after SFT | gold |", "|---|---|---|---|---|"]
    for b, a in list(zip(before, after))[:n]:
        lines.append(f"| {b['prompt']} | {b['response'].strip()}{'' if b['ended'] else ' …'} | {b['gold']:+.2f} "
                     f"| {a['response'].strip()}{'' if a['ended'] else ' …'} | {a['gold']:+.2f} |")
    return lines


def demo(output_dir: str = "runs/demo", task: str = "sentiment", seed: int = 0, quick: bool = False) -> dict:
    from rlhfkit.eval.generation import sample_and_score
    from rlhfkit.train.pt import train_pt
    from rlhfkit.train.sft import train_sft

    out = Path(output_dir)
    data = out / "data"
    t = get_task(task)
    print(f"== rlhfkit demo: task '{task}' -> {out}")
    print(f"== 1. data: writing the task's files to {data}")
    t.write(data, seed=seed)
    configs = _stage_configs(out, data, task, seed, quick)

    print("== 2. pretraining a tiny Llama-style model from scratch (tokenizer trained on the corpus)")
    pt = train_pt(build_config("pt", configs["pt"], source="demo"))
    print("== 3. supervised fine-tuning on demonstrations (loss on responses only)")
    sft = train_sft(build_config("sft", configs["sft"], source="demo"))

    print("== 4. report: the same held-out prompts, sampled before and after SFT")
    from rlhfkit.data.formats import to_canonical
    from rlhfkit.data.sources import load_rows
    from rlhfkit.eval.likelihood import response_nll
    from rlhfkit.train.sft import encode_sft

    # one held-out set for every model: the SFT eval demonstrations (response tokens only)
    heldout = [e for e in (encode_sft(sft.tokenizer, 64, r)
                           for r in to_canonical(load_rows(str(data / "sft_eval.jsonl")))) if e is not None]
    evals, report = {}, {}
    for name, result in (("pt", pt), ("sft", sft)):
        evals[name] = sample_and_score(result.model, result.tokenizer, t, n_prompts=128, max_new_tokens=24,
                                       seed=seed)
        nll = response_nll(result.model, heldout, result.tokenizer.pad_token_id)["loss"]
        report[name] = {**evals[name][0], "eval/loss": nll}
    lines = [f"# rlhfkit demo report (task: {task})", "",
             "| model | gold reward | EOS rate | mean length | held-out loss |", "|---|---|---|---|---|"]
    for name, m in report.items():
        loss = f"{m['eval/loss']:.3f}" if m["eval/loss"] is not None else "-"
        lines.append(f"| {name} | {m['gold_reward']:+.3f} | {m['eos_rate']:.2f} | {m['length']:.1f} | {loss} |")
    lines += ["", "held-out loss: token-mean NLL of the responses of the held-out SFT demonstrations", "",
              "## Samples (held-out prompts)", ""]
    lines += _samples_table(evals["pt"][1], evals["sft"][1])
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(text)
    print(f"== done: report in {out / 'report.md'}; models in {out / 'pt'} and {out / 'sft'}")
    return report
