"""GaLore with one subspace shared by all clients: the server picks each targeted weight's projector, every client
trains GaLore-AdamW with it held fixed, and sends R_k (r x n, or m x r for a right projection) and c_k.

Exactness. With the projector P fixed for the whole round, a client's weight ends at W_k = c_k W + P R_k (see
`galore_lowrank`), so sum p_k W_k = (sum p_k c_k) W + P (sum p_k R_k): the server rebuilds and averages exactly.

The projector rule, and why. Round 1: every client runs GaLore with its own projectors and sends what
`galore_lowrank` sends (c, P, R per projector period). At the end of round 1, and every `refresh_rounds`
rounds after, the server sets each targeted weight's projector to the top-r singular subspace of the
sample-weighted average of the clients' mean gradients over that round, estimated from randomized sketches: a
client sends G_k Omega (m x s, for a left projector) or Omega^T G_k (s x n, right), Omega a Gaussian matrix that
server and clients draw from the same seed, s = r + 10 (Halko, Martinsson and Tropp's oversampling). A sketch is
linear, so the weighted sum of the clients' sketches is the sketch of the average gradient, exactly. The
subspace of the previous round's aggregated update is not used: with a shared P every client's update is P R_k
(plus the weight-decay term c_k W), so that subspace is span(P) again and the projector would never move, while
GaLore's strength is that it does. This is GaLore's own rule (top-r subspace of the current gradient) applied to
the federation's average gradient.

`average_moments`: every client's projected Adam moments live in the coordinates of the same P, so the
server can average them (weighted like the weights) and start the next round's clients from the average instead
of from zero (the direction of FedGaLore, arXiv 2602.01746); they are reset when a new projector is picked.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from galore_torch.galore_projector import GaLoreProjector
from torch import nn

from fed_trainer.distributed import all_gather_objects, all_reduce_sums
from fed_trainer.strategies.base import TensorDict
from fed_trainer.strategies.galore_lowrank import GaLoreLowRank, ProjectedUpdates
from fed_trainer.strategies.keys import message_key, parse
from fed_trainer.strategies.registry import register_strategy

if TYPE_CHECKING:
    from fed_trainer.config import FederatedConfig

OVERSAMPLING = 10
MOMENTS = ("exp_avg", "exp_avg_sq", "step")
# payload and message entries that are not weights: `<weight name>.<kind>`
EXTRAS = ("projector", "sketch", *MOMENTS)


def projector_side(shape: torch.Size, proj_type: str) -> str:
    """Which side GaLore-AdamW projects a weight of `shape` on: 'left' (P: m x r) or 'right' (Q: r x n)."""
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    return proj_type  # "left" or "right": the strategy refuses the two-sided "full" in setup


class FixedProjector(GaLoreProjector):
    """A GaLore projector that keeps the matrix it is given (the server's) instead of recomputing it."""

    def __init__(self, basis: torch.Tensor, group: dict) -> None:
        super().__init__(group["rank"], update_proj_gap=group["update_proj_gap"], scale=group["scale"],
                         proj_type=group["proj_type"])  # fmt: skip
        self.ortho_matrix = basis

    def get_orthogonal_matrix(self, weights, rank, type):  # noqa: A002 - galore_torch's signature
        return self.ortho_matrix


class SharedProjection(ProjectedUpdates):
    """On the client trainer: installs the server's projectors (and averaged moments) in GaLore-AdamW's state before
    the first step, sketches the gradients in rounds after which the server picks new projectors, and keeps the
    final moments when they are to be averaged."""

    def __init__(self, strategy: GaLoreShared) -> None:
        super().__init__()
        self.strategy = strategy

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        super().on_train_begin(args, state, control, optimizer=optimizer, **kwargs)
        strategy, incoming = self.strategy, self.strategy.incoming
        self.sketches, self.sketch_steps, self.moments = {}, 0, {}
        for group in self.groups:
            for p in group["params"]:
                name = strategy.names[p]
                if message_key(name, "projector") in incoming:
                    slot = optimizer.state[p]
                    slot["projector"] = FixedProjector(incoming[message_key(name, "projector")].to(p.device), group)
                    if message_key(name, "exp_avg") in incoming:
                        slot["exp_avg"], slot["exp_avg_sq"] = (
                            incoming[message_key(name, kind)].to(p.device, copy=True) for kind in MOMENTS[:2]
                        )
                        slot["step"] = int(incoming[message_key(name, "step")])
                if strategy.sketching:
                    side = projector_side(p.shape, group["proj_type"])
                    omega = strategy.sketch_matrix(name, p.shape, side, group["rank"]).to(p.device)
                    self.sketches[p] = [side, omega, torch.zeros(0)]

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        super().on_pre_optimizer_step(args, state, control, **kwargs)
        for p, entry in self.sketches.items():
            if p.grad is None:
                continue
            side, omega, total = entry
            grad = p.grad.detach().float()
            sketch = grad @ omega if side == "left" else omega.T @ grad
            entry[2] = sketch if total.numel() == 0 else total.add_(sketch)
        self.sketch_steps += 1

    def on_train_end(self, args, state, control, **kwargs):
        super().on_train_end(args, state, control, **kwargs)
        if self.strategy.sends_moments:
            for group in self.groups:
                for p in group["params"]:
                    slot = self.optimizer.state[p]
                    if isinstance(slot.get("projector"), FixedProjector) and "exp_avg" in slot:
                        self.moments[p] = (slot["exp_avg"].clone(), slot["exp_avg_sq"].clone(), slot["step"])

    def client_sketches(self) -> dict[torch.Tensor, torch.Tensor]:
        """Each weight's sketch of the client's mean gradient over its steps."""
        return {p: total / max(self.sketch_steps, 1) for p, (_, _, total) in self.sketches.items() if total.numel()}


@register_strategy("galore_shared")
class GaLoreShared(GaLoreLowRank):
    """GaLore + FedAvg with a projector per targeted weight that the server picks and every client shares.

    Args:
        refresh_rounds: rounds a shared projector is kept before the server picks the next one from the clients'
            gradient sketches (1: a new one after every round).
        average_moments: average the clients' projected Adam moments on the server and start the next round's
            clients from them while the projector is kept (needs `refresh_rounds` > 1).
    """

    title = "GaLore + FedAvg, shared subspace"

    def __init__(self, refresh_rounds: int = 1, average_moments: bool = False) -> None:
        super().__init__()
        if int(refresh_rounds) != refresh_rounds or refresh_rounds < 1:
            raise ValueError(f"galore_shared's refresh_rounds must be an integer of at least 1, got {refresh_rounds}.")
        if average_moments and refresh_rounds == 1:
            raise ValueError(
                "galore_shared's average_moments needs refresh_rounds > 1: the averaged moments live in the "
                "coordinates of one projector, which refresh_rounds=1 replaces every round."
            )
        self.refresh_rounds, self.average_moments = int(refresh_rounds), bool(average_moments)

    def setup(self, model: nn.Module, args: FederatedConfig, peft_configs: dict | None = None) -> nn.Module:
        model = super().setup(model, args, peft_configs)
        self.index = {name: i for i, name in enumerate(self.names.values())}
        self.layout: dict[str, tuple[str, int]] = {}  # weight -> (side, rank) of its GaLore projector
        self.projectors: TensorDict = {}  # weight -> the shared projector of the coming rounds
        self.moments: TensorDict = {}  # "<weight>.exp_avg" etc.: the averaged moments for the next round
        self.incoming: TensorDict = {}  # on a client: the round's projectors and moments from the message
        return model

    def recording(self) -> ProjectedUpdates:
        return SharedProjection(self)

    @property
    def sketching(self) -> bool:
        """Whether this round's clients sketch their gradients (the server picks new projectors after it)."""
        return (self.round_number - 1) % self.refresh_rounds == 0

    @property
    def sends_moments(self) -> bool:
        """Whether this round's clients send their projected moments (averaged and kept for the next round)."""
        return self.average_moments and not self.sketching

    def sketch_matrix(self, name: str, shape: torch.Size, side: str, rank: int) -> torch.Tensor:
        """Omega of weight `name` this round (n x s for a left projector, m x s for a right one), drawn from
        (seed, round, weight) alike on the server and every client."""
        m, n = shape
        entropy = [self.args.seed, self.round_number, self.index[name]]
        generator = torch.Generator().manual_seed(int(np.random.SeedSequence(entropy).generate_state(1)[0]))
        return torch.randn(n if side == "left" else m, min(rank + OVERSAMPLING, m, n), generator=generator)

    def begin_round(self, round_number: int) -> None:
        super().begin_round(round_number)
        self._extras: TensorDict = {}  # weighted sums of the sketches and moments

    def server_message(self, client_id) -> TensorDict:
        shared = {message_key(name, "projector"): basis for name, basis in self.projectors.items()}
        return {**super().server_message(client_id), **shared, **self.moments}

    def load_client(self, model: nn.Module, message: TensorDict, client_id) -> None:
        super().load_client(model, message, client_id)
        self.incoming = {key: t for key, t in message.items() if parse(key).part in EXTRAS}

    def client_payload(self, model: nn.Module, client_id) -> TensorDict:
        payload = super().client_payload(model, client_id)
        recorder = self.recorder
        for p, name in self.names.items():
            if message_key(name, "projector") in self.incoming:  # the server has the basis: R and c only
                bases = {message_key(name, side, period=0) for side in ("left", "right")}
                payload = {key: t for key, t in payload.items() if key not in bases}
            if p in recorder.moments:
                exp_avg, exp_avg_sq, step = recorder.moments[p]
                payload.update({message_key(name, "exp_avg"): exp_avg, message_key(name, "exp_avg_sq"): exp_avg_sq,
                                message_key(name, "step"): torch.tensor(step, dtype=torch.float64)})  # fmt: skip
        payload.update({message_key(self.names[p], "sketch"): s for p, s in recorder.client_sketches().items()})
        return payload

    def aggregate(self, payload: TensorDict, weight: float, client_id=None) -> None:
        payload = dict(payload)
        for name, basis in self.projectors.items():  # the shared bases this round's clients trained with
            if message_key(name, "R", period=0) in payload:
                payload[message_key(name, self.layout[name][0], period=0)] = basis
        for key in list(payload):
            parsed = parse(key)
            if parsed.period != 0 or parsed.part not in ("left", "right"):
                continue
            name, side, basis = parsed.tensor, parsed.part, payload[key]
            self.layout.setdefault(name, (side, basis.shape[1] if side == "left" else basis.shape[0]))
        extras = {key: payload.pop(key) for key in list(payload) if parse(key).part in EXTRAS}
        super().aggregate(payload, weight, client_id)
        for key, value in extras.items():
            total = self._extras.setdefault(key, torch.zeros_like(value, dtype=torch.float64))
            total.add_(value.detach().double(), alpha=weight)

    def synchronize(self) -> None:
        super().synchronize()
        self._extras = all_reduce_sums(self._extras)
        for layout in all_gather_objects(self.layout):
            self.layout.update(layout)

    def finish_round(self, model: nn.Module) -> None:
        super().finish_round(model)
        mass = self.aggregated_weight
        if self.sketching:  # new projectors, and the moments start afresh in their coordinates
            self.projectors, self.moments = {}, {}
            for name, (side, rank) in self.layout.items():
                sketch = self._extras.get(message_key(name, "sketch"))
                if sketch is None:
                    continue
                u, _, vh = torch.linalg.svd((sketch / mass).float(), full_matrices=False)
                self.projectors[name] = (u[:, :rank] if side == "left" else vh[:rank]).contiguous()
        elif self.average_moments:
            self.moments = {key: (total / mass).float() for key, total in self._extras.items()}
            for key in [key for key in self.moments if parse(key).part == "step"]:
                self.moments[key] = self.moments[key].round().long()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "layout": self.layout, "projectors": self.projectors, "moments": self.moments}

    def load_state_dict(self, model: nn.Module, state: dict, model_state: TensorDict) -> None:
        super().load_state_dict(model, state, model_state)
        self.layout, self.projectors, self.moments = state["layout"], state["projectors"], state["moments"]
