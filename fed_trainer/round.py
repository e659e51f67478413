"""One federated round, in one place: which clients train and with what weight, the messages going out, the
payloads coming in, aggregation, the outcome merged across ranks, the new global model and the events.

Where the clients train is the business of an executor (`ClientExecutor`): `InProcessClients` trains them on this
process's live model (a simulation, or this rank's share of a client-parallel round, or every client together
under DeepSpeed), `fed_trainer.flower.GridClients` on Flower SuperNodes. Every strategy hook of a client's side is
called by `local_update` (and, on a machine of its own, `remote_update`), every hook of the server's side by
`Round`, so a strategy behaves the same wherever its clients train.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from transformers.utils import logging

from fed_trainer.callbacks import call_federated_event
from fed_trainer.client_eval import local_scores
from fed_trainer.compression import translated
from fed_trainer.distributed import all_gather_objects, all_reduce_scalar, is_client_parallel, merged, share_of
from fed_trainer.privacy import privacy_spent
from fed_trainer.server_state import OnDevice, out_of_memory_hint
from fed_trainer.strategies.base import equal_tensors
from fed_trainer.zero import reload_partitions

if TYPE_CHECKING:
    from datasets import Dataset

    from fed_trainer.config import FederatedConfig
    from fed_trainer.trainer import FederatedTrainer

logger = logging.get_logger(__name__)
TensorDict = dict[str, torch.Tensor]


def sampled_clients(args: FederatedConfig, ids: list, round_number: int) -> list:
    """The ids of the clients trained in round `round_number` (from 1): the same for the same seed on every rank."""
    count = args.clients_sampled_per_round
    if count >= len(ids):
        return ids
    rng = np.random.default_rng((args.seed, round_number))
    return [ids[i] for i in sorted(rng.choice(len(ids), size=count, replace=False))]


def client_weights(args: FederatedConfig, sizes: dict, client_ids: list) -> dict:
    """Aggregation weight p_k of each client of a round: n_k / sum n over the round's clients, or uniform."""
    if args.client_weighting == "uniform":
        return {cid: 1.0 / len(client_ids) for cid in client_ids}
    total = sum(sizes[cid] for cid in client_ids)
    return {cid: sizes[cid] / total for cid in client_ids}


@dataclass(frozen=True)
class ClientPlan:
    """How a client trains in a round: its seed, and where its steps lie on the run's learning-rate schedule
    (`offset` steps done before, `schedule_steps` in all); or, with `gradient_examples` (round 0, `GradientRound`),
    that it does not train but sends its mean gradient over that many of its examples."""

    seed: int
    offset: int
    schedule_steps: int
    gradient_examples: int = 0


class ClientExecutor(Protocol):
    """Where a round's clients train, and where they are evaluated.

    `train` trains the clients this process is responsible for and reports each to the round: `round.message(cid)`
    is what to send it, `round.plan(position)` how it trains, then `round.receive(cid, payload, loss,
    learning_rate)` with its reply, or `round.drop(cid, reason)` if it failed. `evaluate` returns, by client, the
    metrics of every client's own model on its held-out set, and those after `personalization_steps` ({} without); a
    client that could not be evaluated is left out of both (`fed_trainer.client_eval`)."""

    def train(self, round: Round) -> None: ...

    def evaluate(self, trainer: FederatedTrainer, held_out: dict, ignore_keys=None) -> tuple[dict, dict]: ...


