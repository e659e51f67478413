"""The SuperNode side: one client's local training for one round, with the code the simulation runs."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from datasets import Dataset
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from safetensors.torch import load_file, save_file

from fed_trainer.flower.remote import (
    RemoteClient,
    TrainerBuilder,
    TrainOrder,
    introduction,
    train_result,
)
from fed_trainer.round import remote_update

# load_client_data(context) -> (client_id, dataset): this SuperNode's client and its private data
DataLoader = Callable[[Context], tuple[object, Dataset]]


def kept_path(context: Context) -> Path:
    """The file in which this SuperNode keeps what the strategy keeps between the rounds of a run
    (`Strategy.catch_up`, `Strategy.client_state`): under the node config's `state-dir` (default: the system's
    temporary folder), by node and run.

    Not Flower's `context.state`: flwr 1.42 sends it back from the ClientApp process in an exit handler that is
    killed after 5 s, and a state the size of a model (SCAFFOLD's control) took longer on a busy machine and was lost
    without an error.
    """
    root = Path(context.node_config.get("state-dir", Path(tempfile.gettempdir()) / "fed-trainer-nodes"))
    return root / f"node-{context.node_id}" / f"run-{context.run_id}.safetensors"


def read_kept(path: Path) -> dict:
    return load_file(path) if path.exists() else {}


def write_kept(path: Path, kept: dict) -> None:
    """Write `kept` to `path` whole or not at all (a node killed while writing keeps its last round's state)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    save_file({name: t.detach().to("cpu").contiguous() for name, t in kept.items()}, partial)
    os.replace(partial, path)


def train_reply(build_trainer: TrainerBuilder, load_client_data: DataLoader, content: RecordDict, context: Context):
    """Train this SuperNode's client for one round from the server's message; the reply's records.

    The node builds the run's `FederatedTrainer` (its own dataset, the others stood for by `RemoteClient`), lets
    the strategy load the server's tensors into the model, trains with the seed and schedule position the server
    chose, and sends the strategy's payload: what a client trained in the simulation would send. What the strategy
    keeps between rounds (FLoRA: the folded base weights; SCAFFOLD: the client's control) stays in a file of the
    node (`kept_path`).
    """
    order = TrainOrder.read(content["config"])
    client_id, dataset = load_client_data(context)
    if client_id != order.client_id:
        raise ValueError(
            f"the server sent client {order.client_id!r}'s round to this SuperNode, which holds client "
            f"{client_id!r}: give every SuperNode its own partition-id."
        )
    clients = {cid: dataset if cid == client_id else RemoteClient(n) for cid, n in order.sizes.items()}
    trainer = build_trainer(context, clients)
    prepared = len(trainer.client_datasets[client_id])  # as the server counts it (TRL's trainers prepare the data)
    if prepared != order.sizes[client_id]:
        raise ValueError(f"client {client_id!r} now has {prepared} examples, not the {order.sizes[client_id]} it had.")
    message = content["arrays"].to_torch_state_dict()
    path = kept_path(context)
    payload, output, kept = remote_update(trainer, order.round, client_id, message, order.plan, read_kept(path))
    if kept:  # for this node's next round of the run
        write_kept(path, kept)
    return train_result(payload, output.training_loss, prepared)


def client_app(build_trainer: TrainerBuilder, load_client_data: DataLoader) -> ClientApp:
    """A Flower `ClientApp` that answers the server's roster query (this node's client id and size) and trains
    its client when the server asks (`train_reply`)."""
    app = ClientApp()

    @app.query()
    def query(message: Message, context: Context) -> Message:
        client_id, dataset = load_client_data(context)
        return Message(content=introduction(client_id, len(dataset)), reply_to=message)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        content = train_reply(build_trainer, load_client_data, message.content, context)
        return Message(content=content, reply_to=message)

    return app
