"""What the example scripts share: LoRA arguments, command lines layered over YAML recipes, and the
train-save-evaluate tail of transformers' `run_*.py` scripts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import yaml
from peft import LoraConfig
from transformers import HfArgumentParser

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
