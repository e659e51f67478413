"""What the two sides of a Flower federation share: how a client's data is stood for where it is not, and how
tensors travel in Flower records."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict

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


@dataclasses.dataclass(frozen=True)
class TrainOrder:
    """What a train message tells a SuperNode beside the tensors: the round, the client to train, its `ClientPlan`,
    and the run's roster (every client id and its number of examples). `record()` writes it as a `ConfigRecord`,
    `read(config)` reads it back: the one place its entries are named."""

    round: int
    client_id: object
    plan: ClientPlan
    sizes: dict

    def record(self) -> ConfigRecord:
        plan = {PLAN_PREFIX + name: value for name, value in dataclasses.asdict(self.plan).items()}
        ids = list(self.sizes)
        roster = {"client-ids": ids, "client-sizes": [self.sizes[cid] for cid in ids]}
        return ConfigRecord({"round": self.round, "client-id": self.client_id, **plan, **roster})

    @classmethod
    def read(cls, config: Mapping) -> TrainOrder:
        plan = ClientPlan(**{f.name: config[PLAN_PREFIX + f.name] for f in dataclasses.fields(ClientPlan)})
        sizes = dict(zip(config["client-ids"], config["client-sizes"], strict=True))
        return cls(config["round"], config["client-id"], plan, sizes)


def roster(trainer: FederatedTrainer) -> dict:
    """Every client id of the run and its number of examples."""
    return {cid: len(dataset) for cid, dataset in trainer.client_datasets.items()}


def introduction(client_id, num_examples: int) -> RecordDict:
    """A SuperNode's answer to the server's roster query: its client's id and size (`introduced` reads it)."""
    return RecordDict({"client": ConfigRecord({"client-id": client_id, "num-examples": int(num_examples)})})


def introduced(content: RecordDict) -> tuple[object, int]:
    """The client id and size in a reply written by `introduction`."""
    client = content["client"]
    return client["client-id"], int(client["num-examples"])


def train_result(payload: Mapping[str, torch.Tensor], loss: float, num_examples: int) -> RecordDict:
    """A SuperNode's reply to a train message: the strategy's payload and the client's train loss (`trained` reads
    it)."""
    metrics = MetricRecord({"train-loss": float(loss), "num-examples": int(num_examples)})
    return RecordDict({"arrays": tensor_record(payload), "metrics": metrics})


def trained(content: RecordDict) -> tuple[dict, float]:
    """The payload and train loss in a reply written by `train_result`."""
    return content["arrays"].to_torch_state_dict(), float(content["metrics"]["train-loss"])
