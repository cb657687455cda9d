"""PPO losses, rewards and advantages against values worked out by hand (RLHF_NOTES.md)."""

from __future__ import annotations

import math

import pytest
import torch

from rlhfkit.losses.advantages import gae, gae_loop
from rlhfkit.losses.kl import KL_ESTIMATORS, AdaptiveKLController, FixedKLController
from rlhfkit.losses.masked import masked_mean, masked_var, whiten
from rlhfkit.losses.policy import clipped_policy_loss
from rlhfkit.models.logprobs import entropy_from_logits
from rlhfkit.losses.ppo import clip_scores, eos_trick, kl_shaped_rewards, score_index, value_loss, value_mask
from rlhfkit.rollout.generate import truncate_after_eos

# The worked example of RLHF_NOTES.md ("A small example to check by hand").
EOS, PAD, BETA, GAMMA, LAM = 0, 9, 0.05, 1.0, 0.95
RESPONSES = torch.tensor([[5, 6, 0, 7, 8], [5, 6, 7, 8, 4]])
SCORES = torch.tensor([1.0, 0.5])
LOGP = torch.tensor([[-1, -2, -.5, -3, -3], [-1, -1.5, -2, -2.5, -.7]])
REF = torch.tensor([[-1.2, -1.8, -.9, -2, -2], [-1.1, -1.5, -2.2, -2, -1]])
VALUES = torch.tensor([[.1, .2, .3, .4, .5], [0, -.1, -.2, -.3, -.4]])


def worked_example():
    tokens, mask, ended = truncate_after_eos(RESPONSES, EOS, PAD)
    scores = eos_trick(SCORES, ended, replace=-1.0)
    kl = KL_ESTIMATORS["k1"](LOGP, REF)
    rewards = kl_shaped_rewards(scores, kl, mask, BETA)
    vmask = value_mask(mask)
    values = VALUES.masked_fill(~vmask, 0.0)
    return tokens, mask, ended, scores, rewards, vmask, values


