"""What the two sides of a Flower federation share: how a client's data is stood for where it is not, and how
tensors travel in Flower records."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict

from fed_trainer.round import ClientPlan
from fed_trainer.trainer import FederatedTrainer

if TYPE_CHECKING:
    from fed_trainer.checkpoint import RunProgress

# build_trainer(context, client_datasets) -> FederatedTrainer, as the simulation script builds it
TrainerBuilder = Callable[[Context, Mapping], FederatedTrainer]


FLAT, LAYOUT, ALIGN = "flat", "layout", 16  # a record's two arrays; each tensor's bytes start at a multiple of ALIGN


def tensor_record(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Tensors as an `ArrayRecord` of two arrays: every tensor's bytes in one flat buffer, and its layout (name,
    dtype, shape and offset of each tensor, as JSON); `record_tensors` reads it back.

    Not one array per tensor: flwr 1.42 moves every array of a record as its own object, with a request per object
    and hop, so a message of a model's hundred-odd tensors pays mostly for round trips (docs/deployment.md). And
    flwr converts a tensor through numpy, which has no bfloat16.
    """
    layout, parts, offset = [], [], 0
    for name, tensor in tensors.items():
        raw = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        layout.append([name, str(tensor.dtype).removeprefix("torch."), list(tensor.shape), offset])
        padding = -raw.numel() % ALIGN
        parts += [raw, torch.zeros(padding, dtype=torch.uint8)]
        offset += raw.numel() + padding
    flat = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.uint8)
    described = json.dumps(layout).encode()
    return ArrayRecord({
        FLAT: Array(dtype="uint8", shape=(offset,), stype="raw", data=flat.numpy().tobytes()),
        LAYOUT: Array(dtype="json", shape=(len(described),), stype="raw", data=described),
    })  # fmt: skip


def record_tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """The tensors `tensor_record` wrote into `record`: views into one writable buffer, in their dtype and shape."""
    flat = torch.frombuffer(bytearray(record[FLAT].data), dtype=torch.uint8) if record[FLAT].data else None
    tensors = {}
    for name, dtype, shape, offset in json.loads(bytes(record[LAYOUT].data)):
        dtype = getattr(torch, dtype)
        size = math.prod(shape) * dtype.itemsize
        tensors[name] = (
            flat[offset : offset + size].view(dtype).reshape(shape) if size else torch.zeros(shape, dtype=dtype)
        )
    return tensors


def record_holds(record: ArrayRecord, tensors: Mapping[str, torch.Tensor]) -> bool:
    """Whether `record` (a `tensor_record`) holds exactly `tensors`: the same names in the same order, dtypes, shapes
    and bytes (compared tensor by tensor, without a second copy of the record)."""
    layout = json.loads(bytes(record[LAYOUT].data))
    if [entry[0] for entry in layout] != list(tensors):
        return False
    flat = record[FLAT].data
    for (_, dtype, shape, offset), tensor in zip(layout, tensors.values()):
        if dtype != str(tensor.dtype).removeprefix("torch.") or shape != list(tensor.shape):
            return False
        raw = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        if not np.array_equal(np.frombuffer(flat, dtype=np.uint8, count=raw.size, offset=offset), raw):
            return False
    return True


PLAN_PREFIX = "plan-"


def roster_entries(sizes: Mapping) -> dict:
    """The run's roster (client id -> number of examples) as config entries (`roster_from` reads them)."""
    ids = list(sizes)
    return {"client-ids": ids, "client-sizes": [sizes[cid] for cid in ids]}


def roster_from(config: Mapping) -> dict:
    return dict(zip(config["client-ids"], config["client-sizes"], strict=True))


KEPT_PREFIX = "kept-"


