"""The ClientApp: one client's local training per round, on the SuperNode that holds its data."""

from fed_flower.task import build_trainer, load_client_data
from fed_trainer.flower import client_app

app = client_app(lambda context, client_datasets: build_trainer(context.run_config, client_datasets), load_client_data)
