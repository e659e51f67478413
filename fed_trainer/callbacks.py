"""Federated events on top of the Trainer's callback system, and the callbacks the trainer installs."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm
from transformers import ProgressCallback, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import CallbackHandler
from transformers.utils import logging

from fed_trainer.distributed import all_reduce_scalar, is_client_parallel
from fed_trainer.strategies.base import Strategy
from fed_trainer.zero import reload_partitions

logger = logging.get_logger(__name__)


class FederatedCallback(TrainerCallback):
    """A `TrainerCallback` that also hears the federated events.

    Events of one round, in order: `on_round_begin(round, client_ids, client_weights)`, then for every sampled
    client `on_client_begin(client_id, model, num_examples)` and `on_client_end(client_id, model, num_examples,
    metrics, optimizer)` (not for a client whose training raised: it is dropped), then `on_round_end(round, model,
    metrics)`. Rounds count from 1. `model` in the client
    events is the client's model as it starts / ends local training (before aggregation); in `on_round_end` it is
    the new global model.
    The usual Trainer events (`on_train_begin`, `on_log`, `on_evaluate`, `on_save`, ...) fire as with `Trainer`.
    """

    def on_round_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        pass

    def on_client_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        pass

    def on_client_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        pass

    def on_round_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        pass


def call_federated_event(
    handler: CallbackHandler,
    event: str,
    args: TrainingArguments,
    state: TrainerState,
    control: TrainerControl,
    **kwargs,
) -> TrainerControl:
    """Send a federated event to every callback that defines it, in the handler's order."""
    for callback in handler.callbacks:
        method = getattr(callback, event, None)
        if method is not None:
            result = method(args, state, control, **kwargs)
            if result is not None:
                control = result
    return control


class AggregationCallback(FederatedCallback):
    """Runs the strategy inside the callback machinery; the trainer puts it first in the list.

    So a user callback's `on_client_begin` sees the client model already loaded from the global state, and its
    `on_round_end` sees the new global model. It also counts the bytes exchanged. In client-parallel rounds it
    holds the clients of its own rank until `on_round_end` combines the ranks' aggregates.
    """

    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy
        self.engine = None  # the DeepSpeed engine, whose ZeRO-3 partitions the strategy writes
        self.round_bytes_up = 0
        self.round_bytes_down = 0

    def on_round_begin(self, args, state, control, round=None, client_weights=None, **kwargs):
        self.round, self.client_weights = round, client_weights
        self.round_bytes_up = self.round_bytes_down = 0
        self.accepted: list = []  # clients whose update went into the aggregate
        self.rejected: list = []  # clients whose update held NaN or Inf
        self.strategy.begin_round(round)

    def on_client_begin(self, args, state, control, client_id=None, model=None, **kwargs):
        self.strategy.load_client(model, self.outgoing(client_id), client_id)
        reload_partitions(self.engine)

    def on_client_end(self, args, state, control, client_id=None, model=None, **kwargs):
        self.incoming(client_id, self.strategy.client_payload(model, client_id))

    def outgoing(self, client_id) -> dict:
        """The server's message to `client_id` this round (its bytes counted)."""
        message = self.strategy.server_message(client_id)
        self.round_bytes_down += self.strategy.traffic_bytes(message)
        return message

    def incoming(self, client_id, payload: dict) -> None:
        """Take a client's payload (its bytes counted): aggregated, or rejected if it holds NaN or Inf."""
        self.round_bytes_up += self.strategy.traffic_bytes(payload)
        bad = next((name for name, t in payload.items() if not torch.isfinite(t).all()), None)
        if self.strategy.sharded and all_reduce_scalar(float(bad is not None)) > 0:  # each rank sees its shards
            bad = bad or "another rank's shard"
        if bad is not None:
            logger.warning(
                f"Round {self.round}: client {client_id!r} sent an update with NaN or Inf (first in {bad}); it is "
                "left out of the aggregate."
            )
            self.rejected.append(client_id)
            return
        self.strategy.aggregate(payload, self.client_weights[client_id], client_id)
        self.accepted.append(client_id)

    def on_round_end(self, args, state, control, model=None, **kwargs):
        if is_client_parallel(args):
            self.strategy.synchronize()
        self.strategy.finish_round(model)
        reload_partitions(self.engine)


class RoundProgressCallback(ProgressCallback, FederatedCallback):
    """A progress bar over rounds (the client trainer shows one over each client's steps)."""

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.training_bar = tqdm(total=args.num_rounds, desc="rounds", unit="round", dynamic_ncols=True)
        self.current_step = 0

    def on_step_end(self, args, state, control, **kwargs):
        pass

    def on_client_begin(self, args, state, control, client_id=None, **kwargs):
        if self.training_bar is not None:
            self.training_bar.set_postfix_str(f"client {client_id}")

    def on_round_end(self, args, state, control, **kwargs):
        if self.training_bar is not None:
            self.training_bar.update(1)


class ClientStepProgressCallback(TrainerCallback):
    """A transient bar over one client's local steps."""

    def __init__(self) -> None:
        self.bar = None
        self.description = "client"

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, desc=self.description, leave=False, dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(1)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
