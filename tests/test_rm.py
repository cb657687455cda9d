"""Reward modelling: reward index, losses, normalisation, the concatenated forward, LoRA, the
`rm` stage end to end (every trainable parameter changes, save/load gives identical rewards),
the `eval-rm` / `score` commands, and the learning test against the Bayes ceiling."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import build_once, launched_run, load_weights, read_metrics, read_summary, register_launched, write_jsonl

from rlhfkit.config import build_config
from rlhfkit.data.collate import pad_batch
from rlhfkit.data.groups import collate_groups, encode_group, truncation_counts, ungroup
from rlhfkit.errors import ConfigError
from rlhfkit.eval.reward import evaluate_rewards, expected_calibration_error
from rlhfkit.losses.preference import bradley_terry, centering_penalty, length_decorrelation_penalty, plackett_luce
from rlhfkit.models.reward import (
    Normalization,
    apply_reward_lora,
    build_reward_model,
    init_reward_head,
    last_token_index,
    load_normalization,
    load_reward_model,
    reward_backbone,
    reward_head,
    save_normalization,
    sequence_rewards,
    token_rewards,
)
from rlhfkit.tasks import get_task
from rlhfkit.train.rm import pairwise_stats, rm_loss, train_rm

LOG2 = math.log(2.0)


# ---- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rm(tiny_model_dir, tiny_tokenizer):
    torch.manual_seed(0)
    return build_reward_model(str(tiny_model_dir), tiny_tokenizer).eval()


def make_rows() -> dict[str, list[dict]]:
    task = get_task("sentiment")
    return {"train": task.make("preference", 64, seed=0), "eval": task.make("preference", 32, seed=1, split="eval"),
            "ranking": task.make("ranking", 32, seed=0)}


@pytest.fixture(scope="module")
def rows():
    return make_rows()


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def rm_data(tmp_path_factory) -> dict[str, str]:
    """The data files (and task.json, which lets eval-rm find the task), written once per session
    (shared by the xdist workers)."""

    def write(d: Path) -> None:
        (d / "task.json").write_text(json.dumps({"name": "sentiment"}))
        for k, v in make_rows().items():
            write_jsonl(d / f"{k}.jsonl", v)

    d = build_once(tmp_path_factory, "rmdata", write)
    return {k: str(d / f"{k}.jsonl") for k in ("train", "eval", "ranking")}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return rm_data(tmp_path_factory)


def _ids(tok, text: str) -> list[int]:
    return tok(text)["input_ids"] + [tok.eos_token_id]


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


# ---- reward index and padding ------------------------------------------------------------------

def test_last_token_index_left_right_and_no_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0],    # right padding: 2
                         [1, 1, 1, 1, 1],    # none: L - 1 = 4
                         [0, 0, 1, 1, 1],    # left padding: 4
                         [1, 0, 0, 0, 0],    # one token, right: 0
                         [0, 0, 0, 0, 1]], dtype=torch.bool)  # one token, left: 4
    assert last_token_index(mask).tolist() == [2, 4, 4, 0, 4]


def test_reward_is_the_same_under_left_right_and_no_padding(rm, tiny_tokenizer):
    tok = tiny_tokenizer
    seqs = [_ids(tok, "The movie was great today."), _ids(tok, "A dog"), _ids(tok, "What is 3 + 4? It is 7.")]
    alone = torch.cat([sequence_rewards(rm, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.bool))
                       for s in seqs])
    for side in ("right", "left"):
        b = pad_batch(seqs, tok.pad_token_id, side)
        torch.testing.assert_close(sequence_rewards(rm, b["input_ids"], b["attention_mask"]), alone,
                                   atol=1e-5, rtol=1e-5)
    # extra pads after the EOS change nothing
    b = pad_batch(seqs, tok.pad_token_id, "right")
    ids = torch.cat([b["input_ids"], torch.full((3, 4), tok.pad_token_id)], 1)
    mask = torch.cat([b["attention_mask"], torch.zeros(3, 4, dtype=torch.bool)], 1)
    torch.testing.assert_close(sequence_rewards(rm, ids, mask), alone, atol=1e-5, rtol=1e-5)
    # with no padding the reward is the head at position L - 1
    s = torch.tensor([seqs[0]])
    full = torch.ones_like(s, dtype=torch.bool)
    assert sequence_rewards(rm, s, full).item() == token_rewards(rm, s, full)[0, -1].item()


def test_plain_transformers_forward_reads_the_same_reward(rm, tiny_tokenizer):
    """The saved model is a normal AutoModelForSequenceClassification: its own pooling (last
    non-pad token via config.pad_token_id) gives our raw reward on right-padded batches."""
    tok = tiny_tokenizer
    b = pad_batch([_ids(tok, "The plot was sad."), _ids(tok, "Hello")], tok.pad_token_id, "right")
    hf = rm(input_ids=b["input_ids"], attention_mask=b["attention_mask"].long()).logits[:, 0]
    torch.testing.assert_close(hf, sequence_rewards(rm, b["input_ids"], b["attention_mask"]))


def test_token_rewards_are_the_head_on_the_backbone(rm, tiny_tokenizer):
    tok = tiny_tokenizer
    b = pad_batch([_ids(tok, "The cat was lovely.")], tok.pad_token_id)
    hidden = reward_backbone(rm)(input_ids=b["input_ids"], attention_mask=b["attention_mask"].long()).last_hidden_state
    torch.testing.assert_close(token_rewards(rm, b["input_ids"], b["attention_mask"]),
                               reward_head(rm)(hidden).squeeze(-1))


# ---- losses (hand-computed) --------------------------------------------------------------------

def test_bradley_terry_values():
    """Equal rewards: log 2. r_c - r_r = 1: log(1 + e^-1) = 0.313262. A margin of 1 on that pair
    brings it back to log 2; r_c - r_r = -2: log(1 + e^2) = 2.126928."""
    rc, rr = torch.tensor([0.3, 1.0, 1.0, -1.0]), torch.tensor([0.3, 0.0, 0.0, 1.0])
    out = bradley_terry(rc, rr, margin=torch.tensor([0.0, 0.0, 1.0, 0.0]))
    torch.testing.assert_close(out, torch.tensor([LOG2, 0.313262, LOG2, 2.126928]), atol=1e-6, rtol=0)
    torch.testing.assert_close(bradley_terry(rc[:2], rr[:2]), out[:2])


def test_plackett_luce_values_and_k2_equals_bradley_terry():
    """r = (2, 1, 0) best first: -(2 - log(e^2 + e + 1)) - (1 - log(e + 1)) = 0.407606 + 0.313262
    = 0.720868. All equal over K = 3: log 3 + log 2 = 1.791759. A row with only 2 of 3 responses
    (mask) is Bradley-Terry on those two."""
    r = torch.tensor([[2.0, 1.0, 0.0], [0.5, 0.5, 0.5], [1.0, 0.0, 123.0]])
    mask = torch.tensor([[True, True, True], [True, True, True], [True, True, False]])
    torch.testing.assert_close(plackett_luce(r, mask), torch.tensor([0.720868, 1.791759, 0.313262]),
                               atol=1e-6, rtol=0)
    pairs = torch.randn(16, 2)
    torch.testing.assert_close(plackett_luce(pairs), bradley_terry(pairs[:, 0], pairs[:, 1]))


def test_centering_penalty_values():
    """coef * (r_c + r_r)^2: 0.01 * (1 + 2)^2 = 0.09; 0.01 * (1 - 1)^2 = 0."""
    out = centering_penalty(torch.tensor([[1.0, 2.0], [1.0, -1.0]]), 0.01)
    torch.testing.assert_close(out, torch.tensor([0.09, 0.0]))


def test_length_decorrelation_penalty_values():
    """coef * rho^2: rewards [1, 2, 3] against lengths [1, 2, 3] or [3, 2, 1]: rho = +-1 -> coef; rewards
    [1, -1, 1, -1] against lengths [1, 1, 2, 2]: centred lengths [-.5, -.5, .5, .5], sum r*l = 0 -> 0;
    constant lengths -> 0. The gradient moves the rewards away from the length trend."""
    r = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    torch.testing.assert_close(length_decorrelation_penalty(r, torch.tensor([1, 2, 3]), 0.5), torch.tensor(0.5))
    torch.testing.assert_close(length_decorrelation_penalty(r, torch.tensor([3, 2, 1]), 0.5), torch.tensor(0.5))
    assert length_decorrelation_penalty(torch.tensor([1.0, -1.0, 1.0, -1.0]), torch.tensor([1, 1, 2, 2]), 1.0) == 0
    assert length_decorrelation_penalty(r, torch.tensor([4, 4, 4]), 1.0) == 0
    r2 = torch.tensor([1.0, 3.0, 2.0], requires_grad=True)  # rho = 0.5 with lengths [1, 2, 3]
    penalty = length_decorrelation_penalty(r2, torch.tensor([1, 2, 3]), 1.0)
    torch.testing.assert_close(penalty, torch.tensor(0.25))
    penalty.backward()
    assert r2.grad[0] < 0 < r2.grad[2]  # descent raises the shortest response's reward, lowers the longest's


def test_rm_loss_adds_the_length_penalty_once_per_row(tiny_model_dir, tiny_tokenizer, rows):
    """rm_loss with length_coef = the loss without it + rows x coef x rho^2 of the batch's rewards and
    response lengths."""
    tok = tiny_tokenizer
    torch.manual_seed(0)
    model = build_reward_model(str(tiny_model_dir), tok)
    batch = collate_groups([encode_group(tok, row, 64) for row in rows["train"][:6]], tok.pad_token_id)
    with torch.no_grad():
        plain, _ = rm_loss(model, batch, dataset_format="preference", center_coef=None)
        with_len, _ = rm_loss(model, batch, dataset_format="preference", center_coef=None, length_coef=2.0)
        flat = sequence_rewards(model, batch["input_ids"], batch["attention_mask"])
    rho2 = length_decorrelation_penalty(flat, batch["response_mask"].sum(-1), 1.0)
    assert rho2 > 0
    torch.testing.assert_close(with_len, plain + 6 * 2.0 * rho2, atol=1e-5, rtol=1e-5)


def test_pairwise_stats_values():
    """(1, 0, 2) best first: pairs (0,1) d=1 right, (0,2) d=-1 wrong, (1,2) d=-2 wrong ->
    accuracy 1/3, margin -2/3. A pair row (3, 1) with a padded third column: 1 and 2."""
    r = torch.tensor([[1.0, 0.0, 2.0], [3.0, 1.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    acc, margin = pairwise_stats(r, mask)
    torch.testing.assert_close(acc, torch.tensor([1 / 3, 1.0]))
    torch.testing.assert_close(margin, torch.tensor([-2 / 3, 2.0]))


def test_expected_calibration_error_value():
    """5 bins on [0.5, 1]: (0.55, right) -> |1 - .55| = .45; (0.65, wrong) -> .65; two at 0.95, one
    right -> |.5 - .95| = .45 with weight 2/4. ECE = (.45 + .65 + .9) / 4 = 0.5."""
    ece, table = expected_calibration_error(torch.tensor([0.55, 0.65, 0.95, 0.95]),
                                            torch.tensor([True, False, True, False]), bins=5)
    assert ece == pytest.approx(0.5)
    assert [row["count"] for row in table] == [1, 1, 0, 0, 2]


# ---- the model ---------------------------------------------------------------------------------

def test_init_reward_head_std_and_bias():
    head = torch.nn.Linear(4095, 1, bias=True)
    torch.manual_seed(0)
    init_reward_head(head)
    assert head.weight.std().item() == pytest.approx(1 / math.sqrt(4096), rel=0.05)
    assert head.bias.item() == 0.0


def test_build_from_causal_lm_copies_backbone(rm, tiny_model, tiny_tokenizer, tmp_path):
    assert type(rm).__name__ == "LlamaForSequenceClassification" and rm.config.num_labels == 1
    assert rm.config.pad_token_id == tiny_tokenizer.pad_token_id
    lm_state = tiny_model.model.state_dict()
    for name, value in reward_backbone(rm).state_dict().items():
        torch.testing.assert_close(value, lm_state[name], rtol=0, atol=0)
    w = reward_head(rm).weight
    assert reward_head(rm).bias is None and w.shape == (1, tiny_model.config.hidden_size)
    assert w.std().item() == pytest.approx(1 / math.sqrt(w.shape[1] + 1), rel=0.2)
    assert all(m.p == 0.0 for m in rm.modules() if isinstance(m, torch.nn.Dropout))
    # a saved sequence-classification checkpoint keeps its head
    rm.save_pretrained(tmp_path, safe_serialization=True)
    again = build_reward_model(str(tmp_path), tiny_tokenizer)
    torch.testing.assert_close(reward_head(again).weight, w, rtol=0, atol=0)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["LlamaForSequenceClassification"]


def test_lora_keeps_the_head_trainable(tiny_model_dir, tiny_tokenizer):
    model = apply_reward_lora(build_reward_model(str(tiny_model_dir), tiny_tokenizer),
                              base_model_name_or_path=str(tiny_model_dir), rank=4, alpha=8, dropout=0.0,
                              target="all-linear")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert reward_head(model).weight.requires_grad
    assert any("score" in n for n in trainable)
    assert all("lora_" in n or "score" in n for n in trainable), trainable
    b = pad_batch([_ids(tiny_tokenizer, "The book was fine.")], tiny_tokenizer.pad_token_id)
    sequence_rewards(model, b["input_ids"], b["attention_mask"]).sum().backward()
    assert reward_head(model).weight.grad.abs().sum() > 0


def test_normalization_apply_save_load(tmp_path):
    norm = Normalization(mean=2.0, std=4.0, divide_by_std=True, reference="x")
    torch.testing.assert_close(norm.apply(torch.tensor([2.0, 6.0])), torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(Normalization(mean=2.0, std=4.0).apply(torch.tensor([6.0])), torch.tensor([4.0]))
    assert load_normalization(tmp_path) == Normalization()  # none stored: identity
    save_normalization(tmp_path, norm)
    assert load_normalization(tmp_path) == norm
    stats = Normalization.from_rewards(torch.tensor([1.0, 3.0]))
    assert (stats.mean, stats.std, stats.count) == (2.0, 1.0, 2)


# ---- data: one concatenated forward ------------------------------------------------------------

def test_concatenated_forward_equals_separate_forwards(rm, tiny_tokenizer, rows):
    tok = tiny_tokenizer
    groups = [encode_group(tok, row, 64) for row in rows["train"][:6]]
    batch = collate_groups(groups, tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 12 and batch["group_mask"].shape == (6, 2)
    together = ungroup(sequence_rewards(rm, batch["input_ids"], batch["attention_mask"]), batch["group_mask"])
    for k in (0, 1):  # chosen alone, rejected alone (each padded to its own length)
        b = pad_batch([g.responses[k].input_ids for g in groups], tok.pad_token_id)
        torch.testing.assert_close(together[:, k], sequence_rewards(rm, b["input_ids"], b["attention_mask"]),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("finetuning", ["full", "lora"])
def test_packed_pass_equals_padded_values_and_gradients(tiny_model_dir, tiny_tokenizer, rows, finetuning):
    """`padding_free` rm_loss: the rewards, the loss and every gradient equal the padded pass's, and
    each pair's prompt is computed once (packed slots = prompt once + both replies)."""
    from rlhfkit.models.logprobs import pack_plan

    tok = tiny_tokenizer
    torch.manual_seed(0)
    model = build_reward_model(str(tiny_model_dir), tok)
    if finetuning == "lora":
        model = apply_reward_lora(model, base_model_name_or_path=str(tiny_model_dir), rank=4, alpha=8, dropout=0.0,
                                  target="all-linear")
        with torch.no_grad():  # B = 0 at init would leave every A without gradient
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.05)
    groups = [encode_group(tok, row, 64) for row in rows["train"][:6]]
    batch = collate_groups(groups, tok.pad_token_id)
    assert batch["prefix_groups"] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    out = {}
    for packed in (False, True):
        model.zero_grad(set_to_none=True)
        loss, metrics = rm_loss(model, batch, dataset_format="preference", center_coef=0.01, padding_free=packed)
        loss.backward()
        flat = sequence_rewards(model, batch["input_ids"], batch["attention_mask"], padding_free=packed,
                                groups=batch["prefix_groups"]).detach()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        out[packed] = (loss.detach(), flat, grads)
    torch.testing.assert_close(out[True][0], out[False][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[True][1], out[False][1], atol=1e-5, rtol=1e-5)
    assert out[True][2].keys() == out[False][2].keys() and len(out[True][2]) > 2
    for name, g in out[False][2].items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(out[True][2][name], g, atol=1e-5, rtol=1e-4, msg=name)
    # the prompt once: slots = sum over pairs of (chosen + rejected - their common prefix)
    plan = pack_plan(batch["attention_mask"], "auto", input_ids=batch["input_ids"], groups=batch["prefix_groups"])
    slots = len(set(zip(plan.dst_row.tolist(), plan.dst_col.tolist())))
    expected = 0
    for g in groups:
        c, r = g.responses[0].input_ids, g.responses[1].input_ids
        common = next(i for i in range(min(len(c), len(r)) + 1) if i == min(len(c), len(r)) or c[i] != r[i])
        expected += len(c) + len(r) - common
    assert slots == expected < int(batch["attention_mask"].sum())


def test_evaluate_rewards_packed_with_shared_prompts_equals_padded(rm, tiny_tokenizer, rows):
    """Every metric of the held-out evaluation (the missing-EOS pass included) is the padded pass's
    when both passes pack and share each row's prompt; both passes get the group ids."""
    tok = tiny_tokenizer
    groups = [g for i, row in enumerate(rows["eval"][:12]) if (g := encode_group(tok, row, 64, index=i))]
    got_groups = []

    def score_fn(packed):
        def score(ids, mask, groups=None):
            got_groups.append(groups is not None)
            return sequence_rewards(rm, ids, mask, padding_free=packed, groups=groups)
        return score

    kw = dict(pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, dataset_format="preference", batch_size=5)
    padded = evaluate_rewards(score_fn(False), groups, **kw)
    assert not any(got_groups)
    got_groups.clear()
    packed = evaluate_rewards(score_fn(True), groups, share_prompts=True, **kw)
    main_batches = math.ceil(sum(len(g.responses) for g in groups) / 5)
    assert all(got_groups) and len(got_groups) > main_batches  # the missing-EOS pass shares prompts too
    assert packed.keys() == padded.keys() and "eos_sensitivity" in packed
    for key, value in padded.items():
        assert packed[key] == pytest.approx(value, abs=1e-5), key


def test_lora_on_the_last_layers_only(tiny_model_dir, tiny_tokenizer, rows):
    """`lora_layers` N: adapters on the last N layers only, and nothing below them needs a gradient
    (backward stops at the lowest adapted layer); a bad N is a clear error."""
    torch.manual_seed(0)
    model = build_reward_model(str(tiny_model_dir), tiny_tokenizer)
    n = model.config.num_hidden_layers
    model = apply_reward_lora(model, base_model_name_or_path=str(tiny_model_dir), rank=4, alpha=8, dropout=0.0,
                              target="all-linear", last_layers=1)
    adapted = {int(name.split(".layers.")[1].split(".")[0]) for name, _ in model.named_parameters() if "lora_" in name}
    assert adapted == {n - 1}
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert all("lora_" in name or "score" in name for name in trainable)
    with pytest.raises(ConfigError, match="lora_layers"):
        apply_reward_lora(build_reward_model(str(tiny_model_dir), tiny_tokenizer), base_model_name_or_path="x",
                          rank=4, alpha=8, dropout=0.0, target="all-linear", last_layers=n + 1)
    with pytest.raises(ConfigError, match="lora_layers"):
        build_config("rm", {"dataset": "d.jsonl", "output_dir": "o", "model_name_or_path": "m", "lora_layers": 2})


def test_ragged_rankings_ungroup_in_order():
    mask = torch.tensor([[True, True, True], [True, True, False]])
    out = ungroup(torch.arange(5.0), mask)
    assert out.tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 0.0]]


