"""GaLore + FedAvg with an exact low-rank uplink.

Within one projector period of GaLore-AdamW (galore_torch's `adamw.py`), every update of a targeted 2-D weight lies
in the span of the period's projector, and weight decay is applied after the update: W <- (W - a P N)(1 - lr wd).
So after the period W_end = c W_start + P R, with c the product of (1 - lr_t wd) over the period's steps and
R = P^T (W_end - c W_start) (P has orthonormal columns; for a right projection Q, W_end = c W_start + R Q and
R = (W_end - c W_start) Q^T). A client sends, per targeted weight and period, (c, P, R): r (m + n) numbers instead of
m n. The server rebuilds every client's weights from the global ones, period by period, and averages them as
FedAvg does: the aggregate is FedAvg's, up to floating-point rounding. Other trainable tensors travel dense.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import TrainerCallback

from fed_trainer.strategies.base import TensorDict
from fed_trainer.strategies.capabilities import Capabilities
from fed_trainer.strategies.fedavg import FedAvg
from fed_trainer.strategies.keys import message_key, parse
from fed_trainer.strategies.registry import register_strategy

if TYPE_CHECKING:
    from fed_trainer.config import FederatedConfig

# GaLore's one-sided projections (P on the left or Q on the right); proj_type "full" projects both sides
ONE_SIDED = ("std", "reverse_std", "left", "right")


def galore_proj_type(args: FederatedConfig) -> str:
    """GaLore's `proj_type` from `optim_args` ("rank=64,update_proj_gap=20,proj_type=std"), transformers' default
    "std" when it is not given."""
    pairs = (item.split("=", 1) for item in str(args.optim_args or "").split(",") if "=" in item)
    return {key.strip(): value.strip() for key, value in pairs}.get("proj_type", "std")


class ProjectedUpdates(TrainerCallback):
    """Records, on the client trainer, each GaLore period's (c, P, R) for every projected weight.

    A period ends after the step that makes GaLore's step count a multiple of `update_proj_gap` (the next step
    computes a new projector) and at the end of the client's training.
    """

    def __init__(self) -> None:
        self.periods: dict[torch.Tensor, list[tuple[float, str, torch.Tensor, torch.Tensor]]] = {}

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.optimizer = optimizer
        self.groups = [group for group in optimizer.param_groups if "rank" in group]
        params = [p for group in self.groups for p in group["params"]]
        self.periods = {p: [] for p in params}
        self.start = {p: p.detach().clone() for p in params}  # the weights at the period's start
        self.decay = dict.fromkeys(params, 1.0)  # c of the period so far
        self.open = False

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        for group in self.groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.decay[p] *= 1.0 - group["lr"] * group["weight_decay"]
        self.open = True

    def on_optimizer_step(self, args, state, control, **kwargs):
        group = self.groups[0] if self.groups else None
        if group is not None and self._step(group) % group["update_proj_gap"] == 0:
            self._close_period()

    def on_train_end(self, args, state, control, **kwargs):
        if self.open:
            self._close_period()
        self.start = {}

    def _step(self, group) -> int:
        return next(self.optimizer.state[p]["step"] for p in group["params"] if "step" in self.optimizer.state[p])

    @torch.no_grad()
    def _close_period(self) -> None:
        for p, start in self.start.items():
            projector = self.optimizer.state[p].get("projector")
            if projector is None:  # no gradient reached this weight: it has not moved
                continue
            delta = p.detach().float() - self.decay[p] * start.float()
            basis = projector.ortho_matrix.float()
            if basis.shape[0] == p.shape[0] and basis.shape[1] != p.shape[1]:  # left: W += P R, P is m x r
                side, factor = "left", basis.T @ delta
            else:  # right: W += R Q, Q is r x n
                side, factor = "right", delta @ basis.T
            periods, decay = self.periods[p], self.decay[p]
            if periods and periods[-1][1] == side and torch.equal(periods[-1][2], basis):
                # the same projector (galore_shared's is fixed): one period, c2 (c1 W + P R1) + P R2
                previous, _, kept, earlier = periods.pop()
                decay, basis, factor = previous * decay, kept, earlier * decay + factor
            periods.append((decay, side, basis.clone(), factor))
            start.copy_(p.detach())
            self.decay[p] = 1.0
        self.open = False


@register_strategy("galore_lowrank")
class GaLoreLowRank(FedAvg):
    """FedAvg's aggregate from GaLore clients that send each projected weight as (c, P, R) per projector period."""

    title = "GaLore + FedAvg, low-rank uplink"
    capabilities = Capabilities(
        exact=True, robust_rules=True, undo_round=True, local_optimizer="galore_adamw", server_optimizer=True
    )
    paper = (
        "Why Gradient Subspace? Identifying and Mitigating LoRA's Bottlenecks in Federated Fine-Tuning of Large "
        "Language Models",
        "2410.23111",
    )

    def setup(self, model: nn.Module, args: FederatedConfig, peft_configs: dict | None = None) -> nn.Module:
        if galore_proj_type(args) not in ONE_SIDED:
            raise ValueError(
                f"strategy {self.name!r} sends one-sided GaLore projections (W = c W + P R), but optim_args sets "
                f"proj_type={galore_proj_type(args)!r}, which projects both sides: use one of {ONE_SIDED}, or "
                "strategy='fedavg'."
            )
        self.recorder = self.recording()
        self.names = {p: name for name, p in model.named_parameters()}
        return super().setup(model, args, peft_configs)

    def recording(self) -> ProjectedUpdates:
        """The client-trainer callback that records the projected updates."""
        return ProjectedUpdates()

    def client_callbacks(self) -> list[TrainerCallback]:
        return [self.recorder]

    def client_payload(self, model: nn.Module, client_id) -> TensorDict:
        payload = dict(self.averaged_state(model))
        for p, periods in self.recorder.periods.items():
            if not periods:
                continue
            name = self.names[p]
            del payload[name]
            for j, (decay, side, basis, factor) in enumerate(periods):
                payload[message_key(name, "c", period=j)] = torch.tensor(decay, dtype=torch.float64)
                payload[message_key(name, side, period=j)] = basis
                payload[message_key(name, "R", period=j)] = factor
        return payload

    def aggregate(self, payload: TensorDict, weight: float, client_id=None) -> None:
        super().aggregate(self.rebuilt(payload), weight, client_id)

    def rebuilt(self, payload: TensorDict) -> TensorDict:
        """The client's dense weights: the global ones carried through its periods, W <- c W + P R (or R Q)."""
        dense = {name: value for name, value in payload.items() if parse(name).period is None}
        for name, start in self.global_state.items():
            if name in dense:
                continue
            weight, j = start.to(self.sent_dtypes[name]).float(), 0  # as the client got it
            while message_key(name, "c", period=j) in payload:
                factor = payload[message_key(name, "R", period=j)].float()
                left, right = (payload.get(message_key(name, side, period=j)) for side in ("left", "right"))
                step = left.float() @ factor if left is not None else factor @ right.float()
                weight = float(payload[message_key(name, "c", period=j)]) * weight + step
                j += 1
            dense[name] = weight
        return dense
