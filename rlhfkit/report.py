"""`report.html` of a pipeline: one self-contained page (inline base64 PNGs, no scripts, no network).

Sections (each an `<h2 id=...>`, in `SECTIONS`): overview (the stages, what this run did with each),
models (a metrics table per model), samples (every model's response to the same prompts side by side),
training (loss curves per stage), rl (reward, KL and gold reward over steps; the reward-KL frontier),
reward-model (accuracy, calibration, length bias).

The models table and samples come from `output_dir/eval/eval.json` when it exists (written by
`rlhfkit eval`: `{"baseline", "judges", "models": {NAME: {"path", "metrics", "win_rate"}}, "samples"}`);
otherwise the report computes them itself (`evaluate_models`): every policy stage's model samples the
same held-out prompts with the same seed, scored by the task's gold reward, the pipeline's reward model
and the KL to the reference (SFT) model, cached in `output_dir/report/models.json`.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
from pathlib import Path

from rlhfkit.data.sources import jsonl_records


SECTIONS = {
    "overview": "Pipeline",
    "models": "Models",
    "samples": "Samples (same prompts, every model)",
    "training": "Training curves",
    "rl": "Online RL: reward, KL, gold reward; the reward-KL frontier",
    "reward-model": "Reward model: accuracy, calibration, length bias",
}
"""Section id -> title; every section is always present (with a note when it has nothing to show)."""

METRIC_COLUMNS = {
    "gold_reward": "gold reward", "rm_score": "RM score", "kl_to_reference": "KL to ref (nats)",
    "length": "length (tokens)", "eos_rate": "EOS rate", "distinct_1": "distinct-1", "distinct_2": "distinct-2",
}

RL_KINDS = ("ppo", "grpo", "rloo", "online_dpo", "xpo", "nash_md", "spin", "self_reward")
REWARD_KEYS = ("objective/scores", "rewards/mean", "scores/mean", "scores/policy")
"""Training-reward metric of the online stages (PPO's reward-model score, GRPO/RLOO's combined reward,
online DPO's mean score of the sampled responses, xpo's and nash_md's of the policy's responses)."""

STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px auto; max-width: 1200px;
       color: #222; line-height: 1.4; padding: 0 16px; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 4px;
       margin-top: 1.8em; } h3 { margin-bottom: 0.3em; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; }
th { background: #f3f3f3; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.resp { max-width: 260px; font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 0.9em; }
.note { color: #666; font-size: 0.9em; } img { max-width: 100%; border: 1px solid #eee; vertical-align: top;
       margin: 0 8px 8px 0; } img.small { width: 420px; }
.skip { color: #777; } .run, .re-run { color: #0a5; } .resume { color: #a60; }
nav a { margin-right: 14px; }
"""


# ---- small helpers ------------------------------------------------------------------------------

def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _history(stage_dir: Path) -> list[dict]:
    path = stage_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return jsonl_records(path)


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:+.{digits}f}" if value < 0 else f"{value:.{digits}f}"
    return html.escape(str(value))


