"""Masked reductions and whitening. A mask is True (or 1) on real tokens, everywhere in rlhfkit."""

from __future__ import annotations

import torch


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of `values` where `mask` is True."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() if dim is None else (values * mask).sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` where `mask` is True; 0 where the mask is empty."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    """Variance over the masked entries (biased by default, as in advantage whitening)."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        var = var * n / (n - 1).clamp(min=1)
    return var


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
           eps: float = 1e-8, stats: tuple[float, float] | None = None) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over masked entries (biased variance; RLHF_NOTES 20). With
    `shift_mean=False` the mean is added back (how OpenAI whitens rewards). Entries outside the
    mask are returned as 0. `stats`: (mean, var) computed elsewhere (e.g. over several processes)
    instead of from `values`."""
    if stats is None:
        mean, var = masked_mean(values, mask), masked_var(values, mask)
    else:
        mean, var = (torch.tensor(float(s), dtype=values.dtype, device=values.device) for s in stats)
    out = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out.masked_fill(~mask.bool(), 0.0)
