"""A strategy written outside fed_trainer, as a user would write one: FedAvg with a damped server step.

The new global model moves only `damping` of the way from the last one to the clients' weighted average. This file
is the example of docs/methods.md ("Writing a strategy"); the contract tests run it like every built-in strategy.
"""

import torch
from torch import nn

from fed_trainer import Capabilities, FedAvg, register_strategy


@register_strategy("damped_fedavg")
class DampedFedAvg(FedAvg):
    """FedAvg whose server moves the global model `damping` of the way to the clients' weighted average."""

    title = "Damped FedAvg"
    capabilities = Capabilities(undo_round=True)  # not exact: it stops short of sum_k p_k W_k

    def __init__(self, damping: float = 0.5) -> None:  # FederatedConfig(strategy_kwargs={"damping": 0.3})
        super().__init__()
        if not 0 < damping <= 1:
            raise ValueError(f"damping must be in (0, 1], got {damping}.")
        self.damping = damping

    def finish_round(self, model: nn.Module) -> None:
        start = {name: t.clone() for name, t in self.global_state.items()}
        super().finish_round(model)  # global state and live model: the clients' weighted average
        for name, value in self.global_state.items():
            value.copy_(torch.lerp(start[name], value, self.damping))
        self.restore_global(model)  # the live model takes the damped global state
