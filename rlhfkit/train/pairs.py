"""DPO on (chosen, rejected) pairs laid out as a `Rollout` of groups of 2 (row 2i the chosen, row 2i + 1
the rejected response of pair i; a pair shares its prompt in packed passes): the pair layout, the
sequence log-probs, the loss of one micro-batch and the choice of a group's best and worst response that
online_dpo (pairs the reward ranks), xpo (the policy's response against the reference's, plus an
exploration term), spin (the data's response against the policy's own) and self_reward (pairs the
policy judges itself) share.

A pair with weight 0 (a tie, or two identical responses) stays in the batch, so every process keeps its
micro-batch count, and trains nothing; each micro-batch's loss is its share of the mean over the
weighted pairs of the global minibatch (`n_pairs`)."""

from __future__ import annotations

import dataclasses
import math

import torch

from rlhfkit.config import OnlineConfig
from rlhfkit.losses.dpo import PairLogps, combined_loss
from rlhfkit.losses.masked import masked_sum
from rlhfkit.rollout.rollout import Rollout, select_rows
from rlhfkit.train.online import rollout_logps, run_updates


def pair_rollout(ro: Rollout, chosen: torch.Tensor, rejected: torch.Tensor) -> Rollout:
    """The pairs as a rollout of groups of 2: row 2i the chosen, row 2i + 1 the rejected response of
    pair i (a pair shares its prompt in packed passes)."""
    return dataclasses.replace(select_rows(ro, torch.stack([chosen, rejected], 1).reshape(-1)), group_size=2)


def identical_pairs(pairs: Rollout) -> torch.Tensor:
    """(P,) whether pair i's two responses (rows 2i, 2i + 1) are the same token sequence: such a pair
    trains nothing (its DPO gradient is 0), even when a reward model scored its two copies a hair apart."""
    same_mask = (pairs.response_mask[0::2] == pairs.response_mask[1::2]).all(-1)
    same_ids = ((pairs.responses[0::2] == pairs.responses[1::2]) | ~pairs.response_mask[0::2]).all(-1)
    return same_mask & same_ids


