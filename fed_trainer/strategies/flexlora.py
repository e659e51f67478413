"""FlexLoRA (Bai et al., 2024): the server keeps the exact aggregated update and hands each client the best
rank-r_k approximation of it.

dW = sum_k p_k s_k B_k A_k is kept as stacked factors (exact, rank R = sum r_k); the global model is W0 + dW.
Client k starts the next round from U_k S_k V_k^T, the rank-r_k truncated SVD of dW, computed from the factors
(`fed_trainer.lowrank`), split as B = U sqrt(S/s_k), A = sqrt(S/s_k) V^T so that s_k B A equals it. In the first
round each client starts from PEFT's initialisation at its own rank. Uplink and downlink r_k(out+in) per layer.
"""

from __future__ import annotations

import torch
from torch import nn

from fed_trainer.lowrank import truncated_svd_of_product
from fed_trainer.strategies.base import TensorDict
from fed_trainer.strategies.lora import StackedLoraStrategy, lora_factors
from fed_trainer.strategies.registry import register_strategy


@register_strategy("flexlora")
class FlexLoRA(StackedLoraStrategy):
    def setup(self, model: nn.Module, args, peft_configs: dict | None = None) -> nn.Module:
        model = super().setup(model, args, peft_configs)
        self.svd: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        return model

    def state_dict(self) -> dict:
        return {**super().state_dict(), "svd": self.svd}

    def load_state_dict(self, model: nn.Module, state: dict, model_state: TensorDict) -> None:
        super().load_state_dict(model, state, model_state)
        self.svd = state["svd"]
        if self.svd:
            self.global_factors = {
                name: (*(t.clone() for t in lora_factors(layer)), 1.0) for name, layer in self.layers.items()
            }

    def server_message(self, client_id) -> TensorDict:
        message = super().server_message(client_id)
        if not self.svd:  # first round: no update yet, the client starts LoRA afresh
            return message
        r, scaling = self.client_configs[client_id].r, self.scaling(client_id)
        fresh = None
        factors = {}
        for name, (u, s, vh) in self.svd.items():
            k = int((s[:r] > 0).sum())
            root = (s[:k] / scaling).sqrt()
            b, a = u[:, :k] * root, root[:, None] * vh[:k]
            if k < r:
                # dW has fewer than r nonzero directions: fill the rest as PEFT initialises LoRA (A random, B zero),
                # which leaves s B A unchanged; directions zero in both factors would get no gradient, ever.
                fresh = fresh or self.fresh_factors(client_id)
                fresh_a, fresh_b = fresh[name]
                a = torch.cat([a, fresh_a[k:]])
                b = torch.cat([b, fresh_b[:, k:]], dim=1)
            factors[name] = (a, b)
        return {**message, **self.factor_message(factors)}

    def finish_round(self, model: nn.Module) -> None:
        super().finish_round(model)
        max_rank = max(config.r for config in self.client_configs.values())
        for name in self.layers:
            left, right = self.stacked(name)
            self.svd[name] = truncated_svd_of_product(left, right, max_rank)
            # The live model holds the exact global model: an adapter of rank R with scaling 1.
            self.global_factors[name] = (right, left, 1.0)
        self.load_global_factors()
