"""`FederatedTrainer`: a `Trainer` that runs federated rounds of client training and server aggregation."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel
from torch import nn
from transformers import ProgressCallback, Trainer, TrainerState
from transformers.trainer_utils import TrainOutput, speed_metrics
from transformers.utils import logging

from fed_trainer.callbacks import RoundProgressCallback
from fed_trainer.checkpoint import FORMAT as CHECKPOINT_FORMAT
from fed_trainer.checkpoint import PREFIX as CHECKPOINT_PREFIX
from fed_trainer.checkpoint import (
    STATE_FILE,
    cpu_state,
    resolve_checkpoint,
    restore_rng_states,
    rng_states,
    write_checkpoint,
)
from fed_trainer.client import ClientRunner, local_steps_for
from fed_trainer.config import FederatedConfig
from fed_trainer.distributed import drain_gloo_workers_at_exit
from fed_trainer.partition import partition_dataset
from fed_trainer.privacy import dp_epsilon
from fed_trainer.round import ClientExecutor, InProcessClients, Round
from fed_trainer.strategies import Strategy, get_strategy
from fed_trainer.zero import holds_shards, reload_partitions, whole_copy

logger = logging.get_logger(__name__)


def _model_class_name(model: nn.Module) -> str:
    """The class of the model under any PEFT wrapper."""
    return type(model.get_base_model() if isinstance(model, PeftModel) else model).__name__


def client_datasets_from(args: FederatedConfig, client_datasets, train_dataset) -> dict[object, Dataset]:
    """Client id -> dataset, from `client_datasets` (list or dict) or by partitioning `train_dataset`."""
    if client_datasets is None:
        if train_dataset is None:
            raise ValueError("FederatedTrainer needs client_datasets, or a train_dataset to partition.")
        client_datasets = partition_dataset(
            train_dataset,
            args.num_clients,
            method=args.partition,
            alpha=args.partition_alpha,
            label_column=args.partition_label_column,
            seed=args.seed,
        )
    if isinstance(client_datasets, Mapping):
        clients = dict(client_datasets)
    elif isinstance(client_datasets, Sequence):
        clients = dict(enumerate(client_datasets))
    else:
        raise TypeError(f"client_datasets must be a list or a dict of datasets, got {type(client_datasets)}.")
    if not clients:
        raise ValueError("client_datasets is empty: give at least one client.")
    empty = [cid for cid, ds in clients.items() if len(ds) == 0]
    if empty:
        raise ValueError(f"Clients {empty} have no examples: drop them from client_datasets.")
    if len(clients) != args.num_clients:
        logger.info(f"Training {len(clients)} clients from client_datasets (args.num_clients={args.num_clients}).")
    return clients


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
    ) -> None:
        if args is None:
            args = FederatedConfig(output_dir="fed_trainer_output")
        if not isinstance(args, FederatedConfig):
            raise TypeError(
                f"FederatedTrainer needs a FederatedConfig as args, got {type(args).__name__}: build it with "
                "FederatedConfig(**training_args.to_dict(), num_clients=..., num_rounds=...)."
            )
        if model_init is not None:
            raise ValueError("FederatedTrainer does not support model_init: pass the initial global model as model.")
        if any(o is not None for o in optimizers):
            raise ValueError(
                "FederatedTrainer builds a fresh optimizer for every client and round, so it cannot take "
                "optimizer instances: pass optimizer_cls_and_kwargs=(OptimizerClass, kwargs) instead."
            )
        self.strategy = strategy if strategy is not None else get_strategy(args.strategy)
        self.client_datasets = client_datasets_from(args, client_datasets, train_dataset)
        args.num_clients = len(self.client_datasets)
        if args.clients_per_round is not None and args.clients_per_round > len(self.client_datasets):
            raise ValueError(
                f"clients_per_round={args.clients_per_round} exceeds the {len(self.client_datasets)} clients given; "
                "lower clients_per_round."
            )
        if isinstance(model, PeftModel) and not self.strategy.uses_lora:
            raise ValueError(
                f"model is a PeftModel but strategy {self.strategy.name!r} averages full weights: pass the base model "
                "with peft_config=LoraConfig(...) and a LoRA strategy such as 'fedit', or merge the adapter first."
            )
        peft_configs = self._peft_configs(peft_config, client_peft_configs)
        model = self.strategy.setup(model, args, peft_configs)
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
        if args.world_size > 1:
            drain_gloo_workers_at_exit()
        if self.pop_callback(ProgressCallback) is not None:
            self.add_callback(RoundProgressCallback)
        self._round_logs: dict | None = None
        self.client_runner = ClientRunner(self)
        # where the clients train: in this process; fed_trainer.flower sets its SuperNodes' executor instead
        self.client_executor: ClientExecutor = InProcessClients()
        if self.client_runner.engine is not None:  # DeepSpeed: the clients' one engine also serves evaluation, saving
            self.deepspeed = self.model_wrapped = self.client_runner.engine
            self.accelerator.deepspeed_config = self.client_runner.trainer.accelerator.deepspeed_config
            if holds_shards(self.model):
                if not self.deepspeed.zero_gather_16bit_weights_on_model_save():
                    raise ValueError(
                        "Under ZeRO-3 FederatedTrainer saves round checkpoints and the merged model from weights "
                        "gathered on the main process: set zero_optimization.stage3_gather_16bit_weights_on_model_save"
                        " to true in the DeepSpeed config (recipes/deepspeed/zero3.json does)."
                    )
                self.strategy.on_model_sharded(self.model)

    def _peft_configs(self, peft_config, client_peft_configs) -> dict | None:
        """One `LoraConfig` per client id, or None without LoRA; refuses LoRA configs for a full-weight strategy."""
        if peft_config is None and client_peft_configs is None:
            return None
        if not self.strategy.uses_lora:
            raise ValueError(
                f"strategy {self.strategy.name!r} averages full weights and takes no peft_config: choose a LoRA "
                "strategy ('fedit', 'ffa_lora', 'flexlora', 'fedex_lora', 'flora') or drop the peft_config."
            )
        ids = list(self.client_datasets)
        if client_peft_configs is None:
            return dict.fromkeys(ids, peft_config)
        if isinstance(client_peft_configs, Mapping):
            missing = [cid for cid in ids if cid not in client_peft_configs]
            if missing:
                raise ValueError(f"client_peft_configs has no LoraConfig for clients {missing}.")
            return {cid: client_peft_configs[cid] for cid in ids}
        if peft_config is None:
            raise ValueError("client_peft_configs given as ranks needs peft_config, the LoraConfig they apply to.")
        if len(client_peft_configs) != len(ids):
            raise ValueError(f"client_peft_configs lists {len(client_peft_configs)} ranks for {len(ids)} clients.")
        return {cid: dataclasses.replace(peft_config, r=int(r)) for cid, r in zip(ids, client_peft_configs)}

    def train(
        self, resume_from_checkpoint: bool | str | None = None, trial=None, ignore_keys_for_eval=None, **kwargs
    ) -> TrainOutput:
        """Run `args.num_rounds` federated rounds; returns a `TrainOutput` (schedule steps, mean client loss).

        `resume_from_checkpoint`: True (the newest `round-N` checkpoint in `output_dir`) or a checkpoint folder;
        the run continues after that round and ends as an uninterrupted run with the same seed would.
        """
        args = self.args
        self.is_in_train = True
        steps_per_round = max(local_steps_for(args, len(ds)) for ds in self.client_datasets.values())
        self.state = TrainerState(
            max_steps=args.num_rounds * steps_per_round,
            is_local_process_zero=self.is_local_process_zero(),
            is_world_process_zero=self.is_world_process_zero(),
        )
        self.state.epoch = None
        self._progress = {"round": 0, "total_bytes_up": 0, "total_bytes_down": 0, "round_losses": []}
        if resume_from_checkpoint:
            self._resume(resolve_checkpoint(resume_from_checkpoint, args.output_dir))
            self.state.global_step = self._progress["round"] * steps_per_round
        self.control = self.callback_handler.on_train_begin(args, self.state, self.control)
        start_time = time.time()
        progress = self._progress
        for round_number in range(progress["round"] + 1, args.num_rounds + 1):
            logs = Round(self, round_number, steps_per_round).run(self.client_executor)
            progress["total_bytes_up"] += logs["bytes_up"]
            progress["total_bytes_down"] += logs["bytes_down"]
            progress["round_losses"].append(logs["train_loss"])
            progress["round"] = round_number
            logs.update(total_bytes_up=progress["total_bytes_up"], total_bytes_down=progress["total_bytes_down"])
            if self._evaluation_due(round_number) and self.eval_dataset is not None:
                with self._logging_into(logs):
                    self.evaluate(ignore_keys=ignore_keys_for_eval)
            self.log(logs)
            if args.save_every_rounds and round_number % args.save_every_rounds == 0:
                self.save_round_checkpoint()
            if self.control.should_training_stop:
                break
        self.control = self.callback_handler.on_train_end(args, self.state, self.control)
        self.is_in_train = False
        metrics = speed_metrics("train", start_time, num_steps=self.state.global_step)
        metrics.update(
            train_loss=float(np.mean(progress["round_losses"])) if progress["round_losses"] else float("nan"),
            total_bytes_up=progress["total_bytes_up"],
            total_bytes_down=progress["total_bytes_down"],
        )
        self.log(dict(metrics))
        return TrainOutput(self.state.global_step, metrics["train_loss"], metrics)

    def privacy_spent(self, rounds: int) -> float:
        """Client-level epsilon at `args.dp_delta` after `rounds` DP-FedAvg rounds (opacus's RDP accountant)."""
        args = self.args
        sample_rate = args.clients_sampled_per_round / args.num_clients
        return dp_epsilon(args.dp_noise_multiplier, sample_rate, rounds, args.dp_delta)

    def save_round_checkpoint(self) -> str:
        """Write `output_dir/round-N` for the last finished round N: the merged global model (a plain
        transformers model) and `federated_state.pt` to resume from. Atomic: written aside, then renamed."""
        directory = Path(self.args.output_dir) / f"{CHECKPOINT_PREFIX}{self._progress['round']}"
        model_state = self._global_state_dict()  # under ZeRO-3 every rank takes part in the gathers
        strategy_state = self.strategy.state_dict()
        if self.args.should_save:

            def write(staging: Path) -> None:
                # without ZeRO-3 the live model saves itself (save_pretrained edits a state dict it is given)
                self._save(str(staging), state_dict=model_state if self.strategy.sharded else None)
                torch.save(self._federated_state(model_state, strategy_state), staging / STATE_FILE)

            write_checkpoint(directory, write, keep=self.args.save_total_limit)
        self.accelerator.wait_for_everyone()  # no rank reads or reports the checkpoint before it is complete
        self.control = self.callback_handler.on_save(self.args, self.state, self.control)
        return str(directory)

    def _global_state_dict(self) -> dict:
        """The state dict of the live global model; under ZeRO-3 gathered from the ranks' partitions (a collective:
        every rank calls it, the main process gets the weights)."""
        if self.strategy.sharded:
            return self.accelerator.get_state_dict(self.deepspeed)
        return self.accelerator.unwrap_model(self.model).state_dict()

    def _federated_state(self, model_state: dict, strategy_state: dict) -> dict:
        model = self.accelerator.unwrap_model(self.model)
        return {
            "format": CHECKPOINT_FORMAT,
            "round": self._progress["round"],
            "strategy": self.strategy.name,
            "model_class": _model_class_name(model),
            "model": cpu_state(model_state),
            "strategy_state": strategy_state,
            "progress": copy.deepcopy(self._progress),
            "log_history": copy.deepcopy(self.state.log_history),
            "rng": rng_states(),
        }

    def _resume(self, path: Path) -> None:
        """Load a round checkpoint into the live model, the strategy and the run's progress; refuse one written
        by another strategy or for another model, before anything is changed."""
        checkpoint = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)  # our own file
        model = self.accelerator.unwrap_model(self.model)
        if checkpoint["strategy"] != self.strategy.name:
            raise ValueError(
                f"{path} was written by a run with strategy {checkpoint['strategy']!r}, but this run uses "
                f"{self.strategy.name!r}: resume with the same strategy, or start a new run in another output_dir."
            )
        saved, live = checkpoint["model"], model.state_dict()
        differing = sorted(saved.keys() ^ live.keys())
        if checkpoint["model_class"] != _model_class_name(model) or differing:
            raise ValueError(
                f"{path} holds a {checkpoint['model_class']} whose weights do not match this "
                f"{_model_class_name(model)} (e.g. {differing[:3]}): resume with the model (and peft_config) of "
                "the checkpointed run."
            )
        try:
            self.strategy.load_state_dict(model, checkpoint["strategy_state"], saved)
        except RuntimeError as err:  # shapes differ
            raise ValueError(f"{path} holds a model of other shapes than this one: {err}") from err
        reload_partitions(self.client_runner.engine)
        restore_rng_states(checkpoint["rng"])
        self.state.log_history = checkpoint["log_history"]
        self._progress = checkpoint["progress"]
        logger.info(f"Resuming from {path}: {self._progress['round']} of {self.args.num_rounds} rounds done.")

    def _evaluation_due(self, round_number: int) -> bool:
        every = self.args.eval_every_rounds
        return round_number == self.args.num_rounds or (every > 0 and round_number % every == 0)

    @contextlib.contextmanager
    def _logging_into(self, logs: dict):
        """Route what `log()` receives into `logs`, so a round is one entry of `log_history`."""
        self._round_logs = logs
        try:
            yield
        finally:
            self._round_logs = None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._round_logs is not None:
            self._round_logs.update(logs)
            return
        super().log(logs, start_time)

    def merged_model(self) -> nn.Module | None:
        """The global model as a plain transformers model (adapters and residuals folded in).

        Under DeepSpeed ZeRO-3 every process must call it (the weights are gathered); the main process gets a whole
        copy on the CPU, the others None."""
        if not self.strategy.sharded:
            return self._merged(None)
        state_dict = self._global_state_dict()
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
        self._save(output_dir if output_dir is not None else self.args.output_dir, self._global_state_dict())
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

    def create_model_card(self, **kwargs) -> None:
        """Trainer's model card plus a section stating the federated set-up and final metrics."""
        super().create_model_card(**kwargs)
        if not self.is_world_process_zero():
            return
        args = self.args
        rounds = [entry for entry in self.state.log_history if "round" in entry]
        final = {k: v for k, v in (rounds[-1] if rounds else {}).items() if k.startswith("eval_") or k == "train_loss"}
        num_clients = len(self.client_datasets)
        lines = [
            "",
            "## Federated training",
            "",
            "Trained with [fed_trainer](https://pypi.org/project/fed-trainer/)'s `FederatedTrainer`.",
            "",
            f"- strategy: `{self.strategy.name}`",
            f"- local optimizer: `{getattr(args.optim, 'value', args.optim)}`",
            f"- rounds: {len(rounds)} of {args.num_rounds}",
            f"- clients: {num_clients} ({args.clients_sampled_per_round} per round)",
            f"- local steps per round: {args.local_steps if args.local_steps is not None else args.local_epochs}"
            + (" epochs" if args.local_steps is None else ""),
            f"- partition: `{args.partition}`"
            + (f" (alpha={args.partition_alpha})" if args.partition == "dirichlet" else ""),
            f"- client weighting: `{args.client_weighting}`",
            f"- aggregation rule: `{args.aggregation_rule}`"
            + (f", updates clipped to L2 norm {args.update_clip_norm}" if args.update_clip_norm is not None else ""),
            *(
                [
                    f"- differential privacy: client-level DP-FedAvg, noise multiplier {args.dp_noise_multiplier}; "
                    f"(epsilon, delta) = ({self.privacy_spent(len(rounds)):.3g}, {args.dp_delta:g}) after "
                    f"{len(rounds)} rounds (opacus RDP accountant)"
                ]
                if args.dp_noise_multiplier is not None and rounds
                else []
            ),
            "",
            "Final metrics of the global model:",
            "",
            *[f"- {k}: {v:.4f}" if isinstance(v, float) else f"- {k}: {v}" for k, v in final.items()],
            "",
        ]
        with open(os.path.join(args.output_dir, "README.md"), "a", encoding="utf-8") as f:
            f.write("\n".join(lines))