def test_worked_example_truncation_eos_trick_rewards_gae():
    """N+ convention (score one past the EOS): by hand, row 1 has EOS at 2, so the score 1 goes
    to index 3; kl = logp - ref = [.2, -.2, .4, masked, masked] -> rewards [-.01, .01, -.02, 1, 0].
    Row 2 never ends: its score is replaced by -1 and placed at min(4 + 1, 4) = 4, on top of
    -0.05 * .3 -> -1.015. Values are kept up to one past the EOS (row 1: index 4 -> 0).
    GAE row 1 from the end: A4 = 0; A3 = 1 - .4 = .6; A2 = -.02 + .4 - .3 + .95 * .6 = .65;
    A1 = .01 + .3 - .2 + .95 * .65 = .7275; A0 = -.01 + .2 - .1 + .95 * .7275 = .781125."""
    tokens, mask, ended, scores, rewards, vmask, values = worked_example()
    assert tokens.tolist() == [[5, 6, 0, 9, 9], [5, 6, 7, 8, 4]]
    assert mask.tolist() == [[True, True, True, False, False], [True] * 5]
    assert ended.tolist() == [True, False]
    assert scores.tolist() == [1.0, -1.0]
    assert score_index(mask).tolist() == [3, 4]
    assert vmask.tolist() == [[True, True, True, True, False], [True] * 5]
    torch.testing.assert_close(rewards, torch.tensor([[-.01, .01, -.02, 1, 0], [-.005, 0, -.01, .025, -1.015]]))
    expected = torch.tensor([[.781125, .7275, .65, .6, 0], [-.864499, -.799473, -.736287, -.65925, -.615]])
    for fn in (gae_loop, gae):
        adv, returns = fn(rewards, values, GAMMA, LAM)
        torch.testing.assert_close(adv, expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(returns, adv + values)


def test_eos_trick_penalty_and_passthrough():
    ended = torch.tensor([True, False])
    assert eos_trick(SCORES, ended, penalty=1.0).tolist() == [1.0, -0.5]
    assert eos_trick(SCORES, ended).tolist() == [1.0, 0.5]
    with pytest.raises(ValueError):
        eos_trick(SCORES, ended, penalty=1.0, replace=-1.0)
    assert clip_scores(torch.tensor([-7.0, 2.0, 9.0]), 5.0).tolist() == [-5.0, 2.0, 5.0]


def test_gae_loop_and_vectorised_agree_on_random_inputs():
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(6, 17, generator=g), torch.randn(6, 17, generator=g)
    for gamma, lam in ((1.0, 0.95), (0.99, 0.9), (0.9, 0.0), (1.0, 1.0)):
        a1, r1 = gae_loop(rewards, values, gamma, lam)
        a2, r2 = gae(rewards, values, gamma, lam)
        torch.testing.assert_close(a1, a2, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(r1, r2, atol=1e-5, rtol=1e-5)


def test_gae_lambda_zero_is_td_error_and_lambda_one_is_return_minus_value():
    rewards = torch.tensor([[1.0, 2.0, 3.0]])
    values = torch.tensor([[.5, .25, .125]])
    adv, _ = gae(rewards, values, 1.0, 0.0)
    torch.testing.assert_close(adv, torch.tensor([[1 + .25 - .5, 2 + .125 - .25, 3 - .125]]))
    adv, _ = gae(rewards, values, 1.0, 1.0)
    torch.testing.assert_close(adv, torch.tensor([[6 - .5, 5 - .25, 3 - .125]]))


def test_k3_by_hand_and_nonnegative():
    # r = ref - logp = -0.5 -> exp(-0.5) + 0.5 - 1 = 0.1065307
    k3 = KL_ESTIMATORS["k3"](torch.tensor([-1.0]), torch.tensor([-1.5]))
    assert k3.item() == pytest.approx(math.exp(-0.5) - 0.5, abs=1e-7) == pytest.approx(0.1065307, abs=1e-6)
    assert (KL_ESTIMATORS["k3"](LOGP, REF) >= 0).all()
    assert KL_ESTIMATORS["k1"](LOGP, LOGP).abs().max() == 0


def test_advantage_whitening_over_real_tokens_only():
    tokens, mask, *_ = worked_example()
    adv = torch.randn(2, 5)
    white = whiten(adv, mask)
    assert masked_mean(white, mask).abs() < 1e-6
    assert masked_var(white, mask).item() == pytest.approx(1.0, abs=1e-5)
    assert (white[~mask] == 0).all()
    # pads contribute nothing: changing values at pad positions changes no real entry
    other = adv.masked_fill(~mask, 123.0)
    torch.testing.assert_close(whiten(other, mask), white)
    # shift_mean=False keeps the mean (reward whitening)
    kept = whiten(adv, mask, shift_mean=False)
    assert masked_mean(kept, mask).item() == pytest.approx(masked_mean(adv, mask).item(), abs=1e-6)
    # statistics given from elsewhere (several processes): the same result when they are this batch's
    stats = (masked_mean(adv, mask).item(), masked_var(adv, mask).item())
    torch.testing.assert_close(whiten(adv, mask, stats=stats), white)
    shifted = whiten(adv, mask, stats=(stats[0] + 1.0, stats[1]))  # another mean: not centred here
    assert masked_mean(shifted, mask).item() == pytest.approx(-1.0 / stats[1] ** 0.5, abs=1e-5)


def test_pads_contribute_nothing_to_rewards():
    tokens, mask, ended, scores, rewards, *_ = worked_example()
    kl = KL_ESTIMATORS["k1"](LOGP, REF)
    noisy = kl.masked_fill(~mask, 50.0)
    torch.testing.assert_close(kl_shaped_rewards(scores, noisy, mask, BETA), rewards)


def test_policy_loss_by_hand():
    """A = [1, -1, 2], logp - old = [log 1.5, log 0.5, 0], eps 0.2.
    token 0: ratio 1.5: max(-1.5, -1.2) = -1.2 (clipped). token 1: ratio .5, A -1:
    max(.5, .8) = .8 (clipped). token 2: ratio 1: -2 (not clipped)."""
    old = torch.zeros(1, 3)
    logps = torch.log(torch.tensor([[1.5, 0.5, 1.0]]))
    real = torch.ones(1, 3, dtype=torch.bool)
    out = clipped_policy_loss(logps, old, torch.tensor([[1.0, -1.0, 2.0]]), real, epsilon=0.2)
    torch.testing.assert_close(out["loss"], torch.tensor([[-1.2, .8, -2.0]]))
    assert out["clipped_high"].tolist() == [[1.0, 0.0, 0.0]]
    assert out["clipped_low"].tolist() == [[0.0, 1.0, 0.0]]
    torch.testing.assert_close(out["approxkl"], 0.5 * logps ** 2)
    # ratio 1 -> no clipping and loss = -A
    same = clipped_policy_loss(old, old, torch.tensor([[1.0, -1.0, 2.0]]), real)
    assert (same["clipped_low"] + same["clipped_high"]).sum() == 0
    assert same["ratio"].tolist() == [[1.0, 1.0, 1.0]]


def test_policy_loss_masked_mean_ignores_pads():
    mask = torch.tensor([[True, True, False]])
    adv = torch.tensor([[1.0, 1.0, 0.0]])
    a = clipped_policy_loss(torch.zeros(1, 3), torch.zeros(1, 3), adv, mask, epsilon=0.2)["loss"]
    b = clipped_policy_loss(torch.tensor([[0.0, 0.0, 5.0]]), torch.zeros(1, 3), adv.masked_fill(~mask, 99.0),
                            mask, epsilon=0.2)["loss"]
    assert masked_mean(a, mask) == masked_mean(b, mask) == -1.0


def test_value_loss_by_hand():
    """V_old = 0, c = 0.2, R = 1. V = .5: clip -> .2, errors .25 vs .64 -> .5 * .64 = .32 (clipped).
    V = 1.1: clip -> .2, errors .01 vs .64 -> .32. V = .1: within range, .5 * .81 = .405."""
    out = value_loss(torch.tensor([[.5, 1.1, .1]]), torch.zeros(1, 3), torch.ones(1, 3), 0.2)
    torch.testing.assert_close(out["loss"], torch.tensor([[.32, .32, .405]]))
    assert out["clipped"].tolist() == [[1.0, 1.0, 0.0]]
    torch.testing.assert_close(out["error"], torch.tensor([[.25, .01, .81]]))


def test_entropy():
    uniform = torch.zeros(2, 3, 8)
    torch.testing.assert_close(entropy_from_logits(uniform), torch.full((2, 3), math.log(8)))
    peaked = torch.tensor([[0.0, -1e4]])
    assert entropy_from_logits(peaked).abs().item() < 1e-6


def test_kl_controllers():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    assert ctl.update(6.0, 64) == 0.1  # KL = target leaves beta unchanged
    up = ctl.update(100.0, 100)         # error clipped at +0.2: beta * (1 + 0.2 * 100 / 10000)
    assert up == pytest.approx(0.1 * 1.002)
    down = AdaptiveKLController(0.1, 6.0, 10000).update(3.0, 100)  # error -0.5 -> -0.2
    assert down == pytest.approx(0.1 * 0.998)
    assert FixedKLController(0.05).update(100.0, 64) == 0.05
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, 0.0, 100)
