"""Aggregation strategies, one file per method, behind a registry. Every module of this package is imported here, so
a new method's file registers itself (`register_strategy`) without being named anywhere else."""

import importlib
import pkgutil

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

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "tables":  # the tables' command (python -m fed_trainer.strategies.tables), not a strategy
        importlib.import_module(f"{__name__}.{_module.name}")

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
