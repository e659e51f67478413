"""The contract every registered strategy meets, one parametrised matrix: the built-in strategies and a user's
strategy defined in one file outside the package (tests/user_strategy.py). A strategy joins by being registered.

For each, on tiny BERT (3 clients, 2 rounds):
- its declared exactness (`capabilities.exact`): the global model after every round equals sum_k p_k W_k of the
  round's trained client models, merged by PEFT and summed here; an inexact one is shown not to;
- resuming from the round-1 checkpoint ends with the uninterrupted run's model;
- the bytes logged each round equal the bytes of the tensors sent (messages down, payloads up);
- a Flower round trip: the round-1 message, encoded into a Flower record and decoded on a client built afresh (as a
  SuperNode builds it), trains to the payload the in-process client sent; and the global model's `global_tensors`,
  sent the same way after the run, evaluate there (with and without personalization steps) as on the server;
- with a server optimizer (FedAvgM, whose step is linear in the update, so it can be checked on merged weights):
  an exact strategy's global model moves by eta m_t, m_t = beta m_{t-1} + sum_k p_k W_k - W_t, and resuming from
  round 1 ends where the uninterrupted run ends; a strategy that declares no server optimizer refuses one.
  (tests/test_server_optimizer.py checks every rule's formula, and the step on FedIT's factors.)
- two client-parallel ranks (one `torchrun` for every strategy, tests/contract_ranks.py) end with the global model of
  one process, round by round the same clients, losses and bytes, with the options that stress each part of the
  cross-rank merge (tests/contract_setup.py: clients moving between ranks, a robust rule, a server optimizer, a client
  failing on one rank, every client's held-out set evaluated).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import user_strategy
from conftest import fed_config
from contract_setup import CLIENTS, STRATEGIES, TWO_RANK_OPTIONS, TWO_RANKS, build
from federated_run import FailClient
from recording import Record, aggregation_gaps
from transformers import default_data_collator

from fed_trainer import FederatedTrainer
from fed_trainer.client_eval import local_scores, remote_scores
from fed_trainer.flower.remote import record_tensors, tensor_record
from fed_trainer.round import ClientPlan, remote_update
from fed_trainer.strategies.base import tensor_bytes
from fed_trainer.strategies.registry import strategy_class


def traffic(trainer: FederatedTrainer) -> dict:
    """Wrap the strategy's message and payload hooks (and the clients' gradients of a round 0) to add up the bytes of
    what they return, by round."""
    strategy, counted = trainer.strategy, {}
    hooks = [(strategy, "server_message", "down"), (strategy, "client_payload", "up"),
             (trainer.client_runner, "mean_gradients", "up")]  # fmt: skip
    for owner, hook, direction in hooks:
        original = getattr(owner, hook)

        def counting(*args, _original=original, _direction=direction):
            returned = _original(*args)
            tensors = returned[0] if isinstance(returned, tuple) else returned  # (gradients, TrainOutput)
            key = (strategy.round_number, _direction)
            counted[key] = counted.get(key, 0) + tensor_bytes(tensors)
            return returned

        setattr(owner, hook, counting)
    return counted


SERVER_STEP = dict(server_optimizer="fedavgm", server_learning_rate=1.5, server_momentum=0.5)


STEPPED = [name for name in STRATEGIES if strategy_class(name).capabilities.server_optimizer]


@pytest.fixture(scope="module")
def stepped_run(tmp_path_factory):
    """`stepped_run(strategy)`: one 2-round run of the strategy with FedAvgM on the server (run once per module)."""
    runs = {}

    def run(name):
        if name not in runs:
            tmp = tmp_path_factory.mktemp(f"{name}-stepped")
            make_config = lambda **overrides: fed_config(tmp, **SERVER_STEP, **overrides)  # noqa: E731
            record = Record()
            trainer = build(make_config, name, [record], save_every_rounds=1)
            trainer.train()
            runs[name] = dict(trainer=trainer, record=record, tmp=tmp, make_config=make_config)
        return runs[name]

    return run


@pytest.fixture(scope="module", params=STRATEGIES)
def contract_run(request, tmp_path_factory):
    """One 2-round run per strategy with everything the checks read, and its round-1 message and payload."""
    tmp = tmp_path_factory.mktemp(request.param)
    make_config = lambda **overrides: fed_config(tmp, **overrides)  # noqa: E731
    record = Record()
    trainer = build(make_config, request.param, [record], save_every_rounds=1)
    counted = traffic(trainer)
    first = {}
    message_hook, payload_hook, runner_train = (
        trainer.strategy.server_message, trainer.strategy.client_payload, trainer.client_runner.train
    )  # fmt: skip

    def message(client_id):
        out = message_hook(client_id)
        if trainer.strategy.round_number == 1 and "message" not in first:
            first.update(client=client_id, message={k: t.detach().clone() for k, t in out.items()})
        return out

    def payload(model, client_id):
        out = payload_hook(model, client_id)
        if trainer.strategy.round_number == 1 and client_id == first["client"] and "payload" not in first:
            first["payload"] = {k: t.detach().clone() for k, t in out.items()}
        return out

    def train(dataset, client_id, **plan):
        if "plan" not in first:
            first["plan"] = ClientPlan(**plan)
        return runner_train(dataset, client_id, **plan)

    trainer.strategy.server_message, trainer.strategy.client_payload = message, payload
    trainer.client_runner.train = train
    trainer.train()
    return dict(name=request.param, trainer=trainer, record=record, counted=counted, first=first, tmp=tmp,
                make_config=make_config)  # fmt: skip


def test_the_global_model_is_what_the_strategy_declares(contract_run):
    exact = strategy_class(contract_run["name"]).capabilities.exact
    for number, entry in enumerate(contract_run["record"].rounds, start=1):
        gaps = aggregation_gaps(entry)
        if exact:
            assert max(gaps.values()) < 1e-5, (number, gaps)
        else:  # what an inexact rule gets wrong: the LoRA-targeted layers
            assert (
                max(gap for name, gap in gaps.items() if "classifier" not in name and "embeddings" not in name) > 1e-4
            )


def test_resuming_from_round_1_ends_with_the_uninterrupted_model(contract_run):
    make_config, tmp = contract_run["make_config"], contract_run["tmp"]
    resumed = build(make_config, contract_run["name"], output_dir=str(tmp / "resumed"))
    resumed.train(resume_from_checkpoint=str(tmp / "out" / "round-1"))
    expected = contract_run["trainer"].model.state_dict()
    for name, value in resumed.model.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("name", [name for name in STEPPED if strategy_class(name).capabilities.exact])
def test_a_server_optimizer_moves_an_exact_strategy_by_its_step(stepped_run, name):
    eta, beta, momentum = SERVER_STEP["server_learning_rate"], SERVER_STEP["server_momentum"], {}
    for number, entry in enumerate(stepped_run(name)["record"].rounds, start=1):
        weights, clients, start = entry["weights"], entry["clients"], entry["start"]
        for key, value in entry["global"].items():
            update = sum(weights[cid] * state[key] for cid, state in clients.items()) - start[key]
            momentum[key] = beta * momentum.get(key, 0.0) + update
            gap = (value - (start[key] + eta * momentum[key])).abs().max().item()
            assert gap < 1e-5, (number, key, gap)
        plain = sum(weights[cid] * state["classifier.weight"] for cid, state in clients.items())
        assert (entry["global"]["classifier.weight"] - plain).abs().max() > 1e-4  # the step is not the average


@pytest.mark.parametrize("name", STEPPED)
def test_resuming_with_a_server_optimizer_ends_with_the_uninterrupted_model(stepped_run, name):
    run = stepped_run(name)
    resumed = build(run["make_config"], name, output_dir=str(run["tmp"] / "resumed"))
    resumed.train(resume_from_checkpoint=str(run["tmp"] / "out" / "round-1"))
    expected = run["trainer"].model.state_dict()
    for key, value in resumed.model.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize("name", [name for name in STRATEGIES if name not in STEPPED])
def test_a_strategy_without_a_server_optimizer_refuses_one(make_config, name):
    with pytest.raises(ValueError, match="does not support a server optimizer"):
        build(lambda **overrides: make_config(**SERVER_STEP, **overrides), name)


def test_the_bytes_logged_are_the_bytes_of_the_tensors_sent(contract_run):
    logged = [e for e in contract_run["trainer"].state.log_history if "round" in e]
    counted = contract_run["counted"]
    gradient_round = [0] if contract_run["trainer"].strategy.gradient_examples else []
    assert [e["round"] for e in logged] == [*gradient_round, 1, 2]
    assert [(e["bytes_down"], e["bytes_up"]) for e in logged] == [
        (counted.get((e["round"], "down"), 0), counted[(e["round"], "up")]) for e in logged
    ]


def test_a_client_on_its_own_machine_sends_what_the_in_process_client_sent(contract_run):
    first, name = contract_run["first"], contract_run["name"]
    decoded = record_tensors(tensor_record(first["message"]))  # through a Flower record
    node = build(contract_run["make_config"], name, output_dir=str(contract_run["tmp"] / "node"))
    client = first["client"]
    payload, _, _ = remote_update(node, 1, client, decoded, first["plan"], kept={})
    payload = record_tensors(tensor_record(payload))
    assert payload.keys() == first["payload"].keys()
    for key, value in first["payload"].items():
        torch.testing.assert_close(payload[key], value, rtol=0, atol=1e-6, msg=key)


def test_a_client_on_its_own_machine_evaluates_the_model_the_server_evaluates(contract_run):
    """Per-client evaluation on Flower: a client built afresh, sent the global model's `global_tensors` (through a
    Flower record) and given what its machine kept (FedSA-LoRA: its B), scores on its held-out data as the server's
    own evaluation of that client does, before and after personalization_steps."""
    trainer, name, client = contract_run["trainer"], contract_run["name"], 1
    node = build(contract_run["make_config"], name, output_dir=str(contract_run["tmp"] / "evaluating-node"))
    held_out = CLIENTS[client]
    tensors = record_tensors(tensor_record(trainer.strategy.global_tensors(trainer.model)))
    kept = dict(trainer.strategy.personal_state(client))  # the simulation's record of what the node keeps
    trainer.args.personalization_steps = node.args.personalization_steps = 2
    try:
        scores, personalized = local_scores(trainer, {client: held_out})
        got = remote_scores(node, trainer.strategy.round_number, client, held_out, tensors, kept)
    finally:
        trainer.args.personalization_steps = 0
    assert got == (pytest.approx(scores[client], rel=1e-5), pytest.approx(personalized[client], rel=1e-5))
    assert abs(got[1]["loss"] - got[0]["loss"]) > 1e-4  # the personalization steps trained


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Every strategy of the matrix trained on two client-parallel ranks (one launch): the folder of the results."""
    root = tmp_path_factory.mktemp("two-ranks")
    # one thread per process; no torchrun variables of an outer launch
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(Path(__file__).with_name("contract_ranks.py")), str(root)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return root


