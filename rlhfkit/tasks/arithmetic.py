"""`arithmetic`: answer "7+5=" with " 12"; the gold reward checks the answer.

Prompts: "a+b=" with a, b in 0..15; "a-b=" with 0 <= b <= a <= 15 (no negative
results); "a*b=" with a, b in 0..9 -> 492 distinct prompts. Responses: a space and
an integer, " 12". Demonstrations are correct with probability 0.7, otherwise a
plausible wrong answer (off by 1-3 or 10, a neighbouring product, or a random number
in range), so a policy that imitates them is right about 70% of the time and RL has
room to push towards 100%. Pretraining text ("world knowledge", kind `pt`, every prompt
of both splits) is more reliable than the demonstrators: its answers are right with
probability 0.9 (10% of its documents are rough), so a pretrained model can know a
held-out prompt's answer that SFT on the sloppy demonstrations blurs and RL recovers.
"""

from __future__ import annotations

import random
import re

from rlhfkit.tasks.base import Task

ADD_MAX = 15
MUL_MAX = 9
CORRECT_FRACTION = 0.7
PT_CORRECT_FRACTION = 0.9  # world knowledge beats the demonstrators
WRONG_SCORE = 0.1
_PROMPT_RE = re.compile(r"^\s*(\d+)\s*([+\-*])\s*(\d+)\s*=\s*$")
_INT_RE = re.compile(r"^-?\d+$")  # a well-formed integer


def _all_prompts() -> list[str]:
    out = [f"{a}+{b}=" for a in range(ADD_MAX + 1) for b in range(ADD_MAX + 1)]
    out += [f"{a}-{b}=" for a in range(ADD_MAX + 1) for b in range(a + 1)]
    out += [f"{a}*{b}=" for a in range(MUL_MAX + 1) for b in range(MUL_MAX + 1)]
    return out


PROMPTS = _all_prompts()


def parse_prompt(prompt: str) -> tuple[int, str, int]:
    """'7+5=' -> (7, '+', 5). Raises ValueError on anything else."""
    m = _PROMPT_RE.fullmatch(prompt)
    if not m:
        raise ValueError(f"not an arithmetic prompt: {prompt!r}")
    return int(m.group(1)), m.group(2), int(m.group(3))


def answer(prompt: str) -> int:
    """The correct result of an arithmetic prompt."""
    a, op, b = parse_prompt(prompt)
    return a + b if op == "+" else a - b if op == "-" else a * b


class ArithmeticTask(Task):
    """Small-integer arithmetic. Gold reward of a response r to prompt "a op b=":

        gold = 1.0  if r.strip() == str(correct result) and ended     (exact: "012" is wrong)
               0.1  if r.strip() is some other integer and ended      (well formed, wrong)
               0.0  otherwise: no EOS, empty, or not a single integer

    A leading space is expected but not required ("12" and " 12" both count).
    """

    name = "arithmetic"
    description = (
        "Answer small-integer arithmetic ('7+5=' -> ' 12'); gold reward = 1.0 for the correct "
        "integer followed by EOS, 0.1 for a wrong integer followed by EOS, 0.0 otherwise."
    )
    label_temperature = 0.25
    unpaired_baseline = 0.5
    judge_gold_range = (0.0, 1.0)  # judge rows: right 5, a wrong integer 1, malformed 0

    def all_prompts(self) -> list[str]:
        return PROMPTS

    def prompt_row(self, prompt: str) -> dict:
        """{"prompt": "7+5=", "answer": "12"}: `answer` is the string r.strip() must equal."""
        return {"prompt": prompt, "answer": str(answer(prompt))}

    def wrong_answer(self, rng: random.Random, prompt: str) -> int:
        """A plausible wrong, non-negative answer."""
        a, op, b = parse_prompt(prompt)
        right = answer(prompt)
        for _ in range(100):
            r = rng.random()
            if r < 0.6:
                x = right + rng.choice([-3, -2, -1, 1, 2, 3])
            elif r < 0.75:
                x = right + rng.choice([-10, 10])
            elif r < 0.85 and op == "*":
                x = right + rng.choice([-a, a, -b, b])  # a neighbouring product
            elif r < 0.85:
                x = a - b if op == "+" else a + b  # the other operation
            else:
                x = rng.randint(0, 2 * ADD_MAX if op != "*" else MUL_MAX * MUL_MAX)
            if x >= 0 and x != right:
                return x
        return right + 1

    def demo(self, rng: random.Random, prompt: str) -> str:
        if rng.random() < CORRECT_FRACTION:
            return f" {answer(prompt)}"
        return f" {self.wrong_answer(rng, prompt)}"

    def pt_response(self, rng: random.Random, prompt: str) -> str:
        """World knowledge: rough with prob. `rough_fraction`, else right with prob. 0.9 (the
        demonstrators: 0.7), else a plausible wrong answer."""
        if rng.random() < self.rough_fraction:
            return self.rough(rng, prompt)
        if rng.random() < PT_CORRECT_FRACTION:
            return f" {answer(prompt)}"
        return f" {self.wrong_answer(rng, prompt)}"

    def rough(self, rng: random.Random, prompt: str) -> str:
        """Malformed: the answer repeated or with a trailing '=', the prompt echoed, or empty."""
        right = answer(prompt)
        x = right if rng.random() < 0.5 else self.wrong_answer(rng, prompt)
        return rng.choice([f" {x} {x}", f" {x}=", f" {prompt}", f" {x}+", ""])

    def correct(self, prompt: str, response: str, ended: bool = True) -> bool:
        """Exact match: the right integer, followed by EOS (gold 1.0)."""
        return self.score(prompt, response, ended) == 1.0

    def score(self, prompt: str, response: str, ended: bool = True) -> float:
        text = response.strip()
        if not ended or not _INT_RE.fullmatch(text):
            return 0.0
        return 1.0 if text == str(answer(prompt)) else WRONG_SCORE
