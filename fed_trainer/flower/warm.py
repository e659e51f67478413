"""A ClientApp that stays light: each message goes to the SuperNode's warm worker process.

flwr 1.42 starts a new ClientApp process for every message (its SuperExec's subprocess executor; the warm executor
pool it has is for Kubernetes pods, which hold no imported app). A ClientApp that imports torch, transformers and
the app pays about 8 s of imports per message on a 2-core machine, before any training. `warm_client_app` imports
only flwr and the standard library: its process hands the message to the node's worker
(`fed_trainer.flower.node_worker`), which the first message of a run starts and which keeps the imports and the
node's data (`load_client_data`) between messages. Every message is still answered on a trainer of its own, built
by `build_trainer` with the code `client_app` runs in its process (`client_app.answer`), so a warm node answers
exactly as a cold one. With the node config's `build-ahead` (true by default) the worker builds the next message's
trainer as soon as it has answered one (`node_worker.AheadBuilder`): the build is then hidden behind the messaging
and the server's aggregation, at the cost of one model's memory while the node waits.

The worker belongs to one run of one SuperNode: it listens on 127.0.0.1 with an authentication key in a file only
its user can read (in `node_dir`), and ends when its SuperNode ends, when it has had no message for the node
config's `worker-idle-timeout` seconds (1800 by default), or when a later run's worker starts on the node while it
has had no message for `worker-yield-idle` seconds (300 by default: runs that share the node at once keep a worker
each). It is in the SuperNode's process group, so a signal to the group (killing or stopping the node) reaches it
too.
"""

from __future__ import annotations

import copyreg
import fcntl
import io
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection
from pathlib import Path

import psutil
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp

# reply(kind, content, context) -> the reply's records, for a message of flwr's MessageType `kind`
Replier = Callable[[str, RecordDict, Context], RecordDict]

IDLE_TIMEOUT = 1800.0  # seconds a worker waits for its next message (node config: worker-idle-timeout)
YIELD_IDLE = 300.0  # seconds idle after which a later run's worker ends it (node config: worker-yield-idle)
START_TIMEOUT = 600.0  # seconds a worker may take to import the app and listen


def state_dir(context: Context) -> Path:
    """The node config's `state-dir`, where the SuperNode keeps its files (default: under the system's temporary
    folder)."""
    return Path(context.node_config.get("state-dir", Path(tempfile.gettempdir()) / "fed-trainer-nodes"))


def node_dir(context: Context) -> Path:
    """The folder of this SuperNode's worker files, by node id (a SuperNode restarted without a key gets another;
    what it keeps for its client is by client: `client_app.KeptStates`)."""
    return state_dir(context) / f"node-{context.node_id}"


def answering_app(reply: Replier) -> ClientApp:
    """A Flower `ClientApp` that answers the server's query, train and evaluate messages with `reply`."""
    app = ClientApp()
    for kind, register in (
        (MessageType.QUERY, app.query), (MessageType.TRAIN, app.train), (MessageType.EVALUATE, app.evaluate)
    ):  # fmt: skip

        def handle(message: Message, context: Context, kind: str = kind) -> Message:
            return Message(content=reply(kind, message.content, context), reply_to=message)

        register()(handle)
    return app


def warm_client_app(build_trainer: str, load_client_data: str) -> ClientApp:
    """A Flower `ClientApp` whose messages are answered by the SuperNode's warm worker process (see the module's
    docstring): `build_trainer` and `load_client_data` are the import paths ("package.module:function") of the
    functions `client_app` takes, imported only by the worker."""
    for path in (build_trainer, load_client_data):
        module, _, name = path.partition(":")
        if not (module and name):
            raise ValueError(f"{path!r} is not an import path of the form 'package.module:function'.")

    def reply(kind: str, content: RecordDict, context: Context) -> RecordDict:
        began = psutil.Process().create_time()  # this ClientApp process's start: the node's "start" phase
        with worker_connection(context, build_trainer, load_client_data) as connection:
            connection.send_bytes(dumps(("answer", kind, content, context, began)))
            try:
                outcome, value = pickle.loads(connection.recv_bytes())
            except EOFError:
                raise RuntimeError(
                    f"the SuperNode's worker process ended while answering this {kind} message; its log: "
                    f"{worker_files(context)[1]}"
                ) from None
        if outcome == "error":
            raise RuntimeError(f"the SuperNode's worker process failed on this {kind} message:\n{value}")
        return value

    return answering_app(reply)


def dumps(value) -> bytes:
    """`value` pickled for the worker's connection. A flwr record that has been sent once keeps its chunks as
    memoryviews, which pickle refuses: they go as bytes."""
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL)
    pickler.dispatch_table = {**copyreg.dispatch_table, memoryview: lambda view: (bytes, (view.tobytes(),))}
    pickler.dump(value)
    return buffer.getvalue()


def worker_files(context: Context) -> tuple[Path, Path]:
    """(the file that says where this run's worker listens, the worker's log)."""
    folder = node_dir(context)
    return folder / f"worker-run-{context.run_id}.json", folder / f"worker-run-{context.run_id}.log"


def worker_connection(context: Context, build_trainer: str, load_client_data: str) -> Connection:
    """A connection to this run's worker on this SuperNode, started first if there is none (one at a time: a lock
    file keeps two messages from starting two workers)."""
    info, log = worker_files(context)
    info.parent.mkdir(parents=True, exist_ok=True)
    with open(info.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        connection = connected(info)
        if connection is None:
            stop_other_runs(info, float(context.node_config.get("worker-yield-idle", YIELD_IDLE)))
            idle = float(context.node_config.get("worker-idle-timeout", IDLE_TIMEOUT))
            ahead = bool(context.node_config.get("build-ahead", True))
            start_worker(info, log, build_trainer, load_client_data, idle, ahead)
            connection = connected(info)
            if connection is None:
                raise RuntimeError(f"the SuperNode's worker process started but does not answer; its log: {log}")
    return connection


def connected(info: Path) -> Connection | None:
    """A connection to the worker `info` describes, or None if there is no such worker (no file, its process gone,
    or its port gone or taken by another process)."""
    try:
        worker = json.loads(info.read_text())
    except FileNotFoundError:
        return None
    if not psutil.pid_exists(worker["pid"]):
        return None
    try:
        return Client(tuple(worker["address"]), authkey=bytes.fromhex(worker["authkey"]))
    except (OSError, EOFError, AuthenticationError):
        return None


def stop_other_runs(info: Path, min_idle: float) -> None:
    """Ask the workers of this node's other runs to end if they have had no message for `min_idle` seconds: a run
    that has moved on leaves its worker holding a model; one that still runs beside this one keeps its own."""
    for other in info.parent.glob("worker-run-*.json"):
        if other != info and (connection := connected(other)) is not None:
            with connection:
                connection.send_bytes(dumps(("stop", min_idle)))


def start_worker(
    info: Path, log: Path, build_trainer: str, load_client_data: str, idle_timeout: float, build_ahead: bool
) -> None:
    """Start the worker process and wait until it listens (it writes `info` then), or fail with its log's end."""
    info.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))  # the app as this process sees it
    command = [sys.executable, "-m", "fed_trainer.flower.node_worker", str(info), build_trainer, load_client_data,
               str(idle_timeout), str(os.getppid()), str(int(build_ahead))]  # fmt: skip
    with open(log, "a") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + START_TIMEOUT
    while not info.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"the SuperNode's worker process did not start; the end of its log ({log}):\n"
                               + log.read_text()[-3000:])  # fmt: skip
        time.sleep(0.05)