@pytest.mark.parametrize("name", STRATEGIES)
def test_two_client_parallel_ranks_end_with_the_global_model_of_one_process(two_ranks, tmp_path, name):
    failing = FailClient("2:1", default_data_collator) if name == "fedavg" else None  # as tests/contract_ranks.py
    one = build(lambda **overrides: fed_config(tmp_path, **{**TWO_RANKS, **overrides}), name,
                callbacks=[failing] if failing else [], dropout=0.1, data_collator=failing,
                **TWO_RANK_OPTIONS.get(name, {}))  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank: SCAFFOLD's control (x - y_k) / (K lr) magnifies the rounding of sums
    try:
        one.train()
    finally:
        torch.set_num_threads(threads)
    expected = one.model.state_dict()
    ranks = [torch.load(two_ranks / name / f"final-rank{r}.pt") for r in (0, 1)]
    for key, value in expected.items():
        torch.testing.assert_close(ranks[0][key], value, rtol=1e-5, atol=1e-5, msg=key)
        assert torch.equal(ranks[1][key], ranks[0][key]), f"ranks disagree on {key}"
    rounds = [e for e in one.state.log_history if "round" in e]
    two = json.loads((two_ranks / name / "rounds.json").read_text())
    assert [e["round"] for e in two] == [e["round"] for e in rounds]
    assert [e["round"] for e in rounds if e["round"] > 0] == list(range(1, one.args.num_rounds + 1))
    for a, b in zip(rounds, two, strict=True):
        assert (a["num_clients"], a["bytes_up"], a["bytes_down"]) == (b["num_clients"], b["bytes_up"], b["bytes_down"])
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        assert a.get("num_clients_dropped") == b.get("num_clients_dropped")
        evaluated = {key: value for key, value in a.items() if key.startswith(("eval_client", "eval_personalized"))}
        assert {key: b[key] for key in evaluated} == pytest.approx(evaluated, abs=1e-6)
    if "client_eval_split" in TWO_RANK_OPTIONS.get(name, {}):
        assert all("eval_clients_mean_loss" in entry for entry in two)
        assert all("eval_personalized_clients_mean_loss" in entry for entry in two)
    if failing:
        assert [entry.get("num_clients_dropped") for entry in two] == [None, 1, None]
    # checkpoints written by the main process alone (two writers would race on the round-N.partial folders)
    assert sorted(p.name for p in (two_ranks / name / "out").glob("round-*")) == ["round-2", "round-3"]


def test_the_user_strategy_takes_its_option_from_the_config(make_config):
    trainer = build(make_config, "damped_fedavg", strategy_kwargs={"damping": 0.25})
    assert trainer.strategy.damping == 0.25
    with pytest.raises(ValueError, match=r"damping must be in \(0, 1\]"):
        make_config(strategy="damped_fedavg", strategy_kwargs={"damping": 2.0})
    assert trainer.strategy.capabilities.exact is False


def test_docs_show_the_user_strategy_as_it_is():
    page = (Path(__file__).resolve().parents[1] / "docs" / "methods.md").read_text()
    shown = page.split("<!-- user-strategy: tests/user_strategy.py -->\n```python\n", 1)[1].split("```\n", 1)[0]
    source = Path(user_strategy.__file__).read_text()
    assert shown == source[source.index("import torch") :]
