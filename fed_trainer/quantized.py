"""Clients on a bitsandbytes-quantized base (QLoRA: 4-bit nf4/fp4; LLM.int8: 8-bit).

A quantized base is frozen: only LoRA strategies that leave it untouched can train on it (`check_capabilities`
refuses the others). It is prepared once as PEFT recommends, and the merged model of a run is a plain model whose
base weights are the dequantized ones with the adapters added: the quantized model plus adapters, up to the rounding
of the compute dtype, loadable without peft or bitsandbytes.

bitsandbytes internals used here (only here): `Linear4bit.support_avx512bf16_for_cpu`, set to False, and
`bitsandbytes.functional._convert_weight_packed_for_cpu_inverse`. On a CPU with AVX512-BF16, bitsandbytes 0.50
repacks a 4-bit weight at its first inference forward into a layout with bfloat16 block scales; `dequantize` does not
read that layout (bitsandbytes issue 2078: it breaks `Params4bit.to` too) and its inverse is best-effort, so a
quantized base is kept in the standard layout throughout (CPU evaluation then takes the standard path, the one
GPUs always take).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from peft import PeftModel, prepare_model_for_kbit_training
from torch import nn

if TYPE_CHECKING:
    from fed_trainer.config import FederatedConfig


def quantization_of(model: nn.Module | None) -> str | None:
    """How the base of `model` (a PeftModel or not) is quantized by bitsandbytes, e.g. "4-bit nf4", "8-bit";
    None for a model in a floating dtype."""
    if isinstance(model, PeftModel):
        model = model.get_base_model()
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if config is None or getattr(model, "hf_quantizer", None) is None:
        return None
    if getattr(config, "load_in_4bit", False):
        return f"4-bit {config.bnb_4bit_quant_type}"
    if getattr(config, "load_in_8bit", False):
        return "8-bit"
    return str(getattr(config, "quant_method", "quantized"))


def quantized_weight_keys(model: nn.Module) -> set[str]:
    """The `state_dict()` keys of `model`'s bitsandbytes-quantized layers (packed weights, their scales and quant
    states, biases): frozen, so a round checkpoint leaves them out and a resumed run takes them from its own base."""
    keys = set()
    for name, module in model.named_modules():
        own = dict(module.named_parameters(recurse=False))  # not a LoRA layer's `weight`, its base layer's
        if type(own.get("weight")).__name__ in ("Params4bit", "Int8Params"):
            keys.update(f"{name}.{key}" for key in module.state_dict())
    return keys


def prepared_for_kbit_training(model: nn.Module, args: FederatedConfig) -> nn.Module:
    """PEFT's `prepare_model_for_kbit_training` on a quantized base, before the adapters are added: the base frozen,
    its non-quantized weights (norms, embeddings) in float32, input gradients enabled for gradient checkpointing,
    which is switched on as the client args ask (as TRL's SFTTrainer does)."""
    return prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=args.gradient_checkpointing,
        gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs,
    )


def keep_standard_layout(model: nn.Module) -> None:
    """Keep every 4-bit weight of `model` in bitsandbytes' standard layout, the one `dequantize_4bit` reads: switch
    off the CPU AVX512 repacking of inference forwards, and undo (best effort) one already done."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)


def merged_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of a quantized model's merged copy: the 4-bit compute dtype, else the dtype it was loaded in."""
    if isinstance(model, PeftModel):
        model = model.get_base_model()
    config = model.config
    compute = getattr(config.quantization_config, "bnb_4bit_compute_dtype", None)
    dtype = compute if getattr(config.quantization_config, "load_in_4bit", False) and compute else config.dtype
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype or torch.float32


def dequantized_merge(model: PeftModel, adapter: str) -> nn.Module:
    """A plain copy of the quantized `model` in `merged_dtype`: every quantized weight dequantized (transformers'
    `dequantize`), the adapter's delta B A s added to its layer in float32, the LoRA layers removed; `model` is left
    as it is. PEFT's own merge would round the sum back into 4 or 8 bits."""
    from peft.tuners.lora import LoraLayer

    dtype = merged_dtype(model)
    merged = copy.deepcopy(model)
    deltas = {
        name: layer.get_delta_weight(adapter).detach()
        for name, layer in merged.get_base_model().named_modules()
        if isinstance(layer, LoraLayer) and adapter in layer.lora_A
    }
    base = merged.unload()
    base.dequantize(dtype=dtype)
    for name, delta in deltas.items():
        weight = base.get_submodule(name).weight
        weight.data = (weight.data.float() + delta.float()).to(dtype)
    return base.to(dtype)
