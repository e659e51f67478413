"""A ServerApp that sends every SuperNode a tiny message per round and times the round trip with the exchange a
deployed round uses (`fed_trainer.flower.server_app.GridClients.exchange`: push, then pull the replies every
0.1 s)."""

import json
import time

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fed_trainer.flower.server_app import GridClients

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    while len(nodes := list(grid.get_node_ids())) < int(context.run_config["num-nodes"]):
        time.sleep(0.5)
    clients = GridClients(grid, {node: node for node in nodes}, timeout=60)
    seconds = []
    for number in range(int(context.run_config["rounds"])):
        messages = {
            node: Message(RecordDict({"config": ConfigRecord({"round": number})}), dst_node_id=node,
                          message_type=MessageType.TRAIN)
            for node in nodes
        }  # fmt: skip
        start = time.perf_counter()
        _, failures, _ = clients.exchange(messages)
        seconds.append(time.perf_counter() - start)
        if failures:
            raise RuntimeError(f"round {number}: {failures}")
    with open(context.run_config["out"], "w") as out:
        json.dump(seconds, out)
