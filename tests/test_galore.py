"""GaLore clients: the optimizer really projects, the loss really falls."""

import re

import pytest
import torch
from conftest import tiny_bert, toy_dataset
from galore_torch.galore_projector import GaLoreProjector
from transformers import TrainerCallback

from fed_trainer import FederatedCallback, FederatedTrainer
from fed_trainer.strategies.galore_shared import FixedProjector
from fed_trainer.strategies.keys import message_key


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
            eval_strategy="epoch",
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


class GaLoreWeightDecay(TrainerCallback):
    """Sets weight decay on the client's GaLore group: transformers 5.24 builds GaLore's param groups without
    `args.weight_decay`, so a client would otherwise never decay (c = 1) and the c of the exchange go untested."""

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        for group in optimizer.param_groups:
            if "rank" in group:
                group["weight_decay"] = 0.1


def with_weight_decay(trainer: FederatedTrainer) -> FederatedTrainer:
    trainer.client_runner.trainer.add_callback(GaLoreWeightDecay())
    return trainer


# GaLore rank 4 on tiny BERT's attention and MLP; local_steps 5: projector periods of steps 1-2, 3-4 and 5
GALORE_CLIENTS = dict(
    optim="galore_adamw", optim_target_modules=["attention", "intermediate"],
    optim_args="rank=4,update_proj_gap=2,scale=0.5", num_clients=3, local_steps=5, learning_rate=3e-3,
    per_device_train_batch_size=8,
)  # fmt: skip


def galore_trainer(make_config, callbacks=(), eval_dataset=None, **config) -> FederatedTrainer:
    """GaLore clients (`GALORE_CLIENTS`) that decay their weights: after each update W is c W_start + P R, c < 1."""
    trainer = FederatedTrainer(
        model=tiny_bert(dropout=0.0), args=make_config(**GALORE_CLIENTS, **config), train_dataset=toy_dataset(120),
        eval_dataset=eval_dataset, callbacks=list(callbacks),
    )  # fmt: skip
    return with_weight_decay(trainer)


def galore_run(make_config, strategy):
    trainer = galore_trainer(make_config, strategy=strategy, num_rounds=2)
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


def test_galore_lowrank_needs_the_galore_optimizer_with_one_sided_projections(make_config):
    with pytest.raises(ValueError, match="needs optim='galore_adamw'"):
        FederatedTrainer(model=tiny_bert(), args=make_config(strategy="galore_lowrank"), train_dataset=toy_dataset(8))
    for strategy in ("galore_lowrank", "galore_shared"):
        args = make_config(strategy=strategy, optim="galore_adamw", optim_target_modules=["attention"],
                           optim_args="rank=4, proj_type=full")  # fmt: skip
        with pytest.raises(ValueError, match="proj_type='full', which projects both sides"):
            FederatedTrainer(model=tiny_bert(), args=args, train_dataset=toy_dataset(8))


