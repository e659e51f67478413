"""What the two sides of a Flower federation share: how a client's data is stood for where it is not, and how
tensors travel in Flower records."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import torch
from flwr.app import ArrayRecord, Context

from fed_trainer.round import ClientPlan
from fed_trainer.trainer import FederatedTrainer

# build_trainer(context, client_datasets) -> FederatedTrainer, as the simulation script builds it
TrainerBuilder = Callable[[Context, Mapping], FederatedTrainer]


class RemoteClient:
    """Stands for a client's dataset on a machine that does not hold it: only its size is known (the server
    weights clients by it; a SuperNode needs the whole roster to rank its own client among the others)."""

    def __init__(self, num_examples: int) -> None:
        self.num_examples = int(num_examples)

    def __len__(self) -> int:
        return self.num_examples

    def __repr__(self) -> str:
        return f"RemoteClient({self.num_examples} examples)"


def tensor_record(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Tensors as an `ArrayRecord` (detached CPU copies: a payload may be a view of the live model)."""
    return ArrayRecord({name: t.detach().to("cpu", copy=True).contiguous() for name, t in tensors.items()})


PLAN_PREFIX = "plan-"


def plan_entries(plan: ClientPlan) -> dict:
    """A client's `ClientPlan` as `ConfigRecord` entries (`plan-<field>`); `plan_from` reads them back."""
    return {PLAN_PREFIX + name: value for name, value in dataclasses.asdict(plan).items()}


def plan_from(config: Mapping) -> ClientPlan:
    """The `ClientPlan` in a config record written with `plan_entries`."""
    return ClientPlan(**{field.name: config[PLAN_PREFIX + field.name] for field in dataclasses.fields(ClientPlan)})


def roster(trainer: FederatedTrainer) -> dict:
    """Every client id of the run and its number of examples, as `ConfigRecord` values."""
    ids = list(trainer.client_datasets)
    return {"client-ids": ids, "client-sizes": [len(trainer.client_datasets[cid]) for cid in ids]}
