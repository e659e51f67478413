"""The SuperNode side: one client's local training for one round, with the code the simulation runs."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import psutil
from datasets import Dataset
from flwr.app import Context, MessageType, RecordDict
from flwr.clientapp import ClientApp
from safetensors.torch import load_file, save_file

from fed_trainer.client_eval import remote_scores
from fed_trainer.clients import RemoteClient
from fed_trainer.flower.remote import (
    EvalOrder,
    KeptRounds,
    TrainerBuilder,
    TrainOrder,
    eval_result,
    introduction,
    record_tensors,
    roster,
    train_result,
)
from fed_trainer.flower.warm import answering_app, state_dir
from fed_trainer.round import remote_update
from fed_trainer.trainer import FederatedTrainer

# load_client_data(context) -> (client_id, dataset): this SuperNode's client and its private data
DataLoader = Callable[[Context], tuple[object, Dataset]]

KEEP_FEDERATIONS = 4  # federations whose kept state a node holds, the latest written (node config: keep-federations)


class KeptStates:
    """What the strategy keeps on this SuperNode between its client's rounds (`Strategy.catch_up`,
    `Strategy.client_state`: FLoRA's folded base, SCAFFOLD's control, FedSA-LoRA's B, an error-feedback residual),
    one file per round it was written in, in the client's folder in the node's `state-dir` by federation: a resumed
    run (a new Flower run) finds the state its checkpoint's round left, not a later one the interrupted run wrote,
    and a restarted SuperNode (which may come back under a new node id) finds what it kept for its client.

    `rounds` (`KeptRounds`, from the server) says which file a message starts from. A node keeps that one, the
    newest checkpoint's (for a resume) and the one it writes; the others go. Of its federations it keeps the
    `keep-federations` (node config; 0: all) it wrote to last: so that finished runs do not fill its disk, an older
    one's folder goes when another is written to.

    Not Flower's `context.state`: flwr 1.42 sends it back from the ClientApp process in an exit handler that is
    killed after 5 s, and a state the size of a model (SCAFFOLD's control) took longer on a busy machine and was lost
    without an error.
    """

    def __init__(self, context: Context, client_id, rounds: KeptRounds) -> None:
        client = state_dir(context) / f"client-{quote(str(client_id), safe='')}"  # (any id: "/" is "%2F")
        self.folder = client / f"federation-{rounds.federation}"
        self.rounds = rounds
        self.keep_federations = int(context.node_config.get("keep-federations", KEEP_FEDERATIONS))

    def path(self, round_number: int) -> Path:
        return self.folder / f"round-{round_number}.safetensors"

    def read(self) -> dict | None:
        """The state kept after the client's last round that reached the server: {} before it has one, None if this
        node has not got it (its files lost, or let go of before a resume from an older checkpoint)."""
        if self.rounds.round == 0:
            return {}
        path = self.path(self.rounds.round)
        return load_file(path) if path.exists() else None

    def write(self, round_number: int, kept: dict) -> None:
        """Keep `kept` as written in `round_number`, whole or not at all (a node killed while writing keeps the
        others); then let go of the files no later message or resume can start from."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path(round_number)
        partial = path.with_suffix(".partial")
        save_file({name: t.detach().to("cpu").contiguous() for name, t in kept.items()}, partial)
        os.replace(partial, path)
        wanted = {path, self.path(self.rounds.round), self.path(self.rounds.saved_round)}
        for other in self.folder.glob("round-*.safetensors"):
            if other not in wanted:
                other.unlink(missing_ok=True)
        for folder in older_federations(self.folder.parent, self.keep_federations):
            shutil.rmtree(folder, ignore_errors=True)  # (another run of the node may be letting it go too)


def older_federations(client: Path, keep: int) -> list[Path]:
    """The federation folders of the client folder `client` beyond the `keep` last written to (none when `keep` is
    0). A folder's modification time is its last write: writing a round's file replaces one in it."""
    if keep <= 0:
        return []
    written = []
    for folder in client.glob("federation-*"):
        try:
            written.append((folder.stat().st_mtime_ns, folder))
        except FileNotFoundError:  # let go of by another run of the node meanwhile
            continue
    return [folder for _, folder in sorted(written, reverse=True)[keep:]]


def train_reply(
    build_trainer: TrainerBuilder,
    load_client_data: DataLoader,
    content: RecordDict,
    context: Context,
    process_start: float | None = None,
) -> RecordDict:
    """Train this SuperNode's client for one round from the server's message; the reply's records.

    The node builds the run's `FederatedTrainer` (its own dataset, the others stood for by `RemoteClient`), lets
    the strategy load the server's tensors into the model, trains with the seed and schedule position the server
    chose, and sends the strategy's payload: what a client trained in the simulation would send. What the strategy
    keeps between rounds (FLoRA: the folded base weights; SCAFFOLD: the client's control) stays in a file of the
    node (`KeptStates`). `process_start`: when the ClientApp process that received the message started (default: this
    process's start), for the reply's "start" phase.
    """
    start = time.time()
    process_start = psutil.Process().create_time() if process_start is None else process_start
    order = TrainOrder.read(content["config"])
    client_id, trainer = node_trainer(build_trainer, load_client_data, context, order.client_id, order.sizes)
    built = time.time()
    message = record_tensors(content["arrays"])
    states = KeptStates(context, client_id, order.kept)
    payload, output, kept = remote_update(trainer, order.round, client_id, message, order.plan, states.read())
    if kept:  # for this client's next round
        states.write(order.round, kept)
    seconds = {
        # the ClientApp process's start, imports and connection (and, from a warm_client_app, the hand-over)
        "start": start - process_start,
        "build": built - start,  # the data and the run's trainer (model included)
        "update": time.time() - built,  # loading the message, training, the payload, the kept state
        "train": output.metrics["train_runtime"],  # Trainer's own time for the local steps
    }
    learning_rate, examples = trainer.client_runner.last_learning_rate, len(trainer.client_datasets[client_id])
    return train_result(payload, output.training_loss, learning_rate, examples, seconds, process_start)


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
    tensors = record_tensors(content["arrays"])
    kept = KeptStates(context, client_id, order.kept).read()
    scores, personalized = remote_scores(trainer, order.round, client_id, held_out, tensors, kept)
    return eval_result(scores, personalized)


def answer(
    kind: str,
    content: RecordDict,
    context: Context,
    build_trainer: TrainerBuilder,
    load_client_data: DataLoader,
    process_start: float | None = None,
) -> RecordDict:
    """The records of this SuperNode's reply to a message of flwr's `MessageType` `kind`: the roster query (its
    client id and size), a train message (`train_reply`) or an evaluate message (`evaluate_reply`)."""
    if kind == MessageType.QUERY:
        client_id, dataset = load_client_data(context)
        return introduction(client_id, len(dataset))
    if kind == MessageType.TRAIN:
        return train_reply(build_trainer, load_client_data, content, context, process_start)
    if kind == MessageType.EVALUATE:
        return evaluate_reply(build_trainer, load_client_data, content, context)
    raise ValueError(f"a SuperNode of fed_trainer answers query, train and evaluate messages, not {kind!r} ones.")


def client_app(build_trainer: TrainerBuilder, load_client_data: DataLoader) -> ClientApp:
    """A Flower `ClientApp` that answers the server's roster query (this node's client id and size), trains its
    client when the server asks (`train_reply`) and evaluates it on its held-out data (`evaluate_reply`), all in
    the ClientApp process (flwr starts one per message; `warm.warm_client_app` keeps the work in a warm process)."""

    def reply(kind: str, content: RecordDict, context: Context) -> RecordDict:
        return answer(kind, content, context, build_trainer, load_client_data)

    return answering_app(reply)