# ---- the stage end to end ----------------------------------------------------------------------

def _config(data, out, **kw):
    values = dict(dataset=data["train"], eval_dataset=data["eval"], output_dir=str(out), max_length=64,
                  per_device_train_batch_size=8, max_steps=4, learning_rate=1e-2, eval_steps=2,
                  logging_steps=2, task="sentiment", report_to=[], disable_tqdm=True, seed=0)
    values.update(kw)
    return build_config("rm", values)


@pytest.fixture(scope="module")
def trained_full(tmp_path_factory, tiny_model_dir, tiny_tokenizer, data):
    """4 full fine-tuning steps from the saved tiny LM, rewards divided by their std; the initial
    parameters rebuilt with the run's seed (the head init is checked to be reproducible)."""
    out = tmp_path_factory.mktemp("rm_full")
    initial = []
    for _ in range(2):
        torch.manual_seed(0)
        initial.append(_params(build_reward_model(str(tiny_model_dir), tiny_tokenizer)))
    for name in initial[0]:
        assert torch.equal(initial[0][name], initial[1][name]), name
    result = train_rm(_config(data, out, model_name_or_path=str(tiny_model_dir), normalize_std=True))
    return result, initial[0]


def test_train_full_changes_every_trainable_parameter(trained_full):
    result, initial = trained_full
    final = _params(result.model)
    assert set(final) == set(initial)
    unchanged = [n for n in initial if torch.equal(initial[n], final[n])]
    assert not unchanged, unchanged


