"""DeepSpeed ZeRO rounds: every rank trains every client together, on a model sharded over the ranks.

One DeepSpeed engine is built before the first round and serves every client of every round; between two clients
its optimizer is restarted in place (`restart_optimizer`) instead of being rebuilt. Under ZeRO-3 each rank holds a
partition of every parameter; full-weight FedAvg is an entry-wise weighted mean, so each rank averages its own
partitions (`local_shard`) and nothing is gathered.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def zero_stage(accelerator) -> int:
    """The ZeRO stage of the accelerator's DeepSpeed plugin; 0 without DeepSpeed."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return 0 if plugin is None else int(plugin.zero_stage)


def local_shard(param: torch.Tensor) -> torch.Tensor:
    """The part of a ZeRO-3 partitioned `param` that this rank holds (its partition without the padding), as a view
    that writes through; `param` itself when it is not partitioned.

    Over the ranks the shards hold every element once, so per-rank sums of their sizes add up to the full count.
    """
    partition = getattr(param, "ds_tensor", None)
    if partition is None:
        return param
    start = dist.get_rank(group=getattr(param, "ds_process_group", None)) * partition.ds_numel
    return partition.narrow(0, 0, max(0, min(partition.ds_numel, param.ds_numel - start)))


def holds_shards(model: nn.Module) -> bool:
    """Whether `model`'s parameters are ZeRO-3 partitions (each rank then aggregates its own)."""
    return any(hasattr(p, "ds_tensor") for p in model.parameters())


def restart_optimizer(engine) -> None:
    """Make the engine's ZeRO optimizer what a freshly built one would be for the model's current weights (the next
    client's starting point): fp32 master partitions copied from the weights, Adam moments and step counts zeroed.

    In place, so the optimizer's memory is allocated once for the whole run.
    """
    optimizer = engine.optimizer
    optimizer.refresh_fp32_params()
    for state in optimizer.optimizer.state.values():
        for key, value in state.items():
            if torch.is_tensor(value):
                value.zero_()
            elif isinstance(value, int | float):
                state[key] = type(value)(0)


def reload_partitions(engine) -> None:
    """Under ZeRO-3, make the gathered copies of the parameters agree with partitions written outside the optimizer
    (a client's starting weights, a new global model): release every gathered parameter and gather the persistent
    ones (those small enough that ZeRO-3 keeps them whole on every rank) again, as DeepSpeed does around loading a
    checkpoint. Nothing to do without DeepSpeed or under ZeRO-1/2, whose parameters are the written tensors."""
    if engine is None or engine.zero_optimization_stage() != 3:
        return
    engine.optimizer.checkpoint_event_prologue()
    engine.optimizer.checkpoint_event_epilogue()
