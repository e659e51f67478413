"""The base class every aggregation strategy derives from."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import nn

from fed_trainer.config import FederatedConfig

TensorDict = dict[str, torch.Tensor]


def tensor_bytes(tensors: TensorDict) -> int:
    """Bytes needed to send `tensors` as they are (numel x element size, summed)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


class Strategy(ABC):
    """One federated aggregation method.

    A strategy answers four questions, one hook each:

    1. `server_message` + `load_client`: how a client's model is prepared from the global state;
    2. `client_payload`: what a client sends back after local training;
    3. `aggregate`: how payloads are combined, called once per client with its weight p_k (a running
       weighted sum, so memory does not grow with the number of clients);
    4. `finish_round`: how the aggregate becomes the new global state (and the live model).

    The trainer counts the bytes of every `server_message` and `client_payload` as the traffic of a round.
    """

    name: ClassVar[str]
    uses_lora: ClassVar[bool] = False

    def __init__(self) -> None:
        self.args: FederatedConfig | None = None
        self._sum: TensorDict | None = None

    def setup(self, model: nn.Module, args: FederatedConfig, peft_configs: dict | None = None) -> nn.Module:
        """Called once with the initial global model (and LoRA strategies' per-client `LoraConfig`s).

        Returns the model to train (a LoRA strategy wraps it in a `PeftModel`).
        """
        self.args = args
        return model

    @abstractmethod
    def server_message(self, client_id) -> TensorDict:
        """The tensors the server sends to `client_id` at the start of a round."""

    @abstractmethod
    def load_client(self, model: nn.Module, message: TensorDict, client_id) -> None:
        """Make `model` the client's starting model from the server's `message`."""

    @abstractmethod
    def client_payload(self, model: nn.Module, client_id) -> TensorDict:
        """The tensors the client sends back after local training."""

    @abstractmethod
    def finish_round(self, model: nn.Module) -> None:
        """Turn the aggregate of this round into the new global state and load it into `model`."""

    def begin_round(self, round_number: int) -> None:
        """Called with the round number (from 1) before the round's first client; zeroes the running aggregate."""
        if self._sum is not None:
            for t in self._sum.values():
                t.zero_()

    def aggregate(self, payload: TensorDict, weight: float, client_id=None) -> None:
        """Add `weight * payload` to the running sum, in float32 whatever the payload's dtype."""
        if self._sum is None:
            self._sum = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in payload.items()}
        for k, v in payload.items():
            self._sum[k].add_(v.detach(), alpha=weight)

    def merged_model(self, model: nn.Module) -> nn.Module:
        """The global model as a plain transformers model (strategies with adapters fold them in)."""
        return model
