"""A `ClientExecutor` that stands in for the Flower transport in process (tests/test_flower.py runs the real one on
loopback): each client's train message is the records a Flower server sends (`train_contents`), answered by the
node side (`train_reply`) on a trainer built afresh from that node's own data, as on a SuperNode."""

import torch
from flwr.app import Context, RecordDict

from fed_trainer.flower import train_reply
from fed_trainer.flower.remote import roster, trained
from fed_trainer.flower.server_app import train_contents


class SuperNodesInProcess:
    """`build(context, client_datasets)` builds a node's trainer; `clients[client_id]` is that node's dataset;
    each node keeps its files under `state_dir`; the messages come from Flower run `run_id` (a resumed run is a new
    one); client k's node has node id `first_node_id + k` (a SuperNode restarted without a key gets another)."""

    def __init__(self, build, clients, state_dir, run_id: int = 1, first_node_id: int = 0) -> None:
        self.build, self.clients, self.state_dir, self.run_id = build, clients, str(state_dir), run_id
        self.first_node_id = first_node_id
        self.sent: list[dict] = []  # every round's train records, by client
        self.held: list[tuple[int, int]] = []  # every round's distinct (messages, sent forms) awaiting the replies

    def train(self, round) -> None:
        everyone = roster(round.trainer)
        self.sent.append(train_contents(round, everyone))
        pairs = round.messages.values()
        self.held.append((len({id(message) for message, _ in pairs}), len({id(sent) for _, sent in pairs})))
        for client_id, content in self.sent[-1].items():
            node = Context(run_id=self.run_id, node_id=self.first_node_id + client_id,
                           node_config={"state-dir": self.state_dir}, state=RecordDict(), run_config={})  # fmt: skip
            data = lambda context, cid=client_id: (cid, self.clients[cid])  # noqa: E731
            reply = train_reply(self.build, data, content, node)
            round.receive(client_id, *trained(reply))


def served_like_simulated(build, clients, state_dir) -> tuple[list, SuperNodesInProcess]:
    """Train `build()` in simulation and on `SuperNodesInProcess`, check that both end with the same model (1e-6)
    and round entries (number, bytes each way, learning rate); (the round entries, the served run's
    `SuperNodesInProcess`)."""
    simulated, served = build(), build()
    simulated.train()
    nodes = SuperNodesInProcess(build, clients, state_dir)
    served.client_executor = nodes
    served.train()
    expected = simulated.model.state_dict()
    for name, value in served.model.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-6, msg=name)
    logged = [[(e["round"], e["bytes_up"], e["bytes_down"], e["learning_rate"]) for e in t.state.log_history
               if "round" in e] for t in (served, simulated)]  # fmt: skip
    assert logged[0] == logged[1]
    return logged[0], nodes
