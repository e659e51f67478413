"""LoRA-FAIR (Bian et al., ICCV 2025): FedIT's averaged A and B, with a server-side correction of B.

The averages' product s B A misses the average of the clients' products M = sum_k p_k s B_k A_k (FedIT's
aggregation bias). The server keeps A and replaces B by B' = B + Delta B, the ridge least-squares fit of the
product to M:
    B' = argmin_X ||M - s X A||_F^2 + lam ||X - B||_F^2 = (M A^T / s + lam B) (A A^T + lam I)^{-1},
with lam = `ridge` * tr(A A^T) / r (scale-free; ridge 0 is the plain projection of M onto A's row space). The
clients start the next round from (B', A) (the paper's Avg-Initial). Not exact: what M holds outside A's row space
stays out, but the residual ||M - s B' A|| is never above FedIT's ||M - s B A||. The paper measures the fit with a
similarity S and a penalty lam ||Delta B|| solved iteratively; this is its Frobenius-norm, closed-form reading.
Messages are FedIT's (r(out + in) per layer both ways); the server holds one dense out x in sum per layer.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from fed_trainer.strategies.lora import (
    ADAPTER,
    LoraStrategy,
    ProductAveragingLora,
    factor_names,
    lora_factors,
    lora_parameters,
)
from fed_trainer.strategies.registry import register_strategy


@register_strategy("lora_fair")
class LoRAFAIR(ProductAveragingLora):
    """FedIT's averaged A and B, then B refitted so that s B A comes closest to sum_k p_k s B_k A_k."""

    title = "LoRA-FAIR"
    paper = ("LoRA-FAIR: Federated LoRA Fine-Tuning with Aggregation and Initialization Refinement", "2411.14961")
    # the correction needs every client's product (no robust rule picks one) and sets B after the average (no
    # server optimizer steps it); under ZeRO-3 the factors are partitions
    capabilities = dataclasses.replace(
        LoraStrategy.capabilities, robust_rules=False, zero3=False, server_optimizer=False, compressed_downlink=False
    )

    def __init__(self, ridge: float = 1e-3) -> None:  # FederatedConfig(strategy_kwargs={"ridge": 1e-2})
        super().__init__()
        if ridge < 0:
            raise ValueError(f"ridge must be at least 0, got {ridge}.")
        self.ridge = ridge

    def corrected_b(self, name: str) -> torch.Tensor:
        """B' of layer `name` (out x r, float32) from the averaged factors now in the layer and the round's M."""
        layer = self.layers[name]
        a, b = (t.float() for t in lora_factors(layer))
        gram = a @ a.T
        lam = self.ridge * gram.trace() / a.shape[0]
        target = self.average_product(name) / layer.scaling[ADAPTER]
        rhs = target @ a.T + lam * b  # out x r
        return torch.linalg.solve(gram + lam * torch.eye(a.shape[0], dtype=gram.dtype), rhs.T).T

    def finish_round(self, model: nn.Module) -> None:
        super().finish_round(model)  # FedIT: the live adapter and the global state hold the averages
        for name, layer in self.layers.items():
            _, live_b = lora_parameters(layer)
            live_b.data.copy_(self.corrected_b(name).reshape(live_b.shape).to(live_b.dtype))
            self.global_state[factor_names(name)[1]].copy_(live_b.detach())  # the global state follows B'
