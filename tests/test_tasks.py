"""Built-in synthetic tasks: registry, determinism, schemas, gold reward, simulated labels, files."""

from __future__ import annotations

import json
import math
import statistics
import sys

import pytest

from rlhfkit.tasks import KINDS, TASKS, Task, get_task, sigmoid, task_names
from rlhfkit.tasks.base import DEFAULT_SIZES, EVAL_SEED_OFFSET

NAMES = ["sentiment", "arithmetic"]
NON_PT_KINDS = [k for k in KINDS if k != "pt"]


def _prompts_of(rows: list[dict]) -> set[str]:
    """The task prompts of rows (a judge row's is its `request`)."""
    return {r.get("request", r["prompt"]) for r in rows}


# ---- registry ----------------------------------------------------------------------------------
def test_registry_lists_both_tasks():
    assert task_names() == sorted(NAMES)
    assert set(TASKS) == set(NAMES)
    for name in NAMES:
        task = get_task(name)
        assert isinstance(task, Task)
        assert task.name == name and task.description and task.label_temperature > 0


def test_unknown_task_lists_names_and_suggests():
    with pytest.raises(ValueError) as err:
        get_task("sentimnet")
    msg = str(err.value)
    assert "sentimnet" in msg and "arithmetic" in msg and "Did you mean 'sentiment'" in msg
    with pytest.raises(ValueError, match="available tasks"):
        get_task("zzzz")


def test_tasks_package_is_pure_python():
    # Importing the tasks must not pull in torch or the models (checked in a fresh interpreter).
    import subprocess

    code = "import sys, rlhfkit.tasks; print('torch' in sys.modules, 'rlhfkit.models' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


# ---- determinism and schemas ------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", KINDS)
def test_make_is_deterministic_and_seed_dependent(name, kind):
    task = get_task(name)
    a = task.make(kind, 20, seed=3)
    assert a == task.make(kind, 20, seed=3)
    assert a == get_task(name).make(kind, 20, seed=3)  # no hidden state between instances
    assert a != task.make(kind, 20, seed=4)
    assert len(a) == 20 and task.make(kind, 0, seed=3) == []


EXPECTED_COLUMNS = {
    "pt": {"text"},
    "sft": {"prompt", "completion"},
    "preference": {"prompt", "chosen", "rejected", "gold_chosen", "gold_rejected"},
    "ranking": {"prompt", "responses", "gold_scores"},
    "unpaired": {"prompt", "completion", "label", "gold"},
    "judge": {"prompt", "completion", "request", "response", "gold"},
}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", KINDS)
def test_row_schema(name, kind):
    task = get_task(name)
    for row in task.make(kind, 30, seed=0):
        expected = EXPECTED_COLUMNS.get(kind, {"prompt", "answer"} if name == "arithmetic" else {"prompt"})
        assert set(row) == expected
        if "prompt" in row:
            assert isinstance(row["prompt"], str) and row["prompt"] and not row["prompt"].endswith(" ")
        if kind == "pt":
            assert isinstance(row["text"], str) and row["text"]
        elif kind == "sft":
            assert row["completion"].startswith(" ")
        elif kind == "preference":
            assert row["chosen"] != row["rejected"]
            assert row["gold_chosen"] == task.score(row["prompt"], row["chosen"])
            assert row["gold_rejected"] == task.score(row["prompt"], row["rejected"])
        elif kind == "ranking":
            assert len(row["responses"]) == task.ranking_k == 4
            assert len(set(row["responses"])) == 4
            assert row["gold_scores"] == task.gold_reward([row["prompt"]] * 4, row["responses"])
        elif kind == "unpaired":
            assert isinstance(row["label"], bool)
            assert row["gold"] == task.score(row["prompt"], row["completion"])
        elif kind == "judge":
            assert row["prompt"] == task.judge_template.replace("{prompt}", row["request"]).replace(
                "{response}", row["response"])
            assert row["gold"] == task.score(row["request"], row["response"])
            assert row["completion"] == f" Score: {task.judge_score(row['gold'])}"
        elif kind == "prompt" and name == "arithmetic":
            assert task.score(row["prompt"], " " + row["answer"]) == 1.0