class Round:
    """Round `number` of `trainer`'s run, from sampling to the new global model: `run(executor)` returns its log."""

    def __init__(self, trainer: FederatedTrainer, number: int, steps_per_round: int) -> None:
        self.trainer, self.strategy, self.args = trainer, trainer.strategy, trainer.args
        self.number, self.steps_per_round = number, steps_per_round
        sizes = {cid: len(ds) for cid, ds in trainer.client_datasets.items()}
        self.client_ids = sampled_clients(self.args, list(sizes), number)
        self.weights = client_weights(self.args, sizes, self.client_ids)
        self.losses: dict = {}
        self.learning_rate = trainer.client_runner.last_learning_rate  # the last client's at its last step
        self.failed: list = []  # clients whose training raised or whose machine did not answer
        self.accepted: list = []  # clients whose update went into the aggregate
        self.rejected: list = []  # clients whose update held NaN or Inf
        self.bytes_up = self.bytes_down = 0
        # (message, as sent) by client, while its reply is awaited (compressed traffic only; equal ones shared: `held`)
        self.messages: dict = {}
        self.notes: dict = {}  # what the executor adds to the round's log (Flower: where its nodes' time went)

    def plan(self, position: int) -> ClientPlan:
        """How the client at `position` in the round's sample trains."""
        args, trainer = self.args, self.trainer
        return ClientPlan(
            seed=args.seed + (self.number - 1) * len(trainer.client_datasets) + position,
            offset=(self.number - 1) * self.steps_per_round,
            schedule_steps=trainer.state.max_steps,
        )

    def message(self, client_id) -> TensorDict:
        """The server's message to `client_id` this round, as it travels (its bytes counted)."""
        strategy = self.strategy
        message = strategy.server_message(client_id)
        sent = strategy.sent_message(message)
        self.bytes_down += strategy.traffic_bytes(sent)
        if strategy.compressor is not None or strategy.downlink is not None:  # its reply is decoded against it
            self.messages[client_id] = self.held(message), self.held(sent)
        return sent

    def held(self, tensors: TensorDict) -> TensorDict:
        """`tensors`, or an equal message (or sent form) already held for another client of the round: on Flower all
        the round's replies are awaited at once, and a copy of the global model per client (a bfloat16 model's
        message, cast from its float32 master) would add up."""
        for pair in self.messages.values():
            for other in pair:
                if equal_tensors(other, tensors):
                    return other
        return tensors

    def receive(self, client_id, payload: TensorDict, loss: float, learning_rate: float) -> None:
        """A client's reply (its bytes counted, as it travelled): aggregated, or rejected if it holds NaN or Inf; its
        train loss and its learning rate at its last step (the round logs the last client's)."""
        self.losses[client_id], self.learning_rate = loss, learning_rate
        self.bytes_up += self.strategy.traffic_bytes(payload)
        strategy = self.strategy
        if client_id in self.messages:
            message, sent = self.messages.pop(client_id)
            if strategy.compressor is not None:  # the update against what the client received, onto the message
                payload = strategy.compressor.decoded(payload, message)
            else:
                payload = translated(payload, message, strategy.received_message(sent))
        bad = next((name for name, t in payload.items() if not torch.isfinite(t).all()), None)
        if self.strategy.sharded and all_reduce_scalar(float(bad is not None)) > 0:  # each rank sees its shards
            bad = bad or "another rank's shard"
        if bad is not None:
            logger.warning(
                f"Round {self.number}: client {client_id!r} sent an update with NaN or Inf (first in {bad}); it is "
                "left out of the aggregate."
            )
            self.rejected.append(client_id)
            return
        self.strategy.aggregate(payload, self.weights[client_id], client_id)
        self.accepted.append(client_id)

    def drop(self, client_id, reason: str) -> None:
        """Leave out a client whose training failed; `min_clients_per_round` decides whether the round stands."""
        logger.warning(f"Round {self.number}: client {client_id!r} failed and is dropped from the round: {reason}")
        self.failed.append(client_id)

    def event(self, name: str, **kwargs) -> None:
        """Send a federated event to the trainer's callbacks."""
        fire(self.trainer, name, **kwargs)

    def run(self, executor: ClientExecutor) -> dict:
        """Train the round's clients with `executor`, aggregate, make the new global model; the round's log (with
        `round_runtime`, its seconds from sampling to the new global model, as Trainer logs `train_runtime`)."""
        start = time.perf_counter()
        self.strategy.begin_round(self.number)
        self.event(
            "on_round_begin",
            round=self.number,
            client_ids=self.client_ids,
            client_weights=self.weights,
            model=self.trainer.model,
        )
        executor.train(self)
        outcome = self.outcome()
        kept = [cid for cid in self.client_ids if cid in set(outcome["accepted"])]
        if len(kept) < self.args.min_clients_per_round:
            self.abandon(outcome)
        compressor = self.strategy.compressor
        if is_client_parallel(self.args):
            self.strategy.synchronize()
            if compressor is not None:
                compressor.synchronize()
        model = self.trainer.model
        self.strategy.finish_round(model)
        if compressor is not None:
            compressor.finish_round()
        # the clients whose update reached the server (a rejected one too: its machine keeps the state it trained
        # to, as the simulation's strategy does) start their next round from the state this one left them
        reached = [*outcome["accepted"], *outcome["rejected"]]
        self.trainer.round_progress.client_rounds.update(dict.fromkeys(reached, self.number))
        reload_partitions(self.trainer.client_runner.engine)
        self.trainer.state.global_step = self.number * self.steps_per_round
        logs = {
            "round": self.number,
            "loss": float(np.mean([outcome["losses"][cid] for cid in kept])),
            "learning_rate": self.learning_rate,
            "num_clients": len(kept),
        }
        if outcome["failed"] or outcome["rejected"]:
            logs["num_clients_dropped"] = len(outcome["failed"]) + len(outcome["rejected"])
        if self.args.dp_noise_multiplier is not None:
            logs["dp_epsilon"] = privacy_spent(self.args, self.number)
        logs.update({**self.notes, "round_runtime": round(time.perf_counter() - start, 4)})
        self.event("on_round_end", round=self.number, model=model, metrics=logs)
        return {**logs, "bytes_up": outcome["bytes_up"], "bytes_down": outcome["bytes_down"]}

    def outcome(self) -> dict:
        """Losses, failures, acceptances and bytes of the whole round, alike on every rank."""
        args = self.args
        outcome = dict(losses=self.losses, failed=self.failed, accepted=self.accepted, rejected=self.rejected,
                       bytes_up=self.bytes_up, bytes_down=self.bytes_down)  # fmt: skip
        if is_client_parallel(args):  # each rank trained its share of the clients
            return merged(all_gather_objects(outcome))
        if args.world_size > 1:  # sharded: each rank saw its part of every batch, and under ZeRO-3 its shards
            outcome["losses"] = {cid: all_reduce_scalar(v) / args.world_size for cid, v in self.losses.items()}
            if self.strategy.sharded:
                outcome.update(bytes_up=int(all_reduce_scalar(self.bytes_up)),
                               bytes_down=int(all_reduce_scalar(self.bytes_down)))  # fmt: skip
        return outcome

    def abandon(self, outcome: dict) -> None:
        """Too few clients gave a usable update: put the last global model back, checkpoint it, and stop (a
        strategy that cannot undo a round, `capabilities.undo_round`, stops without a new checkpoint)."""
        failed, rejected = outcome["failed"], outcome["rejected"]
        sampled = len(self.client_ids)
        why = (
            f"Round {self.number}: only {sampled - len(failed) - len(rejected)} of {sampled} clients gave a usable "
            f"update (failed: {failed}, rejected for NaN/Inf: {rejected}), fewer than min_clients_per_round="
            f"{self.args.min_clients_per_round}."
        )
        if not self.strategy.capabilities.undo_round:
            raise RuntimeError(
                f"{why} Strategy {self.strategy.name!r} cannot undo a round, so the live model is not the last "
                "global model: continue from the last round checkpoint with trainer.train(resume_from_checkpoint="
                "True) after fixing the failing clients, or lower min_clients_per_round."
            )
        self.strategy.restore_global(self.trainer.model)
        saved = self.trainer.save_round_checkpoint()
        raise RuntimeError(
            f"{why} The global model after round {self.number - 1} is saved in {saved}; fix the failing clients and "
            "continue with trainer.train(resume_from_checkpoint=True), or lower min_clients_per_round."
        )


