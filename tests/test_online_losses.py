"""Critic-free online RL losses (GRPO, Dr. GRPO, DAPO, GSPO, RLOO, REINFORCE++) against hand-worked values.

The ragged batch used throughout (SCORES, MASK): 2 prompts x G = 2 samples, scores [1, 0 | 3, 1], response
lengths [3, 1, 2, 4] in T = 4 columns (10 real tokens). By hand:
  group means .5 and 2; centred scores [.5, -.5, 1, -1]; group stds (Bessel, G = 2) sqrt(.5), sqrt(2);
  batch std of [1, 0, 3, 1]: mean 1.25, squares .0625 + 1.5625 + 3.0625 + .0625 = 4.75, / 3 -> sqrt(4.75/3).
"""

from __future__ import annotations

import math
import threading

import pytest
import torch

from rlhfkit.losses.advantages import (
    ADVANTAGE_ESTIMATORS,
    flat_groups,
    group_mean_std,
    grpo_advantages,
    kl_shaped_returns,
    reinforce_pp_advantages,
    rloo_advantages,
)
from rlhfkit.losses.kl import KL_ESTIMATORS, kl_loss_term
from rlhfkit.losses.masked import masked_mean, masked_var
from rlhfkit.losses.policy import (
    LOSS_AGGREGATIONS,
    aggregate_loss,
    clipped_policy_loss,
    overlong_penalty,
    truncated_importance_weights,
)

SCORES = torch.tensor([1.0, 0.0, 3.0, 1.0])
LENGTHS = torch.tensor([3, 1, 2, 4])
MASK = torch.arange(4)[None, :] < LENGTHS[:, None]  # (4, 4) right-padded
G = 2
BATCH_STD = math.sqrt(4.75 / 3)


def per_token(row_values) -> torch.Tensor:
    """(4,) per-row values on the real tokens of MASK, 0 on pads."""
    return torch.tensor(row_values, dtype=torch.float32)[:, None].expand(4, 4).masked_fill(~MASK, 0.0)


# ---- KL ------------------------------------------------------------------------------------------------


def test_kl_estimators_by_hand():
    """logp -1, ref -1.5: log r = -.5. k1 = .5; k2 = .25 / 2 = .125; k3 = e^-.5 + .5 - 1 = .1065307."""
    logp, ref = torch.tensor([-1.0]), torch.tensor([-1.5])
    assert set(KL_ESTIMATORS) == {"k1", "k2", "k3"}
    assert KL_ESTIMATORS["k1"](logp, ref).item() == pytest.approx(0.5)
    assert KL_ESTIMATORS["k2"](logp, ref).item() == pytest.approx(0.125)
    assert KL_ESTIMATORS["k3"](logp, ref).item() == pytest.approx(0.1065307, abs=1e-6)


def test_kl_loss_term_k3_value_and_gradient():
    """k3 = exp(ref - logp) - (ref - logp) - 1; d/dlogp = 1 - exp(ref - logp) = 1 - e^-.5 = .3934693.
    The reference gets no gradient."""
    logp = torch.tensor([[-1.0]], requires_grad=True)
    ref = torch.tensor([[-1.5]], requires_grad=True)
    kl = kl_loss_term(logp, ref, "k3")
    assert kl.item() == pytest.approx(0.1065307, abs=1e-6)
    kl.sum().backward()
    assert logp.grad.item() == pytest.approx(1 - math.exp(-0.5), abs=1e-6)
    assert ref.grad is None
    with pytest.raises(ValueError, match="k4"):
        kl_loss_term(logp, ref, "k4")


