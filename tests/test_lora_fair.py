"""LoRA-FAIR: the server's refitted B against the formula written out here in float64, from the factors each client
trained; its residual against FedIT's on the same payloads. (Resume, bytes, the Flower round trip and two ranks are
in the contract matrix, tests/test_contract.py.)"""

import pytest
import torch
from conftest import tiny_bert, toy_dataset
from peft import LoraConfig

from fed_trainer import FederatedCallback, FederatedTrainer
from fed_trainer.strategies.lora import lora_factors

CLIENTS = [toy_dataset(n, seed) for seed, n in enumerate([8, 16, 24], start=1)]
LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "intermediate.dense"], task_type="SEQ_CLS")


class Factors(FederatedCallback):
    """Per round: the client weights, each client's trained (A, B) by layer, and the global (A, B) after the round."""

    def __init__(self, trainer):
        self.trainer, self.rounds = trainer, []

    def factors(self):
        return {n: tuple(t.double().clone() for t in lora_factors(layer)) for n, layer in self.layers().items()}

    def layers(self):
        return self.trainer.strategy.layers

    def on_round_begin(self, args, state, control, client_weights=None, **kwargs):
        self.rounds.append({"weights": client_weights, "clients": {}})

    def on_client_end(self, args, state, control, client_id=None, **kwargs):
        self.rounds[-1]["clients"][client_id] = self.factors()

    def on_round_end(self, args, state, control, **kwargs):
        self.rounds[-1]["global"] = self.factors()


@pytest.mark.parametrize("ridge", [0.0, 1e-3, 0.5])
def test_the_refitted_b_is_the_ridge_fit_and_leaves_less_residual_than_fedit(make_config, ridge):
    trainer = FederatedTrainer(
        model=tiny_bert(dropout=0.0),
        args=make_config(strategy="lora_fair", strategy_kwargs={"ridge": ridge}, learning_rate=2e-2),
        client_datasets=CLIENTS, peft_config=LORA,
    )  # fmt: skip
    record = Factors(trainer)
    trainer.add_callback(record)
    trainer.train()
    s = LORA.lora_alpha / LORA.r
    for entry in record.rounds:
        weights = entry["weights"]
        for name, (a_global, b_global) in entry["global"].items():
            clients = {cid: factors[name] for cid, factors in entry["clients"].items()}
            a_mean = sum(weights[c] * a for c, (a, _) in clients.items())
            b_mean = sum(weights[c] * b for c, (_, b) in clients.items())
            target = sum(weights[c] * s * b @ a for c, (a, b) in clients.items())  # M
            gram = a_mean @ a_mean.T
            lam = ridge * torch.trace(gram) / gram.shape[0]
            expected = (target @ a_mean.T / s + lam * b_mean) @ torch.linalg.inv(gram + lam * torch.eye(len(gram)))
            torch.testing.assert_close(a_global, a_mean, rtol=0, atol=1e-6)  # A: FedIT's average
            torch.testing.assert_close(b_global, expected, rtol=1e-4, atol=1e-6)
            fair, fedit = ((target - s * b @ a_mean).norm() for b in (b_global, b_mean))
            assert fair < fedit, (name, float(fair), float(fedit))
            if ridge == 0.0:  # the plain projection: what is left is orthogonal to A's rows
                assert ((target - s * b_global @ a_mean) @ a_mean.T).abs().max() < 1e-5


def test_a_negative_ridge_is_refused(make_config):
    with pytest.raises(ValueError, match="ridge must be at least 0"):
        make_config(strategy="lora_fair", strategy_kwargs={"ridge": -1.0})
