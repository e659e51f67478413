"""GaLore clients: the optimizer really projects, the loss really falls."""

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
