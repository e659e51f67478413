"""The ServerApp side: the run's rounds, with every client trained on its own SuperNode.

The server builds the same `FederatedTrainer` as a simulation (the clients' datasets stood for by their sizes) and
runs `train()`: the same sampling, strategy (message, aggregation, new global model), evaluation, logging, round
checkpoints and merged-model saving. Only the clients' local training happens elsewhere (`GridClients`).
"""

from __future__ import annotations

import time

import numpy as np
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp
from transformers.utils import logging

from fed_trainer.cli import train_save_evaluate
from fed_trainer.clients import RemoteClient
from fed_trainer.flower.remote import (
    EvalOrder,
    KeptRounds,
    TrainerBuilder,
    TrainOrder,
    evaluated,
    introduced,
    node_seconds,
    record_holds,
    roster,
    tensor_record,
    trained,
)
from fed_trainer.round import Round
from fed_trainer.trainer import FederatedTrainer

logger = logging.get_logger(__name__)


def discover_clients(grid: Grid, expected: int, timeout: float) -> dict:
    """Wait (at most `timeout` seconds) for `expected` SuperNodes and ask each for its client id and size (replies
    pulled as a round's are: `GridClients.exchange`); {client id: (node id, number of examples)} in client-id order."""
    start = time.monotonic()
    deadline = start + timeout
    nodes = list(grid.get_node_ids())
    while len(nodes) < expected:
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"only {len(nodes)} of the {expected} SuperNodes the run needs connected within {timeout:.0f} s: "
                "start the missing ones (flower-supernode), or lower num-clients in the run config."
            )
        time.sleep(1.0)
        nodes = list(grid.get_node_ids())
    queries = {node: Message(content=RecordDict(), message_type=MessageType.QUERY, dst_node_id=node) for node in nodes}
    replies, failures, _ = GridClients(grid, {}, max(deadline - time.monotonic(), 1.0)).exchange(queries)
    if failures:
        node, reason = next(iter(failures.items()))
        raise RuntimeError(f"{len(failures)} of {len(nodes)} SuperNodes did not name their client; {node}: {reason}")
    clients: dict = {}
    for node, content in replies.items():
        client_id, size = introduced(content)
        if client_id in clients:
            raise ValueError(
                f"SuperNodes {clients[client_id][0]} and {node} both hold client {client_id!r}: give every "
                "SuperNode its own partition-id in --node-config."
            )
        clients[client_id] = (node, size)
    logger.info(f"{len(clients)} SuperNodes connected and named their clients in {time.monotonic() - start:.1f} s.")
    return dict(sorted(clients.items()))


POLL_INTERVAL = 0.1  # seconds between two pulls of the replies to a round's messages


