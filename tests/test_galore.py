"""GaLore clients: the optimizer really projects, the loss really falls."""

import re

import pytest
import torch
from conftest import tiny_bert, toy_dataset
from galore_torch.galore_projector import GaLoreProjector

from fed_trainer import FederatedCallback, FederatedTrainer


class ProjectorProbe(FederatedCallback):
    def __init__(self):
        self.projected = []

    def on_client_end(self, args, state, control, optimizer=None, **kwargs):
        groups = [g for g in optimizer.param_groups if "rank" in g]
        states = [optimizer.state[p] for g in groups for p in g["params"]]
        self.projected.append(
            (len(groups), sum(isinstance(s.get("projector"), GaLoreProjector) for s in states), len(states))
        )


def test_galore_clients_train_with_projectors_in_their_optimizer_state(make_config):
    probe = ProjectorProbe()
    trainer = FederatedTrainer(
        model=tiny_bert(dropout=0.0),
        args=make_config(
            optim="galore_adamw",
            optim_target_modules=["attention", "intermediate"],
            optim_args="rank=4,update_proj_gap=5,scale=1.0",
            num_clients=2,
            num_rounds=5,
            local_steps=5,
            learning_rate=3e-3,
            per_device_train_batch_size=8,
        ),
        train_dataset=toy_dataset(200),
        eval_dataset=toy_dataset(80, seed=9),
        callbacks=[probe],
    )
    trainer.train()
    # 2 layers x (query, key, value, attention output dense, intermediate dense) weights are projected
    assert probe.projected == [(1, 10, 10)] * 10
    rounds = [entry for entry in trainer.state.log_history if "round" in entry]
    assert rounds[-1]["eval_loss"] < rounds[0]["eval_loss"] - 0.05


GALORE = re.compile(r"attention\.(self\.(query|key|value)|output\.dense)\.weight|intermediate\.dense\.weight")


def galore_run(make_config, strategy):
    trainer = FederatedTrainer(
        model=tiny_bert(dropout=0.0),
        args=make_config(
            strategy=strategy,
            optim="galore_adamw",
            optim_target_modules=["attention", "intermediate"],
            optim_args="rank=4,update_proj_gap=2,scale=0.5",
            weight_decay=0.1,  # decay after each update: the weight is c W_start + P R, c < 1
            num_clients=3,
            num_rounds=2,
            local_steps=5,  # projector periods of steps 1-2, 3-4 and 5
            learning_rate=3e-3,
            per_device_train_batch_size=8,
        ),
        train_dataset=toy_dataset(120),
    )
    trainer.train()
    return trainer


def test_galore_lowrank_uplink_rebuilds_fedavg_exactly_from_rank_r_factors(make_config):
    dense, lowrank = galore_run(make_config, "fedavg"), galore_run(make_config, "galore_lowrank")
    expected = dense.model.state_dict()
    for name, value in lowrank.model.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6, msg=name)
    # per client and projected m x n weight: 3 periods of P (m x 4) or Q (4 x n), R and a float64 c, not m x n
    projected = [p.shape for name, p in dense.model.named_parameters() if p.dim() == 2 and GALORE.search(name)]
    assert len(projected) == 10
    dense_bytes = sum(4 * m * n for m, n in projected)
    lowrank_bytes = sum(3 * (4 * 4 * (m + n) + 8) for m, n in projected)
    for a, b in zip(*(rounds(t) for t in (dense, lowrank)), strict=True):
        assert a["bytes_up"] - b["bytes_up"] == 3 * (dense_bytes - lowrank_bytes)  # 3 clients a round
        assert a["bytes_down"] == b["bytes_down"]


def rounds(trainer):
    return [entry for entry in trainer.state.log_history if "round" in entry]


def test_galore_lowrank_needs_the_galore_optimizer(make_config):
    with pytest.raises(ValueError, match="needs optim='galore_adamw'"):
        FederatedTrainer(model=tiny_bert(), args=make_config(strategy="galore_lowrank"), train_dataset=toy_dataset(8))