class GradientRound(Round):
    """Round 0 of a strategy that starts from the clients' gradients (`Strategy.gradient_examples`; Fed-SB's LoRA-SB
    initialisation): the round's clients, sampled and weighted as in any round, are sent nothing (each builds the
    initial model itself), take their mean gradient of the `Strategy.gradient_parameters` over their first
    `gradient_examples` examples without training, and send it (compressed as the run's `update_compression` says,
    without error feedback); the strategy's `finish_round` turns the aggregate into the state round 1 starts from.
    No federated events fire: round 1 is the first round of training."""

    def __init__(self, trainer: FederatedTrainer, steps_per_round: int) -> None:
        super().__init__(trainer, 0, steps_per_round)

    def plan(self, position: int) -> ClientPlan:
        """Round 1's seed for the client at `position` (its gradient is over the examples its first steps take)."""
        return ClientPlan(seed=self.args.seed + position, offset=0, schedule_steps=self.trainer.state.max_steps,
                          gradient_examples=self.strategy.gradient_examples)  # fmt: skip

    def message(self, client_id) -> TensorDict:
        if self.strategy.compressor is not None:  # its reply is decoded (against nothing: gradients are not updates)
            self.messages[client_id] = {}, {}
        return {}

    def event(self, name: str, **kwargs) -> None:
        pass

    def abandon(self, outcome: dict) -> None:
        """Too few clients sent their gradients: there is no global model to keep yet, so the run stops."""
        failed, rejected = outcome["failed"], outcome["rejected"]
        raise RuntimeError(
            f"Round 0: only {len(self.client_ids) - len(failed) - len(rejected)} of {len(self.client_ids)} clients "
            f"sent their gradients (failed: {failed}, rejected for NaN/Inf: {rejected}), fewer than "
            f"min_clients_per_round={self.args.min_clients_per_round}: fix the failing clients and start the run "
            f"again, or lower min_clients_per_round."
        )


