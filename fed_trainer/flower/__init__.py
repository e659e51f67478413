"""Real federations on Flower's Deployment Engine: the same `FederatedTrainer`, strategies and recipes, with each
client on its own machine (a SuperNode) and the server's rounds in a `ServerApp`.

    from fed_trainer.flower import server_app, warm_client_app

    app = server_app(build_trainer)  # in the app's server module
    app = warm_client_app("my_app.task:build_trainer", "my_app.task:load_client_data")  # in its client module

`build_trainer(context, client_datasets)` builds the `FederatedTrainer` exactly as a simulation script would, with
the `client_datasets` it is given; `load_client_data(context)` gives a SuperNode's `(client_id, dataset)`.
`warm_client_app` names them by import path: its ClientApp process (one per message in flwr) imports neither torch
nor the app, and hands each message to the node's worker process, which keeps the imports and the data between
messages. `client_app(build_trainer, load_client_data)` takes the functions themselves and does all the work in the
ClientApp process. `examples/flower/` is a complete app; docs/deployment.md says how to run it across machines.

The names are imported on first use, so that `fed_trainer.flower.warm` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fed_trainer import _imported_on_first_use

try:
    import flwr  # noqa: F401
except ImportError as err:  # pragma: no cover - depends on the installation
    raise ImportError("fed_trainer.flower needs Flower: pip install 'fed-trainer[flower]'.") from err

_MODULES = {
    "RemoteClient": "fed_trainer.clients",
    "client_app": "fed_trainer.flower.client_app",
    "train_reply": "fed_trainer.flower.client_app",
    "GridClients": "fed_trainer.flower.server_app",
    "discover_clients": "fed_trainer.flower.server_app",
    "server_app": "fed_trainer.flower.server_app",
    "warm_client_app": "fed_trainer.flower.warm",
}

if TYPE_CHECKING:
    from fed_trainer.clients import RemoteClient
    from fed_trainer.flower.client_app import client_app, train_reply
    from fed_trainer.flower.server_app import GridClients, discover_clients, server_app
    from fed_trainer.flower.warm import warm_client_app


__getattr__ = _imported_on_first_use(globals(), _MODULES)


__all__ = [
    "GridClients",
    "RemoteClient",
    "client_app",
    "discover_clients",
    "server_app",
    "train_reply",
    "warm_client_app",
]
