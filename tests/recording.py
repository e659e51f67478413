"""A callback that records, round by round, what the contract tests compare: each client's trained model and the
global model, as effective (adapter-merged) weights."""

import copy

from peft import PeftModel

from fed_trainer import FederatedCallback


def merged_state(model) -> dict:
    """The model's effective weights: a copy with any adapter merged in by PEFT."""
    plain = copy.deepcopy(model)
    plain = plain.merge_and_unload() if isinstance(plain, PeftModel) else plain
    return {k: v.detach().double() for k, v in plain.state_dict().items()}


class Record(FederatedCallback):
    """Per round: the client weights, each client's merged model after local training, the merged global model."""

    def __init__(self):
        self.rounds = []

    def on_round_begin(self, args, state, control, client_weights=None, model=None, **kwargs):
        self.rounds.append({"weights": client_weights, "clients": {}, "start": merged_state(model)})

    def on_client_end(self, args, state, control, client_id=None, model=None, **kwargs):
        self.rounds[-1]["clients"][client_id] = merged_state(model)

    def on_round_end(self, args, state, control, model=None, **kwargs):
        self.rounds[-1]["global"] = merged_state(model)


def aggregation_gaps(entry: dict) -> dict:
    """For one recorded round: each weight's largest gap between the global model and sum_k p_k W_k of the round's
    trained client models (0 for an exact strategy)."""
    weights, clients = entry["weights"], entry["clients"]
    return {
        name: (value - sum(weights[cid] * state[name] for cid, state in clients.items())).abs().max().item()
        for name, value in entry["global"].items()
    }
