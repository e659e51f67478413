"""The base class every aggregation strategy derives from."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from fed_trainer.compression import UpdateCompressor
from fed_trainer.distributed import all_reduce_scalar, all_reduce_sums
from fed_trainer.server_optimizer import ServerOptimizer
from fed_trainer.server_state import zeros_placed
from fed_trainer.strategies.capabilities import Capabilities
from fed_trainer.zero import load_whole_state, local_shard, own_part, whole

if TYPE_CHECKING:
    from fed_trainer.config import FederatedConfig

TensorDict = dict[str, torch.Tensor]


def tensor_bytes(tensors: TensorDict) -> int:
    """Bytes needed to send `tensors` as they are (numel x element size, summed)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def equal_tensors(a: TensorDict, b: TensorDict) -> bool:
    """Whether `a` and `b` hold the same names with equal tensors (dtype, shape, device and values)."""
    if a.keys() != b.keys():
        return False
    return all(
        x is y or (x.dtype == y.dtype and x.shape == y.shape and x.device == y.device and torch.equal(x, y))
        for x, y in ((a[name], b[name]) for name in a)
    )


def trainable_state(model: nn.Module) -> TensorDict:
    """The live tensors clients can change: trainable parameters and floating-point buffers (e.g. BatchNorm stats).

    Frozen parameters are the same on every client, so they are neither sent nor averaged. Under DeepSpeed ZeRO-3
    a parameter is this rank's shard of it: the average is entry-wise, so each rank averages its own shards.
    """
    state = {name: local_shard(p) for name, p in model.named_parameters() if p.requires_grad}
    state.update({name: b for name, b in model.named_buffers() if b.is_floating_point()})
    return state


