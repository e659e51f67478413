"""Client-parallel rounds over torch.distributed.

With several processes (`torchrun`, `accelerate launch`) and no DeepSpeed, each rank trains its own share of a
round's sampled clients, alone: rank r takes the clients at positions r, r + world, r + 2 world, ... of the round
(every rank samples the same list from the same seed). The strategies' partial aggregates are then combined
across ranks (`Strategy.synchronize`), so every rank finishes the round with the same global model, equal up to
floating-point summation order to a one-process run with the same seed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.distributed as dist
from accelerate.utils import send_to_device

TensorDict = dict[str, torch.Tensor]
SHARDERS = ("DEEPSPEED", "FSDP")


def _in_process_group() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """The number of processes of the default process group (1 without torch.distributed)."""
    return dist.get_world_size() if _in_process_group() else 1


def end_process_group() -> None:
    """Leave the default process group, if the launcher set one up; the last line of a script run under
    `torchrun` or `accelerate launch` (without it, gloo processes sometimes abort at exit)."""
    if _in_process_group():
        dist.destroy_process_group()


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
    every rank passed nothing. The tensors travel as one flat buffer per dtype, in one collective each.
    """
    if world_size() == 1:
        return tensors
    layouts = all_gather_objects({k: (tuple(v.shape), v.dtype) for k, v in tensors.items()} if tensors else None)
    layout = next((entry for entry in layouts if entry), None)
    if layout is None:
        return tensors
    device = next(iter(tensors.values())).device if tensors else _collective_device()
    if not tensors:
        tensors = {k: torch.zeros(shape, dtype=dtype, device=device) for k, (shape, dtype) in layout.items()}
    for dtype in sorted({dtype for _, dtype in layout.values()}, key=str):
        names = [k for k, (_, d) in layout.items() if d == dtype]
        flat = torch.cat([tensors[k].reshape(-1) for k in names])
        dist.all_reduce(flat)
        offset = 0
        for k in names:
            n = tensors[k].numel()
            tensors[k].copy_(flat[offset : offset + n].view_as(tensors[k]))
            offset += n
    return tensors


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
