"""Client-parallel rounds over torch.distributed.

With several processes (`torchrun`, `accelerate launch`) and no DeepSpeed, each rank trains its own share of a
round's sampled clients, alone: rank r takes the clients at positions r, r + world, r + 2 world, ... of the round
(every rank samples the same list from the same seed). The strategies' partial aggregates are then combined
across ranks (`Strategy.synchronize`), so every rank finishes the round with the same global model, equal up to
floating-point summation order to a one-process run with the same seed.
"""

from __future__ import annotations

import atexit
import functools
import gc
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate.utils import send_to_device

TensorDict = dict[str, torch.Tensor]
SHARDERS = ("DEEPSPEED", "FSDP")
BUCKET_VALUES = 1 << 26  # values per collective of `all_reduce_sums` (256 MB in float32)


def _in_process_group() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """The number of processes of the default process group (1 without torch.distributed)."""
    return dist.get_world_size() if _in_process_group() else 1


def end_process_group() -> None:
    """End this process's part in a distributed run, in the order that lets the interpreter exit cleanly: leave the
    process groups (through DeepSpeed when it set them up, so it drops its own references to them), collect what no
    longer refers to them, then wait until no gloo worker thread is still releasing the tensors of a finished
    collective. The last line of a script run under `torchrun` or `accelerate launch` (a multi-process
    FederatedTrainer also waits for the gloo workers at interpreter exit: `drain_gloo_workers_at_exit`).

    Why the wait: a gloo worker frees a collective's tensors after the collective has completed, and a tensor whose
    Python object is already gone takes the GIL to be freed. If that happens once the interpreter has begun
    finalizing, CPython ends the worker thread inside a noexcept destructor and the process aborts ("terminate
    called without an active exception", SIGABRT) after a run that finished. `destroy_process_group` does not stop
    the worker threads while DeepSpeed (its engine, optimizer and the parameters' `ds_process_group`) still refers
    to the groups, so the threads outlive it. See docs/scaling.md, "Failures and ending a run".
    """
    if _in_process_group():
        dist.barrier()  # every rank has finished its collectives
        deepspeed_comm = sys.modules.get("deepspeed.comm")
        if deepspeed_comm is not None and deepspeed_comm.is_initialized():
            deepspeed_comm.destroy_process_group()
        else:
            dist.destroy_process_group()
        gc.collect()  # a group nothing refers to any more is destroyed now, joining its threads
    drain_gloo_workers()


@functools.cache
def drain_gloo_workers_at_exit() -> None:
    """Run `drain_gloo_workers` when the interpreter exits (registered once), also after a script that ends with an
    error or without `end_process_group`: atexit handlers run before the interpreter starts finalizing."""
    atexit.unregister(drain_gloo_workers)  # one registration, however many trainers the process builds
    atexit.register(drain_gloo_workers)


def drain_gloo_workers(timeout: float = 30.0) -> None:
    """Wait, with the GIL released, until no gloo worker thread of this process is running or runnable for a few
    polls in a row: the tensors of finished collectives are then freed, while the interpreter is still whole.
    Linux only (reads /proc); elsewhere returns at once."""
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return
    deadline, quiet_polls = time.monotonic() + timeout, 0
    while quiet_polls < 3 and time.monotonic() < deadline:
        quiet_polls = 0 if any(_is_running_gloo_worker(task) for task in tasks.iterdir()) else quiet_polls + 1
        time.sleep(0.002)


def _is_running_gloo_worker(task: Path) -> bool:
    try:
        name, stat = (task / "comm").read_text(), (task / "stat").read_text()
    except OSError:  # the thread has ended
        return False
    return name.startswith("pt_gloo") and stat.rsplit(")", 1)[1].split()[0] == "R"


def launched_with(sharder: str) -> bool:
    """Whether `accelerate launch` configured `sharder` ("DEEPSPEED" or "FSDP"): its config reaches the process, and
    transformers, through the environment."""
    return os.environ.get(f"ACCELERATE_USE_{sharder}", "false").lower() == "true"