def fire(trainer: FederatedTrainer, name: str, **kwargs) -> None:
    """Send the federated event `name` to `trainer`'s callbacks, keeping the control they return."""
    trainer.control = call_federated_event(
        trainer.callback_handler, name, trainer.args, trainer.state, trainer.control, **kwargs
    )


def local_update(trainer: FederatedTrainer, client_id, dataset: Dataset, message: TensorDict, plan: ClientPlan):
    """One client's side of a round on `trainer`'s model: load the server's `message` (as it travelled), train, and
    return (payload, `TrainOutput`). The client events fire around the training: `on_client_begin` on the loaded
    model, `on_client_end` on the trained one before the payload is taken from it."""
    strategy, runner, model = trainer.strategy, trainer.client_runner, trainer.model
    if plan.gradient_examples:  # round 0: no training, the gradients at the initial model
        parameters = strategy.gradient_parameters(model)
        gradients, output = runner.mean_gradients(dataset, parameters, plan.gradient_examples, plan.seed)
        if strategy.compressor is not None:  # compressed like any payload; no later payload continues them
            gradients = strategy.compressor.encoded(gradients, {}, client_id, feedback=False)
        return gradients, output
    message = strategy.received_message(message)
    strategy.load_client(model, OnDevice(message, trainer.args.device), client_id)
    if strategy.compressor is None:  # only a compressed payload is taken against it
        # a 16-bit model's message is a cast copy of the float32 master (2 bytes a value): not kept through the
        # training. Callers hand it over, holding it no more, so that this frame holds it alone (CPython moves a
        # call's arguments into the called frame).
        del message
    reload_partitions(runner.engine)
    event = dict(client_id=client_id, model=model, num_examples=len(dataset))
    fire(trainer, "on_client_begin", **event)
    try:
        output = runner.train(
            dataset, client_id, seed=plan.seed, offset=plan.offset, schedule_steps=plan.schedule_steps
        )
        fire(trainer, "on_client_end", **event, metrics=output.metrics, optimizer=runner.trainer.optimizer)
        payload = strategy.client_payload(model, client_id)
        if strategy.compressor is not None:
            payload = strategy.compressor.encoded(payload, message, client_id)
        return payload, output
    finally:
        runner.release()


