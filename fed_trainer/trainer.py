"""`FederatedTrainer`: a `Trainer` that runs federated rounds of client training and server aggregation."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

from datasets import Dataset
from peft import LoraConfig, PeftModel
from torch import nn
from transformers import ProgressCallback, Trainer, TrainerCallback, TrainerState
from transformers.trainer_utils import TrainOutput, speed_metrics
from transformers.utils import logging

from fed_trainer.callbacks import RoundProgressCallback
from fed_trainer.checkpoint import RunProgress, load_best_round, resolve_checkpoint, resume, save_round
from fed_trainer.client import TRAINER_LOGGER, ClientRunner, each_message_once, local_steps_for
from fed_trainer.client_eval import eval_strategy_for_trainer, evaluate_round, held_out_sets
from fed_trainer.clients import client_datasets_from, client_lora_configs
from fed_trainer.config import FederatedConfig
from fed_trainer.distributed import drain_gloo_workers_at_exit
from fed_trainer.hp_search import initial_model, report_round, start_trial
from fed_trainer.hub import push_round, round_checkpoints_left_out
from fed_trainer.model_card import (
    append_federated_section,
    card_tags,
    rounds_as_card_rows,
    run_length_as_card_hyperparameters,
)
from fed_trainer.quantized import quantization_of
from fed_trainer.round import ClientExecutor, GradientRound, InProcessClients, Round
from fed_trainer.schedule import evaluation_due, is_new_best, keeps_best, save_due
from fed_trainer.strategies import Strategy, get_strategy
from fed_trainer.strategies.capabilities import check_capabilities
from fed_trainer.zero import share_engine, whole_copy

logger = logging.get_logger(__name__)


class FederatedTrainer(Trainer):
    """A drop-in `Trainer` for federated fine-tuning.

    Takes `Trainer`'s arguments (with a [`FederatedConfig`] as `args`) plus:

    Args:
        client_datasets: the clients' private data, a list (clients `0..K-1`) or a dict (client id -> dataset).
            If not given, `train_dataset` is split per `args.partition`.
        strategy: a [`Strategy`] instance; overrides `args.strategy`.
        peft_config: a `LoraConfig` for every client, with a LoRA strategy (`fedit`, `ffa_lora`, `flexlora`,
            `fedex_lora`, `flora`).
        client_peft_configs: per-client LoRA configs, a dict client id -> `LoraConfig`, or a list of ranks (one
            per client, in client order) applied to `peft_config`. Different ranks need `flexlora` or `flora`.
        client_trainer_cls: the `Trainer` subclass every client trains with (default `Trainer`): its own
            `compute_loss`, `training_step` or data preparation runs in local training unchanged. It is built once
            with this trainer's model, collator, processing class, `compute_loss_func` and
            `optimizer_cls_and_kwargs`, and run for each client's local steps.
        client_callbacks: `TrainerCallback`s for local training: added to the client trainer, they see each
            client's local steps (`on_step_end`, `on_log`, ...) as in a plain `Trainer` run. `callbacks` hear the
            rounds and the federated events.
        client_eval_datasets: each client's own held-out data (a list in client order or a dict by client id, one
            per client), on which every evaluated round also evaluates the global model (`fed_trainer.client_eval`;
            or hold out a share of each client's data with `args.client_eval_split`).

    `train()` runs `args.num_rounds` rounds. In each, `args.clients_per_round` clients (all by default) are
    sampled; each starts from the global model, trains `args.local_steps` steps with `args.optim` and a fresh
    optimizer, and the strategy aggregates their updates, streaming, into the new global model. One model lives in
    memory whatever the number of clients. `state.log_history` gets one entry per round (key `"round"`) with the
    mean client train loss, the bytes exchanged, and the eval metrics when due.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        args: FederatedConfig | None = None,
        data_collator=None,
        train_dataset: Dataset | None = None,
        eval_dataset=None,
        processing_class=None,
        model_init=None,
        compute_loss_func=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        optimizer_cls_and_kwargs=None,
        preprocess_logits_for_metrics=None,
        *,
        client_datasets: Sequence[Dataset] | Mapping[object, Dataset] | None = None,
        strategy: Strategy | None = None,
        peft_config: LoraConfig | None = None,
        client_peft_configs: Mapping[object, LoraConfig] | Sequence[int] | None = None,
        client_trainer_cls: type[Trainer] = Trainer,
        client_callbacks: Sequence[TrainerCallback] | None = None,
        client_eval_datasets: Sequence[Dataset] | Mapping[object, Dataset] | None = None,
    ) -> None:
        if args is None:
            args = FederatedConfig(output_dir="fed_trainer_output")
        if not isinstance(args, FederatedConfig):
            raise TypeError(
                f"FederatedTrainer needs a FederatedConfig as args, got {type(args).__name__}: build it with "
                "FederatedConfig(**training_args.to_dict(), num_clients=..., num_rounds=...)."
            )
        model = initial_model(self, model, model_init)
        if any(o is not None for o in optimizers):
            raise ValueError(
                "FederatedTrainer builds a fresh optimizer for every client and round, so it cannot take "
                "optimizer instances: pass optimizer_cls_and_kwargs=(OptimizerClass, kwargs) instead."
            )
        self.strategy = strategy if strategy is not None else get_strategy(args.strategy, **args.strategy_kwargs)
        self.client_datasets = client_datasets_from(args, client_datasets, train_dataset)
        self.client_datasets, self.client_eval_datasets = held_out_sets(
            args, self.client_datasets, client_eval_datasets
        )
        evaluation = args.eval_strategy
        args.eval_strategy = eval_strategy_for_trainer(args, eval_dataset, self.client_eval_datasets)
        self._peft_configs = (peft_config, client_peft_configs)
        model = self.federated_model(model, args)
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_loss_func=compute_loss_func,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        )
        args.eval_strategy = evaluation
        if args.world_size > 1:  # gloo's worker threads must be done before the interpreter finalizes
            drain_gloo_workers_at_exit()
        if self.pop_callback(ProgressCallback) is not None:
            self.add_callback(RoundProgressCallback)
        self.round_logs: dict | None = None  # the entry of the round being evaluated (`evaluate_round`)
        self.round_progress = RunProgress()  # the run's (`train` starts it afresh, or from a checkpoint)
        self.client_trainer_cls, self.client_callbacks = client_trainer_cls, list(client_callbacks or [])
        self.model_init = model_init  # Trainer.__init__, which was not given it, set None
        self.client_runner = ClientRunner(self)
        # where the clients train: in this process; fed_trainer.flower sets its SuperNodes' executor instead
        self.client_executor: ClientExecutor = InProcessClients()
        share_engine(self)

    def federated_model(self, model: nn.Module, args: FederatedConfig) -> nn.Module:
        """`model` as `self.strategy` trains it (a PEFT model for a LoRA strategy), after checking that the
        strategy supports the run's set-up."""
        peft_configs = client_lora_configs(list(self.client_datasets), *self._peft_configs)
        check_capabilities(self.strategy, args, peft_configs, quantization_of(model), isinstance(model, PeftModel))
        model = self.strategy.setup(model, args, peft_configs)
        self.strategy.keep_downlink_reference()
        return model

    def client_trainer_kwargs(self) -> dict:
        """Arguments of the client trainer beyond its model, args, processing class and optimizer class (see
        `ClientRunner`): here the data collator and `compute_loss_func`; `FederatedSFTTrainer` and
        `FederatedDPOTrainer` pass what TRL's trainers take instead."""
        return {"data_collator": self.data_collator, "compute_loss_func": self.compute_loss_func}

    def train(
        self, resume_from_checkpoint: bool | str | None = None, trial=None, ignore_keys_for_eval=None, **kwargs
    ) -> TrainOutput:
        """Run `args.num_rounds` federated rounds; returns a `TrainOutput` (schedule steps, mean client loss).

        `resume_from_checkpoint`: True (the newest `round-N` checkpoint in `output_dir`) or a checkpoint folder;
        the run continues after that round and ends as an uninterrupted run with the same seed would.
        """
        if trial is not None and self.model_init is not None:
            start_trial(self, trial)
        args = self.args
        self.is_in_train = True
        steps_per_round = max(local_steps_for(args, len(ds)) for ds in self.client_datasets.values())
        self.state = TrainerState(
            max_steps=args.num_rounds * steps_per_round,
            num_train_epochs=args.num_rounds,
            is_local_process_zero=self.is_local_process_zero(),
            is_world_process_zero=self.is_world_process_zero(),
        )
        self.round_progress = RunProgress()
        if resume_from_checkpoint:
            resume(self, resolve_checkpoint(resume_from_checkpoint, args.output_dir))
            self.state.global_step = self.round_progress.round * steps_per_round
        self.state.epoch = float(self.round_progress.round)  # rounds done: the epochs of a federated run
        self.control = self.callback_handler.on_train_begin(args, self.state, self.control)
        start_time = time.time()
        with each_message_once(TRAINER_LOGGER):  # local training would repeat its log lines for every client
            if self.round_progress.round == 0 and self.strategy.gradient_examples:
                logs = GradientRound(self, steps_per_round).run(self.client_executor)
                self._finish_round(logs, steps_per_round, ignore_keys_for_eval, trial)
            for round_number in range(self.round_progress.round + 1, args.num_rounds + 1):
                logs = Round(self, round_number, steps_per_round).run(self.client_executor)
                self._finish_round(logs, steps_per_round, ignore_keys_for_eval, trial)
                if self.control.should_training_stop:
                    break
        if args.load_best_model_at_end and self.state.best_model_checkpoint is not None:
            load_best_round(self)
        self.control = self.callback_handler.on_train_end(args, self.state, self.control)
        self.is_in_train = False
        metrics = {
            **speed_metrics("train", start_time, num_steps=self.state.global_step),
            **self.round_progress.summary(),
        }
        self.log(dict(metrics))
        return TrainOutput(self.state.global_step, metrics["train_loss"], metrics)

    def _finish_round(self, logs: dict, steps_per_round: int, ignore_keys_for_eval, trial) -> None:
        """After a round: count its bytes and loss, evaluate when due (tracking the best metric), log the round as
        one entry, and write a checkpoint when the schedule or a new best metric asks for one; in a hyperparameter
        search, report the eval metrics to the trial (which may prune it). Round 0 (`GradientRound`: clients' gradients
        that set up the state round 1 starts from, no training) is counted and logged only."""
        args, round_number = self.args, logs["round"]
        self.round_progress.add(logs)
        self.state.epoch = float(round_number)
        new_best = False
        trained = round_number > 0
        if trained and evaluation_due(args, round_number, steps_per_round):
            evaluate_round(self, logs, ignore_keys_for_eval)
            new_best = is_new_best(args, self.state, logs)
            report_round(self, trial, logs)  # may prune the trial
        self.log(logs)
        if trained and (save_due(args, round_number, steps_per_round) or (new_best and keeps_best(args))):
            self.save_round_checkpoint()

    def save_round_checkpoint(self) -> str:
        """Write `output_dir/round-N` for the last finished round N (`fed_trainer.checkpoint.save_round`), push it as
        `hub_strategy` says and fire `on_save`; its path."""
        directory = save_round(self)
        push_round(self, directory, self.round_progress.round)
        self.control = self.callback_handler.on_save(self.args, self.state, self.control)
        return str(directory)

    def global_state_dict(self) -> dict:
        """The state dict of the live global model; under ZeRO-3 gathered from the ranks' partitions (a collective:
        every rank calls it, the main process gets the weights)."""
        if self.strategy.sharded:
            return self.accelerator.get_state_dict(self.deepspeed)
        return self.accelerator.unwrap_model(self.model).state_dict()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.round_logs is None:
            return super().log(logs, start_time)
        self.round_logs.update(logs)  # within a round's evaluation: its metrics join the round's entry

    def merged_model(self) -> nn.Module | None:
        """The global model as a plain transformers model (adapters and residuals folded in).

        Under DeepSpeed ZeRO-3 every process must call it (the weights are gathered); the main process gets a whole
        copy on the CPU, the others None."""
        if not self.strategy.sharded:
            return self._merged(None)
        state_dict = self.global_state_dict()
        return self._merged(state_dict) if self.is_world_process_zero() else None

    def _merged(self, state_dict: dict | None) -> nn.Module:
        """The strategy's merged model of the live one; under ZeRO-3, whose live model holds partitions, of a whole
        copy built from the gathered `state_dict`."""
        live = self.accelerator.unwrap_model(self.model)
        return self.strategy.merged_model(whole_copy(live, state_dict) if self.strategy.sharded else live)

    def _wrap_model(self, model: nn.Module, training: bool = True, dataloader=None) -> nn.Module:
        if self.deepspeed is not None:  # evaluate with the clients' engine rather than build a second one
            return self.deepspeed
        return super()._wrap_model(model, training, dataloader)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not self.strategy.sharded:
            return super().save_model(output_dir, _internal_call)
        # Trainer's ZeRO-3 path gathers only a PeftModel's trainable weights; the merged model needs them all
        self._save(output_dir if output_dir is not None else self.args.output_dir, self.global_state_dict())
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        if not self.args.should_save:  # only the writer builds the merged model
            return super()._save(output_dir, state_dict)
        model = self.model
        self.model = self._merged(state_dict)
        if self.model is not self.accelerator.unwrap_model(model):
            state_dict = None  # a state dict passed in is the live model's; the merged model holds its own
        try:
            super()._save(output_dir, state_dict)
        finally:
            self.model = model

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True, **kwargs):
        """`Trainer.push_to_hub`: the merged global model (a plain transformers model), the processing class and the
        model card with its federated section; the round checkpoints in `output_dir` are not uploaded."""
        with round_checkpoints_left_out():
            return super().push_to_hub(commit_message, blocking, **kwargs)

    def create_model_card(self, tags: str | list[str] | None = None, **kwargs) -> None:
        """Trainer's model card, tagged as federated, plus a section stating the federated set-up, the strategy's
        paper and the final metrics (`fed_trainer.model_card`)."""
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        # Trainer's results table, a row per evaluated round; its hyperparameters, the run's length per client
        with rounds_as_card_rows(self.state), run_length_as_card_hyperparameters(self.args):
            super().create_model_card(tags=[*tags, *card_tags(self)], **kwargs)
        append_federated_section(self)