class SharedProbe(FederatedCallback):
    """Per round and client: the starting and final targeted weights, and the optimizer's projectors and moments."""

    def __init__(self, names):
        self.names, self.rounds = names, []

    def on_round_begin(self, args, state, control, client_weights=None, **kwargs):
        self.rounds.append({"weights": client_weights, "start": {}, "end": {}, "projectors": {}, "moments": {}})

    def on_client_begin(self, args, state, control, client_id=None, model=None, **kwargs):
        self.rounds[-1]["start"][client_id] = {n: p.detach().clone() for n, p in model.named_parameters()}

    def on_client_end(self, args, state, control, client_id=None, model=None, optimizer=None, **kwargs):
        record, params = self.rounds[-1], dict(model.named_parameters())
        record["end"][client_id] = {n: p.detach().clone() for n, p in params.items()}
        slots = {n: optimizer.state[params[n]] for n in self.names}
        record["projectors"][client_id] = {n: s["projector"] for n, s in slots.items()}
        record["moments"][client_id] = {n: (s["exp_avg"].clone(), s["exp_avg_sq"].clone()) for n, s in slots.items()}

    def on_round_end(self, args, state, control, model=None, **kwargs):
        self.rounds[-1]["global"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.rounds[-1]["server_moments"] = {k: v.clone() for k, v in self.strategy.moments.items()}


class StartingMoments(TrainerCallback):
    """On the client trainer: each client's Adam moments as its training begins, in training order."""

    def __init__(self, probe):
        self.probe = probe

    def on_train_begin(self, args, state, control, optimizer=None, model=None, **kwargs):
        params = dict(model.named_parameters())
        slots = [optimizer.state[params[n]] for n in self.probe.names]
        moments = [s["exp_avg"].clone() if "exp_avg" in s else None for s in slots]
        self.probe.rounds[-1].setdefault("start_moments", []).append(moments)


def outside_span(weight, basis, left: bool):
    """The part of `weight` outside the projector's span: (I - P P^T) W, or W (I - Q^T Q)."""
    return weight - basis @ (basis.T @ weight) if left else weight - (weight @ basis.T) @ basis


def shared_run(make_config, **config):
    names = [n for n, p in tiny_bert().named_parameters() if p.dim() == 2 and GALORE.search(n)]
    probe = SharedProbe(names)
    trainer = galore_trainer(
        make_config, [probe], toy_dataset(60, seed=9), strategy="galore_shared", eval_strategy="epoch", **config
    )
    probe.strategy = trainer.strategy
    trainer.client_runner.trainer.add_callback(StartingMoments(probe))
    trainer.train()
    return trainer, probe, names


def test_galore_shared_clients_train_in_the_servers_subspace_and_the_aggregate_is_exact(make_config):
    trainer, probe, names = shared_run(make_config, num_rounds=4)
    for number, record in enumerate(probe.rounds, start=1):
        weights = record["weights"]
        for name, value in record["global"].items():  # the global model is sum p_k W_k
            expected = sum(weights[c] * record["end"][c][name] for c in weights)
            torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6, msg=name)
        if number == 1:  # round 1: each client its own GaLore projectors
            continue
        for name in names:
            bases = [record["projectors"][c][name].ortho_matrix for c in weights]
            assert all(isinstance(record["projectors"][c][name], FixedProjector) for c in weights)
            assert all(torch.equal(basis, bases[0]) for basis in bases)  # one projector for every client
            basis = bases[0]
            left = basis.shape[0] == record["global"][name].shape[0] and basis.shape[1] == 4
            gram = basis.T @ basis if left else basis @ basis.T
            torch.testing.assert_close(gram, torch.eye(4), atol=1e-5, rtol=0)
            for c in weights:  # the client's weight moved within the subspace: W_end = c W_start + P R (or R Q)
                start, end = record["start"][c][name], record["end"][c][name]
                x_start, x_end = outside_span(start, basis, left), outside_span(end, basis, left)
                decay = float((x_end * x_start).sum() / (x_start * x_start).sum())
                assert 0.99 < decay < 1.0, decay
                torch.testing.assert_close(x_end, decay * x_start, atol=1e-5, rtol=0)
    moved = [probe.rounds[k]["projectors"][0][names[0]].ortho_matrix for k in (1, 2)]
    assert not torch.allclose(moved[0], moved[1])  # a new projector each round (refresh_rounds=1)
    rounds = [e for e in trainer.state.log_history if "round" in e]
    assert rounds[-1]["eval_loss"] < rounds[0]["eval_loss"] - 0.05


def test_galore_shared_bytes_are_r_per_projected_weight_and_the_projectors_go_down(make_config):
    trainer, probe, names = shared_run(make_config, num_rounds=3, strategy_kwargs={"refresh_rounds": 2})
    fedavg, _, _ = shared_run(make_config, num_rounds=1)
    shapes = [dict(tiny_bert().named_parameters())[n].shape for n in names]
    dense = sum(4 * m * n for m, n in shapes)
    projector = sum(4 * (4 * m if m < n else 4 * n) for m, n in shapes)  # P: m x 4 (m < n) or Q: 4 x n
    r_bytes = sum(4 * (4 * n if m < n else 4 * m) + 8 for m, n in shapes)  # R and a float64 c
    sketch = sum(4 * (m if m < n else n) * min(4 + 10, m, n) for m, n in shapes)  # G Omega or Omega^T G
    first, second, third = [e for e in trainer.state.log_history if "round" in e]
    other_up = first["bytes_up"] // 3 - sum(3 * (4 * 4 * (m + n) + 8) for m, n in shapes) - sketch
    # round 2 keeps its projector for round 3: no sketch; round 3 sketches for the next projector
    assert second["bytes_up"] == 3 * (other_up + r_bytes)
    assert third["bytes_up"] == 3 * (other_up + r_bytes + sketch)
    assert second["bytes_down"] == third["bytes_down"] == first["bytes_down"] + 3 * projector
    assert first["bytes_down"] == [e for e in fedavg.state.log_history if "round" in e][0]["bytes_down"]
    assert r_bytes + sketch < dense  # on this 32-wide model; r(m + n) against m n on a real one


