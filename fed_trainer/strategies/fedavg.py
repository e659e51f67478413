"""FedAvg over full weights: W = sum_k p_k W_k (McMahan et al., 2017).

With `optim="galore_adamw"` the clients train with GaLore and this is "GaLore + FedAvg".
"""

from __future__ import annotations

from torch import nn

from fed_trainer.config import FederatedConfig
from fed_trainer.strategies.base import Strategy, TensorDict
from fed_trainer.strategies.registry import register_strategy


def trainable_state(model: nn.Module) -> TensorDict:
    """The live tensors clients can change: trainable parameters and floating-point buffers (e.g. BatchNorm stats).

    Frozen parameters are the same on every client, so they are neither sent nor averaged.
    """
    state = {name: p for name, p in model.named_parameters() if p.requires_grad}
    state.update({name: b for name, b in model.named_buffers() if b.is_floating_point()})
    return state


@register_strategy("fedavg")
class FedAvg(Strategy):
    """Weighted average of the clients' full weights; exact, uplink out*in per layer."""

    def setup(self, model: nn.Module, args: FederatedConfig) -> nn.Module:
        model = super().setup(model, args)
        self.global_state = {name: t.detach().clone() for name, t in trainable_state(model).items()}
        return model

    def server_message(self, client_id) -> TensorDict:
        return self.global_state

    def load_client(self, model: nn.Module, message: TensorDict, client_id) -> None:
        live = trainable_state(model)
        for name, value in message.items():
            live[name].data.copy_(value)

    def client_payload(self, model: nn.Module, client_id) -> TensorDict:
        return trainable_state(model)

    def finish_round(self, model: nn.Module) -> None:
        for name, value in self._sum.items():
            self.global_state[name].copy_(value)
        self.load_client(model, self.global_state, client_id=None)
