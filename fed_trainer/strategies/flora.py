"""FLoRA (Wang et al., 2024): stack the clients' LoRA products into the base weight, then start LoRA afresh.

W0 += [s_1 p_1 B_1, ..., s_K p_K B_K] [A_1; ...; A_K] = sum_k p_k s_k B_k A_k, exact for any mix of ranks. Each
round every client starts from new factors at its own rank (A kaiming-uniform, seeded per round and client; B
zero). Uplink r_k(out+in) per layer. The downlink carries the stacks a client has not folded yet: those of every
round since its last update reached the server (the previous round's alone when it takes part every round), so a
client that skipped rounds, failed or lost its state still ends up with the global model. Where those stacks
would outweigh the folded base weights themselves (out*in per layer), or reach back beyond the rounds the server
still keeps, the message carries the folded base instead; the server keeps only as many rounds of stacks as fit
in the size of the base weights, so its memory does not grow with the number of rounds.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from fed_trainer.strategies.base import TensorDict, tensor_bytes
from fed_trainer.strategies.client_ledger import ClientLedger
from fed_trainer.strategies.keys import message_key, parse
from fed_trainer.strategies.lora import StackedLoraStrategy, fold_into_base
from fed_trainer.strategies.registry import register_strategy

# Message key: the round of the global model the client is assumed to hold; the stacks of later rounds follow.
SYNCED = "synced_round"


@register_strategy("flora")
class FLoRA(StackedLoraStrategy):
    """Stacks the clients' fresh factors and folds sum p_k s_k B_k A_k into the base every round: exact."""

    title = "FLoRA"
    paper = (
        "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous Low-Rank Adaptations",
        "2409.05976",
    )

    def setup(self, model: nn.Module, args, peft_configs: dict | None = None) -> nn.Module:
        model = super().setup(model, args, peft_configs)
        self.history: dict[int, TensorDict] = {}  # round -> the stacks folded into the base at its end
        self.dropped_through = 0  # the rounds up to this one are no longer in `history`
        # client -> the round of the global model its machine holds (0, the initial model, if not known)
        self.synced = ClientLedger()
        # what the folded base weights of the targeted layers weigh (whole, also under ZeRO-3)
        self.base_bytes = sum(
            getattr(w, "ds_numel", w.numel()) * w.element_size() for w in self.base_weights().values()
        )
        self.clear_adapters()
        return model

    def state_dict(self) -> dict:
        # `synced` is left out: a resumed run assumes nothing of the clients' machines (a new Flower run starts
        # every ClientApp afresh), so its first messages carry every round's stacks (or the folded base).
        return {**super().state_dict(), "history": self.history, "dropped_through": self.dropped_through}

    def load_state_dict(self, model: nn.Module, state: dict, model_state: TensorDict) -> None:
        super().load_state_dict(model, state, model_state)
        self.history, self.dropped_through, self.synced = state["history"], state["dropped_through"], ClientLedger()

    def begin_round(self, round_number: int) -> None:
        super().begin_round(round_number)
        self.synced.begin_round()

    def server_message(self, client_id) -> TensorDict:
        # In the simulation the shared live model's base already holds every stack; a client on its own machine
        # folds them in `catch_up`. No factors: each client starts afresh.
        since = self.synced.get(client_id, 0)
        self.synced.note(client_id, 0)  # unknown until its update arrives: a failed client may have lost its state
        stacks = {
            str(dataclasses.replace(parse(k), round=r)): t
            for r, s in self.history.items()
            if r > since
            for k, t in s.items()
        }
        if since < self.dropped_through or tensor_bytes(stacks) > self.base_bytes:  # the folded base is cheaper
            since = self.round_number - 1
            stacks = self.base_message()
        return {**super().server_message(client_id), SYNCED: torch.tensor(since), **stacks}

    def aggregate(self, payload: TensorDict, weight: float, client_id=None) -> None:
        super().aggregate(payload, weight, client_id)
        self.synced.note(client_id, self.round_number - 1)

    def synchronize(self) -> None:
        super().synchronize()
        self.synced.synchronize()

    def catch_up(self, model: nn.Module, message: TensorDict, kept: TensorDict) -> TensorDict:
        """Fold the stacks of the rounds after the one this machine holds into its base weights (or take the
        folded base from the message)."""
        later = []
        if message_key(next(iter(self.layers)), "base") in message:  # the folded base itself
            source = message
        else:
            held, since = (int(kept[SYNCED]) if kept else 0), int(message[SYNCED])
            if held < since:
                raise RuntimeError(
                    f"this client holds the global model of round {held}, but the server sent the rounds after "
                    f"{since} only (was its machine restarted?); it is dropped this round and sent every round (or "
                    "the folded base) the next time."
                )
            source = kept
            keys = {key: parse(key) for key in message}
            later = sorted({k.round for k in keys.values() if k.round is not None and k.round > held})
        if source:
            self.load_base(source)
        for number in later:
            self._fold({message_key(k.tensor, k.part): message[key] for key, k in keys.items() if k.round == number})
        kept = {key: weight.detach().clone() for key, weight in self.base_message().items()}
        return {**kept, SYNCED: torch.tensor(self.round_number - 1)}

    def _fold(self, stacks: TensorDict, server_step: bool = False) -> None:
        """Add one round's stacked update, left @ right, to every targeted base weight (stepped by the server
        optimizer if `server_step`)."""
        for name, layer in self.layers.items():
            update = stacks[message_key(name, "stack_left")] @ stacks[message_key(name, "stack_right")]
            fold_into_base(layer, update, self.base_step(name) if server_step else None)

    def finish_round(self, model: nn.Module) -> None:
        super().finish_round(model)
        stacks = {}
        for name in self.layers:
            left, right = self.stacked(name)
            stacks.update({message_key(name, "stack_left"): left, message_key(name, "stack_right"): right})
        self._fold(stacks, server_step=True)
        if self.server_optimizer is not None:
            # the base moved by the optimizer's step, not by the stacks: every message carries the folded base
            self.dropped_through = self.round_number
        else:
            self.history[self.round_number] = stacks
        while sum(map(tensor_bytes, self.history.values())) > self.base_bytes:
            # the older rounds would only ever be sent as the (cheaper) folded base
            self.dropped_through = min(self.history)
            del self.history[self.dropped_through]
        self.clear_adapters()
