"""Aggregation strategies, one file per method, behind a registry."""

from fed_trainer.strategies.base import Strategy, TensorDict, tensor_bytes
from fed_trainer.strategies.capabilities import Capabilities
from fed_trainer.strategies.fedavg import FedAvg
from fed_trainer.strategies.fedex_lora import FedExLoRA
from fed_trainer.strategies.fedit import FedIT
from fed_trainer.strategies.ffa_lora import FFALoRA
from fed_trainer.strategies.flexlora import FlexLoRA
from fed_trainer.strategies.flora import FLoRA
from fed_trainer.strategies.galore_lowrank import GaLoreLowRank
from fed_trainer.strategies.galore_shared import GaLoreShared
from fed_trainer.strategies.lora import LoraStrategy
from fed_trainer.strategies.registry import available_strategies, get_strategy, register_strategy
from fed_trainer.strategies.scaffold import Scaffold

__all__ = [
    "Capabilities",
    "FFALoRA",
    "FLoRA",
    "FedAvg",
    "FedExLoRA",
    "FedIT",
    "FlexLoRA",
    "GaLoreLowRank",
    "GaLoreShared",
    "LoraStrategy",
    "Scaffold",
    "Strategy",
    "TensorDict",
    "available_strategies",
    "get_strategy",
    "register_strategy",
    "tensor_bytes",
]