def test_judge_scores_map_the_gold_range_onto_0_to_5():
    sentiment, arithmetic = get_task("sentiment"), get_task("arithmetic")
    assert [sentiment.judge_score(g) for g in (-2.5, -1.0, -0.46, 0.0, 0.46, 0.76, 0.91, 1.0)] == [0, 0, 1, 3, 4, 4, 5, 5]
    assert [arithmetic.judge_score(g) for g in (0.0, 0.1, 1.0)] == [0, 1, 5]  # malformed, wrong, right
    scores = {row["completion"] for row in sentiment.make("judge", 300, seed=0)}
    assert len(scores) >= 5  # the candidates (demos and rough ones) cover the scale


def test_prompt_kind_covers_each_prompt_before_repeating():
    task = get_task("sentiment")
    n_train = len(task.prompts("train"))
    rows = task.make("prompt", n_train, seed=0)
    assert len(_prompts_of(rows)) == n_train


@pytest.mark.parametrize("name", NAMES)
def test_texts_are_short(name):
    # Prompt + response stays far below the 64-token context of the tiny model.
    task = get_task(name)
    for row in task.make("pt", 300, seed=0):
        assert len(row["text"].split()) <= 40


# ---- gold reward -------------------------------------------------------------------------------
def test_sentiment_gold_on_hand_written_examples():
    task = get_task("sentiment")
    p = "the movie was"
    positive = task.score(p, " great , a real gem , i loved it .")  # P = 3
    neutral = task.score(p, " okay , i think .")
    negative = task.score(p, " awful , i hated it .")  # N = 2
    assert positive == pytest.approx(math.tanh(1.5))
    assert neutral == 0.0
    assert negative == pytest.approx(math.tanh(-1.0))
    assert positive > neutral > negative

    clean = task.score(p, " great .")
    assert clean == pytest.approx(math.tanh(0.5))
    assert task.score(p, " great .", ended=False) == pytest.approx(clean - 1.0)  # no EOS
    assert task.score(p, " great") == pytest.approx(clean - 0.5)  # no final "."
    assert task.score(p, " great great great .") == pytest.approx(math.tanh(1.5) - 1.0)  # repetition
    assert task.score(p, " great great , great great .") == pytest.approx(math.tanh(2.0))  # not in a row
    assert task.score(p, " greatt .") == pytest.approx(-1.0)  # out of vocabulary
    assert task.score(p, "") == pytest.approx(-1.5)  # empty: no "." and degenerate
    long_text = " great" + " , i think" * 7 + " ."  # 23 words
    assert task.score(p, long_text) == pytest.approx(math.tanh(0.5) - 1.0)
    # every degenerate variant scores below every clean demonstration of the same sentiment
    assert task.score(p, " great great great .") < neutral


def test_arithmetic_gold_on_hand_written_examples():
    task = get_task("arithmetic")
    assert task.gold_reward(["7+5="] * 3, [" 12", " 13", " 12"], [True, True, False]) == [1.0, 0.1, 0.0]
    assert task.score("12-3=", " 9") == 1.0
    assert task.score("3*4=", "12") == 1.0  # leading space optional
    assert task.score("3*4=", " 012") == 0.1  # well formed but not exactly the answer
    assert task.score("7+5=", " twelve") == 0.0
    assert task.score("7+5=", " 12 12") == 0.0
    assert task.score("7+5=", "") == 0.0
    with pytest.raises(ValueError):
        task.gold_reward(["7+5="], [" 12", " 13"])


def test_gold_reward_checks_lengths():
    task = get_task("sentiment")
    with pytest.raises(ValueError):
        task.gold_reward(["a"], [" great ."], ended=[True, False])


