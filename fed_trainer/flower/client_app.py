"""The SuperNode side: one client's local training for one round, with the code the simulation runs."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psutil
from datasets import Dataset
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from safetensors.torch import load_file, save_file

from fed_trainer.client_eval import remote_scores
from fed_trainer.clients import RemoteClient
from fed_trainer.flower.remote import (
    EvalOrder,
    TrainerBuilder,
    TrainOrder,
    eval_result,
    introduction,
    roster,
    train_result,
)
from fed_trainer.round import remote_update
from fed_trainer.trainer import FederatedTrainer

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
    start = time.time()
    order = TrainOrder.read(content["config"])
    client_id, trainer = node_trainer(build_trainer, load_client_data, context, order.client_id, order.sizes)
    built = time.time()
    message = content["arrays"].to_torch_state_dict()
    path = kept_path(context)
    payload, output, kept = remote_update(trainer, order.round, client_id, message, order.plan, read_kept(path))
    if kept:  # for this node's next round of the run
        write_kept(path, kept)
    seconds = {
        "start": start - psutil.Process().create_time(),  # the ClientApp process's start, imports and connection
        "build": built - start,  # the data and the run's trainer (model included)
        "update": time.time() - built,  # loading the message, training, the payload, the kept state
        "train": output.metrics["train_runtime"],  # Trainer's own time for the local steps
    }
    return train_result(payload, output.training_loss, len(trainer.client_datasets[client_id]), seconds)


def node_trainer(
    build_trainer: TrainerBuilder, load_client_data: DataLoader, context: Context, asked, sizes: dict
) -> tuple[object, FederatedTrainer]:
    """(this node's client id, the run's `FederatedTrainer` built on this node: its own dataset, the others stood
    for by `RemoteClient`s of the roster's `sizes`), checked against the server's view: the client it `asked` for
    and the size it counts."""
    client_id, dataset = load_client_data(context)
    if client_id != asked:
        raise ValueError(
            f"the server sent client {asked!r}'s message to this SuperNode, which holds client {client_id!r}: give "
            "every SuperNode its own partition-id."
        )
    clients = {cid: dataset if cid == client_id else RemoteClient(n) for cid, n in sizes.items()}
    trainer = build_trainer(context, clients)
    prepared = roster(trainer)[client_id]  # as the server counts it (TRL's trainers prepare the data)
    if prepared != sizes[client_id]:
        raise ValueError(f"client {client_id!r} now has {prepared} examples, not the {sizes[client_id]} it had.")
    return client_id, trainer


def evaluate_reply(build_trainer: TrainerBuilder, load_client_data: DataLoader, content: RecordDict, context: Context):
    """Evaluate this SuperNode's client on its held-out data (`client_eval_split`): the server's global tensors
    loaded into the freshly built model, with the client's personal state from the node's file (FedSA-LoRA: its B),
    and fine-tuned first with `personalization_steps`; only the metrics travel back (`eval_result`)."""
    order = EvalOrder.read(content["config"])
    client_id, trainer = node_trainer(build_trainer, load_client_data, context, order.client_id, order.sizes)
    held_out = trainer.client_eval_datasets[client_id]
    tensors = content["arrays"].to_torch_state_dict()
    kept = read_kept(kept_path(context))
    scores, personalized = remote_scores(trainer, order.round, client_id, held_out, tensors, kept)
    return eval_result(scores, personalized)


def client_app(build_trainer: TrainerBuilder, load_client_data: DataLoader) -> ClientApp:
    """A Flower `ClientApp` that answers the server's roster query (this node's client id and size), trains its
    client when the server asks (`train_reply`) and evaluates it on its held-out data (`evaluate_reply`)."""
    app = ClientApp()

    @app.query()
    def query(message: Message, context: Context) -> Message:
        client_id, dataset = load_client_data(context)
        return Message(content=introduction(client_id, len(dataset)), reply_to=message)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        content = evaluate_reply(build_trainer, load_client_data, message.content, context)
        return Message(content=content, reply_to=message)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        content = train_reply(build_trainer, load_client_data, message.content, context)
        return Message(content=content, reply_to=message)

    return app