def test_train_full_logs_and_summarises(trained_full, rows):
    result, _ = trained_full
    out = result.output_dir
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in metrics if "eval/accuracy" in m]
    assert [m["step"] for m in evals] == [2, 4]
    for key in ("eval/accuracy", "eval/bayes_accuracy", "eval/margin", "eval/ece", "eval/length_corr",
                "eval/eos_sensitivity", "rm/accuracy", "rm/margin", "loss"):
        assert key in result.summary and math.isfinite(result.summary[key]), key
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval/bayes_accuracy"] == pytest.approx(get_task("sentiment").bayes_accuracy(rows["eval"]))
    assert summary["padding_free"] is True and 0 < summary["eval/accuracy_stderr"] < 0.1
    # truncation is counted, never silent: the counts are those of encoding the rows directly
    tok = result.tokenizer
    groups = [encode_group(tok, row, 64) for row in rows["train"]]
    assert summary["truncation"]["train"] == truncation_counts([g for g in groups if g], sum(g is None for g in groups))
    assert (out / "plots" / "reliability.png").stat().st_size > 0


def test_train_full_save_load_identical_rewards_and_reference_mean_zero(trained_full, tiny_tokenizer, rows):
    """The saved directory reloads to the same rewards; the stored normalisation makes the
    reference responses (chosen responses of the training rows) average 0 with std 1."""
    result, _ = trained_full
    scorer = load_reward_model(result.output_dir)
    norm = scorer.normalization
    assert norm.divide_by_std and norm.count == 64 and "chosen" in norm.reference
    groups = [encode_group(scorer.tokenizer, row, 64) for row in rows["train"]]
    b = pad_batch([g.responses[0].input_ids for g in groups], scorer.tokenizer.pad_token_id)
    with torch.no_grad():  # the trained model on the CPU, where load_reward_model puts the reloaded one
        raw = sequence_rewards(result.model.cpu(), b["input_ids"], b["attention_mask"])
    scores = scorer.score(b["input_ids"], b["attention_mask"])
    torch.testing.assert_close(scores, (raw - norm.mean) / norm.std, atol=1e-5, rtol=1e-5)
    assert abs(scores.mean().item()) < 1e-4
    assert scores.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)


