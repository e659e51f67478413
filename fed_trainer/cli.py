"""What the example scripts share: LoRA and quantization arguments, command lines layered over YAML recipes, and the
train-save-evaluate tail of transformers' `run_*.py` scripts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import yaml
from peft import LoraConfig
from transformers import BitsAndBytesConfig, HfArgumentParser, TrainingArguments

from fed_trainer.strategies.registry import strategy_class

# Defaults every example shares (each adds its own model, data and federation sizes).
EXAMPLE_DEFAULTS = dict(report_to="none", dataloader_pin_memory=False, eval_every_rounds=1, seed=42)


@dataclass
class LoraArguments:
    """LoRA settings, used when the strategy trains LoRA adapters (like TRL's `ModelConfig` LoRA fields)."""

    lora_r: int = field(default=8, metadata={"help": "LoRA rank, with a LoRA strategy."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (scaling alpha / r)."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Modules that get LoRA adapters (name suffixes); default: all linear layers."}
    )
    lora_modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained in full beside the adapters (e.g. a new classifier)."}
    )
    lora_ranks: list[int] | None = field(
        default=None, metadata={"help": "One LoRA rank per client (flexlora, flora): heterogeneous ranks."}
    )
    use_rslora: bool = field(default=False, metadata={"help": "rsLoRA scaling alpha / sqrt(r)."})

    def peft_config(self, strategy: str, task_type: str | None = None) -> LoraConfig | None:
        """The LoRA config for a LoRA strategy, None for full-weight ones."""
        if not strategy_class(strategy).capabilities.lora:
            return None
        return LoraConfig(
            task_type=task_type,
            r=self.lora_r,
            lora_alpha=self.lora_alpha,
            target_modules=self.lora_target_modules or "all-linear",
            modules_to_save=self.lora_modules_to_save,
            use_rslora=self.use_rslora,
        )


@dataclass
class QuantizationArguments:
    """A bitsandbytes-quantized base for LoRA clients (QLoRA), with the names of TRL's `ModelConfig` fields."""

    load_in_4bit: bool = field(
        default=False,
        metadata={"help": "Load the base in 4 bits (QLoRA); needs a LoRA strategy that leaves the base untouched."},
    )
    load_in_8bit: bool = field(default=False, metadata={"help": "Load the base in 8 bits (LLM.int8)."})
    bnb_4bit_quant_type: str = field(
        default="nf4", metadata={"help": "The 4-bit data type.", "choices": ["nf4", "fp4"]}
    )
    use_bnb_nested_quant: bool = field(
        default=False, metadata={"help": "Quantize the 4-bit block scales too (QLoRA's double quantization)."}
    )

    def model_kwargs(self, args: TrainingArguments) -> dict:
        """`from_pretrained` arguments: float32 weights (bfloat16 with --bf16), quantized as asked, placed on the
        training device (bitsandbytes quantizes a layer when it is placed)."""
        dtype = torch.bfloat16 if args.bf16 else torch.float32
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("Pass --load_in_4bit or --load_in_8bit, not both.")
        if not (self.load_in_4bit or self.load_in_8bit):
            return {"dtype": dtype}
        quantization = BitsAndBytesConfig(
            load_in_4bit=self.load_in_4bit,
            load_in_8bit=self.load_in_8bit,
            bnb_4bit_quant_type=self.bnb_4bit_quant_type,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=self.use_bnb_nested_quant,
        )
        return {"dtype": dtype, "quantization_config": quantization, "device_map": {"": args.device}}


def parse_args_with_recipe(dataclass_types: tuple, argv: list[str], defaults: dict) -> tuple:
    """Parse `argv` into `dataclass_types`: command-line flags over a YAML recipe (`--config FILE`, or a lone
    leading `.yaml` path) over the script's embedded `defaults`."""
    parser = HfArgumentParser(dataclass_types)
    parser.set_defaults(**defaults)
    argv = list(argv)
    recipe = None
    if "--config" in argv:
        i = argv.index("--config")
        recipe = argv[i + 1]
        del argv[i : i + 2]
    elif argv and argv[0].endswith((".yaml", ".yml")):
        recipe = argv.pop(0)
    if recipe is not None:
        with open(recipe, encoding="utf-8") as f:
            parser.set_defaults(**(yaml.safe_load(f) or {}))
    return parser.parse_args_into_dataclasses(args=argv)


def train_save_evaluate(trainer, extra_metrics: Callable[[dict], dict] | None = None) -> dict:
    """Train (continuing from `args.resume_from_checkpoint` when set), save the global model, the train metrics and
    the trainer state; then, if the trainer has an `eval_dataset`, evaluate and save the eval metrics (with
    `eval_samples` and whatever `extra_metrics(metrics)` adds). Returns the eval metrics ({} without evaluation)."""
    train_result = trainer.train(resume_from_checkpoint=trainer.args.resume_from_checkpoint)
    trainer.save_model()
    trainer.log_metrics("train", train_result.metrics)
    trainer.save_metrics("train", train_result.metrics)
    trainer.save_state()
    if trainer.eval_dataset is None:
        return {}
    metrics = trainer.evaluate()
    metrics["eval_samples"] = len(trainer.eval_dataset)
    if extra_metrics is not None:
        metrics.update(extra_metrics(metrics))
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)
    return metrics
