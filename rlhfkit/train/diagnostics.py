"""One registry of run diagnostics: known ways a run goes wrong, each a check over the metrics logged
so far and an explanation with what to do. A stage's `Monitor` runs the checks whose metrics it
logs, prints each explanation once, logs `diag/<name>` flags and lists what fired in summary.json.

A check takes `(train, evals, context)`: the per-step training metrics so far (oldest first), the
evaluation records so far, and stage facts (e.g. `max_new_tokens`); it returns True when the
failure is showing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Diagnostic:
    name: str
    explanation: str
    needs: str
    """The metric whose presence makes the check applicable (in training or evaluation records)."""
    check: Callable[[list[dict], list[dict], dict], bool]


DIAGNOSTICS: dict[str, Diagnostic] = {}


def register(name: str, needs: str, explanation: str):
    def add(check):
        DIAGNOSTICS[name] = Diagnostic(name, explanation, needs, check)
        return check
    return add


def _last(records: list[dict], key: str, n: int) -> list[float]:
    return [r[key] for r in records if key in r][-n:]


@register("negative_kl", "objective/kl",
          "mean KL to the reference is negative: sampling and scoring disagree (temperature not applied the "
          "same way, pads attended, or tokens forced/suppressed at generation); the KL penalty then rewards "
          "drifting away")
def negative_kl(train, evals, context) -> bool:
    recent = _last(train, "objective/kl", 5)
    return len(recent) >= 3 and sum(recent) / len(recent) < -0.01


@register("high_clipfrac", "policy/clipfrac",
          "policy clip fraction stayed above 0.3: updates are too large for the trust region; lower "
          "learning_rate or the passes over each batch, or raise the clip range")
def high_clipfrac(train, evals, context) -> bool:
    recent = _last(train, "policy/clipfrac", 3)
    return len(recent) >= 3 and min(recent) > 0.3


@register("length_runaway", "gen/eos_rate",
          "responses are getting longer and EOS rarer: the policy is learning to not finish (check the EOS "
          "trick: missing_eos_penalty / missing_eos_score)")
def length_runaway(train, evals, context) -> bool:
    recs = [r for r in train if "gen/eos_rate" in r and "gen/length" in r]
    if not recs:
        return False
    first, last = recs[0], recs[-1]
    return (last["gen/eos_rate"] < 0.5 * first["gen/eos_rate"]
            and last["gen/length"] > max(1.5 * first["gen/length"], 0.8 * context.get("max_new_tokens", 0)))


@register("flat_groups", "rewards/flat_groups",
          "most groups have rewards that are all equal (all right or all wrong): their advantages are 0, so "
          "they carry no learning signal; use prompts of the right difficulty, more num_generations, a "
          "denser reward, or dynamic_sampling")
def flat_groups(train, evals, context) -> bool:
    recent = _last(train, "rewards/flat_groups", 3)
    return len(recent) >= 3 and min(recent) > 0.5


@register("reward_hacking", "eval/gold_reward",
          "the proxy score rises while the gold reward falls: the policy is exploiting the reward model; "
          "raise the KL coefficient, or stop earlier")
def reward_hacking(train, evals, context) -> bool:
    recs = [r for r in evals if "eval/scores" in r and "eval/gold_reward" in r][-3:]
    return (len(recs) == 3 and recs[-1]["eval/scores"] > recs[0]["eval/scores"]
            and recs[2]["eval/gold_reward"] < recs[1]["eval/gold_reward"] < recs[0]["eval/gold_reward"])


@register("falling_chosen_logps", "logps/chosen",
          "the policy's log-prob of the CHOSEN responses (against the reference, where there is one) has fallen "
          "steadily while the reward margin grew: "
          "DPO only widens the gap between chosen and rejected, and here it does so by making both less "
          "likely (probability mass moves to responses in neither set). Samples may drift or degrade. "
          "Remedies: a larger beta, a lower learning rate or fewer steps, sft_weight > 0 (RPO: NLL on the "
          "chosen response), or IPO.")
def falling_chosen(train, evals=(), context=None, window: int = 5, min_drop: float = 1.0) -> bool:
    """Over the last `window` logged records the chosen responses' log-prob fell at every step but at
    most one and by at least `min_drop` nats in total, while `rewards/margins` grew.

    With a reference (context `beta`, and `reference` other than "none") the log-prob is measured
    against it on the same pairs, `rewards/chosen / beta`, and must also end below 0 (the chosen
    responses now less likely than under the reference). The raw `logps/chosen` of successive
    batches moves by tens of nats with the batches' response lengths, which made this fire on noise
    (an HH-RLHF run with sft_weight 1: raw log-probs "fell" while the chosen log-ratio rose to +8
    nats). Runs without a reference (SimPO, ORPO, reference_free) have only the raw log-probs."""
    context = context or {}
    beta = context.get("beta")
    relative = bool(beta) and context.get("reference") not in (None, "none")
    key = "rewards/chosen" if relative else "logps/chosen"
    recs = [r for r in train if key in r and "rewards/margins" in r][-window:]
    if len(recs) < window:
        return False
    chosen = [r[key] / beta if relative else r[key] for r in recs]
    margins = [r["rewards/margins"] for r in recs]
    falls = sum(b < a for a, b in zip(chosen, chosen[1:]))
    return (falls >= window - 2 and chosen[0] - chosen[-1] >= min_drop and margins[-1] > margins[0]
            and (not relative or chosen[-1] < 0))


class Monitor:
    """Runs the registered diagnostics for one run: `step(step, metrics)` after each training step
    (returns the `diag/*` flags of the checks that apply), `evaluation(step, metrics)` after each
    evaluation; each explanation is printed once; `summary()` lists what fired, for summary.json."""

    def __init__(self, printer, stage: str, **context):
        self.printer, self.stage, self.context = printer, stage, context
        self.train: list[dict] = []
        self.evals: list[dict] = []
        self.fired: dict[str, int] = {}

    def _run(self, step: int, applicable) -> dict:
        flags = {}
        for d in DIAGNOSTICS.values():
            if applicable(d):
                on = bool(d.check(self.train, self.evals, self.context))
                flags[f"diag/{d.name}"] = float(on)
                if on and d.name not in self.fired:
                    self.fired[d.name] = step
                    self.printer(f"[{self.stage}] WARNING (step {step}): {d.explanation}")
        return flags

    def step(self, step: int, metrics: dict) -> dict:
        self.train.append(metrics)
        return self._run(step, lambda d: d.needs in metrics and not d.needs.startswith("eval/"))

    def evaluation(self, step: int, metrics: dict) -> dict:
        self.evals.append(metrics)
        return self._run(step, lambda d: d.needs in metrics and d.needs.startswith("eval/"))

    def summary(self) -> list[dict]:
        return [{"diagnostic": k, "first_step": s, "explanation": DIAGNOSTICS[k].explanation}
                for k, s in self.fired.items()]
