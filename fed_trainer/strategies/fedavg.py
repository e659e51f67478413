"""FedAvg over full weights: W = sum_k p_k W_k (McMahan et al., 2017).

With `optim="galore_adamw"` the clients train with GaLore and this is "GaLore + FedAvg".
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from fed_trainer.distributed import all_gather_tensors
from fed_trainer.memory_model import client_training_bytes, server_state_bytes, tensor_values
from fed_trainer.privacy import dp_noise_generator, private_average
from fed_trainer.robust import clipped, robust_aggregate
from fed_trainer.server_state import OnDevice, placed, state_device
from fed_trainer.strategies.base import Strategy, TensorDict, trainable_state
from fed_trainer.strategies.capabilities import Capabilities
from fed_trainer.strategies.registry import register_strategy
from fed_trainer.zero import local_shard, zero3_run

if TYPE_CHECKING:
    from fed_trainer.config import FederatedConfig


def master_dtype(tensor: torch.Tensor, server_dtype: str) -> torch.dtype:
    """The dtype of the server's copy of a global tensor: float32 for a bfloat16/float16 one unless `server_dtype` is
    "model"."""
    wide = server_dtype == "float32" and tensor.dtype in (torch.bfloat16, torch.float16)
    return torch.float32 if wide else tensor.dtype


def load_tensors(model: nn.Module, tensors: TensorDict) -> None:
    """Copy `tensors` into the parameters and buffers of `model` of the same names (a part of its state, in
    place)."""
    live = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    with torch.no_grad():
        for name, value in tensors.items():
            live[name].copy_(value)


@register_strategy("fedavg")
class FedAvg(Strategy):
    """Weighted average of the clients' trainable weights; exact, uplink out*in per layer.

    Subclasses narrow what is averaged with `averaged_state` and add their own tensors around it.
    """

    paper = ("Communication-Efficient Learning of Deep Networks from Decentralized Data", "1602.05629")

    title = "FedAvg (full weights)"
    capabilities = Capabilities(
        exact=True, robust_rules=True, zero3=True, undo_round=True, server_optimizer=True, compressed_downlink=True
    )

    def averaged_state(self, model: nn.Module) -> TensorDict:
        """The live tensors that are sent both ways and averaged with weights p_k."""
        return trainable_state(model)

    def setup(self, model: nn.Module, args: FederatedConfig, peft_configs: dict | None = None) -> nn.Module:
        model = super().setup(model, args)
        if not zero3_run(args):  # under ZeRO-3: from the partitions, once there are (`on_model_sharded`)
            self._take_global_state(model)
        return model

    def _take_global_state(self, model: nn.Module) -> None:
        averaged = self.averaged_state(model)
        # what travels: each tensor in the live model's dtype; what the server keeps: a float32 master copy of a
        # bfloat16/float16 tensor unless server_dtype="model" (rounding the global model to 16 bits every round
        # loses the updates smaller than its resolution, which the average of a few clients often is)
        self.sent_dtypes = {name: t.dtype for name, t in averaged.items()}
        self.state_device = self.resolved_state_device(model, averaged)
        self.global_state = {name: placed(t, self.state_device, master_dtype(t, self.args.server_dtype))
                             for name, t in averaged.items()}  # fmt: skip
        # the averaged parameters (not buffers such as BatchNorm statistics, which take the plain average)
        self.averaged_parameters = {name: p for name, p in model.named_parameters() if name in self.global_state}

    def resolved_state_device(self, model: nn.Module, averaged: TensorDict) -> torch.device:
        """Where the server state lives (`server_state_device`; "auto" sizes it and a client's training with
        `fed_trainer.memory_model`, on this rank's partitions under ZeRO-3)."""
        args = self.args
        trainable = sum(t.numel() for t in averaged.values())
        dtype_bytes = max((t.element_size() for t in averaged.values()), default=4)
        params = sum(local_shard(p).numel() for p in model.parameters())
        gradients = self.gradient_parameters(model) if self.gradient_examples else {}
        gradient_values = sum(p.numel() for p in gradients.values())
        state = server_state_bytes(
            trainable,
            dtype_bytes,
            server_optimizer=args.server_optimizer,
            server_dtype=args.server_dtype,
            strategy=self.name,
            payloads_kept=0 if args.aggregation_rule == "mean" else args.clients_sampled_per_round,
            downlink_reference=args.downlink_compression != "none",
            gradient_values=gradient_values,
        )
        optim = str(getattr(args.optim, "value", args.optim))
        largest, tied = tensor_values(model)
        training = client_training_bytes(params, trainable, dtype_bytes, optim=optim, strategy=self.name,
                                         largest=largest, tied=tied, device_type=args.device.type)  # fmt: skip
        return state_device(args.server_state_device, args.device, state, training)

    @property
    def keeps_master(self) -> bool:
        """Whether the global state is kept in a wider dtype than the live model's (a float32 master copy)."""
        return any(t.dtype != self.sent_dtypes[name] for name, t in self.global_state.items())

    def server_parameter(self, name: str):
        return self.averaged_parameters.get(name)

    def stepped(self, name: str) -> bool:
        """Whether the server optimizer steps the averaged tensor `name` (every averaged parameter by default)."""
        return name in self.averaged_parameters

    def on_model_sharded(self, model: nn.Module) -> None:
        self.sharded = True
        self._take_global_state(model)

    def begin_round(self, round_number: int) -> None:
        super().begin_round(round_number)
        self._kept: list[TensorDict] = []  # the payloads a robust rule needs all at once

    def aggregate(self, payload: TensorDict, weight: float, client_id=None) -> None:
        args = self.args
        if args.update_clip_norm is not None:
            payload = OnDevice(payload, self.state_device)
            payload = clipped(payload, self.global_state, args.update_clip_norm, self.sharded)
        self.collect(payload, weight, client_id)

    def collect(self, payload: TensorDict, weight: float, client_id=None) -> None:
        """Take `payload` into the round as it is: into the running weighted sum, or kept whole for a robust rule
        (`round_aggregate` combines them)."""
        if self.args.aggregation_rule == "mean":
            super().aggregate(payload, weight, client_id)
        else:
            self._kept.append({name: placed(t, self.state_device, torch.float32) for name, t in payload.items()})

    def synchronize(self) -> None:
        super().synchronize()
        if self.args.aggregation_rule != "mean":  # a robust rule needs every client's payload on every rank
            self._kept = [payload for part in all_gather_tensors(self._kept, self.state_device) for payload in part]

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.keeps_master:  # the live model holds it rounded
            state["global_master"] = {name: self.whole_state(name, t) for name, t in self.global_state.items()}
        return state

    def load_state_dict(self, model: nn.Module, state: dict, model_state: TensorDict) -> None:
        super().load_state_dict(model, state, model_state)
        if "global_master" in state and self.keeps_master:
            for name, value in state["global_master"].items():
                self.global_state[name].copy_(self.own_state(name, value))
            return
        for name, value in self.averaged_state(model).items():  # between rounds the live model is the global one
            self.global_state[name].copy_(value)

    def server_message(self, client_id) -> TensorDict:
        """The global state in the live model's dtypes (a copy of a master tensor, the tensor itself otherwise)."""
        return {name: t.to(self.sent_dtypes[name]) for name, t in self.global_state.items()}

    def load_client(self, model: nn.Module, message: TensorDict, client_id) -> None:
        """Copy the averaged tensors of `message` into `model` (other entries are the subclass's to load)."""
        live = self.averaged_state(model)
        for name, value in message.items():
            if name in live:
                live[name].data.copy_(value)

    def client_payload(self, model: nn.Module, client_id) -> TensorDict:
        return self.averaged_state(model)

    def restore_global(self, model: nn.Module) -> None:
        FedAvg.load_client(self, model, self.global_state, client_id=None)

    def round_aggregate(self) -> TensorDict:
        """The round's payloads combined: their weighted mean (with the Gaussian noise of client-level DP), or the
        robust rule's aggregate."""
        args = self.args
        if args.aggregation_rule == "mean" and args.dp_noise_multiplier is not None:
            std = args.dp_noise_multiplier * args.update_clip_norm / args.clients_sampled_per_round
            noise = dp_noise_generator(args.seed, self.round_number, self.sharded)
            return private_average(self._sum, self.global_state, self.aggregated_weight, std, noise)
        if args.aggregation_rule == "mean":  # the sum becomes the mean in place (zeroed again next round)
            return {name: total.div_(self.aggregated_weight) for name, total in self._sum.items()}
        aggregate = robust_aggregate(self._kept, args.aggregation_rule, args.trim_fraction)
        self._kept = []
        return aggregate

    def finish_round(self, model: nn.Module) -> None:
        aggregate = self.round_aggregate()
        optimizer = self.server_optimizer
        for name, value in self.global_state.items():  # tensor by tensor: one temporary at a time
            if name not in aggregate:  # not sent this round (RoLoRA's frozen factor): unchanged
                continue
            target = aggregate.pop(name).to(value.device)
            if value.dtype != self.sent_dtypes[name]:  # a master copy: it moves by the clients' mean update from
                sent = value.to(self.sent_dtypes[name]).float()  # the rounded weights they started from
                target = value + (target - sent)
            if optimizer is not None and self.stepped(name):
                value.copy_(optimizer.moved(name, value, target))
            else:
                value.copy_(target)
        FedAvg.restore_global(self, model)
