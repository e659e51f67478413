"""A SuperNode's warm worker process (started by `fed_trainer.flower.warm`): imports the app once, keeps the node's
data, and answers the run's messages one at a time with `client_app.answer`, each on a trainer of its own: built
afresh, ahead of the message, while the node waits for it (`AheadBuilder`).

    python -m fed_trainer.flower.node_worker INFO BUILD_TRAINER LOAD_CLIENT_DATA IDLE_TIMEOUT WATCHED_PID BUILD_AHEAD
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import pickle
import secrets
import sys
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing import AuthenticationError
from multiprocessing.connection import Listener
from pathlib import Path

import psutil
import torch
from flwr.app import Context

from fed_trainer.clients import RemoteClient
from fed_trainer.flower.client_app import DataLoader, answer
from fed_trainer.flower.warm import dumps


def imported(path: str) -> Callable:
    """The function at import path "package.module:function"."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def context_key(context: Context) -> tuple:
    """The run, the node and their configs: what `load_client_data` and `build_trainer` read of a context."""
    configs = (json.dumps(dict(c), sort_keys=True, default=str) for c in (context.node_config, context.run_config))
    return (context.run_id, context.node_id, *configs)


def kept_data(load_client_data: DataLoader) -> DataLoader:
    """`load_client_data` loading each node's data once (by `context_key`) and handing the same
    `(client_id, dataset)` to every later message."""
    loaded: dict = {}

    def load(context: Context):
        key = context_key(context)
        if key not in loaded:
            loaded[key] = load_client_data(context)
        return loaded[key]

    return load


def build_key(context: Context, client_datasets) -> tuple:
    """What a trainer's build depends on: the context (`context_key`) and the roster (this node's dataset by
    identity: `kept_data` hands every message the same one; the others by size)."""
    roster = tuple((cid, len(d) if isinstance(d, RemoteClient) else id(d)) for cid, d in client_datasets.items())
    return (*context_key(context), roster)


class AheadBuilder:
    """`build_trainer`, with the next message's trainer built in advance: after each message (`build_next`) the
    worker builds a trainer from the same context and roster, and the next message takes it if its build would be
    the same (`build_key`); it is the trainer that message would have built (the builder is deterministic: it
    seeds the model's initialisation, and the round seeds the training), built while the SuperNode polls for it."""

    def __init__(self, build_trainer: Callable) -> None:
        self.build_trainer = build_trainer
        self.last = None  # (context, client_datasets) of the last build asked for
        self.ahead = None  # (its build_key, the trainer built for the next message)

    def __call__(self, context: Context, client_datasets):
        self.last = context, client_datasets
        key, trainer = self.ahead or (None, None)
        self.ahead = None
        if trainer is not None and key == build_key(context, client_datasets):
            return trainer
        del trainer  # not the one this message needs: gone before another is built
        return self.build_trainer(context, client_datasets)

    def build_next(self) -> None:
        """Build the next message's trainer, unless one is ready (the last message used none: a query, or one that
        failed first)."""
        if self.last is None or self.ahead is not None:
            return
        try:
            self.ahead = build_key(*self.last), self.build_trainer(*self.last)
        except Exception:  # the next message builds its own, and reports what fails to the server
            print(f"could not build the next message's trainer ahead:\n{traceback.format_exc()}", flush=True)


class Worker:
    """Serves one connection at a time; `watch` ends the process when `watched` (the SuperNode's SuperExec) is
    gone, or when it has been idle for `idle_timeout` seconds."""

    def __init__(
        self, build_trainer: Callable, load_client_data: DataLoader, idle_timeout: float, watched: int, ahead: bool
    ):
        self.build_trainer, self.load_client_data = AheadBuilder(build_trainer), kept_data(load_client_data)
        self.ahead = ahead
        self.idle_timeout, self.watched = idle_timeout, watched
        self.busy, self.idle_since = False, time.monotonic()

    def watch(self) -> None:
        while True:
            time.sleep(1.0)
            gone = not psutil.pid_exists(self.watched)
            if gone or (not self.busy and time.monotonic() - self.idle_since > self.idle_timeout):
                print(f"worker ends: {'its SuperNode is gone' if gone else 'idle'}", flush=True)
                os._exit(0)

    def serve(self, listener: Listener) -> None:
        while True:
            try:
                connection = listener.accept()
                request = pickle.loads(connection.recv_bytes())
            except (OSError, EOFError, AuthenticationError) as error:  # failed the authentication, or went away
                print(f"dropped a connection: {error!r}", flush=True)
                continue
            with connection:
                if request[0] == "stop":
                    idle = time.monotonic() - self.idle_since
                    if idle >= request[1]:
                        print(f"worker ends: another run's worker started, and this one was idle {idle:.0f} s",
                              flush=True)  # fmt: skip
                        return
                    print("worker stays: another run's worker started, but this one's run is active", flush=True)
                    continue
                self.busy = True
                _, kind, content, context, began = request
                try:
                    reply = ("ok", answer(kind, content, context, self.build_trainer, self.load_client_data, began))
                except Exception:  # the ClientApp raises it for Flower to report
                    reply = ("error", traceback.format_exc())
                try:
                    connection.send_bytes(dumps(reply))
                except OSError:  # the ClientApp process was stopped meanwhile
                    print(f"could not reply to a {kind} message: the ClientApp is gone", flush=True)
            del reply, content
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if self.ahead:
                self.build_trainer.build_next()
            self.busy, self.idle_since = False, time.monotonic()


def main(argv: list[str]) -> None:
    info, build_trainer, load_client_data, idle_timeout, watched, ahead = argv
    worker = Worker(
        imported(build_trainer), imported(load_client_data), float(idle_timeout), int(watched), ahead == "1"
    )
    key = secrets.token_bytes(32)
    with Listener(("127.0.0.1", 0), authkey=key) as listener:
        described = {"address": list(listener.address), "authkey": key.hex(), "pid": os.getpid()}
        partial = Path(info).with_suffix(".partial")
        with os.fdopen(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as out:
            json.dump(described, out)
        os.replace(partial, info)  # the ClientApp that started this worker waits for this file
        print(f"worker {os.getpid()} listens on {listener.address[0]}:{listener.address[1]}", flush=True)
        threading.Thread(target=worker.watch, daemon=True).start()
        worker.serve(listener)


if __name__ == "__main__":
    main(sys.argv[1:])