@dataclasses.dataclass(frozen=True)
class KeptRounds:
    """Which of the states a SuperNode kept for its client (`client_app.KeptStates`) a message starts from: those of
    the `federation` (a run and the runs that resumed it), written in `round` (the last round whose update from the
    client reached the server, aggregated or rejected for NaN/Inf; 0: none yet); and `saved_round`, that round as of
    the newest checkpoint, which a resumed run would ask for."""

    federation: str
    round: int
    saved_round: int

    @classmethod
    def of(cls, progress: RunProgress, client_id) -> KeptRounds:
        rounds, saved = progress.client_rounds, progress.saved_client_rounds
        return cls(progress.federation, rounds.get(client_id, 0), saved.get(client_id, 0))

    def entries(self) -> dict:
        return {KEPT_PREFIX + f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def read(cls, config: Mapping) -> KeptRounds:
        return cls(**{f.name: config[KEPT_PREFIX + f.name] for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class TrainOrder:
    """What a train message tells a SuperNode beside the tensors: the round, the client to train, its `ClientPlan`,
    the run's roster (every client id and its number of examples) and the client's `KeptRounds`. `record()` writes
    it as a `ConfigRecord`, `read(config)` reads it back: the one place its entries are named."""

    round: int
    client_id: object
    plan: ClientPlan
    sizes: dict
    kept: KeptRounds

    def record(self) -> ConfigRecord:
        plan = {PLAN_PREFIX + name: value for name, value in dataclasses.asdict(self.plan).items()}
        return ConfigRecord({"round": self.round, "client-id": self.client_id, **plan, **roster_entries(self.sizes),
                             **self.kept.entries()})  # fmt: skip

    @classmethod
    def read(cls, config: Mapping) -> TrainOrder:
        plan = ClientPlan(**{f.name: config[PLAN_PREFIX + f.name] for f in dataclasses.fields(ClientPlan)})
        return cls(config["round"], config["client-id"], plan, roster_from(config), KeptRounds.read(config))


@dataclasses.dataclass(frozen=True)
class EvalOrder:
    """What an evaluate message tells a SuperNode beside the global tensors: the round, the client to evaluate, the
    run's roster and the client's `KeptRounds` (`record()` / `read(config)`, as `TrainOrder`)."""

    round: int
    client_id: object
    sizes: dict
    kept: KeptRounds

    def record(self) -> ConfigRecord:
        return ConfigRecord({"round": self.round, "client-id": self.client_id, **roster_entries(self.sizes),
                             **self.kept.entries()})  # fmt: skip

    @classmethod
    def read(cls, config: Mapping) -> EvalOrder:
        return cls(config["round"], config["client-id"], roster_from(config), KeptRounds.read(config))


def roster(trainer: FederatedTrainer) -> dict:
    """Every client id of the run and its number of examples (training and held-out: as its node introduced it)."""
    held_out = trainer.client_eval_datasets
    return {cid: len(data) + len(held_out.get(cid, ())) for cid, data in trainer.client_datasets.items()}


def introduction(client_id, num_examples: int) -> RecordDict:
    """A SuperNode's answer to the server's roster query: its client's id and size (`introduced` reads it)."""
    return RecordDict({"client": ConfigRecord({"client-id": client_id, "num-examples": int(num_examples)})})


def introduced(content: RecordDict) -> tuple[object, int]:
    """The client id and size in a reply written by `introduction`."""
    client = content["client"]
    return client["client-id"], int(client["num-examples"])


SECONDS, STARTED_AT = "seconds-", "process-started-at"


def unprefixed(metrics: Mapping, prefix: str) -> dict[str, float]:
    """The entries of `metrics` whose name starts with `prefix`, by the rest of their name."""
    return {k[len(prefix) :]: float(v) for k, v in metrics.items() if k.startswith(prefix)}


def train_result(
    payload: Mapping[str, torch.Tensor],
    loss: float,
    learning_rate: float,
    num_examples: int,
    seconds: Mapping[str, float],
    started_at: float,
) -> RecordDict:
    """A SuperNode's reply to a train message: the strategy's payload, the client's train loss and its learning rate
    at its last step (`trained` reads them), and where the node's time went (`node_seconds` reads it): its phases,
    one after the other from `started_at` (the ClientApp process's start, seconds since the epoch)."""
    metrics = {"train-loss": float(loss), "learning-rate": float(learning_rate), "num-examples": int(num_examples),
               STARTED_AT: float(started_at)}  # fmt: skip
    metrics.update({SECONDS + phase: float(value) for phase, value in seconds.items()})
    return RecordDict({"arrays": tensor_record(payload), "metrics": MetricRecord(metrics)})


def node_seconds(content: RecordDict, sent_at: float, received_at: float) -> dict[str, float]:
    """Where the time went between the server's sending a train message (`sent_at`, seconds since the epoch) and
    its receiving the reply (`received_at`), by phase: the node's own (`train_result`), and the messaging on either
    side of them: "delivery" (to the ClientApp process's start) and "return" (from the node's last phase). Across
    machines the two include the offset of their clocks."""
    phases = unprefixed(content["metrics"], SECONDS)
    started_at = float(content["metrics"][STARTED_AT])
    ended_at = started_at + sum(phases[p] for p in ("start", "build", "update"))
    return {**phases, "delivery": started_at - sent_at, "return": received_at - ended_at}


def trained(content: RecordDict) -> tuple[dict, float, float]:
    """The payload, train loss and last learning rate in a reply written by `train_result`."""
    metrics = content["metrics"]
    return record_tensors(content["arrays"]), float(metrics["train-loss"]), float(metrics["learning-rate"])


OWN, PERSONALIZED = "own-", "personalized-"


def eval_result(scores: Mapping[str, float], personalized: Mapping[str, float]) -> RecordDict:
    """A SuperNode's reply to an evaluate message: its client's metrics, own and personalized (`evaluated` reads
    them)."""
    metrics = {OWN + name: float(v) for name, v in scores.items()}
    metrics.update({PERSONALIZED + name: float(v) for name, v in personalized.items()})
    return RecordDict({"metrics": MetricRecord(metrics)})


def evaluated(content: RecordDict) -> tuple[dict, dict]:
    """The client's own and personalized metrics in a reply written by `eval_result`."""
    return unprefixed(content["metrics"], OWN), unprefixed(content["metrics"], PERSONALIZED)
