"""What the federated LoRA strategies share: PEFT wrapping, the LoRA layers, per-client ranks, factor stacking.

Invariant kept by every LoRA strategy: between rounds the live model holds the global model exactly, so
`evaluate()` runs on it and `merged_model()` is PEFT's merge of a copy of it. Trainable tensors other than the
LoRA factors (e.g. the classifier in `modules_to_save`) are FedAvg-averaged under every LoRA strategy.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils import transpose
from torch import nn

from fed_trainer.distributed import all_gather_tensors, all_reduce_sums
from fed_trainer.quantized import (
    dequantized_merge,
    keep_standard_layout,
    prepared_for_kbit_training,
    quantization_of,
)
from fed_trainer.strategies.base import TensorDict, tensor_bytes, trainable_state
from fed_trainer.strategies.capabilities import Capabilities
from fed_trainer.strategies.fedavg import FedAvg
from fed_trainer.strategies.keys import message_key, parse
from fed_trainer.zero import assign_whole, local_shard, own_part, whole

if TYPE_CHECKING:
    from fed_trainer.config import FederatedConfig

ADAPTER = "default"
# LoraConfig fields that may differ between clients; everything else must match.
PER_CLIENT_FIELDS = ("r", "lora_alpha", "use_rslora")


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """The model's LoRA layers by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A}


def lora_scaling(config: LoraConfig) -> float:
    """s = alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)


def lora_parameters(layer: LoraLayer) -> tuple[nn.Parameter, nn.Parameter]:
    """The adapter's (A, B) parameters, in their module's shape (4-D for a Conv2d adapter)."""
    return layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight


def lora_factors(layer: LoraLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) as matrices, A: r x fan_in, B: out x r, detached views of the live parameters (under DeepSpeed ZeRO-3,
    gathered copies: a collective).

    For a Linear adapter they are the weights; a Conv2d adapter's A (r x in x k x k) is flattened to r x (in k k)
    and its B (out x r x 1 x 1) to out x r, so that B A, reshaped, is PEFT's delta weight for every layer type.
    """
    a, b = (whole(local_shard(p), p).detach() for p in lora_parameters(layer))
    return a.flatten(1), b.flatten(1)


def fold_into_base(
    layer: LoraLayer, delta: torch.Tensor, step: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> None:
    """Add an out x fan_in update to the frozen base weight, in the weight's own orientation and shape (Conv1D is
    in x out; a Conv2d kernel is out x in x k x k); under ZeRO-3 each rank adds its part to its partition.

    With `step` (a server optimizer's step for this weight), each rank adds `step(its part of the update)` instead,
    so the optimizer's state has the shape of the rank's partition.
    """
    weight = layer.get_base_layer().weight
    shape = getattr(weight, "ds_shape", weight.shape)
    part = own_part(weight, transpose(delta, getattr(layer, "fan_in_fan_out", False)).reshape(shape))
    target = local_shard(weight).data
    target.add_((part if step is None else step(part)).to(target.dtype))


def set_lora_factors(layer: LoraLayer, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
    """Load factor matrices (A: r x fan_in, B: out x r) and a scaling into `layer`'s adapter. A rank r below the
    adapter's is zero-padded: directions zero in both A and B get zero gradients, so they stay zero in training and
    the client trains a rank-r adapter in the fixed-size one (whose parameters a DeepSpeed engine holds)."""
    live_a, live_b = lora_parameters(layer)
    shape_a, shape_b = (getattr(p, "ds_shape", p.shape) for p in (live_a, live_b))  # ZeRO-3: the whole shape
    r, rank = a.shape[0], shape_a[0]
    if r > rank:
        raise ValueError(f"factors of rank {r} do not fit an adapter of rank {rank}")
    if r < rank:
        a = torch.cat([a, a.new_zeros(rank - r, a.shape[1])])
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - r)], dim=1)
    layer.scaling[ADAPTER] = scaling
    assign_whole(live_a, a.reshape(shape_a))
    assign_whole(live_b, b.reshape(shape_b))