class Strategy(ABC):
    """One federated aggregation method.

    A strategy answers four questions, one hook each:

    1. `server_message` + `load_client`: how a client's model is prepared from the global state;
    2. `client_payload`: what a client sends back after local training;
    3. `aggregate`: how payloads are combined, called once per client with its weight p_k (a running
       weighted sum, so memory does not grow with the number of clients);
    4. `finish_round`: how the aggregate becomes the new global state (and the live model).

    The trainer counts the bytes of every `server_message` and `client_payload` as the traffic of a round.
    """

    name: ClassVar[str]
    title: ClassVar[str] = ""  # the method's name in prose and in generated tables
    capabilities: ClassVar[Capabilities] = Capabilities()  # checked before any training (`check_capabilities`)
    paper: ClassVar[tuple[str, str] | None] = None  # (title, arXiv id) of the method, for the model card
    # examples each client of round 0 takes its mean gradient over (`gradient_parameters`), for a strategy that
    # starts from the clients' gradients; 0: no round 0, the run starts training at round 1
    gradient_examples: int = 0

    def __init__(self) -> None:
        self.args: FederatedConfig | None = None
        self._sum: TensorDict | None = None
        self._mass = 0.0  # the sum of the weights aggregated this round
        self.sharded = False  # whether the model's parameters are ZeRO-3 partitions (see `on_model_sharded`)
        self.round_number = 0  # the round in progress (set by `begin_round`)
        self.server_optimizer: ServerOptimizer | None = None  # the server's step on round updates (`setup`)
        self.compressor: UpdateCompressor | None = None  # how payloads travel (`update_compression`; `setup`)
        self.downlink: UpdateCompressor | None = None  # how messages travel (`downlink_compression`; `setup`)
        self.downlink_reference: TensorDict = {}  # the message at the start of the run (`keep_downlink_reference`)
        self.state_device: torch.device | None = None  # where the server state lives (None: the payloads' device)

    def setup(self, model: nn.Module, args: FederatedConfig, peft_configs: dict | None = None) -> nn.Module:
        """Called once with the initial global model (and LoRA strategies' per-client `LoraConfig`s).

        Returns the model to train (a LoRA strategy wraps it in a `PeftModel`).
        """
        self.args = args
        self.server_optimizer = ServerOptimizer.from_args(args)
        self.compressor = UpdateCompressor.from_args(args)
        self.downlink = UpdateCompressor.for_downlink(args)
        return model

    def keep_downlink_reference(self) -> None:
        """With a compressed downlink, keep the message at the start of the run (every client builds the same
        initial model, so it holds these values too): messages travel as their difference from it. Called once the
        set-up is done, before any round (and before a checkpoint is resumed)."""
        if self.downlink is not None:
            self.downlink_reference = {name: t.detach().clone() for name, t in self.server_message(None).items()}

    def sent_message(self, message: TensorDict) -> TensorDict:
        """`message` as it travels (compressed against `downlink_reference` with a compressed downlink)."""
        return message if self.downlink is None else self.downlink.encoded(message, self.downlink_reference, None)

    def received_message(self, sent: TensorDict) -> TensorDict:
        """The message a client decodes from what was `sent` (`sent_message`)."""
        return sent if self.downlink is None else self.downlink.decoded(sent, self.downlink_reference)

    def client_callbacks(self) -> list:
        """`TrainerCallback`s added to the client trainer, for a strategy that records what happens during local
        training (none by default)."""
        return []

    def on_model_sharded(self, model: nn.Module) -> None:
        """Called once DeepSpeed ZeRO-3 has partitioned `model`'s parameters over the ranks (before the first
        round): take the global state from the partitions (`setup` leaves it to this under ZeRO-3:
        `fed_trainer.zero.zero3_run`). Needed where `capabilities.zero3` is declared."""
        raise NotImplementedError(
            f"strategy {self.name!r} declares ZeRO-3 support but implements no on_model_sharded."
        )

    def gradient_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The weights whose gradients the clients of round 0 send, by payload name (see `gradient_examples`); the
        round's aggregate, the weighted mean of those gradients, is then the strategy's to use in `finish_round`
        (`round_number` 0)."""
        raise NotImplementedError(f"strategy {self.name!r} asks for gradient_examples but has no gradient_parameters.")

    @abstractmethod
    def server_message(self, client_id) -> TensorDict:
        """The tensors the server sends to `client_id` at the start of a round."""

    @abstractmethod
    def load_client(self, model: nn.Module, message: TensorDict, client_id) -> None:
        """Make `model` the client's starting model from the server's `message`."""

    @abstractmethod
    def client_payload(self, model: nn.Module, client_id) -> TensorDict:
        """The tensors the client sends back after local training."""

    @abstractmethod
    def finish_round(self, model: nn.Module) -> None:
        """Turn the aggregate of this round into the new global state and load it into `model`."""

    def catch_up(self, model: nn.Module, message: TensorDict, kept: TensorDict) -> TensorDict:
        """On a client that runs on its own machine (a Flower SuperNode), which builds the initial model afresh for
        every round: bring `model` to the round's global state from what the machine `kept` after its last round
        and the server's `message`, before `load_client`; returns what it keeps for its next round.

        A strategy whose message carries everything a client needs keeps nothing (the default). The simulation's
        clients share the server's live model, which already holds the global state, and skip this.
        """
        return {}

    def machine_kept(self, kept: TensorDict | None, training: bool = True) -> TensorDict:
        """What a client's own machine kept after the client's last round that reached the server, for `catch_up`
        (or, not `training`, `personal_from`); where the machine no longer has it (None: its files gone), nothing,
        once `kept_lost` (the strategy's, and for training its compressor's) has let it go on without it."""
        if kept is not None:
            return kept
        self.kept_lost()
        if training and self.compressor is not None:
            self.compressor.kept_lost()
        return {}

    def kept_lost(self) -> None:
        """On a client's own machine that lost what it kept after the client's last round that reached the server:
        raise (the client is dropped, with the reason) if only that machine held it; by default the server's messages
        bring a client whatever it lacks, so nothing."""
        return None

    def client_state(self, client_id) -> TensorDict:
        """On a client that runs on its own machine, after its payload was taken: what it keeps for its next round
        beyond what `catch_up` kept (merged over it); nothing by default. (The simulation keeps such state in the
        strategy itself.)"""
        return {}

    def personal_state(self, client_id) -> TensorDict:
        """The tensors that make the live global model client `client_id`'s own (FedSA-LoRA: its B), loaded over it
        to evaluate that client (`fed_trainer.client_eval`); none by default: the global model serves every
        client."""
        return {}

    def personal_from(self, kept: TensorDict) -> None:
        """On a client's own machine, before it is evaluated: take its `personal_state` from what the machine kept
        after its last round (`client_state`); nothing by default."""
        return None

    def global_tensors(self, model: nn.Module) -> TensorDict:
        """The tensors that make a freshly built model (the run's initial one) the live global `model`: what a
        client evaluating the global model on its own machine is sent (`fed_trainer.client_eval.remote_scores`).
        The trainable parameters and floating buffers; a strategy that changes frozen weights adds them."""
        return trainable_state(model)

    def begin_round(self, round_number: int) -> None:
        """Called with the round number (from 1) before the round's first client; zeroes the running aggregate."""
        self.round_number = round_number
        self._mass = 0.0
        if self._sum is not None:
            for t in self._sum.values():
                t.zero_()

    def aggregate(self, payload: TensorDict, weight: float, client_id=None) -> None:
        """Add `weight * payload` to the running sum, in float32 whatever the payload's dtype.

        The weights of a round sum to one unless a client failed or was rejected; `finish_round` divides by the
        weight actually aggregated (`aggregated_weight`), so the result is the weighted mean of the clients kept.
        """
        self._mass += weight
        if self._sum is None:
            self._sum = {k: zeros_placed(v, self.state_device or v.device) for k, v in payload.items()}
        for k, v in payload.items():  # tensor by tensor: one payload tensor in transit to the state's device
            self._sum[k].add_(v.detach().to(self._sum[k].device), alpha=weight)

    def synchronize(self) -> None:
        """Combine the partial aggregates of the processes of a client-parallel round (each aggregated its own
        clients), so that every rank holds the aggregate of the whole round; called before `finish_round`.

        The base class sums the running weighted sum and the weight over ranks. A strategy that keeps more than
        that per round extends it (and calls `super().synchronize()`).
        """
        self._sum = all_reduce_sums(self._sum)
        self._mass = all_reduce_scalar(self._mass)

    @property
    def aggregated_weight(self) -> float:
        """The sum of the weights aggregated so far this round."""
        return self._mass

    def restore_global(self, model: nn.Module) -> None:
        """Make the live `model` the global model of the last finished round again, undoing the training of this
        round's clients (used when a round is abandoned, before its checkpoint is written)."""
        raise NotImplementedError(f"strategy {self.name!r} declares undo_round but has no restore_global.")

    def traffic_bytes(self, tensors: TensorDict) -> int:
        """The bytes of a message or payload that this process accounts for. Under ZeRO-3 the trainer sums them
        over the ranks, each of which holds its shards; a strategy that sends whole tensors there (alike on every
        rank) counts them on one rank only."""
        return tensor_bytes(tensors)

    def server_parameter(self, name: str) -> torch.Tensor | None:
        """The live parameter that the server optimizer's state named `name` has the shape of (each rank steps its
        partition of it under ZeRO-3); None for state that is whole on every rank."""
        return None

    def whole_state(self, name: str, shard: torch.Tensor) -> torch.Tensor:
        """Server state `name` whole, for a checkpoint (gathered from the ranks' partitions under ZeRO-3)."""
        param = self.server_parameter(name)
        return shard if param is None else whole(shard, param)

    def own_state(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """This rank's part of the whole server state `name` from a checkpoint (all of it without ZeRO-3), on the
        server state's device."""
        param = self.server_parameter(name)
        part = value if param is None else own_part(param, value.to(param.device))
        return part if self.state_device is None else part.to(self.state_device)

    def state_dict(self) -> dict:
        """What the strategy needs, beyond the live model's weights, to continue a run (saved in round
        checkpoints); tensors only in plain containers. Called on every process (under ZeRO-3 it may gather)."""
        state = {} if self.compressor is None else {"compression": self.compressor.state_dict()}
        if self.server_optimizer is None:
            return state
        return {**state, "server_optimizer": self.server_optimizer.state_dict(self.whole_state)}

    def load_state_dict(self, model: nn.Module, state: dict, model_state: TensorDict) -> None:
        """Resume: load the checkpoint's `model_state` into `model` and restore `state` from `state_dict()`."""
        if (self.server_optimizer is None) == ("server_optimizer" in state):
            raise ValueError(
                f"this run has server_optimizer={self.args.server_optimizer!r}, but the checkpoint was written by a "
                f"run {'with' if 'server_optimizer' in state else 'without'} one: resume with the checkpointed run's "
                "server_optimizer, or start a new run."
            )
        load_whole_state(model, model_state)
        if self.compressor is not None and "compression" in state:  # (a run that compressed nothing before has none)
            self.compressor.load_state_dict(state["compression"])
        if self.server_optimizer is not None:
            self.server_optimizer.load_state_dict(state["server_optimizer"], self.own_state)

    def merged_model(self, model: nn.Module) -> nn.Module:
        """The global model as a plain transformers model (strategies with adapters fold them in)."""
        return model
