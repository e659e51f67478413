"""The SuperNode side of a Flower federation without a SuperLink: the warm ClientApp (`fed_trainer.flower.warm`)
called in this process with the records a Flower server sends, as flwr's per-message ClientApp process calls it,
and the worker process it hands them to; and how tensors travel in Flower records."""

import json
import os
import subprocess
import sys
import time

import psutil
import pytest
import torch
from conftest import tiny_bert, toy_dataset
from flwr.app import Context, Message, MessageType, Metadata, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from loopback import APP, TINY
from supernodes import served_like_simulated

from fed_trainer import FederatedTrainer
from fed_trainer.clients import RemoteClient
from fed_trainer.flower.client_app import KeptStates
from fed_trainer.flower.remote import (
    EvalOrder,
    KeptRounds,
    TrainOrder,
    introduced,
    record_holds,
    record_tensors,
    roster,
    tensor_record,
    trained,
)
from fed_trainer.flower.server_app import train_contents
from fed_trainer.flower.warm import warm_client_app, worker_files
from fed_trainer.round import Round


def test_the_warm_client_app_imports_neither_torch_nor_the_app():
    code = (
        f"import sys; sys.path.insert(0, {str(APP)!r}); import fed_flower.client_app; "
        "print(sorted(m for m in ('torch', 'transformers', 'datasets', 'fed_flower.task') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]"
    with pytest.raises(ValueError, match="package.module:function"):
        warm_client_app("fed_flower.task.flower_trainer", "fed_flower.task:load_client_data")


def test_tensors_come_out_of_a_flower_record_as_they_went_in_whatever_their_dtype():
    tensors = {
        "float32": torch.randn(3, 5), "bfloat16": torch.randn(7, dtype=torch.bfloat16), "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4), "bool": torch.tensor([True, False, True]),
        "int8": torch.randint(-128, 128, (9,), dtype=torch.int8),
        "strided": torch.randn(4, 4, dtype=torch.float64)[:, 1],
    }  # fmt: skip
    content = RecordDict({"arrays": tensor_record(tensors)})
    objects = {object_id: obj.deflate() for object_id, obj in get_all_nested_objects(content).items()}
    assert len(objects) == 6  # the content, its record, the flat array and the layout, a chunk each: not 7 arrays
    received = record_tensors(inflate_object_from_contents(content.object_id, objects)["arrays"])  # as flwr sends it
    assert list(received) == list(tensors)
    for name, tensor in tensors.items():
        assert received[name].dtype == tensor.dtype and received[name].shape == tensor.shape, name
        assert torch.equal(received[name], tensor), name
    received["float32"] += 1  # writable, and no tensor shares bytes with another
    assert torch.equal(received["bfloat16"], tensors["bfloat16"])


def test_a_record_holds_only_the_very_tensors_it_was_made_of():
    tensors = {"w": torch.randn(3, 5), "b": torch.randn(7, dtype=torch.bfloat16)}
    record = tensor_record(tensors)
    assert record_holds(record, {name: t.clone() for name, t in tensors.items()})
    w, b = tensors["w"], tensors["b"]
    changed = w.clone()
    changed[2, 4] += 1e-6
    for other in ({"w": changed, "b": b}, {"b": b, "w": w}, {"w": w}, {"w": w, "b": b.float()},
                  {"w": w.reshape(5, 3), "b": b}, {"w": w, "b": b, "c": torch.zeros(0)}):  # fmt: skip
        assert not record_holds(record, other)


def test_every_client_of_a_fedavg_round_is_sent_one_shared_record(make_config, tmp_path):
    """FedAvg sends every client the global model: one `ArrayRecord` serves the whole round (the ServerApp holds one
    serialized copy of the model, not one per client), and the served run ends where the simulation ends."""
    clients = [toy_dataset(8, seed) for seed in range(3)]

    def build(context=None, client_datasets=clients):
        return FederatedTrainer(model=tiny_bert(dropout=0.0), client_datasets=client_datasets,
                                args=make_config(num_rounds=2))  # fmt: skip

    sent = served_like_simulated(build, clients, tmp_path / "nodes")[1].sent
    assert [len(contents) for contents in sent] == [3, 3]
    assert [len({id(content["arrays"]) for content in contents.values()}) for contents in sent] == [1, 1]


def test_a_first_rounds_orders_name_the_runs_federation_and_no_kept_state(make_config):
    """Train orders can be written for a trainer that has not trained yet (bench/train_records.py builds them so):
    they name its federation, and round 0 (nothing kept yet) for every client."""
    trainer = FederatedTrainer(model=tiny_bert(), client_datasets=[toy_dataset(8, seed) for seed in range(2)],
                               args=make_config(num_clients=2))  # fmt: skip
    contents = train_contents(Round(trainer, 1, trainer.args.local_steps), roster(trainer))
    orders = [TrainOrder.read(content["config"]) for content in contents.values()]
    federation = trainer.round_progress.federation
    assert [order.kept for order in orders] == [KeptRounds(federation, 0, 0)] * 2


def flower_message(kind: str, content: RecordDict, context: Context) -> Message:
    """A message as a SuperNode's ClientApp receives it from the server."""
    metadata = Metadata(
        run_id=context.run_id, message_id=f"{kind}-{time.time_ns()}", src_node_id=1, dst_node_id=context.node_id,
        reply_to_message_id="", group_id="", created_at=time.time(), ttl=3600.0, message_type=kind,
    )  # fmt: skip
    return Message(metadata=metadata, content=content)


class WarmNodes:
    """A `ClientExecutor` that sends each client the records a Flower server sends (`train_contents`) to the warm
    ClientApp of its SuperNode (`contexts`), called here as flwr's ClientApp process would call it."""

    def __init__(self, app, contexts: dict) -> None:
        self.app, self.contexts = app, contexts

    def train(self, round) -> None:
        everyone = roster(round.trainer)
        for client_id, content in train_contents(round, everyone).items():
            context = self.contexts[client_id]
            reply = self.app(flower_message(MessageType.TRAIN, content, context), context)
            assert not reply.has_error(), reply.error
            round.receive(client_id, *trained(reply.content))


@pytest.fixture
def workers():
    """The pids of the worker processes a test started, ended after it."""
    started = []
    yield started
    for pid in started:
        if psutil.pid_exists(pid):
            psutil.Process(pid).kill()


def worker_pid(context: Context) -> int:
    return json.loads(worker_files(context)[0].read_text())["pid"]


def noted(folder, what: str, context: Context) -> list[str]:
    """The pids of the processes that called `what` for the node of `context` (tests/warm_node.py), one per call."""
    return (folder / f"{what}-{context.node_id}.txt").read_text().split()


def gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def test_a_node_keeps_its_clients_state_of_the_federations_it_wrote_to_last(tmp_path):
    """Finished runs do not fill a node's disk: writing to a federation's folder deletes those of the federations
    beyond the `keep-federations` written to last (0: none are deleted). The folders are the client's (its id
    quoted), whichever node id the SuperNode has."""

    def federations_after(writes, keep):
        state_dir = tmp_path / f"{len(writes)}-writes-keep-{keep}"
        for federation, round_number in writes:
            config = {"state-dir": str(state_dir), "keep-federations": keep}
            node = Context(1, 100 + round_number, config, RecordDict(), {})  # (a restarted node: another id)
            states = KeptStates(node, "site/5", KeptRounds(federation, round_number - 1, 0))
            states.write(round_number, {"control": torch.full((2,), float(round_number))})
            time.sleep(0.05)  # (a folder's modification time is the kernel's clock tick: a few ms)
        client = state_dir / "client-site%2F5"
        return {path.name: sorted(f.name for f in path.iterdir()) for path in sorted(client.iterdir())}

    writes = [("a", 1), ("b", 1), ("c", 1), ("b", 2)]  # b written to again after c: a, then c, are the oldest
    assert federations_after(writes, keep=2) == {
        "federation-b": ["round-1.safetensors", "round-2.safetensors"],
        "federation-c": ["round-1.safetensors"],
    }
    assert list(federations_after([*writes, ("d", 1)], keep=2)) == ["federation-b", "federation-d"]
    assert list(federations_after([*writes, ("d", 1)], keep=0)) == [f"federation-{f}" for f in "abcd"]


def test_warm_supernodes_end_with_the_simulations_model_loading_their_data_once_and_building_ahead(
    tmp_path, monkeypatch, workers
):
    monkeypatch.syspath_prepend(str(APP))  # the app, as the ClientApp process has it (the worker inherits the path)
    from fed_flower.task import build_trainer, flower_trainer

    fed_args = f"{TINY} --strategy scaffold"
    run_config = {"fed-args": f"{fed_args} --output_dir {tmp_path / 'served'}", "num-clients": 2}
    contexts = {
        k: Context(run_id=7, node_id=100 + k, node_config={"partition-id": k, "state-dir": str(tmp_path)},
                   state=RecordDict(), run_config=run_config)
        for k in range(2)
    }  # fmt: skip
    app = warm_client_app("warm_node:build_trainer", "warm_node:load_client_data")
    sizes = {}
    for context in contexts.values():  # the server's roster query
        client_id, size = introduced(app(flower_message(MessageType.QUERY, RecordDict(), context), context).content)
        sizes[client_id] = size
        workers.append(worker_pid(context))
    served = flower_trainer(
        Context(7, 1, {}, RecordDict(), run_config), {c: RemoteClient(n) for c, n in sizes.items()}
    )
    served.client_executor = WarmNodes(app, contexts)
    served.train()

    simulated = build_trainer({"fed-args": f"{fed_args} --output_dir {tmp_path / 'simulated'}"})
    simulated.train()
    expected = simulated.merged_model().state_dict()
    for name, value in served.merged_model().state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-5, msg=name)

    for context in contexts.values():  # (a query waits for the worker to have built ahead)
        app(flower_message(MessageType.QUERY, RecordDict(), context), context)
        pid = worker_pid(context)
        assert pid == workers[context.node_config["partition-id"]] != os.getpid()  # one worker answered them all
        loads, builds = (
            (tmp_path / f"{what}-{context.node_id}.txt").read_text().split() for what in ("loads", "builds")
        )
        assert loads == [str(pid)]  # the data once, for the query and both rounds
        # round 1's trainer built on its message, round 2's ahead of it, and one more ahead of a next message
        assert builds == [str(pid)] * 3

    # a failing message comes back as the ClientApp's error, and the worker stays for the next one
    global_model = tensor_record(served.strategy.global_tensors(served.model))
    order = EvalOrder(2, 1, sizes, KeptRounds.of(served.round_progress, 1))
    wrong = RecordDict({"arrays": global_model, "config": order.record()})  # node 0 holds client 0
    with pytest.raises(RuntimeError, match="give every SuperNode its own partition-id"):
        app(flower_message(MessageType.EVALUATE, wrong, contexts[0]), contexts[0])
    assert worker_pid(contexts[0]) == workers[0] and psutil.pid_exists(workers[0])

    # a run beside this one starts a worker of its own and leaves this run's, active a moment ago; an idle worker
    # ends by itself
    beside = Context(8, 100, {"partition-id": 0, "state-dir": str(tmp_path), "worker-idle-timeout": 2.0},
                     RecordDict(), run_config)  # fmt: skip
    app(flower_message(MessageType.QUERY, RecordDict(), beside), beside)
    workers.append(worker_pid(beside))
    assert workers[-1] != workers[0] and gone_within(workers[-1], 30)
    assert psutil.pid_exists(workers[0])
    # a later run's worker ends the workers idle for worker-yield-idle
    later = Context(9, 100, {"partition-id": 0, "state-dir": str(tmp_path), "worker-yield-idle": 0.0},
                    RecordDict(), run_config)  # fmt: skip
    app(flower_message(MessageType.QUERY, RecordDict(), later), later)
    workers.append(worker_pid(later))
    assert gone_within(workers[0], 10)
    assert psutil.pid_exists(workers[1])  # the other node's