def test_galore_shared_averages_the_projected_moments_while_the_projector_is_kept(make_config):
    # projectors picked after rounds 1 and 4: rounds 2-4 share one, so round 2's and 3's moments are averaged
    options = {"refresh_rounds": 3, "average_moments": True}
    _, probe, names = shared_run(make_config, num_rounds=4, strategy_kwargs=options)
    first, second, third, fourth = probe.rounds
    assert not first["server_moments"] and not fourth["server_moments"]  # none across a change of projector
    assert all(moments == [None] * len(names) for moments in first["start_moments"] + second["start_moments"])
    for record, following in ((second, third), (third, fourth)):
        weights = record["weights"]
        for i, name in enumerate(names):  # the server's average of the round's final moments ...
            for j, kind in enumerate(("exp_avg", "exp_avg_sq")):
                average = sum(weights[c] * record["moments"][c][name][j] for c in weights)
                server = record["server_moments"][f"{name}.{kind}"]
                torch.testing.assert_close(server, average, rtol=1e-5, atol=1e-9)
            assert int(record["server_moments"][f"{name}.step"]) == 5 * (2 if record is second else 3) - 5
            # ... is where every client of the next round starts, with the same projector
            for moments in following["start_moments"]:
                torch.testing.assert_close(
                    moments[i], record["server_moments"][message_key(name, "exp_avg")], rtol=0, atol=0
                )
            kept = [r["projectors"][0][name].ortho_matrix for r in (record, following)]
            assert torch.equal(*kept)


def test_galore_shared_options_are_checked(make_config):
    with pytest.raises(ValueError, match="average_moments needs refresh_rounds > 1"):
        make_config(strategy="galore_shared", strategy_kwargs={"average_moments": True})
    with pytest.raises(ValueError, match="refresh_rounds must be an integer of at least 1"):
        make_config(strategy="galore_shared", strategy_kwargs='{"refresh_rounds": 0}')  # as from the command line
    with pytest.raises(ValueError, match=r"\['refresh_rounds'\] are not options of strategy 'fedavg'"):
        make_config(strategy="fedavg", strategy_kwargs={"refresh_rounds": 3})


def test_the_old_galore_shared_fields_still_work_with_a_deprecation_warning(make_config):
    advice = r"galore_refresh_rounds is deprecated.*strategy_kwargs=\{'refresh_rounds': 3\}"
    with pytest.warns(FutureWarning, match=advice):
        old_fields = dict(galore_refresh_rounds=3, galore_average_moments=True)
        trainer = galore_trainer(make_config, strategy="galore_shared", **old_fields)
    assert trainer.args.strategy_kwargs == {"refresh_rounds": 3, "average_moments": True}
    assert (trainer.strategy.refresh_rounds, trainer.strategy.average_moments) == (3, True)


def test_galore_shared_resumes_with_its_projectors_and_moments(make_config, tmp_path):
    # the round-2 checkpoint holds round 3's projector (picked after round 1) and round 2's averaged moments
    config = dict(num_rounds=3, strategy_kwargs={"refresh_rounds": 2, "average_moments": True}, save_every_rounds=1)
    whole, probe, _ = shared_run(make_config, **config)
    assert probe.rounds[1]["server_moments"]
    resumed = galore_trainer(make_config, strategy="galore_shared", output_dir=str(tmp_path / "resumed"), **config)
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "round-2"))
    expected = whole.model.state_dict()
    for name, value in resumed.model.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-6, msg=name)


def test_galore_with_8bit_states_is_refused_without_cuda(make_config):
    """galore_torch's GaLoreAdamW8bit synchronizes CUDA in every step: on CPUs it is refused before any training
    (on a GPU it is an ordinary client optimizer of fedavg)."""
    with pytest.raises(ValueError, match=r"galore_adamw_8bit' needs a CUDA device.*optim='galore_adamw' on CPUs"):
        make_config(optim="galore_adamw_8bit", optim_target_modules=["attention"])