def _png(fig) -> str:
    """A matplotlib figure as an inline `<img>` (base64 PNG); closes the figure."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _png_file(path: Path) -> str:
    return f'<img class=small alt="{html.escape(path.name)}" src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}">'


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(history: list[dict], key: str) -> tuple[list, list]:
    pts = [(r["step"], r[key]) for r in history if isinstance(r.get(key), (int, float))]
    return ([p[0] for p in pts], [p[1] for p in pts]) if pts else ([], [])


def _table(header: list[str], rows: list[list[str]], numeric_from: int = 1) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td{' class=num' if i >= numeric_from else ''}>{c}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


# ---- per-model metrics and samples -----------------------------------------------------------------

def _model_path(stage_dir: Path) -> Path:
    return stage_dir / "merged" if (stage_dir / "merged").is_dir() else stage_dir


def reference_stage(pipeline) -> str | None:
    """The KL reference and table baseline: `report.reference`, else the last sft stage, else the first
    policy stage."""
    from rlhfkit.pipeline import POLICY_KINDS

    if pipeline.config.report.reference:
        return pipeline.config.report.reference
    sft = [s.name for s in pipeline.stages if s.kind == "sft"]
    policies = [s.name for s in pipeline.stages if s.kind in POLICY_KINDS]
    return sft[-1] if sft else (policies[0] if policies else None)


def _cache_key(pipeline, names: list[str], rm: str | None, ref: str | None) -> str:
    from rlhfkit.pipeline import STATE_FILE

    ids = {}
    for name in [*names, rm, ref]:
        if name is not None:
            state = _read_json(pipeline.stage(name).output_dir / STATE_FILE) or {}
            ids[name] = f"{state.get('fingerprint')}:{state.get('run_id')}"
    blob = json.dumps({"ids": ids, "report": pipeline.config.report.model_dump(mode="json"),
                       "data": pipeline.config.data.model_dump(mode="json") if pipeline.config.data else None},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def evaluate_models(pipeline) -> dict:
    """`rlhfkit eval` (`run_eval`, the one model comparison) over every finished policy stage on the same
    held-out prompts (`report` settings): gold reward (with a built-in task), RM score (the last rm
    stage), KL to the reference stage, length, EOS rate, distinct-1/2, win rates against the reference
    stage, per-response stats for the plots. Cached in output_dir/report/models.json while no stage's
    output changes. A failure is printed and gives an empty table (the report is still written)."""
    from rlhfkit.eval.compare import build_eval_config, run_eval
    from rlhfkit.pipeline import POLICY_KINDS

    spec = pipeline.config.report
    names = [s.name for s in pipeline.stages if s.kind in POLICY_KINDS
             and (s.output_dir / "summary.json").is_file()]
    rms = [s.name for s in pipeline.stages if s.kind == "rm" and (s.output_dir / "summary.json").is_file()]
    rm = rms[-1] if rms else None
    ref = reference_stage(pipeline)
    ref = ref if ref in names else None
    cache = pipeline.output_dir / "report" / "models.json"
    key = _cache_key(pipeline, names, rm, ref)
    cached = _read_json(cache)
    if cached is not None and cached.get("cache_key") == key:
        return cached
    empty = {"baseline": ref, "judges": [], "models": {}, "samples": [], "source": "pipeline", "reward_model": rm,
             "cache_key": key}
    data = pipeline.config.data
    if not names or (data is None and not spec.prompts):
        return empty
    values = {"models": {n: str(_model_path(pipeline.stage(n).output_dir)) for n in names},
              "baseline": ref or names[0], "reference": ref, "reward_model": str(pipeline.stage(rm).output_dir) if rm else None,
              "num_prompts": spec.num_prompts, "num_samples": spec.num_samples, "max_new_tokens": spec.max_new_tokens,
              "temperature": spec.temperature, "seed": spec.seed, "disable_tqdm": True,
              "output": str(pipeline.output_dir / "report" / "eval.json"),
              **({"task": data.task} if data is not None else {"prompts": spec.prompts})}
    print(f"== report: rlhfkit eval of {', '.join(names)} on {spec.num_prompts} held-out prompts")
    try:
        result = run_eval(build_eval_config(values, source="pipeline report"))
    except Exception as e:  # noqa: BLE001 - an evaluation that fails must not lose the report
        print(f"== report: could not evaluate the models: {type(e).__name__}: {e}")
        return {**empty, "error": str(e)}
    result = {**result, "source": "pipeline", "reward_model": rm, "cache_key": key}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(result, indent=1) + "\n")
    return result


# ---- sections -------------------------------------------------------------------------------------

def _overview(pipeline) -> str:
    from rlhfkit.pipeline import STATE_FILE

    rows = []
    for s in pipeline.stages:
        state = _read_json(s.output_dir / STATE_FILE) or {}
        summary = _read_json(s.output_dir / "summary.json") or {}
        inputs = ", ".join(f"{k} &larr; {html.escape(v)}" for k, v in s.upstream.items()) or "-"
        status = "finished" if state.get("complete") and summary else "not finished"
        rows.append([html.escape(s.name), s.kind, inputs, _fmt(summary.get("steps")), status,
                     html.escape(str(state.get("fingerprint", "-"))), html.escape(str(state.get("time", "-")))])
    return (f"<p>Output directory <code>{html.escape(str(pipeline.output_dir))}</code>.</p>"
            + _table(["stage", "kind", "inputs (upstream stages)", "steps", "status", "fingerprint",
                      "state recorded"], rows, numeric_from=9))


def _models(evals: dict) -> str:
    models = evals.get("models") or {}
    if not models:
        return "<p class=note>No model to evaluate (no finished policy stage, or no prompts: give the pipeline " \
               "a built-in task under <code>data</code> or <code>report.prompts</code>).</p>"
    present = list(dict.fromkeys(k for m in models.values() for k in m.get("metrics", {})))
    # the known metrics in their order, then any other (eval.json's reward/<function>, rouge...)
    metric_keys = [k for k in METRIC_COLUMNS if k in present] + [k for k in present if k not in METRIC_COLUMNS]
    judges = list(evals.get("judges") or [])
    header = ["model", *[METRIC_COLUMNS.get(k, k) for k in metric_keys],
              *[f"win rate vs {evals.get('baseline')} ({j})" for j in judges]]
    rows = []
    for name, m in models.items():
        row = [html.escape(name) + (" (baseline)" if name == evals.get("baseline") else "")
               + (f"<br><span class=note>not evaluated: {html.escape(m['error'])}</span>" if m.get("error") else "")]
        row += [_fmt(m.get("metrics", {}).get(k)) for k in metric_keys]
        for j in judges:
            w = (m.get("win_rate") or {}).get(j)
            if not w or w.get("rate") is None:
                row.append("-")
                continue
            diff = (f"<br>score diff {w['score_diff']:+.3f} &plusmn; {w['score_diff_se']:.3f}"
                    if w.get("score_diff") is not None else "")  # eval.json files before the paired difference
            row.append(f"{w['rate']:.3f} [{w['low']:.3f}, {w['high']:.3f}] (n={w['n']}){diff}")
        rows.append(row)
    if evals.get("source") == "eval.json":
        note = "From <code>eval/eval.json</code> (<code>rlhfkit eval</code>)."
    else:
        n = len(next(iter(models.values())).get("stats", {}).get("length", []))
        rm = evals.get("reward_model")
        note = (f"<code>rlhfkit eval</code> run by the pipeline: one sample per prompt on the same {n} held-out "
                f"prompts for every model (same seed); KL to <b>{html.escape(str(evals.get('baseline')))}</b> summed "
                "over response tokens; "
                + (f"RM score from the <b>{html.escape(rm)}</b> stage (normalised); " if rm else "")
                + "distinct-n: unique word n-grams / all word n-grams of the responses; win rate: share of prompts "
                "where the model's response beats the baseline's (ties half), bootstrap 95% interval. Your own "
                "<code>eval/eval.json</code> (other judges or prompts) replaces this table when present.")
    return _table(header, rows) + f"<p class=note>{note}</p>" + _frontier_models(evals)


def _frontier_models(evals: dict) -> str:
    models = evals.get("models") or {}
    pts = [(n, m["metrics"]) for n, m in models.items()
           if "gold_reward" in m.get("metrics", {}) and "kl_to_reference" in m.get("metrics", {})]
    if len(pts) < 2:
        return ""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, m in pts:
        ax.scatter(m["kl_to_reference"], m["gold_reward"], s=40)
        ax.annotate(name, (m["kl_to_reference"], m["gold_reward"]), textcoords="offset points", xytext=(5, 4))
    ax.set_xlabel(f"KL to {evals.get('baseline')} (nats per response)")
    ax.set_ylabel("gold reward")
    ax.set_title("models: gold reward vs KL")
    ax.grid(alpha=0.3)
    return _png(fig)


def _samples(evals: dict) -> str:
    samples = evals.get("samples") or []
    if not samples:
        return "<p class=note>No samples.</p>"
    names = list(evals.get("models") or samples[0]["responses"])
    rows = [[html.escape(s["prompt"])] + [html.escape(s["responses"].get(n, "-")) for n in names]
            for s in samples]
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ["prompt", *names])
    body = "".join("<tr>" + "".join(f"<td class=resp>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _training(pipeline) -> str:
    parts = []
    plt = _plt()
    for s in pipeline.stages:
        history = _history(s.output_dir)
        # one panel per loss: the training value and its held-out `eval/` twin on the same axes
        present = list(dict.fromkeys(k for r in history for k in r))
        keys = list(dict.fromkeys(k.removeprefix("eval/") for k in present
                                  if k.endswith("loss") and not k.startswith("initial")))[:4]
        if not keys:
            parts.append(f"<h3>{html.escape(s.name)} ({s.kind})</h3><p class=note>No metrics logged.</p>")
            continue
        fig, axes = plt.subplots(1, len(keys), figsize=(3.8 * len(keys), 2.8), squeeze=False)
        for ax, key in zip(axes[0], keys):
            for k in (key, f"eval/{key}"):
                xs, ys = _series(history, k)
                if xs:
                    ax.plot(xs, ys, marker="." if len(xs) < 40 else "", label="held-out" if k.startswith("eval/")
                            else "train")
            ax.set_title(key, fontsize=10)
            ax.set_xlabel("step")
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
        parts.append(f"<h3>{html.escape(s.name)} ({s.kind})</h3>" + _png(fig))
    return "".join(parts)


def _rl(pipeline, evals: dict) -> str:
    stages = [s for s in pipeline.stages if s.kind in RL_KINDS]
    if not stages:
        return "<p class=note>No online stage (ppo, grpo, rloo, online_dpo, xpo, nash_md, spin, self_reward) in this pipeline.</p>"
    plt = _plt()
    parts = []
    frontier = []
    for s in stages:
        history = _history(s.output_dir)
        reward_key = next((k for k in REWARD_KEYS if any(k in r for r in history)), None)
        panels = [(reward_key, "training reward"), ("objective/kl", "KL to reference (train)"),
                  ("eval/gold_reward", "gold reward (held-out)"), ("eval/judge_score", "judge reward (held-out)"),
                  ("eval/judge_win_rate", "judge win rate vs step 0 (held-out)")]
        panels = [(k, t) for k, t in panels if k and any(k in r for r in history)]
        if not panels:
            parts.append(f"<h3>{html.escape(s.name)}</h3><p class=note>No metrics logged.</p>")
            continue
        fig, axes = plt.subplots(1, len(panels), figsize=(3.8 * len(panels), 2.8), squeeze=False)
        for ax, (key, title) in zip(axes[0], panels):
            xs, ys = _series(history, key)
            ax.plot(xs, ys, marker="." if len(xs) < 40 else None)
            ax.set_title(f"{title}\n{key}", fontsize=9)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        parts.append(f"<h3>{html.escape(s.name)} ({s.kind})</h3>" + _png(fig))
        # the judge reward model (`judge_reward_model`) stands in for a gold reward where there is none
        gold_key = "eval/gold_reward" if any("eval/gold_reward" in r for r in history) else "eval/judge_score"
        evals_at = [{**r, "eval/gold_reward": r[gold_key]} for r in history if gold_key in r and "eval/kl" in r]
        train_at = [r for r in history if reward_key in r and "objective/kl" in r] if reward_key else []
        frontier.append((s.name, evals_at, train_at, reward_key))
    model_pts = [(name, m["metrics"]) for name, m in (evals.get("models") or {}).items()
                 if {"gold_reward", "kl_to_reference"} <= set(m.get("metrics", {}))]
    left = any(f[1] for f in frontier) or model_pts
    right = any(f[2] for f in frontier)
    if not (left or right):
        parts.append("<h3>Reward&ndash;KL frontier</h3><p class=note>No KL logged (e.g. GRPO with beta 0 and no "
                     "gold evaluation): nothing to plot.</p>")
        return "".join(parts)
    fig, axes = plt.subplots(1, int(bool(left)) + int(bool(right)), figsize=(5 * (int(bool(left)) + int(bool(right))),
                                                                              3.6), squeeze=False)
    axes = list(axes[0])
    a1 = axes.pop(0) if left else None
    a2 = axes.pop(0) if right else None
    for name, evals_at, train_at, reward_key in frontier:
        if evals_at and a1 is not None:
            a1.plot([r["eval/kl"] for r in evals_at], [r["eval/gold_reward"] for r in evals_at], marker="o",
                    label=f"{name} (held-out evaluations; labels: step)")
            for r in evals_at[:: max(1, len(evals_at) // 4)]:
                a1.annotate(str(r["step"]), (r["eval/kl"], r["eval/gold_reward"]), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))
        if train_at and a2 is not None:
            a2.plot([r["objective/kl"] for r in train_at], [r[reward_key] for r in train_at], marker=".",
                    label=f"{name} ({reward_key})")
    if a1 is not None:
        for name, met in model_pts:
            a1.scatter(met["kl_to_reference"], met["gold_reward"], marker="x", color="gray")
            a1.annotate(name, (met["kl_to_reference"], met["gold_reward"]), fontsize=8, color="gray",
                        textcoords="offset points", xytext=(4, -10))
        a1.set_title("gold (or judge) reward vs KL (x: the models table)", fontsize=10)
        a1.set_ylabel("gold reward (judge RM without a task)")
    if a2 is not None:
        a2.set_title("training reward vs KL (per logged step)", fontsize=10)
        a2.set_ylabel("training reward")
    for ax in (a1, a2):
        if ax is None:
            continue
        ax.set_xlabel("KL to reference (nats per response)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    parts.append("<h3>Reward&ndash;KL frontier</h3>" + _png(fig))
    return "".join(parts)


RM_METRICS = {"eval/accuracy": "accuracy", "eval/bayes_accuracy": "Bayes ceiling", "eval/gold_accuracy":
              "agreement with gold", "eval/margin": "margin", "eval/ece": "ECE", "eval/length_corr":
              "reward-length corr.", "eval/eos_sensitivity": "EOS sensitivity"}


def _reward_model(pipeline, evals: dict) -> str:
    stages = [s for s in pipeline.stages if s.kind == "rm"]
    if not stages:
        return "<p class=note>No reward-model stage in this pipeline.</p>"
    plt = _plt()
    parts = []
    for s in stages:
        summary = _read_json(s.output_dir / "summary.json") or {}
        keys = [k for k in RM_METRICS if k in summary]
        parts.append(f"<h3>{html.escape(s.name)} ({summary.get('eval_rows', '?')} held-out rows)</h3>")
        parts.append(_table([RM_METRICS[k] for k in keys], [[_fmt(summary[k]) for k in keys]], numeric_from=0)
                     if keys else "<p class=note>No evaluation in summary.json.</p>")
        history = _history(s.output_dir)
        imgs = []
        acc = [k for k in ("rm/accuracy", "eval/accuracy") if any(k in r for r in history)]
        if acc:
            fig, ax = plt.subplots(figsize=(4.2, 3.0))
            for k in acc:
                xs, ys = _series(history, k)
                ax.plot(xs, ys, marker=".", label=k)
            if "eval/bayes_accuracy" in summary:
                ax.axhline(summary["eval/bayes_accuracy"], color="gray", ls="--", label="Bayes ceiling")
            ax.set_title("accuracy", fontsize=10)
            ax.set_xlabel("step")
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
            imgs.append(_png(fig))
        reliability = s.output_dir / "plots" / "reliability.png"
        if reliability.is_file():
            imgs.append(_png_file(reliability))
        parts.append("".join(imgs))
    models = {n: m for n, m in (evals.get("models") or {}).items() if "rm_score" in m.get("stats", {})}
    if models:
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        width = 0.6 / max(len(models), 1)  # lengths are whole tokens: each model gets its own offset
        for i, (name, m) in enumerate(models.items()):
            offset = (i - (len(models) - 1) / 2) * width
            ax.scatter([x + offset for x in m["stats"]["length"]], m["stats"]["rm_score"], s=8, alpha=0.5,
                       label=name)
        ax.set_xlabel("response length (tokens; models side by side at each length)")
        ax.set_ylabel(f"RM score ({evals.get('reward_model')})")
        ax.set_title("length bias: RM score vs length on every model's samples", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        parts.append("<h3>Length bias on the models' samples</h3>" + _png(fig)
                     + "<p class=note>A reward model that rises with length alone invites RL to write longer "
                       "responses; compare with the reward-length correlation above (on preference pairs).</p>")
    return "".join(parts)


# ---- the page -----------------------------------------------------------------------------------

def load_evals(pipeline) -> dict:
    """`output_dir/eval/eval.json` when present (marked source eval.json), else `evaluate_models`."""
    path = pipeline.output_dir / "eval" / "eval.json"
    data = _read_json(path)
    if data is not None and data.get("models"):
        return {**data, "source": "eval.json"}
    return evaluate_models(pipeline)


def render_report(pipeline, evals: dict, steps=None) -> str:
    """The HTML text (sections in `SECTIONS` order)."""
    import time

    body = {
        "overview": _overview(pipeline),
        "models": _models(evals),
        "samples": _samples(evals),
        "training": _training(pipeline),
        "rl": _rl(pipeline, evals),
        "reward-model": _reward_model(pipeline, evals),
    }
    if steps:
        body["overview"] = ("<p>This run's plan: " + "; ".join(
            f"<span class='{s.action}'>{html.escape(s.stage.name)}: {s.action}</span> ({html.escape(s.reason)})"
            for s in steps) + ".</p>" + body["overview"])
    nav = "".join(f'<a href="#{k}">{html.escape(v.split(":")[0])}</a>' for k, v in SECTIONS.items())
    sections = "".join(f'<h2 id="{k}">{html.escape(SECTIONS[k])}</h2>\n{body[k]}\n' for k in SECTIONS)
    title = f"rlhfkit pipeline report: {pipeline.output_dir.name}"
    return (f"<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>\n<h1>{html.escape(title)}</h1>"
            f"<p class=note>{time.strftime('%Y-%m-%d %H:%M')} &middot; {html.escape(pipeline.source)}</p>"
            f"<nav>{nav}</nav>\n{sections}</body></html>\n")


def write_report(pipeline, steps=None, evals: dict | None = None) -> Path:
    """Evaluate (or read eval.json), render and write output_dir/report.html; returns its path."""
    evals = load_evals(pipeline) if evals is None else evals
    path = pipeline.output_dir / "report.html"
    path.write_text(render_report(pipeline, evals, steps))
    return path


def screenshot(html_path: str | Path, png_path: str | Path | None = None, width: int = 1280,
               height: int | None = None) -> Path:
    """A full-page PNG of the report by headless chromium (Debian: `apt-get install chromium`), saved next
    to it (report.png) unless `png_path` says otherwise; `height` defaults to a guess from the page's size."""
    import shutil
    import subprocess

    html_path = Path(html_path).resolve()
    png_path = Path(png_path) if png_path else html_path.with_suffix(".png")
    browser = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    if browser is None:
        from rlhfkit.errors import RlhfkitError

        raise RlhfkitError("no headless browser found: install chromium (Debian: apt-get install chromium)")
    if height is None:  # generous (chromium cuts at the window height); the blank bottom is trimmed below
        text = html_path.read_text()
        height = min(16000, 600 + 520 * text.count("<img") + 40 * text.count("<tr>") + 80 * text.count("<h3>"))
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={png_path.resolve()}", f"--window-size={width},{height}",
                    html_path.as_uri()], check=True, capture_output=True, timeout=120)
    from PIL import Image, ImageChops

    with Image.open(png_path) as im:
        rgb = im.convert("RGB")
    box = ImageChops.difference(rgb, Image.new("RGB", rgb.size, (255, 255, 255))).getbbox()
    if box is not None and box[3] + 40 < rgb.size[1]:
        rgb.crop((0, 0, rgb.size[0], box[3] + 40)).save(png_path)
    return png_path
