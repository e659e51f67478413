"""Federated preference tuning with TRL: every client trains with `trl.DPOTrainer`.

A TRL script federates by swapping `DPOTrainer` -> `FederatedDPOTrainer` and `DPOConfig` -> `FederatedDPOConfig`
and adding the federated arguments.

The reference model is the model each client starts the round from: the round's global model (as the client
receives it; for flexlora its rank-r projection). DPO's loss pulls the policy away from its reference by at most
what beta allows; a reference fixed at the initial model would hold every round to the first, and one refreshed
each round is the federated form of TR-DPO's synced reference (Gorbatovski et al., 2024). It is refreshed in
place when each client starts: with LoRA strategies as TRL's "ref" adapter, a copy of the client's starting adapter
on the shared base (memory: one adapter), otherwise as a frozen copy of the model (memory: one model).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel
from torch import nn
from transformers import TrainerCallback
from trl import DPOConfig, DPOTrainer

from fed_trainer.config import FederatedConfig, deepspeed_settings
from fed_trainer.strategies import Strategy
from fed_trainer.trl_base import FederatedTRLTrainer


@dataclass
class FederatedDPOConfig(DPOConfig, FederatedConfig):
    """TRL's `DPOConfig` with the fields of [`FederatedConfig`]: every `DPOConfig` field (`beta`, `loss_type`,
    `max_length`, ...) keeps its meaning for the local training of one client, and the federated fields describe the
    rounds. TRL's defaults hold (`learning_rate` 1e-6, `gradient_checkpointing` on, `bf16` unless `fp16`).

    Refused: DeepSpeed (the reference refreshed every round would need an engine of its own),
    `precompute_ref_log_probs` (the reference changes every round, so log-probabilities computed once would
    be stale from round 2) and `sync_ref_model` (the federation already moves the reference, to the round's global
    model)."""

    _VALID_DICT_FIELDS = [*FederatedConfig._VALID_DICT_FIELDS, "model_init_kwargs"]
    client_args_class = DPOConfig

    def __post_init__(self) -> None:
        if self.precompute_ref_log_probs:
            raise ValueError(
                "precompute_ref_log_probs=True computes the reference log-probabilities once, but a federated run's "
                "reference is each round's global model: set precompute_ref_log_probs=False."
            )
        if self.sync_ref_model:
            raise ValueError(
                "sync_ref_model=True mixes the policy into the reference during local training; FederatedDPOTrainer "
                "already moves the reference to the round's global model: set sync_ref_model=False."
            )
        if deepspeed_settings(self.deepspeed):
            raise ValueError(
                "FederatedDPOTrainer does not run under DeepSpeed yet: its reference model, refreshed to each "
                "round's global model, would need an engine of its own. Drop the deepspeed config."
            )
        super().__post_init__()


class ReferenceFromClientStart(TrainerCallback):
    """Makes the client's reference the model it starts the round from, in place, when its local training begins."""

    def __init__(self, client: DPOTrainer) -> None:
        self.client = client

    @torch.no_grad()
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model = self.client.accelerator.unwrap_model(self.client.model)
        if self.client.ref_model is None:  # a PeftModel: TRL's "ref" adapter on the same (frozen) base
            for name, param in model.named_parameters():
                if ".default." in name:
                    model.get_parameter(name.replace(".default.", ".ref.")).copy_(param)
            return
        source = model.state_dict()
        for name, target in self.client.accelerator.unwrap_model(self.client.ref_model).state_dict().items():
            target.copy_(source[name])


class FederatedDPOTrainer(FederatedTRLTrainer):
    """`FederatedTrainer` whose clients train with `trl.DPOTrainer`.

    Takes `DPOTrainer`'s arguments (with a [`FederatedDPOConfig`] as `args`; no `ref_model`: the reference is the
    round's global model, see `fed_trainer.dpo`) and `FederatedTrainer`'s federated ones (`client_datasets`,
    `strategy`, `client_peft_configs`, `client_callbacks`). `peft_config` is the LoRA config of every client,
    trained by the strategy. Preference data in any format TRL takes (`prompt`, `chosen`, `rejected`; plain or
    conversational) is prepared once per client. `evaluate()` is `DPOTrainer.evaluate` on the global model against
    the reference of the last round (the loss, rewards, reward accuracy and margins measure what that round changed).
    """

    config_class = FederatedDPOConfig
    trl_trainer_class = DPOTrainer

    def __init__(
        self,
        model: nn.Module,
        args: FederatedDPOConfig | None = None,
        data_collator=None,
        train_dataset: Dataset | None = None,
        eval_dataset: Dataset | Mapping[str, Dataset] | None = None,
        processing_class=None,
        compute_metrics=None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers=(None, None),
        optimizer_cls_and_kwargs=None,
        peft_config: LoraConfig | None = None,
        *,
        client_datasets: Sequence[Dataset] | Mapping[object, Dataset] | None = None,
        strategy: Strategy | None = None,
        client_peft_configs: Mapping[object, LoraConfig] | Sequence[int] | None = None,
        client_callbacks: Sequence[TrainerCallback] | None = None,
    ) -> None:
        super().__init__(
            model,
            args,
            trl_kwargs={"data_collator": data_collator, "compute_metrics": compute_metrics},
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            client_datasets=client_datasets,
            strategy=strategy,
            peft_config=peft_config,
            client_peft_configs=client_peft_configs,
            client_callbacks=client_callbacks,
        )
        self.client_runner.trainer.add_callback(ReferenceFromClientStart(self.client_runner.trainer))

    def client_trainer_kwargs(self) -> dict:
        """Also the reference: None for a LoRA strategy's PeftModel (TRL adds a "ref" adapter, a copy of the
        client's), else a frozen copy of the model, both refreshed when each client starts."""
        reference = None if isinstance(self.model, PeftModel) else copy.deepcopy(self.model).requires_grad_(False)
        return {**super().client_trainer_kwargs(), "ref_model": reference}