def test_a_worker_that_dies_mid_message_fails_that_message_and_the_next_message_starts_a_new_one(
    tmp_path, monkeypatch, workers
):
    monkeypatch.syspath_prepend(str(APP))
    run_config = {"fed-args": f"{TINY} --output_dir {tmp_path / 'out'}", "num-clients": 2}
    dying = Context(run_id=9, node_id=200, node_config={"partition-id": 0, "state-dir": str(tmp_path),
                    "die-in-build": True}, state=RecordDict(), run_config=run_config)  # fmt: skip
    app = warm_client_app("warm_node:build_trainer", "warm_node:load_client_data")
    client_id, size = introduced(app(flower_message(MessageType.QUERY, RecordDict(), dying), dying).content)
    workers.append(worker_pid(dying))
    order = EvalOrder(1, client_id, {client_id: size, 1: size}, KeptRounds("a-federation", 0, 0))
    content = RecordDict({"arrays": tensor_record({}), "config": order.record()})
    with pytest.raises(RuntimeError, match="worker process ended while answering this evaluate message; its log"):
        app(flower_message(MessageType.EVALUATE, content, dying), dying)  # it builds the trainer, and dies
    assert gone_within(workers[0], 10)
    healthy = Context(run_id=9, node_id=200, node_config={"partition-id": 0, "state-dir": str(tmp_path)},
                      state=RecordDict(), run_config=run_config)  # fmt: skip
    assert introduced(app(flower_message(MessageType.QUERY, RecordDict(), healthy), healthy).content) == (0, size)
    workers.append(worker_pid(healthy))
    assert workers[1] != workers[0] and psutil.pid_exists(workers[1])