# ---- simulated labels --------------------------------------------------------------------------
def test_bayes_accuracy_on_hand_computed_rows():
    """T = 0.3. Row 1: gold 0.6 vs 0.0 -> p = sigmoid(2) = 0.880797. Row 2: 0.0 vs 0.3 ->
    p = sigmoid(-1) = 0.268941, max(p, 1-p) = 0.731059. Mean = 0.805928."""
    task = get_task("sentiment")
    task.label_temperature = 0.3
    rows = [
        {"prompt": "x", "chosen": "a", "rejected": "b", "gold_chosen": 0.6, "gold_rejected": 0.0},
        {"prompt": "x", "chosen": "a", "rejected": "b", "gold_chosen": 0.0, "gold_rejected": 0.3},
    ]
    assert task.bayes_accuracy(rows) == pytest.approx(0.805928, abs=1e-6)
    assert sigmoid(2.0) == pytest.approx(0.880797, abs=1e-6)
    # gold computed from the texts when the columns are absent: tanh(0.5) vs 0 at T = 0.3
    no_gold = [{"prompt": "the movie was", "chosen": " great .", "rejected": " okay ."}]
    assert task.bayes_accuracy(no_gold) == pytest.approx(sigmoid(math.tanh(0.5) / 0.3))


@pytest.mark.parametrize("name,low,high", [("sentiment", 0.8, 0.9), ("arithmetic", 0.85, 0.97)])
def test_bayes_ceiling_of_eval_preferences(name, low, high):
    task = get_task(name)
    rows = task.make("preference", DEFAULT_SIZES["preference_eval"], EVAL_SEED_OFFSET, split="eval")
    ceiling = task.bayes_accuracy(rows)
    print(f"{name}: T = {task.label_temperature}, Bayes ceiling of eval preferences = {ceiling:.3f}")
    assert low < ceiling < high


@pytest.mark.parametrize("name", NAMES)
def test_labels_are_noisy_but_informative(name):
    task = get_task(name)
    rows = task.make("preference", 1000, seed=0)
    decided = [r for r in rows if r["gold_chosen"] != r["gold_rejected"]]
    agree = statistics.mean(r["gold_chosen"] > r["gold_rejected"] for r in decided)
    assert 0.7 < agree < 0.99, agree
    # ranking: the first response beats the last more often than not, but not always
    ranks = task.make("ranking", 300, seed=0)
    first_best = statistics.mean(r["gold_scores"][0] >= r["gold_scores"][-1] for r in ranks)
    assert 0.75 < first_best < 1.0
    # unpaired: desirable completions have higher gold on average
    unpaired = task.make("unpaired", 1000, seed=0)
    good = [r["gold"] for r in unpaired if r["label"]]
    bad = [r["gold"] for r in unpaired if not r["label"]]
    assert statistics.mean(good) > statistics.mean(bad)
    assert 0.2 < len(good) / len(unpaired) < 0.8


# ---- room to improve ---------------------------------------------------------------------------
def test_sentiment_demos_are_balanced_with_room_to_improve():
    task = get_task("sentiment")
    rows = task.make("sft", 2000, seed=0)
    gold = task.gold_reward([r["prompt"] for r in rows], [r["completion"] for r in rows])
    print(f"sentiment: SFT demo mean gold = {statistics.mean(gold):.3f} (max in demos {max(gold):.3f})")
    assert abs(statistics.mean(gold)) < 0.1
    assert max(gold) > 0.9 and min(gold) < -0.9
    for r in rows:
        n_words = len(r["completion"].split())
        assert 4 <= n_words <= 15 and r["completion"].endswith(" .")
    # the pretraining corpus is mixed too
    pt = task.make("pt", 1000, seed=0)
    pt_gold = [task.score("", " " + r["text"].split(" ", 1)[1]) for r in pt]  # sentiment ignores the prompt
    assert min(pt_gold) < -1.0 and max(pt_gold) > 0.5