def remote_update(
    trainer: FederatedTrainer,
    round_number: int,
    client_id,
    message: TensorDict,
    plan: ClientPlan,
    kept: TensorDict | None,
):
    """`local_update` on a machine of its own (a Flower SuperNode), which builds the initial model afresh for every
    round: the strategy first brings the model to the round's global state from what the machine `kept` after the
    client's last round that reached the server (`Strategy.catch_up`; None: the machine no longer has it,
    `kept_lost`). The client trains on its dataset as the trainer holds it (prepared, for TRL's trainers). Returns
    (payload, `TrainOutput`, what to keep for the next round)."""
    strategy = trainer.strategy
    strategy.begin_round(round_number)  # fresh LoRA factors are seeded by round
    kept = strategy.machine_kept(kept)
    compressor = strategy.compressor
    if compressor is not None:
        compressor.catch_up(kept)
    kept = strategy.catch_up(trainer.model, strategy.received_message(message), kept)
    payload, output = local_update(trainer, client_id, trainer.client_datasets[client_id], message, plan)
    residual = {} if compressor is None else compressor.client_state(client_id)
    return payload, output, {**kept, **strategy.client_state(client_id), **residual}


class InProcessClients:
    """Clients train in this process, one after another, on the live model: all of them in one process or under
    DeepSpeed (where every rank trains every client together), this rank's share in a client-parallel round."""

    def train(self, round: Round) -> None:
        trainer, args = round.trainer, round.args
        processes, process = (args.world_size, args.process_index) if is_client_parallel(args) else (1, 0)
        for position in share_of(range(len(round.client_ids)), process, processes):
            client_id = round.client_ids[position]
            dataset = trainer.client_datasets[client_id]
            message, plan = [round.message(client_id)], round.plan(position)
            try:  # the message handed over (popped), so that local_update can let go of it once loaded
                payload, output = local_update(trainer, client_id, dataset, message.pop(), plan)
            except Exception as err:  # one client's failure (a bad batch, out of memory) must not end the run
                if processes == 1 and args.world_size > 1:  # sharded: the other ranks are inside this client's steps
                    raise sharded_client_failure(round, client_id, err) from err
                hint = out_of_memory_hint(err, round.strategy.state_device)
                round.drop(client_id, f"{type(err).__name__}: {err}{hint}")
                continue
            round.receive(client_id, payload, output.training_loss, trainer.client_runner.last_learning_rate)

    def evaluate(self, trainer: FederatedTrainer, held_out: dict, ignore_keys=None) -> tuple[dict, dict]:
        """Every client evaluated in this process (each set spread over the processes of a client-parallel run)."""
        return local_scores(trainer, held_out, ignore_keys)


def sharded_client_failure(round: Round, client_id, err: Exception) -> RuntimeError:
    """The error that stops a sharded (DeepSpeed) run when a client's training raised on this rank.

    Every rank trains every client together, so the other ranks are inside the same steps, waiting in a collective
    this rank will not join: the client cannot be dropped as in one process. This rank raises at once; its exit
    closes its connections, so the others fail in their pending collective (and the launcher ends them) instead of
    waiting for the process-group timeout."""
    args = round.args
    return RuntimeError(
        f"Round {round.number}: the training of client {client_id!r} raised on rank {args.process_index} of "
        f"{args.world_size}: {type(err).__name__}: {err}.{out_of_memory_hint(err, round.strategy.state_device)} "
        "Under DeepSpeed every rank trains every client together, so a client that fails on one rank cannot be "
        "dropped: the run stops. Fix the client's data (or memory), "
        "then continue from the last round checkpoint with trainer.train(resume_from_checkpoint=True)."
    )
