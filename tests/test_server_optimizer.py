"""Server optimizers: each rule against the formulas written out here, per tensor, in float64, from the global
model seen at `on_round_begin` and the client models seen at `on_client_end`; over three rounds with example-count
weights and a client whose update is rejected in round 2. The contract matrix (tests/test_contract.py) checks the
step on every strategy that takes one, resume, and two ranks against one process (FedAdam on fedex_lora).
"""

import math

import pytest
import torch
from conftest import tiny_bert, toy_dataset
from peft import LoraConfig

from fed_trainer import FederatedCallback, FederatedTrainer

CLIENTS = [toy_dataset(n, seed) for seed, n in enumerate([8, 16, 24], start=1)]
OPTIONS = {
    "fedavgm": dict(server_learning_rate=1.5, server_momentum=0.5),
    "nesterov": dict(),  # DiLoCo's eta 0.7, mu 0.9
    "fedadam": dict(server_learning_rate=1e-2, server_betas=[0.8, 0.9], server_epsilon=1e-3),
    "fedyogi": dict(server_learning_rate=1e-2, server_betas=[0.8, 0.9], server_epsilon=1e-3),
    "fedadagrad": dict(server_learning_rate=1e-2, server_betas=[0.8, 0.9], server_epsilon=1e-3),
}


class Recorder(FederatedCallback):
    """The weights, the global model at each round's start and end, and each client's trained model; client 1's
    training in round 2 starts from NaN weights, so its update is rejected and the round keeps clients 0 and 2."""

    def __init__(self):
        self.weights, self.start, self.clients, self.end = {}, {}, {}, {}

    def on_round_begin(self, args, state, control, round=None, client_weights=None, model=None, **kwargs):
        self.round = round
        self.weights[round], self.clients[round] = client_weights, {}
        self.start[round] = trainable(model)

    def on_client_begin(self, args, state, control, client_id=None, model=None, **kwargs):
        if (self.round, client_id) == (2, 1):
            next(p for p in model.parameters() if p.requires_grad).data.fill_(float("nan"))

    def on_client_end(self, args, state, control, client_id=None, model=None, **kwargs):
        if (self.round, client_id) != (2, 1):
            self.clients[self.round][client_id] = trainable(model)

    def on_round_end(self, args, state, control, model=None, **kwargs):
        self.end[self.round] = trainable(model)


def trainable(model) -> dict:
    return {name: p.detach().double().clone() for name, p in model.named_parameters() if p.requires_grad}


def expected_rounds(recorder: Recorder, rule: str, eta: float, mu: float, beta1: float, beta2: float, tau: float):
    """The global model after each round by the rule's formulas, from the recorded round starts and clients."""
    m, v = {}, {}
    for number in sorted(recorder.start):
        x, clients, weights = recorder.start[number], recorder.clients[number], recorder.weights[number]
        mass = sum(weights[c] for c in clients)
        expected = {}
        for name, xt in x.items():
            delta = sum(weights[c] * (clients[c][name] - xt) for c in clients) / mass
            if rule == "fedavgm":
                m[name] = mu * m.get(name, 0.0) + delta
                expected[name] = xt + eta * m[name]
            elif rule == "nesterov":
                g = -delta
                m[name] = mu * m.get(name, 0.0) + g
                expected[name] = xt - eta * (g + mu * m[name])
            else:
                m[name] = beta1 * m.get(name, 0.0) + (1 - beta1) * delta
                previous = v.get(name, torch.full_like(xt, tau**2))
                if rule == "fedadagrad":
                    v[name] = previous + delta**2
                elif rule == "fedyogi":
                    v[name] = previous - (1 - beta2) * delta**2 * torch.sign(previous - delta**2)
                else:
                    v[name] = beta2 * previous + (1 - beta2) * delta**2
                expected[name] = xt + eta * m[name] / (v[name].sqrt() + tau)
        yield number, expected


