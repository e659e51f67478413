"""Real federations on Flower's Deployment Engine: the same `FederatedTrainer`, strategies and recipes, with each
client on its own machine (a SuperNode) and the server's rounds in a `ServerApp`.

    from fed_trainer.flower import client_app, server_app

    app = server_app(build_trainer)                  # in the app's server module
    app = client_app(build_trainer, load_client_data)  # in the app's client module

`build_trainer(context, client_datasets)` builds the `FederatedTrainer` exactly as a simulation script would, with
the `client_datasets` it is given; `load_client_data(context)` gives a SuperNode's `(client_id, dataset)`.
`examples/flower/` is a complete app; docs/deployment.md says how to run it across machines.
"""

try:
    import flwr  # noqa: F401
except ImportError as err:  # pragma: no cover - depends on the installation
    raise ImportError("fed_trainer.flower needs Flower: pip install 'fed-trainer[flower]'.") from err

from fed_trainer.clients import RemoteClient
from fed_trainer.flower.client_app import client_app, train_reply
from fed_trainer.flower.server_app import GridClients, discover_clients, server_app

__all__ = ["GridClients", "RemoteClient", "client_app", "discover_clients", "server_app", "train_reply"]
