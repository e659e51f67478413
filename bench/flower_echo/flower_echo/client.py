"""A ClientApp that echoes every train message (it imports flwr alone)."""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def echo(message: Message, context: Context) -> Message:
    return Message(content=message.content, reply_to=message)
