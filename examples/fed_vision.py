#!/usr/bin/env python
"""Federated fine-tuning of an image classifier through the same `FederatedTrainer`.

Runs offline with no arguments: the bundled EfficientNet-Lite0 (ImageNet weights) on Fashion-MNIST (Debian's
`dataset-fashion-mnist`), images resized to 64x64, a Dirichlet label split over 10 clients, 5 sampled per round.

    python examples/fed_vision.py
    accelerate launch examples/fed_vision.py
    python examples/fed_vision.py --strategy fedex_lora --learning_rate 1e-2        # LoRA on the 1x1 convolutions
    python examples/fed_vision.py --strategy fedavg --optim galore_adamw --optim_target_modules _fc \\
        --optim_args "rank=8,update_proj_gap=20,scale=0.25"

LoRA strategies adapt the pointwise (1x1) convolutions through PEFT's Conv2d LoRA and train the new classifier
`_fc` in full. GaLore (galore-torch, through transformers) projects only `nn.Linear` weights: in this network that
is the classifier alone, so `galore_fedavg` here is full fine-tuning with a GaLore-projected head.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field

import numpy as np
import transformers
from transformers import EvalPrediction, set_seed

from fed_trainer import FederatedConfig, FederatedTrainer
from fed_trainer.assets.efficientnet_lite import CLASSIFIER, POINTWISE_CONVS, efficientnet_lite0
from fed_trainer.assets.fashion_mnist import CLASSES, GreyImageCollator, load_fashion_mnist
from fed_trainer.cli import EXAMPLE_DEFAULTS, LoraArguments, parse_args_with_recipe, train_save_evaluate
from fed_trainer.distributed import end_process_group

logger = logging.getLogger(__name__)

# The embedded default run: a few minutes on 2 CPU cores.
DEFAULTS = dict(
    **EXAMPLE_DEFAULTS,
    output_dir="fed_vision_output",
    num_clients=10,
    clients_per_round=5,
    num_rounds=5,
    local_steps=10,
    partition="dirichlet",
    partition_alpha=0.5,
    per_device_train_batch_size=32,
    per_device_eval_batch_size=128,
    learning_rate=3e-3,
    warmup_steps=5,
    lora_target_modules=POINTWISE_CONVS,
    lora_modules_to_save=[CLASSIFIER],
)


@dataclass
class DataArguments:
    image_size: int = field(default=64, metadata={"help": "Images are resized to this many pixels a side."})
    max_train_samples: int | None = field(default=6000, metadata={"help": "Random training subset (of 60,000)."})
    max_eval_samples: int | None = field(default=1000, metadata={"help": "Random test subset (of 10,000)."})


def parse_args(argv: list[str]) -> tuple[LoraArguments, DataArguments, FederatedConfig]:
    """CLI flags over a YAML recipe (`--config FILE` or a lone positional `.yaml`) over the embedded defaults."""
    return parse_args_with_recipe((LoraArguments, DataArguments, FederatedConfig), argv, DEFAULTS)


def accuracy(p: EvalPrediction) -> dict:
    return {"accuracy": float(np.mean(np.argmax(p.predictions, axis=1) == p.label_ids))}


def main(argv: list[str] | None = None) -> dict:
    lora_args, data_args, training_args = parse_args(sys.argv[1:] if argv is None else argv)
    set_seed(training_args.seed)  # before the model is built: its new head is drawn from the seed
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    data = load_fashion_mnist(data_args.max_train_samples, data_args.max_eval_samples, seed=training_args.seed)
    model = efficientnet_lite0(num_labels=len(CLASSES), image_size=data_args.image_size)
    model.config.id2label = dict(enumerate(CLASSES))
    model.config.label2id = {name: i for i, name in enumerate(CLASSES)}

    trainer = FederatedTrainer(
        model=model,
        args=training_args,
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        data_collator=GreyImageCollator(data_args.image_size),
        compute_metrics=accuracy,
        peft_config=lora_args.peft_config(training_args.strategy),
        client_peft_configs=lora_args.lora_ranks,
    )
    return train_save_evaluate(trainer)


if __name__ == "__main__":
    main()
    end_process_group()
