"""The clients of a run: their datasets, and the LoRA config each trains with."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from datasets import Dataset
from transformers.utils import logging

from fed_trainer.partition import partition_dataset

if TYPE_CHECKING:
    from fed_trainer.config import FederatedConfig

logger = logging.get_logger(__name__)


class RemoteClient:
    """Stands for a client's dataset on a machine that does not hold it: only its size is known (the server
    weights clients by it; a SuperNode needs the whole roster to rank its own client among the others)."""

    def __init__(self, num_examples: int) -> None:
        self.num_examples = int(num_examples)

    def __len__(self) -> int:
        return self.num_examples

    def __repr__(self) -> str:
        return f"RemoteClient({self.num_examples} examples)"

    def split(self, fraction: float) -> tuple[RemoteClient, RemoteClient]:
        """Stand-ins for the (train, held-out) parts that `Dataset.train_test_split(test_size=fraction)` makes of
        the client's data where it is (the held-out part: ceil(fraction * n) examples)."""
        held_out = math.ceil(fraction * self.num_examples)
        return RemoteClient(self.num_examples - held_out), RemoteClient(held_out)


def client_datasets_from(args: FederatedConfig, client_datasets, train_dataset) -> dict[object, Dataset]:
    """Client id -> dataset, from `client_datasets` (list or dict) or by partitioning `train_dataset`; sets
    `args.num_clients` to their number."""
    if client_datasets is None:
        if train_dataset is None:
            raise ValueError("FederatedTrainer needs client_datasets, or a train_dataset to partition.")
        client_datasets = partition_dataset(
            train_dataset,
            args.num_clients,
            method=args.partition,
            alpha=args.partition_alpha,
            label_column=args.partition_label_column,
            seed=args.seed,
        )
    if isinstance(client_datasets, Mapping):
        clients = dict(client_datasets)
    elif isinstance(client_datasets, Sequence):
        clients = dict(enumerate(client_datasets))
    else:
        raise TypeError(f"client_datasets must be a list or a dict of datasets, got {type(client_datasets)}.")
    if not clients:
        raise ValueError("client_datasets is empty: give at least one client.")
    empty = [cid for cid, ds in clients.items() if len(ds) == 0]
    if empty:
        raise ValueError(f"Clients {empty} have no examples: drop them from client_datasets.")
    if len(clients) != args.num_clients:
        logger.info(f"Training {len(clients)} clients from client_datasets (args.num_clients={args.num_clients}).")
    args.num_clients = len(clients)
    if args.clients_per_round is not None and args.clients_per_round > len(clients):
        raise ValueError(
            f"clients_per_round={args.clients_per_round} exceeds the {len(clients)} clients given; lower "
            "clients_per_round."
        )
    return clients


def client_lora_configs(ids: list, peft_config, client_peft_configs) -> dict | None:
    """One `LoraConfig` per client id, or None without LoRA."""
    if peft_config is None and client_peft_configs is None:
        return None
    if client_peft_configs is None:
        return dict.fromkeys(ids, peft_config)
    if isinstance(client_peft_configs, Mapping):
        missing = [cid for cid in ids if cid not in client_peft_configs]
        if missing:
            raise ValueError(f"client_peft_configs has no LoraConfig for clients {missing}.")
        return {cid: client_peft_configs[cid] for cid in ids}
    if peft_config is None:
        raise ValueError("client_peft_configs given as ranks needs peft_config, the LoraConfig they apply to.")
    if len(client_peft_configs) != len(ids):
        raise ValueError(f"client_peft_configs lists {len(client_peft_configs)} ranks for {len(ids)} clients.")
    return {cid: dataclasses.replace(peft_config, r=int(r)) for cid, r in zip(ids, client_peft_configs)}
