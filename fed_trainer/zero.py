"""DeepSpeed ZeRO rounds: every rank trains every client together, on a model sharded over the ranks.

One DeepSpeed engine is built before the first round and serves every client of every round; between two clients
its optimizer is restarted in place (`restart_optimizer`) instead of being rebuilt. Under ZeRO-3 each rank holds a
partition of every parameter; full-weight FedAvg is an entry-wise weighted mean, so each rank averages its own
partitions (`local_shard`) and nothing is gathered.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from peft import PeftModel, get_peft_model
from torch import nn

from fed_trainer.quantized import quantized_weight_keys


def _shard_start(param: torch.Tensor) -> int:
    """Where this rank's partition of a ZeRO-3 `param` starts in the flattened whole."""
    return dist.get_rank(group=getattr(param, "ds_process_group", None)) * param.ds_tensor.ds_numel


def local_shard(param: torch.Tensor) -> torch.Tensor:
    """The part of a ZeRO-3 partitioned `param` that this rank holds (its partition without the padding), as a view
    that writes through; `param` itself when it is not partitioned.

    Over the ranks the shards hold every element once, so per-rank sums of their sizes add up to the full count.
    """
    partition = getattr(param, "ds_tensor", None)
    if partition is None:
        return param
    return partition.narrow(0, 0, max(0, min(partition.ds_numel, param.ds_numel - _shard_start(param))))


def whole(shard: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The whole value of a ZeRO-3 partitioned `param`, gathered from every rank's `shard` of it (laid out as
    `local_shard`'s); `shard` itself when `param` is not partitioned. A collective: every rank calls it."""
    partition = getattr(param, "ds_tensor", None)
    if partition is None:
        return shard
    padded = partition.new_zeros(partition.ds_numel, dtype=shard.dtype)  # on the collective's device, wherever the
    padded[: shard.numel()] = shard.reshape(-1)  # server state lives
    group = getattr(param, "ds_process_group", None)
    parts = [torch.empty_like(padded) for _ in range(dist.get_world_size(group=group))]
    dist.all_gather(parts, padded, group=group)
    return torch.cat(parts)[: param.ds_numel].view(param.ds_shape)


def own_part(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The part of the whole-shaped `value` that matches `local_shard(param)` (all of it, in `param`'s shape, when
    `param` is not partitioned)."""
    if getattr(param, "ds_tensor", None) is None:
        return value.reshape(param.shape)
    return value.reshape(-1).narrow(0, _shard_start(param), local_shard(param).numel())


def assign_whole(param: torch.Tensor, value: torch.Tensor) -> None:
    """Set `param` to the whole-shaped `value`; under ZeRO-3 each rank writes its own part, to its partition."""
    local_shard(param).data.copy_(own_part(param, value))


def load_whole_state(model: nn.Module, state: dict) -> None:
    """`model.load_state_dict(state)` for a state of whole tensors, also when ZeRO-3 partitions the model; the frozen
    quantized layers of a bitsandbytes base are not in `state` (see `quantized_weight_keys`)."""
    if not holds_shards(model):
        loaded = model.load_state_dict(state, strict=False)
        wrong = loaded.unexpected_keys + sorted(set(loaded.missing_keys) - quantized_weight_keys(model))
        if wrong:
            raise RuntimeError(f"the state's keys differ from the model's: {wrong[:5]}")
        return
    live = dict(model.named_parameters(remove_duplicate=False))
    live.update(model.named_buffers(remove_duplicate=False))
    differing = sorted(state.keys() ^ model.state_dict().keys())
    if differing:
        raise RuntimeError(f"the state's keys differ from the model's: {differing[:5]}")
    for name, value in state.items():
        assign_whole(live[name], value)


def zero3_run(args) -> bool:
    """Whether the run (its `FederatedConfig`) is under DeepSpeed ZeRO-3. Its model is partitioned for good when the
    client trainer's engine is built, after the strategy's `setup`; a strategy then takes its state from the
    partitions (`Strategy.on_model_sharded`), and not first from the whole model as well: for a model not loaded
    under `zero.Init` (built before the run's config, or by its class's constructor) that would be a whole copy on
    every process."""
    from fed_trainer.config import deepspeed_zero_stage

    return deepspeed_zero_stage(args.deepspeed) == 3


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


def whole_copy(model: nn.Module, state_dict: dict) -> nn.Module:
    """A CPU copy of a ZeRO-3 partitioned `model` (a transformers model, or a PeftModel around one) holding the
    gathered `state_dict`: built anew from its config, since a partitioned model cannot be copied."""
    if isinstance(model, PeftModel):
        base = model.get_base_model()
        copy = get_peft_model(type(base)(base.config), model.peft_config[model.active_adapter])
    else:
        copy = type(model)(model.config)
    copy.load_state_dict(state_dict)
    return copy


def share_engine(trainer) -> None:
    """Under DeepSpeed, let the outer `FederatedTrainer` evaluate and save with the clients' one engine (built by its
    `client_runner`) instead of building a second; under ZeRO-3, hand the partitioned model to the strategy. Nothing
    to do without DeepSpeed."""
    engine = trainer.client_runner.engine
    if engine is None:
        return
    trainer.deepspeed = trainer.model_wrapped = engine
    trainer.accelerator.deepspeed_config = trainer.client_runner.trainer.accelerator.deepspeed_config
    if holds_shards(trainer.model):
        if not engine.zero_gather_16bit_weights_on_model_save():
            raise ValueError(
                "Under ZeRO-3 FederatedTrainer saves round checkpoints and the merged model from weights gathered on "
                "the main process: set zero_optimization.stage3_gather_16bit_weights_on_model_save to true in the "
                "DeepSpeed config (recipes/deepspeed/zero3.json does)."
            )
        trainer.strategy.on_model_sharded(trainer.model)