def best_and_worst(scores: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores (P x G,) of P groups of G consecutive responses -> (P,) rows of each group's best- and
    worst-scored response (the first of equal ones) and (P,) whether they differ (a preference; all
    equal: a tie). A NaN score (a response self_reward's judge could not score) is never picked while
    another is scored; fewer than two scored responses is a tie. Worked: scores [1, 3, 2, 2] in groups
    of 2 -> best [1, 2], worst [0, 3], decisive [True, False]; [nan, 1, 3, nan] in one group -> best 2,
    worst 1, decisive True."""
    s = scores.view(-1, group_size)
    unscored = torch.isnan(s)
    base = torch.arange(s.shape[0], device=scores.device) * group_size
    top, best = s.masked_fill(unscored, -math.inf).max(dim=1)
    low, worst = s.masked_fill(unscored, math.inf).min(dim=1)
    decisive = top > low
    worst = torch.where(decisive, worst, (best + 1) % group_size)  # a tie: still two different rows
    return base + best, base + worst, decisive


# ---- sequence log-probs (reference pass and training forward) ---------------------------------------

def response_sums(model, pairs: Rollout, idx: torch.Tensor, c: OnlineConfig) -> torch.Tensor:
    """(len(idx),) log-probs of the responses of rows `idx` under `model`, summed over their tokens:
    the sequence log-probs of the DPO loss (reference pass and training forward alike)."""
    return masked_sum(rollout_logps(model, pairs, idx, c)[0], pairs.response_mask[idx], dim=1)


@torch.no_grad()
def sequence_logps_of(model, pairs: Rollout, micro_batches: list[torch.Tensor], c: OnlineConfig) -> torch.Tensor:
    """(2P,) `response_sums` of every response of `pairs` under `model`, in the training micro-batches
    (same packing and kernels as the training forward)."""
    out = torch.zeros(pairs.input_ids.shape[0], device=pairs.input_ids.device)
    for idx in micro_batches:
        out[idx] = response_sums(model, pairs, idx, c).float()
    return out


# ---- the loss of one micro-batch, the updates of one step --------------------------------------------

def pair_micro_loss(policy, pairs: Rollout, ref_logps: torch.Tensor, decisive: torch.Tensor, idx: torch.Tensor,
                    c: OnlineConfig, n_pairs: float, explore: torch.Tensor | None = None, alpha: float = 0.0,
                    n_prompts: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """The DPO loss of the pairs in micro-batch `idx` (rows of whole pairs: 2i chosen, 2i + 1 rejected),
    tied pairs weighted 0, divided by the untied pairs of the global minibatch (`n_pairs`), so the
    micro-batches of a minibatch on every process add up to the minibatch's mean loss.

    `explore` (xpo): (2P,) True on the row of each pair that holds the reference's response; XPO's
    exploration term alpha x sum(log pi(those responses)) / `n_prompts` (the pairs of the global
    minibatch, tied ones too) is added to the loss: alpha x the minibatch's mean log pi of the
    reference's responses."""
    logps = response_sums(policy, pairs, idx, c)
    n_tokens = pairs.response_mask[idx].sum(-1).float()
    is_chosen = idx % 2 == 0
    rows_c, rows_r = idx[is_chosen], idx[~is_chosen]
    if not torch.equal(rows_r, rows_c + 1):
        raise AssertionError("a micro-batch must hold whole pairs, chosen before rejected")
    p = PairLogps(logps[is_chosen], logps[~is_chosen], ref_logps[rows_c], ref_logps[rows_r],
                  n_tokens[is_chosen], n_tokens[~is_chosen])
    out = combined_loss(p, [c.loss_type], beta=c.beta, label_smoothing=c.label_smoothing)
    w = decisive[rows_c // 2].to(out.losses.dtype)
    loss = (out.losses * w).sum() / n_pairs

    def share(x: torch.Tensor) -> float:
        return ((x.detach().float() * w).sum() / n_pairs).item()

    margins = out.chosen_rewards - out.rejected_rewards
    stats = {"loss": loss.item(), "rewards/chosen": share(out.chosen_rewards),
             "rewards/rejected": share(out.rejected_rewards), "rewards/margins": share(margins),
             "rewards/accuracies": share((margins > 0).float()),
             "logps/chosen": share(p.chosen), "logps/rejected": share(p.rejected),
             "pairs/logratio": share((p.chosen_logratios + p.rejected_logratios) / 2)}
    if explore is not None:
        reference_logps = (explore[idx].to(logps.dtype) * logps).sum() / n_prompts
        exploration = alpha * reference_logps
        stats.update({"loss/dpo": stats["loss"], "loss/exploration": exploration.item(),
                      "logps/reference_response": reference_logps.item()})
        loss = loss + exploration
        stats["loss"] = loss.item()
    return loss, stats


def pair_updates(run, opt, policy, pairs: Rollout, ref_logps: torch.Tensor, decisive: torch.Tensor,
                 plan: list[list[torch.Tensor]], c: OnlineConfig, explore: torch.Tensor | None = None,
                 alpha: float = 0.0) -> dict[str, float]:
    """The DPO steps on one step's pairs: one optimizer step per minibatch of `plan` (micro-batches of
    whole pairs accumulated; `run_updates`), each micro-batch's loss its share of the mean over the
    minibatch's weighted pairs on every process (with `explore`, xpo's exploration term, its share of the
    mean over the minibatch's pairs). Returns the metric means over the updates."""
    policy.train()
    means, _ = run_updates(
        run, opt, [plan],
        micro_loss=lambda mb, n: pair_micro_loss(opt.wrapped, pairs, ref_logps, decisive, mb, c, n[0],
                                                 explore=explore, alpha=alpha, n_prompts=n[1]),
        counts=lambda r: [decisive[r[r % 2 == 0] // 2].sum().item(), (r % 2 == 0).sum().item()])
    policy.eval()
    return means
