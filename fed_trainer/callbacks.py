"""Federated events on top of the Trainer's callback system, and the callbacks the trainer installs."""

from __future__ import annotations

from tqdm.auto import tqdm
from transformers import ProgressCallback, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import CallbackHandler


class FederatedCallback(TrainerCallback):
    """A `TrainerCallback` that also hears the federated events.

    Events of one round, in order: `on_round_begin(round, client_ids, client_weights, model)`, then for every sampled
    client `on_client_begin(client_id, model, num_examples)` and `on_client_end(client_id, model, num_examples,
    metrics, optimizer)` (not for a client whose training raised: it is dropped), then `on_round_end(round, model,
    metrics)`. Rounds count from 1 (a strategy's round 0, in which clients only send gradients before any
    training, Fed-SB's with init="lora_sb", fires none). `model` in `on_round_begin` is the global model the round
    starts from; in `on_client_begin` it is the client's model loaded from the server's message; in `on_client_end`
    it is the trained model before the client's payload is taken from it (so a callback may still change what the
    client sends); in `on_round_end` it is the new global model.
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
