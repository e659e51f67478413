"""FlexLoRA (Bai et al., 2024): the server keeps the exact aggregated update and hands each client the best
rank-r_k approximation of it.

dW = sum_k p_k s_k B_k A_k is kept as stacked factors (exact, rank R = sum r_k); the global model is W0 + dW. Between
rounds the live model holds it in its base weights (its adapters have B = 0). Client k starts the next round from W0
plus U_k S_k V_k^T, the rank-r_k truncated SVD of dW, computed from the factors (`fed_trainer.lowrank`), split as
B = U sqrt(S/s_k), A = sqrt(S/s_k) V^T so that s_k B A equals it. In the first round each client starts from PEFT's
initialisation at its own rank. Uplink and downlink r_k(out+in) per layer.

W0 of the targeted layers is kept in host memory (under ZeRO-3, this rank's partitions of it) so that every client
restarts from it exactly; round checkpoints hold it too, so a resumed run continues exactly.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from fed_trainer.lowrank import truncated_svd_of_product
from fed_trainer.strategies.base import TensorDict
from fed_trainer.strategies.lora import StackedLoraStrategy, fold_into_base
from fed_trainer.strategies.registry import register_strategy
from fed_trainer.zero import own_part, whole, zero3_run


@register_strategy("flexlora")
class FlexLoRA(StackedLoraStrategy):
    """Keeps the exact global update sum p_k s_k B_k A_k; client k starts from its rank-r_k truncated SVD."""

    # dW lives as rank-R factors that the clients' SVDs are taken from; a server optimizer's step is dense (momentum
    # over rounds, entry-wise scaling), which those factors cannot hold
    capabilities = dataclasses.replace(StackedLoraStrategy.capabilities, server_optimizer=False)

    title = "FlexLoRA"
    paper = (
        "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and Client Resources",
        "2402.11505",
    )

    def setup(self, model: nn.Module, args, peft_configs: dict | None = None) -> nn.Module:
        model = super().setup(model, args, peft_configs)
        self.svd: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.update: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # dW by layer as (left, right)
        if not zero3_run(args):  # under ZeRO-3: from the partitions, once there are (`on_model_sharded`)
            self._take_origin()
        return model

    def on_model_sharded(self, model: nn.Module) -> None:
        super().on_model_sharded(model)
        self._take_origin()

    def _take_origin(self) -> None:
        self.origin = {name: w.detach().to("cpu", copy=True) for name, w in self.base_weights().items()}

    def _set_base(self, with_update: bool) -> None:
        """Base weights := W0, plus dW if `with_update`."""
        for name, weight in self.base_weights().items():
            weight.data.copy_(self.origin[name])
            if with_update and name in self.update:
                left, right = self.update[name]
                fold_into_base(self.layers[name], left @ right)

    def state_dict(self) -> dict:
        weights = {name: layer.get_base_layer().weight for name, layer in self.layers.items()}
        origin = {name: whole(shard.to(weights[name].device), weights[name]) for name, shard in self.origin.items()}
        return {**super().state_dict(), "svd": self.svd, "update": self.update, "origin": origin}

    def load_state_dict(self, model: nn.Module, state: dict, model_state: TensorDict) -> None:
        super().load_state_dict(model, state, model_state)
        self.svd, self.update = state["svd"], state["update"]
        for name, layer in self.layers.items():
            self.origin[name] = own_part(layer.get_base_layer().weight, state["origin"][name]).to("cpu", copy=True)

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

    def load_client(self, model: nn.Module, message: TensorDict, client_id) -> None:
        self._set_base(with_update=False)  # the client's adapter carries its share of dW
        super().load_client(model, message, client_id)

    def restore_global(self, model: nn.Module) -> None:
        super().restore_global(model)
        self._set_base(with_update=True)

    def finish_round(self, model: nn.Module) -> None:
        super().finish_round(model)
        for name in self.layers:
            self.update[name] = self.stacked(name)
            self.svd[name] = truncated_svd_of_product(*self.update[name], self.rank)
        self.restore_global(model)
