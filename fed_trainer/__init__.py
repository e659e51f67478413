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

__all__ = [
    "Capabilities",
    "FedAvg",
    "FederatedCallback",
    "FederatedConfig",
    "FederatedTrainer",
    "Strategy",
    "available_strategies",
    "get_strategy",
    "partition_dataset",
    "register_strategy",
]