class GridClients:
    """The round's clients train on their SuperNodes, all at once (a `ClientExecutor`).

    The round's log says where the time went: `nodes_s`, from sending the messages to the last reply; and the
    nodes' mean `node_delivery_s` (from sending to the start of the ClientApp process), `node_start_s` (the
    ClientApp process's start, imports and connection), `node_build_s` (data and trainer), `node_update_s`
    (loading, training, payload), `node_train_s` (the local steps alone) and `node_return_s` (from the end of the
    node's work to the server's having the reply).

    A client whose SuperNode fails or does not answer within `timeout` seconds is dropped from the round, as a
    client that raises is in the simulation (`min_clients_per_round` then decides whether the round stands).
    """

    def __init__(self, grid: Grid, nodes: dict, timeout: float) -> None:
        self.grid, self.nodes, self.timeout = grid, nodes, timeout

    def train(self, round: Round) -> None:
        """Send every client its message and plan, hand the replies to the round in client order."""
        everyone = roster(round.trainer)
        messages = {
            client_id: Message(content=content, message_type=MessageType.TRAIN, dst_node_id=self.nodes[client_id])
            for client_id, content in train_contents(round, everyone).items()
        }
        start, sent_at = time.perf_counter(), time.time()
        contents, failures, received_at = self.exchange(messages)
        round.notes["nodes_s"] = time.perf_counter() - start
        for client_id in round.client_ids:
            if client_id in failures:
                round.drop(client_id, failures[client_id])
            else:
                round.receive(client_id, *trained(contents[client_id]))
        phases = [node_seconds(content, sent_at, received_at[cid]) for cid, content in contents.items()]
        for phase in sorted({phase for seconds in phases for phase in seconds}):
            round.notes[f"node_{phase}_s"] = float(np.mean([seconds[phase] for seconds in phases if phase in seconds]))

    def exchange(self, messages: dict) -> tuple[dict, dict, dict]:
        """Send every client its message (`messages`: client id -> `Message`) at once and wait at most the
        timeout: (the replies' contents, the reasons of the clients whose node failed or did not answer, when each
        reply came in: seconds since the epoch), by client id.

        Replies are pulled every `POLL_INTERVAL` seconds, not every 3 s as flwr 1.42's `Grid.send_and_receive`
        does: a round would wait up to 3 s for a reply already there."""
        ids = list(self.grid.push_messages(list(messages.values())))  # in order, None where refused
        ids += [None] * (len(messages) - len(ids))  # flwr returns no ids at all for a push too large
        refused = {cid for mid, cid in zip(ids, messages) if mid is None}
        pending = {mid: cid for mid, cid in zip(ids, messages) if mid is not None}
        deadline = time.monotonic() + self.timeout
        got, received_at = {}, {}
        while pending and time.monotonic() < deadline:
            for reply in self.grid.pull_messages(list(pending)):
                client_id = pending.pop(reply.metadata.reply_to_message_id)
                got[client_id], received_at[client_id] = reply, time.time()
            if pending:
                time.sleep(POLL_INTERVAL)
        contents, failures = {}, {}
        for client_id in messages:
            reply = got.get(client_id)
            if client_id in refused:
                failures[client_id] = "the SuperLink did not take its message (too large or malformed: its log says)"
            elif reply is None:
                failures[client_id] = f"no reply within {self.timeout:.0f} s"
            elif reply.has_error():
                failures[client_id] = reply.error.reason
            else:
                contents[client_id] = reply.content
        return contents, failures, received_at

    def evaluate(self, trainer: FederatedTrainer, held_out: dict, ignore_keys=None) -> tuple[dict, dict]:
        """Every client evaluated on its SuperNode (`client_app.evaluate_reply`), all at once: each is sent the
        global model's `Strategy.global_tensors` (not counted in the round's bytes, which are the training's) and
        replies with its metrics alone. A client whose node fails or does not answer within the timeout is left
        out, with a warning."""
        if trainer.strategy.sharded:
            raise ValueError(
                "Per-client evaluation on Flower sends the global model, which DeepSpeed ZeRO-3 keeps in partitions "
                "on the server: drop client_eval_split, or the DeepSpeed config of the ServerApp."
            )
        tensors = tensor_record(trainer.strategy.global_tensors(trainer.model))
        everyone, number = roster(trainer), trainer.strategy.round_number  # the round just finished
        messages = {
            cid: Message(content=RecordDict({"arrays": tensors, "config": EvalOrder(
                             number, cid, everyone, KeptRounds.of(trainer.round_progress, cid)).record()}),
                         message_type=MessageType.EVALUATE, dst_node_id=self.nodes[cid])
            for cid in held_out
        }  # fmt: skip
        contents, failures, _ = self.exchange(messages)
        for client_id, reason in failures.items():
            logger.warning(f"client {client_id!r} could not be evaluated on its SuperNode: {reason}")
        scores, personalized = {}, {}
        for client_id, content in contents.items():
            scores[client_id], mine = evaluated(content)
            if mine:
                personalized[client_id] = mine
        return scores, personalized


def train_contents(round: Round, everyone: dict) -> dict[object, RecordDict]:
    """What the server sends each client of `round`, by client id: its message's tensors and its `TrainOrder` (the
    round's plan for it, with the roster of the run, `everyone`).

    Clients whose messages are equal (FedAvg's and most strategies': the global model) share one `ArrayRecord`, so
    the ServerApp holds one serialized copy of a model, not one per client, and flwr hashes and pushes it once (its
    objects are keyed by content)."""
    contents, records = {}, []  # every distinct message's record, in the order first sent
    for position, client_id in enumerate(round.client_ids):
        message = round.message(client_id)
        record = next((r for r in records if record_holds(r, message)), None)
        if record is None:
            record = tensor_record(message)
            records.append(record)
        kept = KeptRounds.of(round.trainer.round_progress, client_id)
        order = TrainOrder(round.number, client_id, round.plan(position), everyone, kept)
        contents[client_id] = RecordDict({"arrays": record, "config": order.record()})
    return contents


def server_app(build_trainer: TrainerBuilder) -> ServerApp:
    """A Flower `ServerApp` that runs a federated training over the SuperNodes of the run and saves the merged
    global model, its metrics and state in the trainer's `output_dir` (as `examples/fed_glue.py` does).

    Run config keys it reads: `num-clients` (how many SuperNodes to wait for) and `round-timeout` (seconds a
    round, and the wait for SuperNodes, may take; 600 by default). The trainer's `resume_from_checkpoint` (a round
    checkpoint folder) continues an interrupted run.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        timeout = float(context.run_config.get("round-timeout", 600))
        clients = discover_clients(grid, int(context.run_config["num-clients"]), timeout)
        trainer = build_trainer(context, {cid: RemoteClient(n) for cid, (_, n) in clients.items()})
        trainer.client_executor = GridClients(grid, {cid: node for cid, (node, _) in clients.items()}, timeout)
        train_save_evaluate(trainer)

    return app