def test_train_lora_from_preset_records_a_loadable_base(data, tmp_path):
    """A preset has no weights on disk: the run saves the initial model under output_dir/base and
    records its absolute path as the adapter's base. LoRA A/B and the head all change."""
    result = train_rm(_config(data, tmp_path / "rm", model_name_or_path="preset:tiny", finetuning_type="lora",
                              lora_rank=4, lora_alpha=8, eval_steps=None, max_steps=3))
    out = result.output_dir
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str((out / "base").resolve())
    # the initial model, rebuilt with the run's seed (its backbone must equal the saved base)
    torch.manual_seed(0)
    initial = apply_reward_lora(build_reward_model("preset:tiny", result.tokenizer),
                                base_model_name_or_path=adapter["base_model_name_or_path"], rank=4, alpha=8,
                                dropout=0.0, target="all-linear")
    saved_base = build_reward_model(str(out / "base"), result.tokenizer).state_dict()
    for name, value in reward_backbone(initial).state_dict().items():
        if "lora_" not in name:
            torch.testing.assert_close(value, saved_base["model." + name.replace(".base_layer", "")], rtol=0, atol=0)
    # the trained adapter as saved (save_final merges a preset's LoRA model in place for merged/)
    from peft import PeftModel

    trained = PeftModel.from_pretrained(build_reward_model(str(out / "base"), result.tokenizer), str(out),
                                        is_trainable=True)
    before, after = _params(initial), _params(trained)
    assert set(before) == set(after) and any("score" in n for n in after)
    unchanged = [n for n in before if torch.equal(before[n], after[n])]
    assert not unchanged, unchanged
    assert (out / "merged" / "reward_normalization.json").is_file()
    # reload: identical (normalised) rewards
    scorer = load_reward_model(out)
    b = pad_batch([_ids(result.tokenizer, "the movie was great ."), _ids(result.tokenizer, "so bad")],
                  result.tokenizer.pad_token_id)
    with torch.no_grad():  # the trained model on the CPU, where load_reward_model puts the reloaded one
        raw = sequence_rewards(result.model.cpu(), b["input_ids"], b["attention_mask"])
    torch.testing.assert_close(scorer.score(b["input_ids"], b["attention_mask"]), raw - scorer.normalization.mean,
                               atol=1e-5, rtol=1e-5)


