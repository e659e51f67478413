"""FedIT (Zhang et al., 2024): average LoRA A and B separately, A = sum p_k A_k, B = sum p_k B_k.

Not exact: the mean of the products s B_k A_k is not the product of the means. That gap is what FedEx-LoRA
closes and what the method comparison measures. Uplink r(out+in) per layer.
"""

from __future__ import annotations

from fed_trainer.strategies.lora import LoraStrategy
from fed_trainer.strategies.registry import register_strategy


@register_strategy("fedit")
class FedIT(LoraStrategy):
    """Averages every trainable tensor of the adapter model entry by entry, LoRA factors included."""

    title = "FedIT"
    paper = ("Towards Building the Federated GPT: Federated Instruction Tuning", "2305.05644")
