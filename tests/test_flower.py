"""Flower's Deployment Engine on loopback: a real `flower-superlink` and two `flower-supernode` processes run
examples/flower with `flwr run`, and the global model they end with is the one the in-process simulation of the
same run ends with."""

import json
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from loopback import TINY, Deployment, simulated
from safetensors.torch import load_file

ROUND_TIMEOUT = 150  # seconds (a round of TINY takes about 30 s on this machine)


@pytest.fixture(scope="module")
def deployments(tmp_path_factory):
    started = {}

    def get(secure: bool) -> Deployment:
        if secure not in started:
            started[secure] = Deployment(tmp_path_factory.mktemp("secure" if secure else "insecure"), secure)
        return started[secure]

    yield get
    for deployment in started.values():
        deployment.stop()


def assert_same_model(saved: Path, expected: Path) -> None:
    weights, reference = (load_file(d / "model.safetensors") for d in (saved, expected))
    assert weights.keys() == reference.keys()
    for name, value in reference.items():
        torch.testing.assert_close(weights[name], value, rtol=1e-5, atol=1e-5, msg=name)


# FLoRA over TLS with authenticated nodes: the hardest case (kept node state, mixed ranks), with a server optimizer
# whose state the ServerApp carries from round to round (FedAvgM: linear in the update, so the comparison with the
# simulation stays tight), and every client evaluated on its SuperNode after round 2 (a quarter of its data held out;
# its global model, then one personalization step); SCAFFOLD (FedAvg with client state) runs on Flower in the kill
# test below (every strategy's message, payload and evaluation round trip through Flower records is in
# tests/test_contract.py)
FLORA_FEDAVGM = (
    "--strategy flora --lora_ranks 2 4 --learning_rate 5e-3 "
    "--server_optimizer fedavgm --server_learning_rate 1.5 --server_momentum 0.5 "
    "--client_eval_split 0.25 --eval_every_rounds 2 --personalization_steps 1"
)


@pytest.mark.parametrize("secure, fed_args", [(True, FLORA_FEDAVGM)], ids=["flora-fedavgm-tls-auth"])
def test_a_loopback_federation_ends_with_the_global_model_of_the_simulation(tmp_path, deployments, secure, fed_args):
    fed_args = f"{TINY} {fed_args}"
    deployed = deployments(secure).run(fed_args, tmp_path / "deployed")
    expected = simulated(fed_args, tmp_path / "simulated")
    assert_same_model(deployed, expected)
    state = json.loads((deployed / "trainer_state.json").read_text())
    rounds = [e for e in state["log_history"] if "round" in e]
    for got, want in zip(rounds, json.loads((expected / "rounds.json").read_text()), strict=True):
        assert (got["num_clients"], got["bytes_up"], got["bytes_down"]) == (2, want["bytes_up"], want["bytes_down"])
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-5)
        # the clients' metrics, evaluated on their SuperNodes, are the simulation's
        clients = {k: v for k, v in want.items() if k.startswith(("eval_client", "eval_personalized_client"))}
        assert {k: got.get(k) for k in clients} == pytest.approx(clients, rel=1e-5)
    assert "eval_personalized_clients_worst_accuracy" in rounds[1] and "eval_client_0_loss" not in rounds[0]
    for got in rounds:  # where the nodes' time went: each node's phases lie within the server's wait for the replies
        phases = got["node_start_s"] + got["node_build_s"] + got["node_update_s"]
        assert 0 < got["node_train_s"] < got["node_update_s"] and 0 < phases <= got["nodes_s"] < got["round_runtime"]


def test_a_supernode_whose_key_is_not_registered_is_refused(deployments):
    deployment = deployments(True)
    intruder = deployment.start_node(2, register=False)
    try:
        code = intruder.wait(timeout=90)
    except subprocess.TimeoutExpired:
        code = None
    log = (deployment.root / "supernode2.log").read_text()
    assert code not in (None, 0) and "Failed to activate SuperNode" in log, log[-3000:]


# SCAFFOLD: each SuperNode keeps its client's control c_k between rounds (and the server its record of every c_k)
SCAFFOLD = "--strategy scaffold --optim sgd --learning_rate 0.05 --lr_scheduler_type constant --warmup_steps 0"


def test_a_killed_supernode_stops_the_run_and_the_resumed_run_ends_where_the_simulation_ends(tmp_path):
    deployment, run = Deployment(tmp_path / "deployment", secure=False), tmp_path / "run"
    fed_args = f"{TINY} --min_clients_per_round 2 {SCAFFOLD}"
    try:
        # node 1 killed in round 2: the run stops after checkpointing round 1, with an error that says why (and only
        # 1 of 2: node 0 trained round 2 from the control its state file kept, whose round matched the server's)
        logs = deployment.run_signalling_node(1, fed_args, run)
        assert "only 1 of 2 clients gave a usable update" in logs, logs[-3000:]
        assert (run / "round-1").is_dir() and not (run / "model.safetensors").exists()
        # the node back (without a key: under a new node id, finding its client's files in its state-dir), and the
        # run resumed from round 1's checkpoint (a new Flower run): the server sends each client its c_k (a node may
        # have been replaced), and the run ends where the uninterrupted simulation ends
        deployment.nodes[1] = deployment.start_node(1)
        deployment.run(f"{fed_args} --resume_from_checkpoint {run / 'round-1'}", run)
    finally:
        deployment.stop()
    expected = simulated(fed_args, tmp_path / "simulated")
    assert_same_model(run, expected)
    rounds = [e for e in json.loads((run / "trainer_state.json").read_text())["log_history"] if "round" in e]
    want = json.loads((expected / "rounds.json").read_text())
    assert [(e["round"], e["num_clients"]) for e in rounds] == [(1, 2), (2, 2)]
    # a message: the weights and c (the same size), the round of the client's c_k (8 bytes), after the resume its c_k
    controls = (want[0]["bytes_down"] // 2 - 8) // 2
    resent = [0, 2 * controls]
    assert [e["bytes_down"] for e in rounds] == [w["bytes_down"] + r for w, r in zip(want, resent, strict=True)]
    assert [e["loss"] for e in rounds] == pytest.approx([w["loss"] for w in want], abs=1e-5)


def test_a_supernode_that_stops_answering_without_dying_costs_its_round_at_most_the_round_timeout(tmp_path):
    # node 1 frozen (SIGSTOP: alive, its sockets open, silent, heartbeats stopped) as it receives round 2's message:
    # the round drops it within round-timeout (flwr's SuperLink reports the node gone once its heartbeats are 2 x 30 s
    # overdue, which may come first) and stands on node 0's update (min_clients_per_round 1). (A frozen ClientApp
    # process alone is no straggler: its SuperNode starts the task again in a new one after about 30 s.)
    deployment, run = Deployment(tmp_path / "deployment", secure=False), tmp_path / "run"
    try:
        logs = deployment.run_signalling_node(1, TINY, run, sig=signal.SIGSTOP, round_timeout=ROUND_TIMEOUT)
    finally:
        deployment.stop()
    rounds = [e for e in json.loads((run / "trainer_state.json").read_text())["log_history"] if "round" in e]
    assert [(e["round"], e["num_clients"], e.get("num_clients_dropped")) for e in rounds] == [(1, 2, None), (2, 1, 1)]
    assert rounds[1]["nodes_s"] < ROUND_TIMEOUT + 5, logs[-3000:]