def kaiming_like(weight: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A fresh LoRA A as PEFT initialises it (kaiming-uniform, a=sqrt(5)), drawn from `generator`."""
    out = torch.empty(weight.shape, dtype=torch.float32)
    nn.init.kaiming_uniform_(out, a=math.sqrt(5), generator=generator)
    return out.to(device=weight.device, dtype=weight.dtype)


def factor_names(layer_name: str) -> tuple[str, str]:
    """The parameter names of a LoRA layer's (A, B) in the PeftModel's state."""
    return f"{layer_name}.lora_A.{ADAPTER}.weight", f"{layer_name}.lora_B.{ADAPTER}.weight"


def is_lora_factor(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


class LoraStrategy(FedAvg):
    """Base of the federated LoRA strategies. As it stands it is FedIT: everything trainable, the LoRA factors
    included, is averaged entry by entry. Subclasses change what travels and how the aggregate is applied.
    """

    capabilities = Capabilities(
        lora=True, robust_rules=True, zero3=True, undo_round=True, server_optimizer=True, compressed_downlink=True
    )

    def setup(self, model: nn.Module, args: FederatedConfig, peft_configs: dict | None = None) -> nn.Module:
        self.client_configs = self._checked_configs(peft_configs)
        self.client_index = {cid: i for i, cid in enumerate(self.client_configs)}
        self.args = args
        first = next(iter(self.client_configs.values()))
        # One adapter of the largest client rank serves every client (smaller ranks are zero-padded), so the live
        # parameters never change shape
        self.rank = max(config.r for config in self.client_configs.values())
        wrapped = not isinstance(model, PeftModel)
        if quantization_of(model):
            keep_standard_layout(model)
            if wrapped:
                model = prepared_for_kbit_training(model, args)
        if wrapped:
            names = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})
            try:
                model = get_peft_model(model, dataclasses.replace(first, r=self.rank))
            except ValueError as err:
                if "target" not in str(err):
                    raise
                raise ValueError(
                    f"target_modules={first.target_modules} matched no layer of the model; its linear layers end in "
                    f"{names[:12]}: name some of those ({err})."
                ) from err
        self.layers = lora_layers(model)
        try:
            self._check_layers(first)
        except ValueError:
            if wrapped:  # give the caller's model back as it came
                model.unload()
            raise
        self.prepare_adapter(model)
        return super().setup(model, args)

    def _check_layers(self, first: LoraConfig) -> None:
        if not self.layers:
            raise ValueError(f"target_modules={first.target_modules} matched no layer of the model.")
        rank = self.rank
        for name, layer in self.layers.items():
            a, b = lora_factors(layer)
            if a.shape[0] != rank:
                raise ValueError(
                    f"the PeftModel's adapter has rank {a.shape[0]} in layer {name}, but the largest client rank is "
                    f"{rank}: pass the base model (FederatedTrainer wraps it), or build the PeftModel with r={rank}."
                )
            if rank > min(b.shape[0], a.shape[1]):
                raise ValueError(
                    f"LoRA rank {rank} is larger than layer {name} allows: its update is {b.shape[0]} x "
                    f"{a.shape[1]}, so a rank above {min(b.shape[0], a.shape[1])} adds nothing but cost. Lower r "
                    "(or lora_ranks), or leave this layer out of target_modules."
                )

    def prepare_adapter(self, model: nn.Module) -> None:
        """Hook run once on the freshly wrapped model, before the global state is taken from it."""

    def _checked_configs(self, peft_configs: dict | None) -> dict:
        first_id, first = next(iter(peft_configs.items()))
        for cid, config in peft_configs.items():
            if not isinstance(config, LoraConfig):
                raise TypeError(f"client {cid!r}: expected a peft.LoraConfig, got {type(config).__name__}.")
            if dataclasses.replace(config, **{f: getattr(first, f) for f in PER_CLIENT_FIELDS}) != first:
                raise ValueError(
                    f"client {cid!r}'s LoraConfig differs from client {first_id!r}'s beyond {PER_CLIENT_FIELDS}: "
                    "clients must share target_modules, dropout and the other fields."
                )
        return dict(peft_configs)

    def scaling(self, client_id) -> float:
        return lora_scaling(self.client_configs[client_id])

    def client_generator(self, client_id) -> torch.Generator:
        """A generator seeded by (seed, round, client), so fresh LoRA inits are reproducible."""
        entropy = [self.args.seed, self.round_number, self.client_index[client_id]]
        return torch.Generator().manual_seed(int(np.random.SeedSequence(entropy).generate_state(1)[0]))

    def base_weights(self) -> TensorDict:
        """What this process holds of every targeted layer's base weight (all of it without ZeRO-3)."""
        return {name: local_shard(layer.get_base_layer().weight) for name, layer in self.layers.items()}

    def base_message(self) -> TensorDict:
        """The targeted base weights as message entries `<layer>.base` (for a client that must be sent them)."""
        return {message_key(name, "base"): weight for name, weight in self.base_weights().items()}

    def global_tensors(self, model: nn.Module) -> TensorDict:
        """The trainable tensors, both factors of every adapter (a frozen one too: RoLoRA's of the round), and the
        targeted base weights for a strategy that folds updates into them."""
        wanted = {id(p) for layer in self.layers.values() for p in lora_parameters(layer)}
        if self.capabilities.folds_into_base:
            wanted |= {id(layer.get_base_layer().weight) for layer in self.layers.values()}
        return {**super().global_tensors(model), **{n: p for n, p in model.named_parameters() if id(p) in wanted}}

    def load_base(self, tensors: TensorDict) -> None:
        """Copy the `<layer>.base` entries of `tensors` (a `base_message`) into the base weights."""
        for name, weight in self.base_weights().items():
            weight.data.copy_(tensors[message_key(name, "base")])

    def base_step(self, name: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The server optimizer's step for the base weight of layer `name` (for `fold_into_base`), None without one.

        Strategies that fold the exact update of a layer into its base weight step that dense update: its
        optimizer state is as large as the base weight (per rank: its partition under ZeRO-3).
        """
        if self.server_optimizer is None:
            return None
        return lambda delta: self.server_optimizer.step(message_key(name, "base"), delta)

    def server_parameter(self, name: str):
        key = parse(name)
        if key.part == "base":
            return self.layers[key.tensor].get_base_layer().weight
        return super().server_parameter(name)

    def state_dict(self) -> dict:
        scalings = {name: layer.scaling[ADAPTER] for name, layer in self.layers.items()}
        return {**super().state_dict(), "scalings": scalings}

    def load_state_dict(self, model: nn.Module, state: dict, model_state: TensorDict) -> None:
        for name, layer in self.layers.items():
            layer.scaling[ADAPTER] = state["scalings"][name]
        super().load_state_dict(model, state, model_state)

    def merged_model(self, model: nn.Module) -> nn.Module:
        if quantization_of(model):  # a plain model: the dequantized base plus the adapters
            return dequantized_merge(model, ADAPTER)
        return copy.deepcopy(model).merge_and_unload()


class StackedLoraStrategy(LoraStrategy):
    """LoRA strategies whose clients may differ in rank: the factors are not averaged entry by entry but stacked,
    `left = [s_1 p_1 B_1, ..., s_K p_K B_K]` (out x R) and `right = [A_1; ...; A_K]` (R x in), so that
    `left @ right = sum_k p_k s_k B_k A_k` exactly. Only the other trainables go through FedAvg.
    """

    capabilities = Capabilities(
        lora=True,
        exact=True,
        heterogeneous_ranks=True,
        zero3=True,
        undo_round=True,
        folds_into_base=True,
        server_optimizer=True,
    )

    def restore_global(self, model: nn.Module) -> None:
        super().restore_global(model)
        self.clear_adapters()

    def clear_adapters(self) -> None:
        """A = B = 0 in every live adapter: between rounds the global model is in the base weights, with no adapter
        (every client is given its own factors)."""
        for layer in self.layers.values():
            for param in lora_parameters(layer):
                local_shard(param).data.zero_()

    def averaged_state(self, model: nn.Module) -> TensorDict:
        return {name: t for name, t in trainable_state(model).items() if not is_lora_factor(name)}

    def traffic_bytes(self, tensors: TensorDict) -> int:
        if not self.sharded or dist.get_rank() == 0:
            return tensor_bytes(tensors)
        # under ZeRO-3 the averaged tensors and base weights (".base") are this rank's shards; factors and stacks
        # are whole on every rank
        return tensor_bytes({k: t for k, t in tensors.items() if k in self.global_state or parse(k).part == "base"})

    @staticmethod
    def factor_message(factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> TensorDict:
        """{layer: (A, B)} as named tensors."""
        return {key: t for name, pair in factors.items() for key, t in zip(factor_names(name), pair)}

    def fresh_factors(self, client_id) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """PEFT's initialisation at the client's rank (A kaiming-uniform, B zero), seeded per round and client."""
        r, generator = self.client_configs[client_id].r, self.client_generator(client_id)
        factors = {}
        for name, layer in self.layers.items():
            a, b = lora_factors(layer)
            factors[name] = (kaiming_like(a.new_empty(r, a.shape[1]), generator), b.new_zeros(b.shape[0], r))
        return factors

    def load_client(self, model: nn.Module, message: TensorDict, client_id) -> None:
        """Load the shared tensors and the client's factors; a message without factors means: start LoRA afresh."""
        super().load_client(model, message, client_id)
        if factor_names(next(iter(self.layers)))[0] not in message:
            message = self.factor_message(self.fresh_factors(client_id))
        scaling = self.scaling(client_id)
        for name, layer in self.layers.items():
            a, b = (message[key] for key in factor_names(name))
            set_lora_factors(layer, a, b, scaling)

    def client_payload(self, model: nn.Module, client_id) -> TensorDict:
        r = self.client_configs[client_id].r  # the client's own directions, not the adapter's zero padding
        factors = {}
        for name, layer in self.layers.items():
            a, b = lora_factors(layer)
            factors[name] = (a[:r], b[:, :r])
        return {**super().client_payload(model, client_id), **self.factor_message(factors)}

    def begin_round(self, round_number: int) -> None:
        super().begin_round(round_number)
        # client index -> {layer: (s_k p_k B_k, A_k)}; stacked in client order, whatever order they arrive in
        self._stack_parts: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}

    def aggregate(self, payload: TensorDict, weight: float, client_id=None) -> None:
        super().aggregate({k: v for k, v in payload.items() if k in self.global_state}, weight, client_id)
        coefficient = weight * self.scaling(client_id)
        parts = {}
        for name in self.layers:
            a, b = (payload[key].detach() for key in factor_names(name))
            # a copy of A: the payload may be a view of the live adapter, which the next client overwrites
            parts[name] = (b.flatten(1).float() * coefficient, a.flatten(1).to(torch.float32, copy=True))
        self._stack_parts[self.client_index[client_id]] = parts

    def synchronize(self) -> None:
        super().synchronize()
        device = lora_factors(next(iter(self.layers.values())))[0].device
        gathered = all_gather_tensors(self._stack_parts, device)
        self._stack_parts = {i: parts for part in gathered for i, parts in part.items()}

    def stacked(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(left, right) of this round for layer `name`: left @ right = sum_k p_k s_k B_k A_k (over the weight
        aggregated, so the clients kept in the round)."""
        parts = [self._stack_parts[i][name] for i in sorted(self._stack_parts)]
        left = torch.cat([left for left, _ in parts], dim=1) / self.aggregated_weight
        return left, torch.cat([right for _, right in parts], dim=0)


class ProductAveragingLora(LoraStrategy):
    """A LoRA strategy whose server also needs the average of the clients' products, sum_k p_k s_k B_k A_k per
    layer (a dense out x in float32 sum per layer, summed over the ranks of a client-parallel round)."""

    def begin_round(self, round_number: int) -> None:
        super().begin_round(round_number)
        self._products: dict[str, torch.Tensor] = {}

    def aggregate(self, payload: TensorDict, weight: float, client_id=None) -> None:
        super().aggregate(payload, weight, client_id)
        coefficient = weight * self.scaling(client_id)
        for name, layer in self.layers.items():  # each layer's product made where the model is, summed where the
            product = self._product(name, layer, payload, coefficient)  # server state is (`server_state_device`)
            if name in self._products:
                self._products[name].add_(product.to(self._products[name].device))
            else:
                self._products[name] = product.to(self.state_device)  # (a fresh tensor: moved, not copied)

    def synchronize(self) -> None:
        super().synchronize()
        self._products = all_reduce_sums(self._products)

    def average_product(self, name: str) -> torch.Tensor:
        """sum_k p_k s_k B_k A_k of layer `name` over the round's clients kept (out x fan_in, float32), on the layer's
        device."""
        device = lora_factors(self.layers[name])[0].device
        return self._products[name].to(device) / self.aggregated_weight

    @staticmethod
    def _product(name: str, layer, tensors: TensorDict, coefficient: float) -> torch.Tensor:
        """coefficient * B A of layer `name`, in float32, from the factors held in `tensors` (under ZeRO-3 this rank's
        shards, gathered whole: a collective)."""
        pairs = zip(factor_names(name), lora_parameters(layer))
        a, b = (whole(tensors[key].detach(), p).flatten(1).float() for key, p in pairs)
        return (b @ a).mul_(coefficient)
