"""SCAFFOLD (Karimireddy et al., 2020), option II control variates, over full weights.

The server keeps a control c and each client k its own control c_k (zero at first), one entry per trainable weight.
A client corrects the gradient of every local step by c - c_k (after gradient clipping, before the optimizer step)
and, having gone from the global x to y_k in its steps, sends y_k and
Delta c_k = c_k+ - c_k = (x - y_k) / (sum of the learning rates of its steps) - c, where option II's
c_k+ = c_k - c + (x - y_k) / (K lr) is written with the steps' own rates so that a schedule is followed. The server
averages the weights as FedAvg does (x = sum_k p_k y_k) and moves c by the sampled clients' mean Delta c_k times
|S| / N: c += sum_{k in S} Delta c_k / N. Downlink (x, c) and uplink (y_k, Delta c_k): twice FedAvg's bytes.

The control estimate is an average gradient only for SGD-like steps: with another `optim` the run warns. Client
controls persist across rounds: in the simulation the strategy keeps every client's on the CPU (N times the
trainable weights, saved in round checkpoints); on Flower each SuperNode keeps its own (`client_state`).

c stays the mean of the c_k the server counted only if every client corrects with that c_k. The server keeps its
record of each c_k (the sum of the Delta c_k it received) and sends the round it is from (`CONTROL_ROUND`, 8 bytes)
with every message. A node whose kept c_k is not from that round (its files lost: a SuperNode reads the state it
kept in the round the server names, `fed_trainer.flower.client_app.KeptStates`) refuses to train and is dropped;
the next message to a client whose last one brought no update, and the first to every client after a resume (a
node may have lost its files meanwhile, or been replaced), carries the server's c_k (`own_control`), whose bytes are
counted.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import TrainerCallback

from fed_trainer.distributed import all_gather_objects, all_reduce_sums, united_across_ranks
from fed_trainer.server_state import zeros_placed
from fed_trainer.strategies.base import TensorDict
from fed_trainer.strategies.capabilities import Capabilities
from fed_trainer.strategies.fedavg import FedAvg
from fed_trainer.strategies.keys import message_key, parse
from fed_trainer.strategies.registry import register_strategy

if TYPE_CHECKING:
    from fed_trainer.config import FederatedConfig

logger = logging.getLogger(__name__)

# The round the server's record of a client's control is from (0: none yet), in every message and a node's kept state
CONTROL_ROUND = "control_round"


class ControlledSteps(TrainerCallback):
    """On the client trainer: adds each weight's correction c - c_k to its gradient before every optimizer step, and
    adds up the learning rates of the steps taken."""

    def __init__(self) -> None:
        self.corrections: list[tuple[nn.Parameter, torch.Tensor]] = []
        self.rate_sum = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.rate_sum = 0.0

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        for param, correction in self.corrections:
            if param.grad is None:  # no gradient reached it this step: the correction alone moves it
                param.grad = correction.to(param.dtype).clone()
            else:
                param.grad.add_(correction.to(param.grad.dtype))

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.rate_sum += optimizer.param_groups[0]["lr"]


@register_strategy("scaffold")
class Scaffold(FedAvg):
    """FedAvg whose clients correct every step's gradient by the control variates c - c_k (option II); exact."""

    title = "SCAFFOLD"
    paper = ("SCAFFOLD: Stochastic Controlled Averaging for Federated Learning", "1910.06378")
    capabilities = Capabilities(exact=True, undo_round=True, server_optimizer=True)

    def setup(self, model: nn.Module, args: FederatedConfig, peft_configs: dict | None = None) -> nn.Module:
        from fed_trainer.config import deepspeed_zero_stage

        if deepspeed_zero_stage(args.deepspeed) > 0:
            raise ValueError(
                "strategy 'scaffold' corrects the gradients its clients' optimizer steps with, which DeepSpeed ZeRO "
                "keeps in its own partitioned buffers: drop the DeepSpeed config, or use strategy='fedavg'."
            )
        optim = str(getattr(args.optim, "value", args.optim))
        if optim != "sgd":
            logger.warning(
                "strategy 'scaffold' with optim=%r: its control estimate (x - y_k) / (K lr) is an average gradient "
                "only for SGD steps; an adaptive optimizer's steps are normalised, so the corrections come out of "
                "scale with the gradients they are added to. optim='sgd' is what SCAFFOLD is defined for.",
                optim,
            )
        model = super().setup(model, args, peft_configs)
        self.control = {name: zeros_placed(p, self.state_device) for name, p in self.averaged_parameters.items()}
        self.client_controls: dict = {}  # client -> its c_k, on the CPU (the simulation's clients' own state)
        self.control_round: dict = {}  # client -> the round its c_k was last updated in
        self.unsure: set = set()  # clients whose machine may not hold the c_k the server counts: sent theirs next
        self.kept_control: TensorDict = {}  # on a SuperNode: its client's c_k, from what the node kept
        self.steps = ControlledSteps()
        return model

    def client_callbacks(self) -> list[TrainerCallback]:
        return [self.steps]

    def server_message(self, client_id) -> TensorDict:
        controls = {message_key(name, "control"): c for name, c in self.control.items()}
        controls[CONTROL_ROUND] = torch.tensor(self.control_round.get(client_id, 0))
        if client_id in self.unsure and client_id in self.client_controls:
            own = self.client_controls[client_id]
            controls.update({message_key(name, "own_control"): c for name, c in own.items()})
        self._messaged.add(client_id)
        return {**super().server_message(client_id), **controls}

    def catch_up(self, model: nn.Module, message: TensorDict, kept: TensorDict) -> TensorDict:
        """The client's c_k: sent by the server, or kept by this machine if it is the one the server counts."""
        counted = int(message[CONTROL_ROUND])
        parts = {key: parse(key) for key in message}
        own = {k.tensor: message[key] for key, k in parts.items() if k.part == "own_control"}
        if not own and counted > 0:
            held = int(kept[CONTROL_ROUND]) if CONTROL_ROUND in kept else 0
            if held != counted:
                raise RuntimeError(
                    f"this client keeps its SCAFFOLD control from round {held} (0: none), but the server counts the "
                    f"one from round {counted} (were its SuperNode's files lost?); it is dropped "
                    "this round and sent its control the next time."
                )
            own = {parse(key).tensor: value for key, value in kept.items() if parse(key).part == "control"}
        self.kept_control = own
        return {}

    def load_client(self, model: nn.Module, message: TensorDict, client_id) -> None:
        super().load_client(model, message, client_id)
        own = self.client_controls.get(client_id, self.kept_control)
        params = dict(model.named_parameters())
        self._server_control = {name: message[message_key(name, "control")].float() for name in self.control}
        self._own = {name: own[name].to(c.device) if name in own else torch.zeros_like(c)
                     for name, c in self._server_control.items()}  # fmt: skip
        self._start = {name: message[name].detach().float().clone() for name in self.control}
        self.steps.corrections = [(params[name], c - self._own[name]) for name, c in self._server_control.items()]

    def client_payload(self, model: nn.Module, client_id) -> TensorDict:
        payload = super().client_payload(model, client_id)
        rate_sum = self.steps.rate_sum
        if rate_sum <= 0:
            raise ValueError(
                f"client {client_id!r} took no optimizer step at a positive learning rate this round, so SCAFFOLD's "
                "control update (x - y_k) / (K lr) is undefined."
            )
        # tensor by tensor, each start weight and c_k let go once used (the corrections first: training is over), so
        # that the payload's control changes and the new c_k do not come on top of three more model-sized copies
        self.steps.corrections, changes, self._own_next = [], {}, {}
        for name in list(self._start):
            start = self._start.pop(name)
            changes[name] = (start - payload[name].detach().float()) / rate_sum - self._server_control[name]
            self._own_next[name] = self._own.pop(name) + changes[name]
        return {**payload, **{message_key(name, "control"): change for name, change in changes.items()}}

    def client_state(self, client_id) -> TensorDict:
        controls = {message_key(name, "control"): c.detach().cpu() for name, c in self._own_next.items()}
        return {**controls, CONTROL_ROUND: torch.tensor(self.round_number)}

    def begin_round(self, round_number: int) -> None:
        super().begin_round(round_number)
        self._control_sum: TensorDict | None = None  # sum of the round's Delta c_k, unweighted
        self._updated: dict = {}  # client -> its c_k+ (this process's clients)
        self._messaged: set = set()  # clients sent a message this round (this process's)

    def aggregate(self, payload: TensorDict, weight: float, client_id=None) -> None:
        super().aggregate({k: v for k, v in payload.items() if parse(k).part != "control"}, weight, client_id)
        changes = {name: payload[message_key(name, "control")].detach().float() for name in self.control}
        if self._control_sum is None:
            self._control_sum = {name: torch.zeros_like(c) for name, c in self.control.items()}
        for name, change in changes.items():
            self._control_sum[name].add_(change.to(self._control_sum[name].device))
        self._own_next = {}  # (in the simulation, the client's side of it: the server keeps c_k+ in _updated)
        old = self.client_controls.get(client_id, {})
        self._updated[client_id] = {n: c.cpu() + old[n] if n in old else c.cpu() for n, c in changes.items()}

    def synchronize(self) -> None:
        super().synchronize()
        self._control_sum = all_reduce_sums(self._control_sum)
        self._updated = united_across_ranks(self._updated)
        self._messaged = set().union(*all_gather_objects(self._messaged))

    def finish_round(self, model: nn.Module) -> None:
        super().finish_round(model)
        for name, total in (self._control_sum or {}).items():  # c += (|S| / N) mean_k Delta c_k
            self.control[name].add_(total.to(self.control[name].device), alpha=1.0 / self.args.num_clients)
        self.client_controls.update(self._updated)
        self.control_round.update(dict.fromkeys(self._updated, self.round_number))
        self.unsure = (self.unsure | self._messaged) - set(self._updated)

    def state_dict(self) -> dict:
        controls = {"control": self.control, "client_controls": self.client_controls}
        return {**super().state_dict(), **controls, "control_round": self.control_round}

    def load_state_dict(self, model: nn.Module, state: dict, model_state: TensorDict) -> None:
        super().load_state_dict(model, state, model_state)
        for name, value in state["control"].items():
            self.control[name].copy_(value)
        self.client_controls = state["client_controls"]
        self.control_round = state.get("control_round", {})  # absent from checkpoints before it was kept
        self.unsure = set(self.client_controls)  # their machines may have restarted since
