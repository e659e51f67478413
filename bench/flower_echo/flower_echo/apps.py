"""A ServerApp that sends every SuperNode a tiny message per round and times the round trip (pulling the replies
every 0.1 s, as `fed_trainer.flower.server_app.GridClients` does), and a ClientApp that echoes it."""

import json
import time

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

client = ClientApp()
server = ServerApp()


@client.train()
def echo(message: Message, context: Context) -> Message:
    return Message(content=message.content, reply_to=message)


@server.main()
def main(grid: Grid, context: Context) -> None:
    while len(nodes := list(grid.get_node_ids())) < int(context.run_config["num-nodes"]):
        time.sleep(0.5)
    seconds = []
    for number in range(int(context.run_config["rounds"])):
        content = RecordDict({"config": ConfigRecord({"round": number})})
        start = time.perf_counter()
        pending = set(
            grid.push_messages([Message(content, dst_node_id=n, message_type=MessageType.TRAIN) for n in nodes])
        )
        while pending:
            pending -= {reply.metadata.reply_to_message_id for reply in grid.pull_messages(list(pending))}
            time.sleep(0.1)
        seconds.append(time.perf_counter() - start)
    with open(context.run_config["out"], "w") as out:
        json.dump(seconds, out)
