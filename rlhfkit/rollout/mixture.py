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
        mine = self.policy(past_key_values=own, **kw).logits.float()
        with self.reference() as ref:
            other = ref(past_key_values=theirs, **kw).logits.float()
        mixed = (1.0 - self.coef) * torch.log_softmax(mine, -1) + self.coef * torch.log_softmax(other, -1)
        return SimpleNamespace(logits=mixed)
