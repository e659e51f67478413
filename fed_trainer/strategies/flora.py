"""FLoRA (Wang et al., 2024): stack the clients' LoRA products into the base weight, then start LoRA afresh.

W0 += [s_1 p_1 B_1, ..., s_K p_K B_K] [A_1; ...; A_K] = sum_k p_k s_k B_k A_k, exact for any mix of ranks. Each
round every client starts from new factors at its own rank (A kaiming-uniform, seeded per round and client; B
zero). Uplink r_k(out+in) per layer. The downlink carries the stacks a client has not folded yet: those of every
round since its last update reached the server (the previous round's alone when it takes part every round), so a
client that skipped rounds, failed or lost its state still ends up with the global model.
"""

from __future__ import annotations

import torch
from torch import nn

from fed_trainer.distributed import all_gather_objects
from fed_trainer.strategies.base import TensorDict
from fed_trainer.strategies.lora import StackedLoraStrategy, fold_into_base
from fed_trainer.strategies.registry import register_strategy
from fed_trainer.zero import local_shard

# Message key: the round of the global model the client is assumed to hold; the stacks of later rounds follow.
SYNCED = "synced_round"


def round_key(round_number: int, key: str) -> str:
    return f"round{round_number}.{key}"


def round_of(prefix: str) -> int:
    """The round number of a `round_key` prefix ("round3" -> 3)."""
    return int(prefix[len("round") :])


@register_strategy("flora")
class FLoRA(StackedLoraStrategy):
    def setup(self, model: nn.Module, args, peft_configs: dict | None = None) -> nn.Module:
        model = super().setup(model, args, peft_configs)
        self.history: dict[int, TensorDict] = {}  # round -> the stacks folded into the base at its end
        # client -> the round of the global model its machine holds (0, the initial model, if not known)
        self.synced: dict = {}
        self.clear_adapters()
        return model

    def state_dict(self) -> dict:
        # `synced` is left out: a resumed run assumes nothing of the clients' machines (a new Flower run starts
        # every ClientApp afresh), so its first messages carry every round's stacks.
        return {**super().state_dict(), "history": self.history}

    def load_state_dict(self, model: nn.Module, state: dict, model_state: TensorDict) -> None:
        super().load_state_dict(model, state, model_state)
        self.history, self.synced = state["history"], {}

    def begin_round(self, round_number: int) -> None:
        super().begin_round(round_number)
        self._synced_now: dict = {}  # this process's changes to `synced` this round

    def _set_synced(self, client_id, round_number: int) -> None:
        self.synced[client_id] = self._synced_now[client_id] = round_number

    def server_message(self, client_id) -> TensorDict:
        # In the simulation the shared live model's base already holds every stack; a client on its own machine
        # folds them in `catch_up`. No factors: each client starts afresh.
        since = self.synced.get(client_id, 0)
        self._set_synced(client_id, 0)  # unknown until its update arrives: a failed client may have lost its state
        stacks = {round_key(r, k): t for r, s in self.history.items() if r > since for k, t in s.items()}
        return {**super().server_message(client_id), SYNCED: torch.tensor(since), **stacks}

    def aggregate(self, payload: TensorDict, weight: float, client_id=None) -> None:
        super().aggregate(payload, weight, client_id)
        self._set_synced(client_id, self.round_number - 1)

    def synchronize(self) -> None:
        super().synchronize()
        for changes in all_gather_objects(self._synced_now):  # each process served its own clients
            self.synced.update(changes)

    def catch_up(self, model: nn.Module, message: TensorDict, kept: TensorDict) -> TensorDict:
        """Fold the stacks of the rounds after the one this machine holds into its base weights."""
        held, since = (int(kept[SYNCED]) if kept else 0), int(message[SYNCED])
        if held < since:
            raise RuntimeError(
                f"this client holds the global model of round {held}, but the server sent the rounds after {since} "
                "only (was its machine restarted?); it is dropped this round and sent every round the next time."
            )
        bases = {name: local_shard(layer.get_base_layer().weight) for name, layer in self.layers.items()}
        for name, weight in bases.items() if kept else ():
            weight.data.copy_(kept[f"{name}.base"])
        prefixes = sorted({key.split(".", 1)[0] for key in message if key.startswith("round")}, key=round_of)
        for prefix in (p for p in prefixes if round_of(p) > held):
            self._fold({key.split(".", 1)[1]: t for key, t in message.items() if key.startswith(f"{prefix}.")})
        return {
            **{f"{name}.base": w.detach().clone() for name, w in bases.items()},
            SYNCED: torch.tensor(self.round_number - 1),
        }

    def _fold(self, stacks: TensorDict) -> None:
        """Add one round's stacked update, left @ right, to every targeted base weight."""
        for name, layer in self.layers.items():
            fold_into_base(layer, stacks[f"{name}.stack_left"] @ stacks[f"{name}.stack_right"])

    def finish_round(self, model: nn.Module) -> None:
        super().finish_round(model)
        stacks = {}
        for name in self.layers:
            left, right = self.stacked(name)
            stacks.update({f"{name}.stack_left": left, f"{name}.stack_right": right})
        self._fold(stacks)
        self.history[self.round_number] = stacks
        self.clear_adapters()
