"""Fed-SB (Singhal et al., 2025): LoRA's B and A fixed and shared, clients train an r x r matrix R between them.

A targeted layer's weight is W0 + s B R A. B (out x r) and A (r x in) are the same on every client and the server,
computed once from the pretrained weight by every party alike (nothing to send): the rank-r truncated SVD
W0 = U S V^T gives B = U_r S_r and A = V_r^T (LoRA-XS's initialisation, arXiv 2405.17604). R starts at zero, so the
run starts from the pretrained model. Clients train only R (and the heads); the server averages R with weights
p_k, which is exact: sum_k p_k (W0 + s B R_k A) = W0 + s B (sum_k p_k R_k) A. Uplink and downlink: r^2 numbers per
layer, whatever the layer's size.

The Fed-SB paper initialises B, A and R with LoRA-SB (arXiv 2411.19557) instead: the truncated SVD of an
approximation of full fine-tuning's first step, -lr sign(sum of the gradients over a few examples), with R = S_r,
which needs every client's dense gradient once before training; that initialisation is not implemented here yet.

R sits inside PEFT's LoRA layer: the adapter's A module keeps A (frozen) and R (trainable) and presents their product
R A as its `weight`, so PEFT's forward and merge compute s B (R A) unchanged, and `merged_model()` is PEFT's merge.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from fed_trainer.strategies.lora import ADAPTER, LoraStrategy
from fed_trainer.strategies.registry import register_strategy


class RotatedDown(nn.Module):
    """LoRA's A module with a trainable r x r R after the frozen A: x -> R A x; `weight` is R A (r x in)."""

    def __init__(self, a: torch.Tensor) -> None:
        super().__init__()
        self.A = nn.Parameter(a, requires_grad=False)
        self.R = nn.Parameter(torch.zeros(a.shape[0], a.shape[0], dtype=a.dtype, device=a.device))

    @property
    def weight(self) -> torch.Tensor:
        return self.R @ self.A

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.A), self.R)


@register_strategy("fed_sb")
class FedSB(LoraStrategy):
    """LoRA's B and A fixed from the pretrained weight's SVD, only the r x r R trained and averaged: exact, r^2 per
    layer each way."""

    title = "Fed-SB"
    paper = ("Fed-SB: A Silver Bullet for Extreme Communication Efficiency and Performance in (Private) Federated "
             "LoRA Fine-Tuning", "2502.15436")  # fmt: skip
    # the SVD needs each whole base weight in full precision: not under ZeRO-3 partitions, nor of a 4/8-bit base
    capabilities = dataclasses.replace(LoraStrategy.capabilities, exact=True, zero3=False, reads_base=True)

    def prepare_adapter(self, model: nn.Module) -> None:
        for layer in self.layers.values():
            weight = layer.get_base_layer().weight.detach().float()
            if getattr(layer, "fan_in_fan_out", False):  # GPT-2's Conv1D stores in x out
                weight = weight.T
            if weight.dim() != 2:
                raise ValueError("strategy 'fed_sb' supports Linear (and Conv1D) layers only, not convolutions.")
            u, s, vh = torch.linalg.svd(weight, full_matrices=False)
            b_param = layer.lora_B[ADAPTER].weight
            a_old = layer.lora_A[ADAPTER].weight
            r = a_old.shape[0]
            with torch.no_grad():
                b_param.copy_((u[:, :r] * s[:r]).to(b_param.dtype))
            b_param.requires_grad_(False)
            layer.lora_A[ADAPTER] = RotatedDown(vh[:r].to(device=a_old.device, dtype=a_old.dtype).contiguous())
