"""Aggregation strategies, one file per method, behind a registry."""

from fed_trainer.strategies.base import Strategy, TensorDict, tensor_bytes
from fed_trainer.strategies.fedavg import FedAvg
from fed_trainer.strategies.registry import available_strategies, get_strategy, register_strategy

__all__ = [
    "FedAvg",
    "Strategy",
    "TensorDict",
    "available_strategies",
    "get_strategy",
    "register_strategy",
    "tensor_bytes",
]
