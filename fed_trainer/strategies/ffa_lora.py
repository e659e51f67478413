"""FFA-LoRA (Sun et al., 2024): LoRA A frozen and identical everywhere, only B trained and averaged.

With one A for all, sum_k p_k (W0 + s B_k A) = W0 + s (sum_k p_k B_k) A: averaging B is exact. A is drawn from
`args.seed` (never sent); uplink r*out per layer.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from fed_trainer.strategies.lora import LoraStrategy, kaiming_like, lora_parameters
from fed_trainer.strategies.registry import register_strategy


@register_strategy("ffa_lora")
class FFALoRA(LoraStrategy):
    """A frozen and the same on every client (drawn from the seed), B averaged: exact, uplink r*out per layer."""

    title = "FFA-LoRA"
    capabilities = dataclasses.replace(LoraStrategy.capabilities, exact=True)  # one A for all: B's mean is exact
    paper = ("Improving LoRA in Privacy-preserving Federated Learning", "2403.12313")

    def prepare_adapter(self, model: nn.Module) -> None:
        generator = torch.Generator().manual_seed(self.args.seed)
        for layer in self.layers.values():
            a, _ = lora_parameters(layer)
            a.data.copy_(kaiming_like(a.flatten(1), generator).reshape(a.shape))
            a.requires_grad_(False)
