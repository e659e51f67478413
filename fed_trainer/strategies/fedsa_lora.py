"""FedSA-LoRA (Guo et al., ICLR 2025): LoRA's A shared and averaged, each client's B its own across rounds.

The paper's finding is that A learns what the clients share and B what is particular to each. The server averages
A (and the heads) with weights p_k; B never leaves its client: a client trains from the global A with the B it
ended its last round with (a client new to the run: LoRA's initial B, zero). Downlink and uplink: r*in per layer
plus the heads.

There is no single global model: client k's is W0 + s B_k A. `merged_model()` (and what `save_model` writes) is
the shared part, the base with the averaged heads and the initial B (a new client's start, whose adapters add
nothing); the per-client evaluation (`client_eval_split`, `personalization_steps`) evaluates each client's own
model (`personal_state`). The clients' B persist: in the simulation the strategy keeps them on the CPU (saved in
round checkpoints; r*out per layer per client), on Flower each SuperNode keeps its own (`client_state`; a resumed
Flower run is a new run, so its clients start again from the initial B).
"""

from __future__ import annotations

import dataclasses

from torch import nn

from fed_trainer.distributed import united_across_ranks
from fed_trainer.strategies.base import TensorDict
from fed_trainer.strategies.fedavg import load_tensors
from fed_trainer.strategies.lora import LoraStrategy, factor_names
from fed_trainer.strategies.registry import register_strategy


@register_strategy("fedsa_lora")
class FedSALoRA(LoraStrategy):
    """A averaged, every client's B kept by the client (personalised); uplink r*in per layer."""

    title = "FedSA-LoRA"
    paper = ("Selective Aggregation for Low-Rank Adaptation in Federated Learning", "2410.01463")
    # the clients' B are whole tensors kept between rounds, not ZeRO-3 partitions
    capabilities = dataclasses.replace(LoraStrategy.capabilities, zero3=False)

    def prepare_adapter(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        self.initial_b = {n: params[n].detach().to("cpu", copy=True) for n in self.b_names()}
        self.client_bs: dict = {}  # client -> its B (the simulation's clients' own state)
        self.kept_b: TensorDict = {}  # on a SuperNode: its client's B, from what the node kept

    def b_names(self) -> list[str]:
        return [factor_names(layer)[1] for layer in self.layers]

    def averaged_state(self, model: nn.Module) -> TensorDict:
        """Every trainable tensor but the B factors: A and the heads."""
        own = set(self.initial_b)
        return {name: t for name, t in super().averaged_state(model).items() if name not in own}

    def personal_state(self, client_id) -> TensorDict:
        return self.client_bs.get(client_id) or self.kept_b or self.initial_b

    def load_client(self, model: nn.Module, message: TensorDict, client_id) -> None:
        super().load_client(model, message, client_id)
        load_tensors(model, self.personal_state(client_id))

    def client_payload(self, model: nn.Module, client_id) -> TensorDict:
        params = dict(model.named_parameters())
        self._trained[client_id] = {n: params[n].detach().to("cpu", copy=True) for n in self.initial_b}
        return super().client_payload(model, client_id)

    def catch_up(self, model: nn.Module, message: TensorDict, kept: TensorDict) -> TensorDict:
        self.personal_from(kept)
        return {}

    def kept_lost(self) -> None:
        raise RuntimeError(
            "this client's machine no longer holds the B it kept after its last round that reached the server "
            "(FedSA-LoRA keeps each client's B on its own machine only, and the server cannot send it): restore the "
            "node's state-dir, resume from the newest checkpoint (a node keeps the state of that one and of its last "
            "rounds only, for its last keep-federations runs: node config), or start the run again."
        )

    def personal_from(self, kept: TensorDict) -> None:
        self.kept_b = {name: value for name, value in kept.items() if name in self.initial_b}

    def client_state(self, client_id) -> TensorDict:
        return self._trained[client_id]

    def begin_round(self, round_number: int) -> None:
        super().begin_round(round_number)
        self._trained: dict = {}  # client -> its B after this round's training (this process's clients)

    def synchronize(self) -> None:
        super().synchronize()
        self._trained = united_across_ranks(self._trained)

    def restore_global(self, model: nn.Module) -> None:
        super().restore_global(model)
        load_tensors(model, self.initial_b)

    def finish_round(self, model: nn.Module) -> None:
        super().finish_round(model)
        self.client_bs.update(self._trained)
        load_tensors(model, self.initial_b)  # the live model between rounds: the shared part

    def state_dict(self) -> dict:
        return {**super().state_dict(), "client_bs": self.client_bs}

    def load_state_dict(self, model: nn.Module, state: dict, model_state: TensorDict) -> None:
        super().load_state_dict(model, state, model_state)
        self.client_bs = state["client_bs"]