def test_arithmetic_demos_leave_room_to_improve():
    task = get_task("arithmetic")
    rows = task.make("sft", 2000, seed=0)
    gold = task.gold_reward([r["prompt"] for r in rows], [r["completion"] for r in rows])
    print(f"arithmetic: SFT demo mean gold = {statistics.mean(gold):.3f}")
    assert 0.6 < statistics.mean(gold) < 0.85
    assert all(r["completion"].startswith(" ") for r in rows)


def test_arithmetic_world_knowledge_beats_the_demonstrators():
    """pt answers are right with prob. 0.9 x (1 - 0.1 rough) = 0.81 vs the demos' 0.7, on every prompt of
    both splits: what RL can recover on held-out prompts (tests/test_grpo_learning.py)."""
    task = get_task("arithmetic")
    rows = task.make("pt", 4000, seed=0)
    prompts = [r["text"].split("=", 1)[0] + "=" for r in rows]
    right = [task.correct(p, r["text"][len(p):]) for p, r in zip(prompts, rows)]
    demos = task.make("sft", 4000, seed=0)
    demo_right = [task.correct(r["prompt"], r["completion"]) for r in demos]
    print(f"arithmetic: pt right {statistics.mean(right):.3f}, demos right {statistics.mean(demo_right):.3f}")
    assert 0.78 < statistics.mean(right) < 0.84 and 0.67 < statistics.mean(demo_right) < 0.73
    assert set(task.prompts("eval")) <= set(prompts)  # held-out prompts are in the world knowledge


# ---- held-out prompts and files ----------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_eval_prompts_are_held_out(name):
    task = get_task(name)
    train, held_out = set(task.prompts("train")), set(task.prompts("eval"))
    assert train and held_out and not train & held_out
    assert 0.1 < len(held_out) / len(task.prompts()) < 0.3
    for kind in NON_PT_KINDS:
        assert _prompts_of(task.make(kind, 200, seed=0)) <= train
        assert _prompts_of(task.make(kind, 200, seed=0, split="eval")) <= held_out


def test_write_produces_every_file(tmp_path):
    task = get_task("arithmetic")
    sizes = {k: 12 for k in DEFAULT_SIZES}
    paths = task.write(tmp_path, seed=5, sizes=sizes)
    assert set(paths) == {f"{k}_{s}" for k in KINDS for s in ("train", "eval")} | {"task"}
    for key, path in paths.items():
        assert path.exists() and path.parent == tmp_path
        if key != "task":
            rows = [json.loads(line) for line in path.read_text().splitlines()]
            assert len(rows) == 12
    train = [json.loads(x) for x in paths["sft_train"].read_text().splitlines()]
    assert train == task.make("sft", 12, 5)
    held = [json.loads(x) for x in paths["preference_eval"].read_text().splitlines()]
    meta = json.loads(paths["task"].read_text())
    assert meta["name"] == "arithmetic" and meta["label_temperature"] == task.label_temperature
    assert meta["description"] == task.description and meta["sizes"]["sft"] == 12
    assert meta["bayes_accuracy_eval"] == pytest.approx(task.bayes_accuracy(held))
    assert not _prompts_of(train) & _prompts_of(held)
    with pytest.raises(ValueError, match="unknown size key"):
        task.write(tmp_path, sizes={"sft_test": 3})


def test_write_default_sizes_is_fast(tmp_path):
    paths = get_task("sentiment").write(tmp_path)
    n_lines = {k: len(p.read_text().splitlines()) for k, p in paths.items() if k != "task"}
    assert n_lines["pt_train"] == 4000 and n_lines["prompt_eval"] == 256
    meta = json.loads(paths["task"].read_text())
    assert 0.8 < meta["bayes_accuracy_eval"] < 0.9 and abs(meta["sft_mean_gold"]) < 0.1