def test_kl_loss_term_expected_gradients():
    """The docstring's claim, exactly, on a 3-token distribution with on-policy samples:
    E_pi[grad k1] = 0, E_pi[grad k2] = grad KL(pi || ref), E_pi[grad k3] = grad KL(ref || pi)."""
    ref = torch.log_softmax(torch.tensor([0.3, -1.0, 0.5]), -1)

    def grad(objective):
        theta = torch.tensor([1.0, -0.5, 0.2], requires_grad=True)
        objective(torch.log_softmax(theta, -1)).backward()
        return theta.grad

    def expected_term(name):  # sum_x pi(x) k(x), pi not differentiated: the sampling distribution
        return lambda logp: (logp.exp().detach() * kl_loss_term(logp, ref, name)).sum()

    def kl_pi_ref(logp):
        return (logp.exp() * (logp - ref)).sum()

    def kl_ref_pi(logp):
        return (ref.exp() * (ref - logp)).sum()

    torch.testing.assert_close(grad(expected_term("k1")), torch.zeros(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(grad(expected_term("k2")), grad(kl_pi_ref))
    torch.testing.assert_close(grad(expected_term("k3")), grad(kl_ref_pi))
    assert (grad(kl_ref_pi) - grad(kl_pi_ref)).abs().max() > 1e-2  # the bias is real


# ---- sequence-level advantages ------------------------------------------------------------------------


def test_worked_values_from_the_notes():
    """RLHF_NOTES: R = [1, 0, .5, .5], one group of 4. Mean .5; RLOO: 1 - (0 + .5 + .5)/3 = .6667,
    0 - 2/3 = -.6667, .5 - .5 = 0. GRPO: std = sqrt((.25 + .25) / 3) = .408248,
    .5 / (.408248 + 1e-4) = 1.2244."""
    r = torch.tensor([1.0, 0.0, 0.5, 0.5])
    torch.testing.assert_close(rloo_advantages(r, 4), torch.tensor([2 / 3, -2 / 3, 0, 0]))
    expected = torch.tensor([1.2244, -1.2244, 0, 0])
    torch.testing.assert_close(grpo_advantages(r, 4), expected, atol=1e-4, rtol=0)
    mean, std = group_mean_std(r, 4)
    torch.testing.assert_close(mean, torch.full((4,), 0.5))
    torch.testing.assert_close(std, torch.full((4,), math.sqrt(0.5 / 3)))


def test_sequence_advantages_on_the_ragged_batch():
    """See the module docstring: Dr. GRPO = centred; GRPO divides by group std + 1e-4 or by the batch std
    + 1e-4; RLOO with G = 2 is r_i - r_other = [1, -1, 2, -2]."""
    centred = torch.tensor([0.5, -0.5, 1.0, -1.0])
    torch.testing.assert_close(grpo_advantages(SCORES, G, "none"), centred)
    group_std = torch.tensor([0.5 ** 0.5] * 2 + [2 ** 0.5] * 2)
    torch.testing.assert_close(grpo_advantages(SCORES, G), centred / (group_std + 1e-4))
    torch.testing.assert_close(grpo_advantages(SCORES, G, "batch"), centred / (BATCH_STD + 1e-4))
    torch.testing.assert_close(grpo_advantages(SCORES, G, "batch", eps=0.0), centred / BATCH_STD)
    torch.testing.assert_close(rloo_advantages(SCORES, G), torch.tensor([1.0, -1.0, 2.0, -2.0]))


def test_kl_shaped_returns_are_the_reward_to_go():
    """nash_md's advantages (REINFORCE++'s returns before whitening): -kl_coef x KL per token, the score at
    the last real token, summed from each token to the end; 0 on pads. Worked: score 1, KL [.5, .25, pad],
    coef .1 -> [1 - .075, 1 - .025, 0]; score -2, KL [.4, pad, pad] -> [-2.04, 0, 0]."""
    mask = torch.tensor([[True, True, False], [True, False, False]])
    kl = torch.tensor([[0.5, 0.25, 9.0], [0.4, 9.0, 9.0]])  # pads hold garbage: ignored
    out = kl_shaped_returns(torch.tensor([1.0, -2.0]), mask, kl, 0.1)
    torch.testing.assert_close(out, torch.tensor([[0.925, 0.975, 0.0], [-2.04, 0.0, 0.0]]))
    torch.testing.assert_close(kl_shaped_returns(torch.tensor([1.0, -2.0]), mask),
                               torch.tensor([[1.0, 1.0, 0.0], [-2.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="needs token_kl"):
        kl_shaped_returns(torch.tensor([1.0, -2.0]), mask, None, 0.1)


# Per-row (real tokens) advantages of every estimator on the ragged batch (module docstring and here).
# reinforce_pp (no KL): reward-to-go = the score on every real token: values 1,1,1 | 0 | 3,3 | 1,1,1,1;
#   mean 13/10 = 1.3, biased var (7 * .09 + 1.69 + 2 * 2.89) / 10 = .81, std .9 ->
#   rows -.3/.9, -1.3/.9, 1.7/.9, -.3/.9.
# reinforce_pp_baseline: centred scores .5,.5,.5 | -.5 | 1,1 | -1,-1,-1,-1; mean -1/10 = -.1,
#   var (3 * .36 + .16 + 2 * 1.21 + 4 * .81) / 10 = .69 -> rows .6, -.4, 1.1, -.9 over sqrt(.69).
_g0, _g1 = 0.5 / (0.5 ** 0.5 + 1e-4), 1 / (2 ** 0.5 + 1e-4)  # GRPO, centred / (group std + 1e-4)
ESTIMATOR_ROWS = {
    "grpo": [_g0, -_g0, _g1, -_g1],
    "dr_grpo": [0.5, -0.5, 1.0, -1.0],
    "rloo": [1.0, -1.0, 2.0, -2.0],
    "reinforce_pp": [-0.3 / 0.9, -1.3 / 0.9, 1.7 / 0.9, -0.3 / 0.9],
    "reinforce_pp_baseline": [x / 0.69 ** 0.5 for x in (0.6, -0.4, 1.1, -0.9)],
}


@pytest.mark.parametrize("name", sorted(ADVANTAGE_ESTIMATORS))
def test_every_estimator_on_the_ragged_batch(name):
    adv = ADVANTAGE_ESTIMATORS[name](SCORES, MASK, G)
    assert adv.shape == (4, 4)
    torch.testing.assert_close(adv, per_token(ESTIMATOR_ROWS[name]), atol=1e-5, rtol=1e-5)
    assert (adv[~MASK] == 0).all()


# Loss at ratio 1 is -A per token. Row sums of -A: S = -(3 a0 + a1 + 2 a2 + 4 a3); row means -(a0+a1+a2+a3).
#   token = S / 10, sequence = sum of row means / 4, constant = S / (4 * max_length 4).
# dr_grpo: S = -(1.5 - .5 + 2 - 4) = 1 -> .1, 0, 1/16.   rloo: S = -(3 - 1 + 4 - 8) = 2 -> .2, 0, 2/16.
# grpo: a = [g0, -g0, g1, -g1] -> S = 2 g1 - 2 g0 -> (g1 - g0)/5, 0, (g1 - g0)/8.
# reinforce_pp(_baseline): whitened over real tokens -> S = 0 -> token 0, constant 0; sequence:
#   -(-.3 - 1.3 + 1.7 - .3) / .9 / 4 = .2 / 3.6 = 1/18; baseline: -(.6 - .4 + 1.1 - .9) / sqrt(.69) / 4.
RATIO_ONE_LOSS = {
    "grpo": {"token": (_g1 - _g0) / 5, "sequence": 0.0, "constant": (_g1 - _g0) / 8},
    "dr_grpo": {"token": 0.1, "sequence": 0.0, "constant": 1 / 16},
    "rloo": {"token": 0.2, "sequence": 0.0, "constant": 2 / 16},
    "reinforce_pp": {"token": 0.0, "sequence": 1 / 18, "constant": 0.0},
    "reinforce_pp_baseline": {"token": 0.0, "sequence": -0.1 / 0.69 ** 0.5, "constant": 0.0},
}


@pytest.mark.parametrize("mode", sorted(LOSS_AGGREGATIONS))
@pytest.mark.parametrize("name", sorted(ADVANTAGE_ESTIMATORS))
def test_every_estimator_and_aggregation_at_ratio_one(name, mode):
    """"Loss is 0 at the start" holds only for some pairs: the token mean weights long rows more."""
    adv = ADVANTAGE_ESTIMATORS[name](SCORES, MASK, G)
    logps = torch.randn(4, 4)
    out = clipped_policy_loss(logps, logps.clone(), adv, MASK)
    loss = aggregate_loss(out["loss"], MASK, mode, num_tokens=10, num_sequences=4, max_length=4)
    assert loss.item() == pytest.approx(RATIO_ONE_LOSS[name][mode], abs=1e-6)


def test_flat_groups_have_zero_advantage_and_zero_gradient():
    """Group 0 = [.9, .9, .9] (float32: the mean of three .9 misses .9 by an ulp, which the std division
    would blow up to ~6e-4); group 1 = [1, 0, 0]. Every estimator that uses the group gives group 0
    exactly 0, and the policy gradient on its rows is exactly 0."""
    scores = torch.tensor([0.9, 0.9, 0.9, 1.0, 0.0, 0.0])
    mask = torch.ones(6, 5, dtype=torch.bool)
    assert flat_groups(scores, 3).tolist() == [True, False]
    assert (grpo_advantages(scores, 3)[:3] == 0).all() and (rloo_advantages(scores, 3)[:3] == 0).all()
    assert (grpo_advantages(scores, 3, "batch")[:3] == 0).all()
    for name in ("grpo", "dr_grpo", "rloo"):
        adv = ADVANTAGE_ESTIMATORS[name](scores, mask, 3)
        assert (adv[:3] == 0).all() and (adv[3:] != 0).all()
        logps = torch.randn(6, 5, requires_grad=True)
        out = clipped_policy_loss(logps, torch.randn(6, 5), adv, mask)
        aggregate_loss(out["loss"], mask, "token", num_tokens=30, num_sequences=6).backward()
        assert (logps.grad[:3] == 0).all() and (logps.grad[3:] != 0).any()


def test_reinforce_pp_with_kl_by_hand():
    """kl_coef .1, token_kl row 0 = [1, 2, 1, pad 9] (others 0): rewards -.1, -.2, -.1 + 1 -> reward-to-go
    [.6, .7, .9]. All real values: .6 .7 .9 | 0 | 3 3 | 1 1 1 1, mean 12.2/10 = 1.22, biased var
    (.3844 + .2704 + .1024 + 1.4884 + 2 * 3.1684 + 4 * .0484) / 10 = .8776."""
    kl = torch.zeros(4, 4)
    kl[0] = torch.tensor([1.0, 2.0, 1.0, 9.0])
    adv = reinforce_pp_advantages(SCORES, MASK, G, token_kl=kl, kl_coef=0.1)
    rtg = torch.tensor([[.6, .7, .9, 0], [0, 0, 0, 0], [3, 3, 0, 0], [1, 1, 1, 1]])
    expected = ((rtg - 1.22) / 0.8776 ** 0.5).masked_fill(~MASK, 0.0)
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=0)
    table = ADVANTAGE_ESTIMATORS["reinforce_pp"](SCORES, MASK, G, token_kl=kl, kl_coef=0.1)
    torch.testing.assert_close(table, adv)


def reinforce_pp_loop(scores, mask, token_kl, kl_coef, group_size, baseline):
    """Textbook version: python loops over rows and tokens, then whitening with explicit sums."""
    scores = scores.tolist()
    if baseline:
        means = [sum(scores[i:i + group_size]) / group_size for i in range(0, len(scores), group_size)]
        scores = [s - means[i // group_size] for i, s in enumerate(scores)]
    out = torch.zeros(mask.shape, dtype=torch.float64)
    for i in range(mask.shape[0]):
        real = [t for t in range(mask.shape[1]) if mask[i, t]]
        to_go = 0.0
        for t in reversed(real):
            to_go += -kl_coef * token_kl[i, t].item() + (scores[i] if t == real[-1] else 0.0)
            out[i, t] = to_go
    values = out[mask]
    mean = values.sum() / len(values)
    var = ((values - mean) ** 2).sum() / len(values)
    return ((out - mean) / (var + 1e-8).sqrt()).masked_fill(~mask, 0.0).float()


@pytest.mark.parametrize("baseline", [False, True])
def test_reinforce_pp_matches_loop(baseline):
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([7, 1, 4, 6, 2, 5])
    mask = torch.arange(7)[None, :] < lengths[:, None]
    scores, kl = torch.randn(6, generator=g), torch.randn(6, 7, generator=g)
    adv = reinforce_pp_advantages(scores, mask, 3, token_kl=kl, kl_coef=0.3, baseline=baseline)
    expected = reinforce_pp_loop(scores, mask, kl, 0.3, 3, baseline)
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=1e-5)
    assert masked_mean(adv, mask).abs() < 1e-6
    assert masked_var(adv, mask).item() == pytest.approx(1.0, abs=1e-5)


# ---- data parallel: a fake two-process all-reduce -----------------------------------------------------


def two_processes(fn):
    """Run fn(rank, reduce_sum) in two threads whose reduce_sum adds both ranks' tensors (a fake
    all-reduce, with the barrier a real one implies). Returns [result_rank0, result_rank1]."""
    barrier, slots, results, seen = threading.Barrier(2, timeout=10), [None, None], [None, None], []

    def reduce_for(rank):
        def reduce_sum(t):
            seen.append((t.dtype, t.dim()))
            slots[rank] = t.clone()
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()  # nobody overwrites a slot before both have read it
            return total
        return reduce_sum

    def work(rank):
        try:
            results[rank] = fn(rank, reduce_for(rank))
        except BaseException as e:  # surfaced below
            results[rank] = e
            barrier.abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        if isinstance(r, BaseException):
            raise r
    assert all(s == (torch.float64, 1) for s in seen)
    return results


@pytest.mark.parametrize("name", sorted(ADVANTAGE_ESTIMATORS))
def test_reduce_sum_two_processes_equal_one_batch(name):
    """Process 0 holds prompts 0-1, process 1 prompts 2-4 (unequal shares, groups never split)."""
    g = torch.Generator().manual_seed(1)
    n, group = 5 * 3, 3
    lengths = torch.randint(1, 8, (n,), generator=g)
    mask = torch.arange(8)[None, :] < lengths[:, None]
    scores, kl = torch.randn(n, generator=g), torch.rand(n, 8, generator=g)
    kw = {"token_kl": kl, "kl_coef": 0.2} if name.startswith("reinforce_pp") else {}
    fn = ADVANTAGE_ESTIMATORS[name]
    one = fn(scores, mask, group, scale_rewards="batch", **kw)
    shares = [slice(0, 6), slice(6, n)]

    def part(rank, reduce_sum):
        s = shares[rank]
        kw_rank = {k: (v[s] if torch.is_tensor(v) else v) for k, v in kw.items()}
        return fn(scores[s], mask[s], group, scale_rewards="batch", reduce_sum=reduce_sum, **kw_rank)

    torch.testing.assert_close(torch.cat(two_processes(part)), one, atol=1e-6, rtol=1e-6)
    if name.startswith("reinforce_pp") or name == "grpo":  # batch statistics: one process alone differs
        assert not torch.allclose(part(0, None), one[:6], atol=1e-4)


# ---- policy loss ----------------------------------------------------------------------------------------


def test_clip_higher():
    """DAPO: ratio 1.25, A = 1. eps .2 / .28: 1.25 < 1.28, loss -1.25, not clipped; symmetric .2:
    clipped to 1.2, loss -1.2, clipped_high. ratio .75, A = -1: .75 < .8 -> loss max(.75, .8) = .8,
    clipped_low in both."""
    logps = torch.log(torch.tensor([[1.25, 0.75]]))
    old, adv, mask = torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]), torch.ones(1, 2, dtype=torch.bool)
    high = clipped_policy_loss(logps, old, adv, mask, epsilon=0.2, epsilon_high=0.28)
    torch.testing.assert_close(high["loss"], torch.tensor([[-1.25, 0.8]]))
    assert high["clipped_high"].tolist() == [[0.0, 0.0]] and high["clipped_low"].tolist() == [[0.0, 1.0]]
    sym = clipped_policy_loss(logps, old, adv, mask, epsilon=0.2)
    torch.testing.assert_close(sym["loss"], torch.tensor([[-1.2, 0.8]]))
    assert sym["clipped_high"].tolist() == [[1.0, 0.0]] and sym["clipped_low"].tolist() == [[0.0, 1.0]]


def test_gspo_sequence_ratio_by_hand():
    """Row 0 log-ratios [.3, -.1, .4] -> mean .2, s = e^.2 = 1.2214 > 1.2; A = 1: loss -1.2 on every
    token, clipped_high. Row 1 [-.6, pad 5] -> s = e^-.6 = .5488 (pad ignored); A = -1: max(.5488, .8) = .8,
    clipped_low. Row 2 [.05, -.05, 0] -> s = 1, A = 2: loss -2; with "sequence" aggregation over this
    row alone d loss / d logp_t = -A * s / 3 = -2/3 on each real token, 0 on the pad."""
    old = torch.zeros(3, 4)
    logps = torch.tensor([[.3, -.1, .4, 0], [-.6, 5, 0, 0], [.05, -.05, 0, 7]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    adv = torch.tensor([1.0, -1.0, 2.0])
    out = clipped_policy_loss(logps, old, adv, mask, importance_sampling_level="sequence")
    torch.testing.assert_close(out["ratio"][:, 0], torch.tensor([math.exp(0.2), math.exp(-0.6), 1.0]))
    assert (out["ratio"] == out["ratio"][:, :1]).all()  # the same s_i on every token of the row
    torch.testing.assert_close(out["loss"], torch.tensor([[-1.2] * 3 + [0], [.8, 0, 0, 0], [-2, -2, -2, 0]]))
    assert out["clipped_high"].tolist() == [[1, 1, 1, 0], [0] * 4, [0] * 4]
    assert out["clipped_low"].tolist() == [[0] * 4, [1, 0, 0, 0], [0] * 4]
    row2 = aggregate_loss(out["loss"][2:], mask[2:], "sequence", num_tokens=3, num_sequences=1)
    row2.backward()
    torch.testing.assert_close(logps.grad[2], torch.tensor([-2 / 3, -2 / 3, -2 / 3, 0]))
    assert (logps.grad[:2] == 0).all()  # clipped rows carry no gradient


def test_sequence_advantages_broadcast_like_token_advantages():
    g = torch.Generator().manual_seed(2)
    logps, old = torch.randn(4, 4, generator=g), torch.randn(4, 4, generator=g)
    adv = torch.randn(4, generator=g)
    a = clipped_policy_loss(logps, old, adv, MASK)
    b = clipped_policy_loss(logps, old, adv[:, None].expand(4, 4), MASK)
    for key in a:
        torch.testing.assert_close(a[key], b[key])
    assert (a["loss"][~MASK] == 0).all() and (a["approxkl"][~MASK] == 0).all()
    with pytest.raises(ValueError, match="importance_sampling_level"):
        clipped_policy_loss(logps, old, adv, MASK, importance_sampling_level="sentence")


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_garbage_on_pads_reaches_neither_loss_nor_gradient(level):
    """-inf log-probs and nan advantages on pads: loss and gradient stay finite, pads get gradient 0."""
    logps = torch.zeros(4, 4).masked_fill(~MASK, -math.inf).requires_grad_()
    adv = torch.ones(4, 4).masked_fill(~MASK, math.nan)
    out = clipped_policy_loss(logps, torch.full((4, 4), -0.1), adv, MASK, importance_sampling_level=level)
    loss = aggregate_loss(out["loss"], MASK, "token", num_tokens=10, num_sequences=4)
    loss.backward()
    assert loss.isfinite() and logps.grad.isfinite().all() and (logps.grad[~MASK] == 0).all()


# ---- aggregation ----------------------------------------------------------------------------------------


# per-token loss on the ragged batch: rows [1 2 3 | 4 | 5 6 | 1 1 1 1], pads 100 (must not count).
# Sum 25 over 10 tokens. token 25/10 = 2.5; sequence: row means 2, 4, 5.5, 1 -> 12.5/4 = 3.125;
# constant (max_length 4): 25/16; (max_length 5): 25/20.
PER_TOKEN = torch.tensor([[1, 2, 3, 100], [4, 100, 100, 100], [5, 6, 100, 100], [1, 1, 1, 1]]).float()
AGGREGATED = {"token": 2.5, "sequence": 3.125, "constant": 25 / 16}


@pytest.mark.parametrize("mode", sorted(LOSS_AGGREGATIONS))
def test_aggregation_by_hand_and_micro_batches_add_up(mode):
    kw = {"num_tokens": 10, "num_sequences": 4, "max_length": 4}
    assert aggregate_loss(PER_TOKEN, MASK, mode, **kw).item() == pytest.approx(AGGREGATED[mode])
    for split in ([0, 1], [2, 3]), ([0, 3], [1, 2]), ([2], [0, 1, 3]):
        parts = sum(aggregate_loss(PER_TOKEN[rows], MASK[rows], mode, **kw) for rows in split)
        assert parts.item() == pytest.approx(AGGREGATED[mode], abs=1e-6)


def test_aggregation_errors_and_constant_max_length():
    kw = {"num_tokens": 10, "num_sequences": 4}
    assert aggregate_loss(PER_TOKEN, MASK, "constant", max_length=5, **kw).item() == 1.25
    with pytest.raises(ValueError, match="max_length"):
        aggregate_loss(PER_TOKEN, MASK, "constant", num_tokens=10, num_sequences=4)
    with pytest.raises(ValueError, match="token"):
        aggregate_loss(PER_TOKEN, MASK, "mean", num_tokens=10, num_sequences=4)
    with pytest.raises(ValueError, match="num_tokens"):
        aggregate_loss(PER_TOKEN, MASK, "token", num_tokens=0, num_sequences=4)


# ---- overlong penalty, errors ---------------------------------------------------------------------------


def test_overlong_penalty_three_regions():
    """max 20, buffer 5: L <= 15 -> 0; 17 -> (15 - 17)/5 = -.4; 20 -> -1; beyond 20 -> -1."""
    out = overlong_penalty(torch.tensor([10, 15, 16, 17, 20, 25]), 20, 5)
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, -0.2, -0.4, -1.0, -1.0]))
    for bad in (0, 21):
        with pytest.raises(ValueError, match="buffer"):
            overlong_penalty(torch.tensor([1]), 20, bad)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="whole number of groups"):
        grpo_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="group_size"):
        rloo_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="scale_rewards"):
        grpo_advantages(SCORES, G, "global")
    with pytest.raises(ValueError, match="1-D"):
        group_mean_std(SCORES[None], G)
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        reinforce_pp_advantages(SCORES, MASK.index_fill(0, torch.tensor([1]), False), G)
    with pytest.raises(ValueError, match="token_kl"):
        reinforce_pp_advantages(SCORES, MASK, G, kl_coef=0.1)
    with pytest.raises(ValueError, match="fold the KL"):
        ADVANTAGE_ESTIMATORS["rloo"](SCORES, MASK, G, token_kl=torch.zeros(4, 4), kl_coef=0.1)
    with pytest.raises(ValueError, match="disagree"):
        ADVANTAGE_ESTIMATORS["grpo"](SCORES, MASK[:3], G)


def test_truncated_importance_weights_by_hand():
    """w = min(exp(old - sampling), cap) per token, 1 outside the mask, detached from old_logps.
    Row 0: old - sampling = [log 0.5, 0, log 3] -> [0.5, 1, min(3, 2) = 2]; row 1: [log 1.5, pad]."""
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.0, 9.0]], requires_grad=True)
    shift = torch.tensor([[math.log(0.5), 0.0, math.log(3.0)], [math.log(1.5), 0.0, -50.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    w = truncated_importance_weights(old, old.detach() - shift, mask, cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[0.5, 1.0, 2.0], [1.5, 1.0, 1.0]]))
    assert not w.requires_grad
    with pytest.raises(ValueError, match="cap must be >= 1"):
        truncated_importance_weights(old, old, mask, cap=0.5)