def test_train_ranking_lora_with_merge(data, tiny_model_dir, tmp_path):
    """Rankings (K = 4, Plackett-Luce) with LoRA from a directory: the base is recorded as that
    directory; the merged copy and the adapter give the same rewards."""
    result = train_rm(_config(data, tmp_path / "rm", model_name_or_path=str(tiny_model_dir), dataset=data["ranking"],
                              eval_dataset=None, eval_steps=None, finetuning_type="lora", lora_rank=4,
                              merge_lora=True, max_steps=2))
    out = result.output_dir
    assert result.summary["dataset_format"] == "ranking" and math.isfinite(result.summary["loss"])
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model_dir.resolve())
    a, m = load_reward_model(out), load_reward_model(out / "merged")
    assert a.normalization == m.normalization
    b = pad_batch([_ids(a.tokenizer, "the plot was dark ."), _ids(a.tokenizer, "fine")], a.tokenizer.pad_token_id)
    torch.testing.assert_close(a.score(b["input_ids"], b["attention_mask"]), m.score(b["input_ids"], b["attention_mask"]),
                               atol=1e-5, rtol=1e-5)


def test_bad_config_and_data_fail_before_loading(data, tmp_path):
    with pytest.raises(ConfigError, match="max_prompt_length"):
        _config(data, tmp_path, model_name_or_path="preset:tiny", max_prompt_length=64)
    with pytest.raises(ConfigError, match="preference or ranking"):
        _config(data, tmp_path, model_name_or_path="preset:tiny", dataset_format="text")
    sft = _write(tmp_path / "sft.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(ConfigError, match="cannot train on"):
        train_rm(_config(data, tmp_path / "x", model_name_or_path="/does/not/exist", dataset=sft, eval_dataset=None,
                         eval_steps=None))


# ---- the commands ------------------------------------------------------------------------------

def test_eval_rm_and_score_commands(trained_full, data, tmp_path, capsys, rows):
    from rlhfkit.cli import main

    result, _ = trained_full
    assert main(["eval-rm", str(result.output_dir), data["eval"], "--output-dir", str(tmp_path / "ev")]) == 0
    printed = capsys.readouterr().out
    assert "bayes_accuracy" in printed and "accuracy" in printed and "with the start of the prompt cut" in printed
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    # same data, same model: the stage's final evaluation (accuracy does not depend on the shift)
    assert summary["eval/accuracy"] == pytest.approx(result.summary["eval/accuracy"])
    assert summary["eval/bayes_accuracy"] == pytest.approx(result.summary["eval/bayes_accuracy"])
    assert (tmp_path / "ev" / "reliability.png").is_file()

    to_score = [{"prompt": r["prompt"], "response": r["chosen"], "id": i} for i, r in enumerate(rows["eval"][:5])]
    src = _write(tmp_path / "s.jsonl", to_score)
    assert main(["score", str(result.output_dir), src, "--output", str(tmp_path / "o.jsonl"), "--batch-size", "2"]) == 0
    scored = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [s["id"] for s in scored] == list(range(5))
    scorer = load_reward_model(result.output_dir)
    groups = [encode_group(scorer.tokenizer, r, 64) for r in rows["eval"][:5]]
    b = pad_batch([g.responses[0].input_ids for g in groups], scorer.tokenizer.pad_token_id)
    expected = scorer.score(b["input_ids"], b["attention_mask"]).tolist()
    # score packs its batches (float rounding of a packed pass vs the padded one)
    assert [s["reward"] for s in scored] == pytest.approx(expected, abs=1e-4)
    assert main(["score", str(result.output_dir), data["eval"]]) == 2  # preference rows have no response


# ---- learning ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_rm_reaches_90_percent_of_the_bayes_ceiling(sentiment_rm, sentiment_sft):
    """Sentiment task, 2000 simulated preference pairs (label temperature 0.3), RM from the
    `sentiment_sft` model, 1 epoch (63 steps, lr 3e-4, SENTIMENT_RM_CONFIG). Held-out accuracy on
    the 256 eval pairs must reach >= 90% of the Bayes ceiling 0.8475 (i.e. >= 0.763).
    Measured (single thread, RM seeds 0/1/2 on the same SFT model): 0.816 (96% of the ceiling),
    0.797 (94%), 0.855 (101%: the ceiling is an expectation, a 256-pair sample can beat it); the
    accuracy's sampling std on 256 pairs is ~0.025. The fixture uses seed 0."""
    summary = json.loads((sentiment_rm / "summary.json").read_text())
    acc, ceiling = summary["eval/accuracy"], summary["eval/bayes_accuracy"]
    print(json.dumps({k: v for k, v in summary.items() if k.startswith("eval/")}, indent=1))
    assert ceiling == pytest.approx(0.8475, abs=1e-3)
    assert acc >= 0.9 * ceiling, (acc, ceiling)
    # consumers see the same model: reloading reproduces the held-out accuracy
    scorer = load_reward_model(sentiment_rm)
    rows = [json.loads(line) for line in (sentiment_sft["data"] / "preference_eval.jsonl").read_text().splitlines()]
    groups = [g for g in (encode_group(scorer.tokenizer, r, 64) for r in rows) if g is not None]
    batch = collate_groups(groups, scorer.tokenizer.pad_token_id)
    r = ungroup(scorer.score(batch["input_ids"], batch["attention_mask"]), batch["group_mask"])
    assert (r[:, 0] > r[:, 1]).float().mean().item() == pytest.approx(acc)


# ---- data parallel -------------------------------------------------------------------------------

DDP_COMMON = dict(logging_steps=1, learning_rate=1e-3)


def ddp_job(tmp_path_factory, model_dir: Path, out: Path):
    """The DDP run of test_two_processes_match_one (in the ddp launch of `launched_run`)."""
    return "rm", _config(rm_data(tmp_path_factory), out, model_name_or_path=str(model_dir),
                         per_device_train_batch_size=4, **DDP_COMMON), None


register_launched("ddp", "rm_ddp", ddp_job)


@pytest.mark.slow
def test_two_processes_match_one(tmp_path_factory, data, tiny_model_dir, tmp_path):
    """DDP on 2 CPU processes (gloo; `accelerate launch` with configs/accelerate/ddp.yaml) x batch 4
    gives the same losses, eval metrics, reward normalisation and weights as one process with batch 8;
    summary.json names the engine."""
    common = dict(model_name_or_path=str(tiny_model_dir), **DDP_COMMON)
    (tmp_path / "ddp").symlink_to(launched_run(tmp_path_factory, tiny_model_dir, "ddp", "rm_ddp"))
    train_rm(_config(data, tmp_path / "single", **common))
    runs = [read_metrics(tmp_path / d) for d in ("ddp", "single")]
    assert len(runs[0]) == len(runs[1]) == 4
    for a, b in zip(*runs):
        assert a.keys() == b.keys()
        for k in a:
            # float rounding only (other batch shapes per process): measured <= 2e-5 absolute at lr 1e-2
            assert a[k] == pytest.approx(b[k], rel=2e-4, abs=2e-5), (a["step"], k)
    summaries = [read_summary(tmp_path / d) for d in ("ddp", "single")]
    assert (summaries[0]["engine"], summaries[0]["world_size"]) == ("ddp", 2)
    assert (summaries[1]["engine"], summaries[1]["world_size"]) == ("single", 1)
    assert summaries[0]["normalization"]["mean"] == pytest.approx(summaries[1]["normalization"]["mean"], rel=1e-4)
    wa, wb = (load_weights(tmp_path / d) for d in ("ddp", "single"))
    for k in wa:
        # Adam divides by sqrt(v): where a gradient is ~0, rounding can flip an update of ~lr, so a few
        # elements may differ by up to a few lr (seen on another CPU, a 16-core GPU host); the rest agree
        close = torch.isclose(wa[k], wb[k], atol=1e-4, rtol=1e-4)
        assert close.float().mean() >= 0.999, (k, close.float().mean())
        assert (wa[k] - wb[k]).abs().max() <= 4 * 4 * common["learning_rate"], k  # 4 steps, <= ~4 lr each