def is_sharded(args) -> bool:
    """Whether the model is sharded over the processes: DeepSpeed or FSDP, from the arguments or from an
    `accelerate launch` config (which reaches transformers through the environment)."""
    from_launcher = any(launched_with(name) for name in SHARDERS)
    return bool(args.deepspeed or args.fsdp or from_launcher)


def is_client_parallel(args) -> bool:
    """Whether rounds are client-parallel: several processes and an unsharded model (when the model is sharded,
    every rank trains every client together)."""
    return args.world_size > 1 and not is_sharded(args)


def share_of(clients: Sequence, process: int, processes: int) -> Sequence:
    """The clients of a round (ids or positions) that rank `process` of `processes` trains: every `processes`-th,
    from `process`."""
    return clients[process::processes]


def all_gather_objects(obj) -> list:
    """`obj` of every rank, in rank order (a list of one without torch.distributed)."""
    if world_size() == 1:
        return [obj]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def all_gather_tensors(obj, device: torch.device) -> list:
    """`all_gather_objects` for nested containers of tensors: sent from the CPU (pickling a GPU tensor would pin
    it to the sender's device), received on `device`."""
    return send_to_device(all_gather_objects(send_to_device(obj, "cpu")), device)


def united_across_ranks(by_client: dict) -> dict:
    """Every rank's `by_client` dict (client -> its tensors) united, on the CPU: what a client-parallel round's
    clients keep for their next round, which may be on another rank."""
    out = {}
    for part in all_gather_tensors(by_client, torch.device("cpu")):
        out.update(part)
    return out


def merged(parts: list[dict]) -> dict:
    """One dict from the ranks' dicts of the same keys: lists concatenated, dicts united, numbers summed."""
    out = {}
    for key, first in parts[0].items():
        values = [part[key] for part in parts]
        if isinstance(first, list):
            out[key] = [item for value in values for item in value]
        elif isinstance(first, dict):
            out[key] = {k: v for value in values for k, v in value.items()}
        else:
            out[key] = sum(values)
    return out


def all_reduce_sums(tensors: TensorDict | None) -> TensorDict | None:
    """The element-wise sum over ranks of named tensors, on every rank.

    A rank that aggregated nothing passes None (or {}) and receives the sum of the others; None comes back only if
    every rank passed nothing. The tensors travel as flat buffers of one dtype and at most `BUCKET_VALUES` values, one
    collective each, on the collective's device; they stay where they are.
    """
    if world_size() == 1:
        return tensors
    layouts = all_gather_objects({k: (tuple(v.shape), v.dtype) for k, v in tensors.items()} if tensors else None)
    layout = next((entry for entry in layouts if entry), None)
    if layout is None:
        return tensors
    device = _collective_device()
    if not tensors:
        tensors = {k: torch.zeros(shape, dtype=dtype, device=device) for k, (shape, dtype) in layout.items()}
    for dtype in sorted({dtype for _, dtype in layout.values()}, key=str):
        for names in _buckets([k for k, (_, d) in layout.items() if d == dtype], tensors):
            flat = torch.cat([tensors[k].reshape(-1) for k in names]).to(device)
            dist.all_reduce(flat)
            offset = 0
            for k in names:
                n = tensors[k].numel()
                tensors[k].copy_(flat[offset : offset + n].view_as(tensors[k]))
                offset += n
    return tensors


def _buckets(names: list[str], tensors: TensorDict) -> list[list[str]]:
    """`names` in consecutive groups of at most `BUCKET_VALUES` values (a larger tensor alone), so that tensors kept
    off the collective's device (`server_state_device="cpu"`) travel through it a bucket at a time."""
    buckets, size = [[]], 0
    for k in names:
        n = tensors[k].numel()
        if buckets[-1] and size + n > BUCKET_VALUES:
            buckets.append([])
            size = 0
        buckets[-1].append(k)
        size += n
    return buckets


def all_reduce_scalar(value: float) -> float:
    """The sum over ranks of a Python float (in float64)."""
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return float(t.item())


def _collective_device() -> torch.device:
    """Where the default process group's collectives take their tensors: the GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
