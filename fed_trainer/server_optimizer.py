"""Server optimizers: one step the server takes on a round's update, whatever strategy produced it.

With x_t the global weights before round t and Delta_t = sum_k p_k (x_k - x_t) the strategy's aggregated update
(after clipping, robust rules and DP noise), the server sets x_{t+1} = x_t + u_t, with u_t:

- `fedavgm` (Hsu et al. 2019): m_t = beta m_{t-1} + Delta_t; u_t = eta m_t.
- `nesterov` (DiLoCo's outer step, torch's `SGD(nesterov=True)` on the outer gradient g_t = -Delta_t):
  b_t = mu b_{t-1} + g_t; u_t = -eta (g_t + mu b_t).
- `fedadam`, `fedyogi`, `fedadagrad` (Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2), with
  m_{-1} = 0, v_{-1} = tau^2 and no bias correction: m_t = beta1 m_{t-1} + (1 - beta1) Delta_t;
  Adagrad v_t = v_{t-1} + Delta_t^2; Yogi v_t = v_{t-1} - (1 - beta2) Delta_t^2 sign(v_{t-1} - Delta_t^2);
  Adam v_t = beta2 v_{t-1} + (1 - beta2) Delta_t^2; u_t = eta m_t / (sqrt(v_t) + tau).

Flower's FedAdam and FedYogi start v at 0 and add bias correction to Adam; OpenFedLLM's start v at tau^2 as here.
The state is float32, one set of buffers per stepped tensor, on that tensor's device; under DeepSpeed ZeRO-3 a
strategy steps each rank's partitions, so the state is partitioned the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from fed_trainer.config import FederatedConfig

SERVER_OPTIMIZERS = ("none", "fedavgm", "nesterov", "fedadam", "fedyogi", "fedadagrad")
MOMENTUM_RULES = ("fedavgm", "nesterov")
ADAPTIVE_RULES = ("fedadam", "fedyogi", "fedadagrad")
# eta when server_learning_rate is unset: plain averaging's 1 for FedAvgM, DiLoCo's 0.7 for its outer Nesterov, and
# for the adaptive rules, whose first step moves every entry by about eta, a step the size of a fine-tuning update
DEFAULT_LEARNING_RATES = {"fedavgm": 1.0, "nesterov": 0.7, "fedadam": 1e-3, "fedyogi": 1e-3, "fedadagrad": 1e-3}
DEFAULT_MOMENTUM = 0.9  # beta of FedAvgM, mu of DiLoCo


class ServerOptimizer:
    """The server's step on round updates, tensor by tensor (see the module docstring for the rules).

    Args:
        rule: one of `SERVER_OPTIMIZERS` other than "none".
        learning_rate: eta.
        momentum: beta (fedavgm) or mu (nesterov).
        betas: (beta1, beta2) of the adaptive rules (fedadagrad uses beta1 only).
        epsilon: tau of the adaptive rules.
    """

    def __init__(
        self, rule: str, learning_rate: float, momentum: float, betas: tuple[float, float], epsilon: float
    ) -> None:
        if rule not in SERVER_OPTIMIZERS[1:]:
            raise ValueError(f"server optimizer must be one of {SERVER_OPTIMIZERS[1:]}, got {rule!r}.")
        self.rule, self.learning_rate, self.momentum = rule, learning_rate, momentum
        self.beta1, self.beta2 = betas
        self.epsilon = epsilon
        self.state: dict[str, dict[str, torch.Tensor]] = {}  # tensor name -> its buffers ("m", "v")

    @classmethod
    def from_args(cls, args: FederatedConfig) -> ServerOptimizer | None:
        """The run's server optimizer, or None for `server_optimizer="none"` (the aggregate is the new model)."""
        if args.server_optimizer == "none":
            return None
        return cls(
            args.server_optimizer,
            args.server_learning_rate,
            args.server_momentum,
            tuple(args.server_betas),
            args.server_epsilon,
        )

    @torch.no_grad()
    def step(self, name: str, delta: torch.Tensor) -> torch.Tensor:
        """u_t for the tensor `name` from its round update `delta` (in float32, `delta`'s shape and device)."""
        delta = delta.float()
        buffers = self.state.setdefault(name, {})
        eta = self.learning_rate
        if self.rule == "fedavgm":
            m = buffers.setdefault("m", torch.zeros_like(delta))
            return m.mul_(self.momentum).add_(delta) * eta
        if self.rule == "nesterov":
            gradient = -delta
            b = buffers.setdefault("b", torch.zeros_like(delta))
            b.mul_(self.momentum).add_(gradient)
            return (gradient + self.momentum * b) * -eta
        m = buffers.setdefault("m", torch.zeros_like(delta))
        v = buffers.setdefault("v", torch.full_like(delta, self.epsilon**2))
        m.mul_(self.beta1).add_(delta, alpha=1 - self.beta1)
        square = delta * delta
        if self.rule == "fedadagrad":
            v.add_(square)
        elif self.rule == "fedyogi":
            v.sub_((1 - self.beta2) * square * torch.sign(v - square))
        else:
            v.mul_(self.beta2).add_(square, alpha=1 - self.beta2)
        return m * eta / (v.sqrt() + self.epsilon)

    def moved(self, name: str, current: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The new value of tensor `name`, now `current`, whose clients' aggregate is `target`: current + u_t with
        Delta_t = target - current (float32)."""
        current = current.float()
        return current + self.step(name, target.float() - current)

    def state_dict(self, whole: Callable[[str, torch.Tensor], torch.Tensor] = lambda name, t: t) -> dict:
        """The buffers by tensor name, each passed through `whole(name, tensor)` (a strategy under ZeRO-3 gathers
        its partitions there)."""
        return {name: {k: whole(name, t) for k, t in buffers.items()} for name, buffers in self.state.items()}

    def load_state_dict(
        self, state: dict, part: Callable[[str, torch.Tensor], torch.Tensor] = lambda name, t: t
    ) -> None:
        """Restore `state_dict()`'s buffers, each passed through `part(name, tensor)` (this rank's partition)."""
        self.state = {name: {k: part(name, t).float().clone() for k, t in b.items()} for name, b in state.items()}
