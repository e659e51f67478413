"""Federated supervised fine-tuning with TRL: every client trains with `trl.SFTTrainer`.

A TRL script federates by swapping `SFTTrainer` -> `FederatedSFTTrainer` and `SFTConfig` -> `FederatedSFTConfig`
and adding the federated arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from datasets import Dataset
from peft import LoraConfig
from torch import nn
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from fed_trainer.config import FederatedConfig
from fed_trainer.strategies import Strategy
from fed_trainer.trl_base import FederatedTRLTrainer


@dataclass
class FederatedSFTConfig(SFTConfig, FederatedConfig):
    """TRL's `SFTConfig` with the fields of [`FederatedConfig`]: every `SFTConfig` field (chat templates,
    `completion_only_loss`, `assistant_only_loss`, `packing`, `max_length`, ...) keeps its meaning for the local
    training of one client, and the federated fields describe the rounds. TRL's defaults hold (`learning_rate` 2e-5,
    `gradient_checkpointing` on, `bf16` unless `fp16`): pass `bf16=False` on a CPU without bfloat16 support.

    `SFTConfig` comes first among the bases so that its defaults win over `TrainingArguments`' own."""

    _VALID_DICT_FIELDS = [*FederatedConfig._VALID_DICT_FIELDS, "model_init_kwargs", "dataset_kwargs"]
    client_args_class = SFTConfig


class FederatedSFTTrainer(FederatedTRLTrainer):
    """`FederatedTrainer` whose clients train with `trl.SFTTrainer`.

    Takes `SFTTrainer`'s arguments (with a [`FederatedSFTConfig`] as `args`) and `FederatedTrainer`'s federated
    ones (`client_datasets`, `strategy`, `client_peft_configs`, `client_callbacks`). `peft_config` is the LoRA config
    of every client, trained by the strategy (`fedit`, `flora`, ...), as `FederatedTrainer` takes it.

    Each client's dataset, and the evaluation set, is prepared once, when the trainer is built, by TRL's own
    preprocessing (conversational, prompt-completion or language-modelling data; the chat template, completion-only
    or assistant-only labels, packing, truncation to `max_length`); rounds reuse it. The global model is evaluated
    by `SFTTrainer.evaluate` (the loss over the labelled tokens, token accuracy, entropy).
    """

    config_class = FederatedSFTConfig
    trl_trainer_class = SFTTrainer

    def __init__(
        self,
        model: nn.Module,
        args: FederatedSFTConfig | None = None,
        data_collator=None,
        train_dataset: Dataset | None = None,
        eval_dataset: Dataset | Mapping[str, Dataset] | None = None,
        processing_class=None,
        compute_metrics=None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers=(None, None),
        optimizer_cls_and_kwargs=None,
        preprocess_logits_for_metrics=None,
        peft_config: LoraConfig | None = None,
        formatting_func: Callable[[dict], str] | None = None,
        *,
        client_datasets: Sequence[Dataset] | Mapping[object, Dataset] | None = None,
        strategy: Strategy | None = None,
        client_peft_configs: Mapping[object, LoraConfig] | Sequence[int] | None = None,
        client_callbacks: Sequence[TrainerCallback] | None = None,
    ) -> None:
        super().__init__(
            model,
            args,
            trl_kwargs={
                "data_collator": data_collator,
                "formatting_func": formatting_func,
                "compute_metrics": compute_metrics,
                "preprocess_logits_for_metrics": preprocess_logits_for_metrics,
            },
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
            client_datasets=client_datasets,
            strategy=strategy,
            peft_config=peft_config,
            client_peft_configs=client_peft_configs,
            client_callbacks=client_callbacks,
        )
