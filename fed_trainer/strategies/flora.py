"""FLoRA (Wang et al., 2024): stack the clients' LoRA products into the base weight, then start LoRA afresh.

W0 += [s_1 p_1 B_1, ..., s_K p_K B_K] [A_1; ...; A_K] = sum_k p_k s_k B_k A_k, exact for any mix of ranks. Each
round every client starts from new factors at its own rank (A kaiming-uniform, seeded per round and client; B
zero). Uplink r_k(out+in) per layer; the downlink carries the stacked factors of the previous round.
"""

from __future__ import annotations

from torch import nn

from fed_trainer.strategies.base import TensorDict
from fed_trainer.strategies.lora import StackedLoraStrategy, fold_into_base
from fed_trainer.strategies.registry import register_strategy


@register_strategy("flora")
class FLoRA(StackedLoraStrategy):
    def setup(self, model: nn.Module, args, peft_configs: dict | None = None) -> nn.Module:
        model = super().setup(model, args, peft_configs)
        self.stacks: TensorDict = {}
        self.clear_adapters()
        return model

    def state_dict(self) -> dict:
        return {**super().state_dict(), "stacks": self.stacks}

    def load_state_dict(self, model: nn.Module, state: dict, model_state: TensorDict) -> None:
        super().load_state_dict(model, state, model_state)
        self.stacks = state["stacks"]

    def server_message(self, client_id) -> TensorDict:
        # The stacks are what a real client needs to fold the last round into its own base weight; in the
        # simulation the shared live model's base already holds them. No factors: each client starts afresh.
        return {**super().server_message(client_id), **self.stacks}

    def finish_round(self, model: nn.Module) -> None:
        super().finish_round(model)
        self.stacks = {}
        for name, layer in self.layers.items():
            left, right = self.stacked(name)
            fold_into_base(layer, left @ right)
            self.stacks.update({f"{name}.stack_left": left, f"{name}.stack_right": right})
        self.clear_adapters()
