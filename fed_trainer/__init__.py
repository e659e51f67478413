"""Federated fine-tuning with the Hugging Face Trainer.

The names below are imported on first use (as transformers does), so that `import fed_trainer.<light module>`
(a Flower ClientApp that hands its messages to a warm node worker: `fed_trainer.flower.warm`) does not pay for
torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_MODULES = {
    "FederatedCallback": "fed_trainer.callbacks",
    "FederatedConfig": "fed_trainer.config",
    "partition_dataset": "fed_trainer.partition",
    "Capabilities": "fed_trainer.strategies",
    "FedAvg": "fed_trainer.strategies",
    "Strategy": "fed_trainer.strategies",
    "available_strategies": "fed_trainer.strategies",
    "get_strategy": "fed_trainer.strategies",
    "register_strategy": "fed_trainer.strategies",
    "FederatedTrainer": "fed_trainer.trainer",
}
# TRL's trainers as clients: the package imports without trl
_TRL_MODULES = {
    "FederatedDPOConfig": "fed_trainer.dpo",
    "FederatedDPOTrainer": "fed_trainer.dpo",
    "FederatedSFTConfig": "fed_trainer.sft",
    "FederatedSFTTrainer": "fed_trainer.sft",
}

if TYPE_CHECKING:
    from fed_trainer.callbacks import FederatedCallback
    from fed_trainer.config import FederatedConfig
    from fed_trainer.dpo import FederatedDPOConfig, FederatedDPOTrainer
    from fed_trainer.partition import partition_dataset
    from fed_trainer.sft import FederatedSFTConfig, FederatedSFTTrainer
    from fed_trainer.strategies import (
        Capabilities,
        FedAvg,
        Strategy,
        available_strategies,
        get_strategy,
        register_strategy,
    )
    from fed_trainer.trainer import FederatedTrainer


def _imported_on_first_use(namespace: dict, modules: dict[str, str]):
    """A package's `__getattr__` (PEP 562) that imports each name of `modules` from its module on first use and
    keeps it in the package's `namespace`, as an eager `from module import name` would: so a submodule of the same
    name (`fed_trainer.flower.server_app`), which its import binds to the package, does not shadow it."""

    def imported(name: str):
        if name not in modules:
            raise AttributeError(f"module {namespace['__name__']!r} has no attribute {name!r}")
        value = namespace[name] = getattr(importlib.import_module(modules[name]), name)
        return value

    return imported


_imported = _imported_on_first_use(globals(), _MODULES)


def __getattr__(name: str):
    if name in _TRL_MODULES:
        try:
            module = importlib.import_module(_TRL_MODULES[name])
        except ImportError as error:
            raise ImportError(
                f"fed_trainer.{name} needs TRL: pip install 'fed-trainer[trl]' (trl==1.16.0)."
            ) from error
        return getattr(module, name)
    return _imported(name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_MODULES, *_TRL_MODULES])


__all__ = [
    "Capabilities",
    "FedAvg",
    "FederatedCallback",
    "FederatedConfig",
    "FederatedDPOConfig",
    "FederatedDPOTrainer",
    "FederatedSFTConfig",
    "FederatedSFTTrainer",
    "FederatedTrainer",
    "Strategy",
    "available_strategies",
    "get_strategy",
    "partition_dataset",
    "register_strategy",
]
