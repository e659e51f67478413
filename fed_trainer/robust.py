"""Robust aggregation rules over client tensors: coordinate-wise median and trimmed mean (Yin et al., 2018),
and update-norm clipping. They use no client weights: a rule meant to bound one client's influence cannot let
that client's own claim (its number of examples) decide it."""

from __future__ import annotations

import math

import torch

from fed_trainer.distributed import all_reduce_scalar

TensorDict = dict[str, torch.Tensor]


def coordinate_median(stack: torch.Tensor) -> torch.Tensor:
    """The median over dim 0 of each coordinate (the mean of the two middle values for an even count)."""
    ordered = stack.sort(dim=0).values
    k = stack.shape[0]
    return ordered[(k - 1) // 2 : k // 2 + 1].mean(dim=0)


def trimmed_mean(stack: torch.Tensor, fraction: float) -> torch.Tensor:
    """The mean over dim 0 of each coordinate after cutting the floor(fraction * K) largest and smallest values."""
    k = stack.shape[0]
    cut = math.floor(fraction * k)
    return stack.sort(dim=0).values[cut : k - cut].mean(dim=0)


def robust_aggregate(payloads: list[TensorDict], rule: str, trim_fraction: float = 0.1) -> TensorDict:
    """Combine the clients' tensors entry by entry with `rule` ('median' or 'trimmed_mean')."""
    combine = coordinate_median if rule == "median" else lambda s: trimmed_mean(s, trim_fraction)
    return {name: combine(torch.stack([p[name] for p in payloads])) for name in payloads[0]}


def clipped(payload: TensorDict, reference: TensorDict, max_norm: float, sharded: bool = False) -> TensorDict:
    """`payload` with its update `payload - reference` scaled to an L2 norm (over all tensors) of at most
    `max_norm`; returned unchanged when already within. `sharded`: each rank holds a shard of every tensor (ZeRO-3),
    so the squared norm is summed over the ranks."""
    deltas = {name: value.detach().float() - reference[name].float() for name, value in payload.items()}
    squared = sum(float((d * d).sum()) for d in deltas.values())
    norm = math.sqrt(all_reduce_scalar(squared) if sharded else squared)
    if norm <= max_norm:
        return payload
    scale = max_norm / norm
    return {name: reference[name].float() + delta * scale for name, delta in deltas.items()}
