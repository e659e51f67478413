"""What each strategy supports, declared on its class (`Strategy.capabilities`) and checked before any training.

A combination a strategy does not support is refused when the trainer is built, with an error that names the
registered strategies that do support it. The capability table of docs/methods.md and the method table of README.md
are generated from these declarations (`fed_trainer.strategies.tables`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fed_trainer.config import FederatedConfig
    from fed_trainer.strategies.base import Strategy


@dataclass(frozen=True)
class Capabilities:
    """What a strategy supports.

    Attributes:
        lora: trains PEFT LoRA adapters (needs `peft_config`); otherwise full weights (refuses one).
        exact: the new global model is sum_k p_k W_k of the round's trained client models (W_k with any adapter
            merged in); the contract tests check it against that sum computed independently, and check that a
            strategy declared inexact is not.
        heterogeneous_ranks: clients may have LoRA configs of different ranks.
        robust_rules: `aggregation_rule` median / trimmed_mean, `update_clip_norm` and client-level DP apply (the
            aggregate is an entry-wise average of the payloads).
        zero3: runs under DeepSpeed ZeRO-3, the model sharded over the processes.
        flower: runs on Flower SuperNodes (`fed_trainer.flower`).
        undo_round: can put the last global model back when a round is abandonned (`min_clients_per_round`).
        folds_into_base: adds its updates into the base weights (so it refuses a quantized base: 4/8-bit weights
            cannot take them).
        reads_base: computes its adapters from the base weights' full-precision values (so it refuses a quantized
            base).
        local_optimizer: the `optim` its clients must train with, or None for any.
        server_optimizer: a server optimizer (`server_optimizer`, FedAdam and its kin) can step its round update.
        compressed_downlink: its messages may travel compressed (`downlink_compression`): a client starts from the
            message it decodes, and its payload's tensors of the message's names are trained values of them, so the
            server applies each client's update to the exact message (`fed_trainer.compression.translated`).
    """

    lora: bool = False
    exact: bool = False
    heterogeneous_ranks: bool = False
    robust_rules: bool = False
    zero3: bool = False
    flower: bool = True
    undo_round: bool = False
    folds_into_base: bool = False
    reads_base: bool = False
    local_optimizer: str | None = None
    server_optimizer: bool = False
    compressed_downlink: bool = False


# capability -> (column of the generated tables, what a user asks for when it is needed)
COLUMNS = {
    "lora": ("trains", "a peft_config"),
    "exact": ("exact", "an exact aggregate"),
    "heterogeneous_ranks": ("different ranks", "clients of different LoRA ranks"),
    "robust_rules": (
        "robust rules, clipping, DP",
        "robust rules, update clipping or differential privacy (aggregation_rule, update_clip_norm, "
        "dp_noise_multiplier)",
    ),
    "zero3": ("ZeRO-3", "DeepSpeed ZeRO-3"),
    "flower": ("Flower", "Flower SuperNodes"),
    "undo_round": ("undoes an abandoned round", "undoing an abandoned round"),
    "folds_into_base": ("folds updates into base weights", "folding updates into base weights"),
    "reads_base": ("adapters from base weights", "adapters computed from the base weights"),
    "local_optimizer": ("client optimizer", "a client optimizer"),
    "server_optimizer": ("server optimizer", "a server optimizer (server_optimizer)"),
    "compressed_downlink": ("compressed downlink", "a compressed downlink (downlink_compression)"),
}


def registered(built_in: bool = False) -> dict[str, type[Strategy]]:
    """The registered strategy classes (only fed_trainer's own if `built_in`), built-in ones in the order of the
    generated tables first."""
    from fed_trainer.strategies.registry import strategy_classes  # the registry imports the base, which imports this

    found = {n: c for n, c in strategy_classes().items() if not built_in or c.__module__.startswith(__package__)}
    return dict(sorted(found.items(), key=lambda item: ORDER.index(item[0]) if item[0] in ORDER else len(ORDER)))


# the order of the tables and error messages: as the methods are introduced in docs/methods.md; user strategies last
ORDER = [
    "fedavg", "galore_lowrank", "galore_shared", "scaffold", "fedit", "ffa_lora", "flexlora", "fedex_lora", "flora"
]  # fmt: skip


def supporting(capability: str) -> list[str]:
    """The registered strategies whose `capability` is `value`."""
    return [name for name, cls in registered().items() if getattr(cls.capabilities, capability)]


def refused(strategy: Strategy, capability: str, fix: str = "") -> ValueError:
    """The error for asking `strategy` for a capability it lacks, naming the strategies that have it."""
    others = [name for name in supporting(capability) if name != strategy.name]
    alternatives = f"; strategies that support it: {others}" if others else ""
    fix = f" {fix}" if fix else ""
    return ValueError(f"strategy {strategy.name!r} does not support {COLUMNS[capability][1]}{alternatives}.{fix}")


def check_capabilities(
    strategy: Strategy,
    args: FederatedConfig,
    peft_configs: dict | None,
    quantized: str | None = None,
    peft_model: bool = False,
) -> None:
    """Refuse, before any training, a run that asks `strategy` for something it does not support (`quantized`:
    how the model's base is quantized, see `fed_trainer.quantized.quantization_of`; `peft_model`: whether the model
    given is already a PEFT model)."""
    from fed_trainer.config import deepspeed_zero_stage

    caps = strategy.capabilities
    if peft_model and not caps.lora:
        raise ValueError(
            f"model is a PeftModel but strategy {strategy.name!r} averages full weights: pass the base model with "
            "peft_config=LoraConfig(...) and a LoRA strategy such as 'fedit', or merge the adapter first."
        )
    if quantized and (not caps.lora or caps.folds_into_base or caps.reads_base):
        adapters_only = [
            n for n, c in registered().items()
            if c.capabilities.lora and not c.capabilities.folds_into_base and not c.capabilities.reads_base
        ]  # fmt: skip
        changes = (
            "trains full weights" if not caps.lora
            else "adds its updates into the base weights" if caps.folds_into_base
            else "computes its adapters from the full-precision base weights"
        )  # fmt: skip
        raise ValueError(
            f"strategy {strategy.name!r} {changes}, which a {quantized} base cannot hold: train LoRA adapters with a "
            f"strategy that leaves the base untouched ({adapters_only}), or load the model without "
            "quantization_config."
        )
    if quantized and args.deepspeed:
        raise ValueError(
            f"a {quantized} (bitsandbytes) base does not run under DeepSpeed: drop the deepspeed config, or load the "
            "model without quantization_config."
        )
    if caps.lora and not peft_configs:
        raise ValueError(
            f"strategy {strategy.name!r} trains LoRA adapters: pass peft_config=LoraConfig(...) (or "
            "client_peft_configs=) to FederatedTrainer."
        )
    if not caps.lora and peft_configs:
        raise ValueError(
            f"strategy {strategy.name!r} averages full weights and takes no peft_config: choose a LoRA strategy "
            f"({supporting('lora')}) or drop the peft_config."
        )
    if peft_configs and not caps.heterogeneous_ranks and len({repr(c) for c in peft_configs.values()}) > 1:
        ranks = sorted({config.r for config in peft_configs.values()})
        raise refused(strategy, "heterogeneous_ranks", f"Ranks given: {ranks}; give every client the same config.")
    robust = (
        args.aggregation_rule != "mean" or args.update_clip_norm is not None or args.dp_noise_multiplier is not None
    )
    if robust and not caps.robust_rules:
        raise refused(
            strategy,
            "robust_rules",
            "Its aggregate is built from products of LoRA factors, which a coordinate-wise rule or a clip of the "
            "factors does not bound: use aggregation_rule='mean' without update_clip_norm.",
        )
    optim = str(getattr(args.optim, "value", args.optim))
    if caps.local_optimizer is not None and optim != caps.local_optimizer:
        raise ValueError(
            f"strategy {strategy.name!r} needs optim={caps.local_optimizer!r} (with optim_target_modules), got "
            f"optim={optim!r}; use strategy='fedavg' for other optimizers."
        )
    if args.downlink_compression != "none" and not caps.compressed_downlink:
        raise refused(
            strategy,
            "compressed_downlink",
            "Its message is not the state its clients train from (or its clients keep what they build from it), "
            "so a client's update cannot be put back onto the exact message: use downlink_compression='none'.",
        )
    if args.server_optimizer != "none" and not caps.server_optimizer:
        raise refused(strategy, "server_optimizer", "Use server_optimizer='none' (docs/methods.md says why).")
    if deepspeed_zero_stage(args.deepspeed) == 3 and not caps.zero3:
        raise refused(strategy, "zero3", "Drop the ZeRO-3 config, or use ZeRO-2.")
