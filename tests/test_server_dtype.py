"""The server's float32 master copy of a bfloat16 model's global weights: updates below bfloat16's resolution add
up over rounds instead of being rounded away, messages still travel in bfloat16, and resume keeps the master."""

import pytest
import torch
from conftest import tiny_bert, toy_dataset

from fed_trainer import FederatedTrainer

CLIENTS = [toy_dataset(8, seed) for seed in range(4)]
NAME = "bert.encoder.layer.0.attention.self.query.weight"


def bf16_trainer(make_config, **config) -> FederatedTrainer:
    return FederatedTrainer(model=tiny_bert(dropout=0.0).to(torch.bfloat16), client_datasets=CLIENTS,
                            args=make_config(num_clients=4, **config))  # fmt: skip


def quarter_ulp_rounds(trainer: FederatedTrainer, rounds: int) -> None:
    """`rounds` rounds in which one of 4 equally weighted clients moved NAME by one bfloat16 step up and the others
    sent it back unchanged: each round's average moves it a quarter of a step."""
    strategy, model = trainer.strategy, trainer.model
    for number in range(1, rounds + 1):
        strategy.begin_round(number)
        for k in range(4):
            payload = {name: t.clone() for name, t in strategy.server_message(k).items()}
            if k == 0:
                payload[NAME] = torch.nextafter(payload[NAME], torch.full_like(payload[NAME], float("inf")))
            strategy.aggregate(payload, 0.25, client_id=k)
        strategy.finish_round(model)


@pytest.mark.parametrize("server_dtype, steps", [("float32", 1), ("model", 0)])
def test_quarter_steps_add_up_on_a_float32_master_and_are_rounded_away_without_it(make_config, server_dtype, steps):
    trainer = bf16_trainer(make_config, server_dtype=server_dtype)
    live = dict(trainer.model.named_parameters())[NAME]
    start = live.detach().clone()
    assert all(t.dtype == torch.bfloat16 for t in trainer.strategy.server_message(0).values())  # what travels
    quarter_ulp_rounds(trainer, 4)
    expected = start
    for _ in range(steps):  # four quarters of a step: one step
        expected = torch.nextafter(expected, torch.full_like(expected, float("inf")))
    assert torch.equal(live.detach(), expected)
    if server_dtype == "float32":
        assert trainer.strategy.global_state[NAME].dtype == torch.float32


def test_resume_keeps_the_float32_master(make_config, tmp_path):
    trainer = bf16_trainer(make_config)
    start = dict(trainer.model.named_parameters())[NAME].detach().clone()
    quarter_ulp_rounds(trainer, 1)  # a quarter of a step: the live model still holds the start, the master does not
    master = trainer.strategy.global_state[NAME].clone()
    assert torch.equal(dict(trainer.model.named_parameters())[NAME].detach(), start)
    assert not torch.equal(master, start.float())
    state = trainer.strategy.state_dict()
    resumed = bf16_trainer(make_config, output_dir=str(tmp_path / "resumed"))
    resumed.strategy.load_state_dict(resumed.model, state, trainer.global_state_dict())
    assert torch.equal(resumed.strategy.global_state[NAME], master)
    quarter_ulp_rounds(resumed, 3)  # three more quarters: one step on the resumed run too
    up = torch.nextafter(start, torch.full_like(start, float("inf")))
    assert torch.equal(dict(resumed.model.named_parameters())[NAME].detach(), up)
