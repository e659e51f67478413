"""RoLoRA (Chen et al., 2024): clients train LoRA's B in odd rounds and A in even rounds, the other factor frozen.

With the frozen factor the same on every client, each round's average is the average of the clients' products:
sum_k p_k s B_k A = s (sum_k p_k B_k) A in a B round, sum_k p_k s B A_k = s B (sum_k p_k A_k) in an A round, so the
aggregation is exact (unlike FedIT's), while both factors keep learning (unlike FFA-LoRA's, whose A never moves).
B trains first: with B = 0 at the start, A's gradient is zero. Downlink: both factors (r (in + out) per layer, a
client keeps nothing between rounds); uplink: the round's factor (r out or r in per layer). Heads and other trainable
tensors are averaged every round.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from fed_trainer.strategies.base import TensorDict, trainable_state
from fed_trainer.strategies.lora import LoraStrategy, factor_names, lora_parameters
from fed_trainer.strategies.registry import register_strategy


@register_strategy("rolora")
class RoLoRA(LoraStrategy):
    """LoRA B trained and averaged in odd rounds, A in even rounds (the other frozen): exact, uplink r*out or r*in."""

    title = "RoLoRA"
    paper = ("Robust Federated Finetuning of LLMs via Alternating Optimization of LoRA", "2409.02346")
    # A DeepSpeed engine's optimizer is built once over the parameters trainable then: it cannot follow the factors.
    # A server optimizer would keep each factor's state across the rounds that do not train it, a step rule on the
    # merged weights that no paper defines: refused.
    capabilities = dataclasses.replace(LoraStrategy.capabilities, exact=True, zero3=False, server_optimizer=False)

    def trains_b(self, round_number: int) -> bool:
        """Whether round `round_number` trains B (odd rounds) rather than A (even rounds)."""
        return round_number % 2 == 1

    def averaged_state(self, model: nn.Module) -> TensorDict:
        """Both factors of every LoRA layer, frozen or not, and the other trainable tensors (the heads)."""
        state, params = trainable_state(model), dict(model.named_parameters())
        for layer in self.layers:
            for name in factor_names(layer):
                state.setdefault(name, params[name])
        return state

    def begin_round(self, round_number: int) -> None:
        self._sum = None  # the running sum is rebuilt from the first payload: its keys change with the factor
        super().begin_round(round_number)
        b_round = self.trains_b(round_number)
        for layer in self.layers.values():
            a, b = lora_parameters(layer)
            a.requires_grad_(not b_round)
            b.requires_grad_(b_round)

    def client_payload(self, model: nn.Module, client_id) -> TensorDict:
        frozen_index = 0 if self.trains_b(self.round_number) else 1  # factor_names: (A, B)
        frozen = {factor_names(layer)[frozen_index] for layer in self.layers}
        return {name: t for name, t in super().client_payload(model, client_id).items() if name not in frozen}