@pytest.mark.parametrize("rule", list(OPTIONS))
def test_each_rule_moves_the_global_model_by_its_formula(make_config, rule):
    recorder = Recorder()
    args = make_config(num_rounds=3, server_optimizer=rule, **OPTIONS[rule])
    trainer = FederatedTrainer(model=tiny_bert(dropout=0.0), args=args, client_datasets=CLIENTS, callbacks=[recorder])
    trainer.train()
    assert sorted(recorder.clients[2]) == [0, 2] and sorted(recorder.clients[1]) == [0, 1, 2]
    eta, mu, (beta1, beta2), tau = (
        args.server_learning_rate, args.server_momentum, args.server_betas, args.server_epsilon
    )  # fmt: skip
    moved = 0.0
    for number, expected in expected_rounds(recorder, rule, eta, mu, beta1, beta2, tau):
        for name, value in recorder.end[number].items():
            torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6, msg=f"round {number} {name}")
        # the step is not plain averaging: the test would fail if the optimizer were skipped
        clients, weights = recorder.clients[number], recorder.weights[number]
        mass = sum(weights[c] for c in clients)
        for name, value in recorder.end[number].items():
            plain = sum(weights[c] * clients[c][name] for c in clients) / mass
            moved = max(moved, (value - plain).abs().max().item())
    assert moved > 1e-3, moved


def test_the_optimizer_steps_lora_factors_as_tensors_under_fedit(make_config):
    """FedIT's step acts on the averaged factors (as OpenFedLLM's FedAdam does): A and B each move by the rule."""
    recorder = Recorder()
    args = make_config(strategy="fedit", learning_rate=2e-2, num_rounds=3, server_optimizer="fedadam",
                       **OPTIONS["fedadam"])  # fmt: skip
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["query"], task_type="SEQ_CLS")
    trainer = FederatedTrainer(model=tiny_bert(dropout=0.0), args=args, client_datasets=CLIENTS,
                               peft_config=lora, callbacks=[recorder])  # fmt: skip
    trainer.train()
    for number, expected in expected_rounds(recorder, "fedadam", 1e-2, None, 0.8, 0.9, 1e-3):
        assert any(".lora_A." in name for name in expected)
        for name, value in recorder.end[number].items():
            torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6, msg=f"round {number} {name}")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(server_optimizer="adam"), "server_optimizer must be one of"),
        (dict(server_learning_rate=0.1), "server_optimizer='none'"),
        (dict(server_optimizer="fedadam", server_momentum=0.9), "takes server_betas instead"),
        (dict(server_optimizer="fedyogi", server_betas=[0.9]), "server_betas must be two numbers"),
        (dict(server_optimizer="nesterov", server_momentum=1.0), r"server_momentum must be in \[0, 1\)"),
        (dict(server_optimizer="fedavgm", server_learning_rate=-1.0), "server_learning_rate must be positive"),
    ],
)
def test_a_bad_server_optimizer_setting_fails_when_the_config_is_built(make_config, options, message):
    with pytest.raises(ValueError, match=message):
        make_config(**options)


def test_defaults_are_stated_per_rule(make_config):
    assert make_config(server_optimizer="fedavgm").server_learning_rate == 1.0
    assert make_config(server_optimizer="fedadam").server_momentum is None
    config = make_config(server_optimizer="nesterov")
    assert (config.server_learning_rate, config.server_momentum) == (0.7, 0.9)
    assert math.isclose(make_config(server_optimizer="fedyogi").server_learning_rate, 1e-3)


def test_resuming_with_another_server_optimizer_setting_is_refused(make_config):
    first = FederatedTrainer(model=tiny_bert(), args=make_config(num_rounds=1, save_every_rounds=1),
                             client_datasets=CLIENTS)  # fmt: skip
    first.train()
    again = FederatedTrainer(model=tiny_bert(), args=make_config(num_rounds=2, server_optimizer="fedadam"),
                             client_datasets=CLIENTS)  # fmt: skip
    with pytest.raises(ValueError, match="written by a run without one"):
        again.train(resume_from_checkpoint=True)
