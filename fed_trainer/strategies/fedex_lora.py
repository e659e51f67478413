"""FedEx-LoRA (Singhal et al., 2025): FedIT's averaged A and B plus the exact residual folded into W0.

R = sum_k p_k s B_k A_k - s B A (B, A the averages) is added to the frozen base weight, so the global model is
exactly sum_k p_k W_k. Uplink r(out+in) per layer; the downlink adds the dense base update (out*in).

With a server optimizer, each targeted layer's exact update Delta = sum_k p_k s B_k A_k - s B' A' (B', A' the
factors of the last global model) is stepped as one dense tensor: the layer becomes W0 + s B' A' + u(Delta), with
the averaged factors as its adapter and the rest folded into the base.
"""

from __future__ import annotations

import torch
from torch import nn

from fed_trainer.strategies.base import TensorDict
from fed_trainer.strategies.capabilities import Capabilities
from fed_trainer.strategies.keys import message_key
from fed_trainer.strategies.lora import ADAPTER, ProductAveragingLora, fold_into_base, is_lora_factor, lora_factors
from fed_trainer.strategies.registry import register_strategy


@register_strategy("fedex_lora")
class FedExLoRA(ProductAveragingLora):
    """FedIT's averaged factors, plus the residual sum p_k s B_k A_k - s B A folded into the base: exact."""

    paper = (
        "FedEx-LoRA: Exact Aggregation for Federated and Efficient Fine-Tuning of Foundation Models",
        "2410.09432",
    )

    title = "FedEx-LoRA"
    capabilities = Capabilities(
        lora=True, exact=True, zero3=True, undo_round=True, folds_into_base=True, server_optimizer=True
    )

    def stepped(self, name: str) -> bool:  # the factors are averaged; the server steps each layer's whole update
        return super().stepped(name) and not is_lora_factor(name)

    def server_message(self, client_id) -> TensorDict:
        message = super().server_message(client_id)
        if self.round_number > 1:  # the base weights have moved: clients need the dense residual
            message.update(self.base_message())
        return message

    def load_client(self, model: nn.Module, message: TensorDict, client_id) -> None:
        super().load_client(model, message, client_id)
        if (
            message_key(next(iter(self.layers)), "base") in message
        ):  # a client on its own machine takes the folded base
            self.load_base(message)  # (in the simulation, the live base itself: nothing changes)

    def finish_round(self, model: nn.Module) -> None:
        previous = self._global_products() if self.server_optimizer is not None else {}
        super().finish_round(model)
        for name, layer in self.layers.items():
            a, b = lora_factors(layer)  # now the averaged factors
            average = self.average_product(name)
            product = layer.scaling[ADAPTER] * (b.float() @ a.float())
            if name in previous:  # W0 + s B A + u(Delta) = (W0 + previous - s B A) + u(average - previous)
                fold_into_base(layer, previous[name] - product)
                fold_into_base(layer, average - previous[name], self.base_step(name))
            else:
                fold_into_base(layer, average - product)

    def _global_products(self) -> dict[str, torch.Tensor]:
        """s B A of the last global model's factors, by layer."""
        return {name: self._product(name, layer, self.global_state, layer.scaling[ADAPTER])
                for name, layer in self.layers.items()}  # fmt: skip
