"""Sampling from the geometric mixture of two causal LMs, token by token: Nash-MD's pi^beta (Munos et al.
2023, "Nash Learning from Human Feedback"), the policy regularised towards the reference,

    pi_mix(y_t | x, y_<t)  proportional to  pi(y_t | x, y_<t)^(1 - coef) * ref(y_t | x, y_<t)^coef

(the paper's sequence-level mixture is intractable; as in its experiments, it is taken per token). A
`GeometricMixture` is a model for `HFGenerator`: its forward runs both models on their own halves of one
KV cache (`new_cache`: the policy's layers, then the reference's), so the generator's shared prefill,
row dropping and column cutting apply to both at once, and returns the mixed log-probabilities as the
logits. The generator then applies the temperature to them: the mixture of the two tempered models.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import AbstractContextManager
from types import SimpleNamespace

import torch

from rlhfkit.rollout.generate import new_cache


class GeometricMixture(torch.nn.Module):
    """`policy` (a module) and `reference` (a context-manager factory yielding the reference model: a
    frozen copy, or the policy itself with its LoRA adapters disabled) mixed with weight `coef` on the
    reference (0: the policy, 1: the reference). Both must share the vocabulary (same logits width)."""

    def __init__(self, policy: torch.nn.Module, reference: Callable[[], AbstractContextManager], coef: float):
        super().__init__()
        if not 0.0 <= coef <= 1.0:
            raise ValueError(f"GeometricMixture: coef must be in [0, 1], got {coef}")
        self.policy = policy
        self.reference = reference
        self.coef = coef
        self.split = len(new_cache(policy).layers)
        with reference() as ref:
            widths = (policy.get_output_embeddings().weight.shape[0], ref.get_output_embeddings().weight.shape[0])
        if widths[0] != widths[1]:
            raise ValueError(f"GeometricMixture: the policy's logits have {widths[0]} entries and the reference's "
                             f"{widths[1]}: the two models must share the vocabulary")

    @property
    def config(self):
        return self.policy.config

    def train(self, mode: bool = True) -> "GeometricMixture":
        """The mixture only samples: `eval()` puts the policy into eval mode, `train()` never puts it into
        training mode (the generator restores the mode it found, which for a new module is training)."""
        self.training = mode
        if not mode:
            self.policy.eval()
        return self

    def new_cache(self):
        """One cache: the policy's layers, then the reference's."""
        cache = new_cache(self.policy)
        with self.reference() as ref:
            cache.layers = [*cache.layers, *new_cache(ref).layers]
        return cache

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                past_key_values, use_cache: bool = True, logits_to_keep: int = 0) -> SimpleNamespace:
        own, theirs = copy.copy(past_key_values), copy.copy(past_key_values)
        own.layers, theirs.layers = past_key_values.layers[:self.split], past_key_values.layers[self.split:]
        kw = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=use_cache,
                  logits_to_keep=logits_to_keep)
        mine = torch.log_softmax(self.policy(past_key_values=own, **kw).logits.float(), -1)
        with self.reference() as ref:  # run at every weight: both halves of the cache must be filled
            other = torch.log_softmax(ref(past_key_values=theirs, **kw).logits.float(), -1)
        if self.coef == 0 or self.coef == 1:  # one model alone (0 x a -inf log-prob of the other would be NaN)
            return SimpleNamespace(logits=other if self.coef == 1 else mine)
        return SimpleNamespace(logits=(1.0 - self.coef) * mine + self.coef * other)
