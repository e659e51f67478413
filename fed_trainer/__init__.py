"""Federated fine-tuning with the Hugging Face Trainer."""

from fed_trainer.callbacks import FederatedCallback
from fed_trainer.config import FederatedConfig
from fed_trainer.partition import partition_dataset
from fed_trainer.strategies import (
    Capabilities,
    FedAvg,
    Strategy,
    available_strategies,
    get_strategy,
    register_strategy,
)
from fed_trainer.trainer import FederatedTrainer

__version__ = "0.1.0"

# TRL's trainers as clients; imported on first use, so the package imports without trl
_TRL_CLASSES = {
    "FederatedDPOConfig": "fed_trainer.dpo",
    "FederatedDPOTrainer": "fed_trainer.dpo",
    "FederatedSFTConfig": "fed_trainer.sft",
    "FederatedSFTTrainer": "fed_trainer.sft",
}


def __getattr__(name: str):
    if name in _TRL_CLASSES:
        import importlib

        try:
            module = importlib.import_module(_TRL_CLASSES[name])
        except ImportError as error:
            raise ImportError(
                f"fed_trainer.{name} needs TRL: pip install 'fed-trainer[trl]' (trl==1.16.0)."
            ) from error
        return getattr(module, name)
    raise AttributeError(f"module 'fed_trainer' has no attribute {name!r}")


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
