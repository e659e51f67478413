"""RoLoRA: B trains in odd rounds and A in even rounds, the other factor frozen and unsent. (Its exactness, resume,
bytes, Flower round trip and two ranks are in the contract matrix, tests/test_contract.py.)"""

import pytest
from conftest import tiny_bert, toy_dataset
from peft import LoraConfig

from fed_trainer import FederatedCallback, FederatedTrainer
from fed_trainer.strategies.lora import lora_parameters

CLIENTS = [toy_dataset(n, seed) for seed, n in enumerate([8, 16, 24], start=1)]
# intermediate.dense is 32 -> 64: A (r x 32) and B (64 x r) differ in size, so the uplink tells which one travelled
LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["intermediate.dense"], task_type="SEQ_CLS")


class Factors(FederatedCallback):
    """Every LoRA layer's global (A, B) at the start and after each round."""

    def __init__(self, trainer):
        self.trainer, self.after = trainer, []

    def factors(self):
        layers = self.trainer.strategy.layers.values()
        return [tuple(p.detach().clone() for p in lora_parameters(layer)) for layer in layers]

    def on_round_begin(self, args, state, control, round=None, **kwargs):
        if round == 1:
            self.start = self.factors()

    def on_round_end(self, args, state, control, **kwargs):
        self.after.append(self.factors())


def test_b_trains_in_odd_rounds_and_a_in_even_rounds_and_only_it_travels_up(make_config):
    trainer = FederatedTrainer(
        model=tiny_bert(dropout=0.0), args=make_config(strategy="rolora", num_rounds=3, learning_rate=2e-2),
        client_datasets=CLIENTS, peft_config=LORA,
    )  # fmt: skip
    factors = Factors(trainer)
    trainer.add_callback(factors)
    trainer.train()
    before = factors.start
    for number, after in enumerate(factors.after, start=1):
        for (a0, b0), (a1, b1) in zip(before, after, strict=True):
            moved, kept = (b0, b1), (a0, a1)
            if number % 2 == 0:
                moved, kept = kept, moved
            assert (moved[1] - moved[0]).abs().max() > 1e-4, number
            assert (kept[1] == kept[0]).all(), number
        before = after
    layers = len(factors.start)
    head = sum(p.numel() for n, p in trainer.model.named_parameters() if p.requires_grad and "lora_" not in n)
    rounds = [e for e in trainer.state.log_history if "round" in e]
    a_size, b_size = 4 * 32, 64 * 4  # floats per layer
    per_client = [4 * (layers * size + head) for size in (b_size, a_size, b_size)]
    assert [e["bytes_up"] for e in rounds] == [3 * bytes_ for bytes_ in per_client]
    assert [e["bytes_down"] for e in rounds] == [3 * 4 * (layers * (a_size + b_size) + head)] * 3


def test_rolora_refuses_a_server_optimizer_naming_strategies_that_take_one(make_config):
    with pytest.raises(ValueError, match="does not support a server optimizer"):
        FederatedTrainer(
            model=tiny_bert(), args=make_config(strategy="rolora", server_optimizer="fedavgm"),
            client_datasets=CLIENTS, peft_config=LORA,
        )  # fmt: skip
