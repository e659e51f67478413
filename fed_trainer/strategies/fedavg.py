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
    """Weighted average of the clients' trainable weights; exact, uplink out*in per layer.

    Subclasses narrow what is averaged with `averaged_state` and add their own tensors around it.
    """

    def averaged_state(self, model: nn.Module) -> TensorDict:
        """The live tensors that are sent both ways and averaged with weights p_k."""
        return trainable_state(model)

    def setup(self, model: nn.Module, args: FederatedConfig, peft_configs: dict | None = None) -> nn.Module:
        model = super().setup(model, args)
        self.global_state = {name: t.detach().clone() for name, t in self.averaged_state(model).items()}
        return model

    def server_message(self, client_id) -> TensorDict:
        return dict(self.global_state)

    def load_client(self, model: nn.Module, message: TensorDict, client_id) -> None:
        """Copy the averaged tensors of `message` into `model` (other entries are the subclass's to load)."""
        live = self.averaged_state(model)
        for name, value in message.items():
            if name in live:
                live[name].data.copy_(value)

    def client_payload(self, model: nn.Module, client_id) -> TensorDict:
        return self.averaged_state(model)

    def finish_round(self, model: nn.Module) -> None:
        for name, value in self.global_state.items():
            value.copy_(self._sum[name])
        FedAvg.load_client(self, model, self.global_state, client_id=None)
