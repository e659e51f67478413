"""The example app's functions as tests/test_flower_node.py has the warm worker import them: each call is written
down, by process, in the node's state-dir, so that the test sees which process loaded and built what, and how often."""

import os
from pathlib import Path

from fed_flower.task import flower_trainer
from fed_flower.task import load_client_data as example_client_data


def noted(context, what: str) -> None:
    with open(Path(context.node_config["state-dir"]) / f"{what}-{context.node_id}.txt", "a") as out:
        out.write(f"{os.getpid()}\n")


def load_client_data(context):
    noted(context, "loads")
    return example_client_data(context)


def build_trainer(context, client_datasets):
    noted(context, "builds")
    if context.node_config.get("die-in-build"):  # a worker killed mid-message (out of memory, say)
        os._exit(3)
    return flower_trainer(context, client_datasets)
