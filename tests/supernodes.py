"""A `ClientExecutor` that stands in for the Flower transport in process (tests/test_flower.py runs the real one on
loopback): each client's train message is the records a Flower server sends (`train_content`), answered by the
node side (`train_reply`) on a trainer built afresh from that node's own data, as on a SuperNode."""

from flwr.app import Context, RecordDict

from fed_trainer.flower import train_reply
from fed_trainer.flower.remote import roster, trained
from fed_trainer.flower.server_app import train_content


class SuperNodesInProcess:
    """`build(context, client_datasets)` builds a node's trainer; `clients[client_id]` is that node's dataset;
    each node keeps its files under `state_dir`."""

    def __init__(self, build, clients, state_dir) -> None:
        self.build, self.clients, self.state_dir = build, clients, str(state_dir)

    def train(self, round) -> None:
        everyone = roster(round.trainer)
        for position, client_id in enumerate(round.client_ids):
            content = train_content(round, position, everyone)
            node = Context(run_id=1, node_id=client_id, node_config={"state-dir": self.state_dir}, state=RecordDict(),
                           run_config={})  # fmt: skip
            data = lambda context, cid=client_id: (cid, self.clients[cid])  # noqa: E731
            reply = train_reply(self.build, data, content, node)
            round.receive(client_id, *trained(reply))
