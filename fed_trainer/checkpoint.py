"""Round checkpoints: everything a federated run needs to continue after the last completed round.

`output_dir/round-N/` holds the merged global model (a plain transformers model, loadable on its own) and
`federated_state.pt`: the live model's full state (base weights, adapters, residuals folded into the base; not the
frozen layers of a quantized base), the
strategy's own state, the run's progress and log history, and the RNG states. A checkpoint is written into
`round-N.partial` and renamed into place, so a crash while writing leaves the previous checkpoints intact.

`save_round`, `resume` and `load_best_round` are `FederatedTrainer`'s steps; they write the merged model with the
trainer's `_save` (its override of `Trainer._save`, which takes a gathered state dict under ZeRO-3). The states of
`ExportableState` callbacks (EarlyStoppingCallback's patience counter) are saved as `Trainer` saves them, and restored
on resume with Trainer's `_load_callback_state` when `restore_callback_states_from_checkpoint` is set (as `Trainer`
does: off by default).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import random
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from peft import PeftModel
from torch import nn
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import ExportableState
from transformers.utils import logging

from fed_trainer.quantized import quantized_weight_keys
from fed_trainer.zero import reload_partitions

if TYPE_CHECKING:
    from transformers import TrainerState

    from fed_trainer.strategies import Strategy
    from fed_trainer.trainer import FederatedTrainer

logger = logging.get_logger(__name__)

PREFIX = "round-"
STATE_FILE = "federated_state.pt"
FORMAT = 1
BEST_FIELDS = ("best_metric", "best_global_step", "best_model_checkpoint")  # TrainerState's, kept across a resume


@dataclasses.dataclass
class RunProgress:
    """How far a run has come: the rounds done, the bytes exchanged so far, and every round's mean client loss; and
    what a client's own machine needs to know of its state (a Flower SuperNode's `KeptStates`): the id of the
    federation (the run, and the runs that resumed it), the last round each client's update reached the server in
    (aggregated, or rejected for NaN/Inf), and those rounds as of the newest checkpoint."""

    round: int = 0
    total_bytes_up: int = 0
    total_bytes_down: int = 0
    round_losses: list[float] = dataclasses.field(default_factory=list)
    federation: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)
    client_rounds: dict = dataclasses.field(default_factory=dict)
    saved_client_rounds: dict = dataclasses.field(default_factory=dict)

    def add(self, logs: dict) -> None:
        """Count the finished round whose entry is `logs`, and add the run's totals so far to the entry. (Round 0's
        loss, at the initial model, is not one of the training loss's rounds.)"""
        self.round = logs["round"]
        self.total_bytes_up += logs["bytes_up"]
        self.total_bytes_down += logs["bytes_down"]
        if self.round > 0:
            self.round_losses.append(logs["loss"])
        logs.update(total_bytes_up=self.total_bytes_up, total_bytes_down=self.total_bytes_down)

    def summary(self) -> dict:
        """The run's mean client train loss (over rounds) and its total bytes."""
        loss = float(np.mean(self.round_losses)) if self.round_losses else float("nan")
        return {"train_loss": loss, "total_bytes_up": self.total_bytes_up, "total_bytes_down": self.total_bytes_down}


def checkpoint_dirs(output_dir: str | os.PathLike) -> list[Path]:
    """Complete round checkpoints in `output_dir`, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if re.fullmatch(rf"{PREFIX}\d+", p.name) and (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def resolve_checkpoint(resume_from_checkpoint: bool | str, output_dir: str) -> Path:
    """The checkpoint folder meant by `resume_from_checkpoint` (True: the newest one in `output_dir`)."""
    if resume_from_checkpoint is True:
        found = checkpoint_dirs(output_dir)
        if not found:
            raise ValueError(
                f"resume_from_checkpoint=True but {output_dir!r} holds no round checkpoint ({PREFIX}N/{STATE_FILE}): "
                "set save_every_rounds in the config of the run to resume, or pass a checkpoint path."
            )
        return found[-1]
    path = Path(resume_from_checkpoint)
    if not (path / STATE_FILE).exists():
        raise ValueError(f"{path} is not a round checkpoint: it has no {STATE_FILE}.")
    return path


def write_checkpoint(
    directory: Path, write: Callable[[Path], None], keep: int | None, best: str | None = None
) -> None:
    """Call `write(staging_dir)`, then move the staging folder to `directory` in one rename; keep the newest
    `keep` checkpoints of the folder (all if None), and always the `best` one."""
    staging = directory.with_name(directory.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    write(staging)
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(staging, directory)
    if keep is not None:
        found = checkpoint_dirs(directory.parent)
        for old in found[: max(len(found) - keep, 0)]:
            if best is None or old.resolve() != Path(best).resolve():
                shutil.rmtree(old, ignore_errors=True)


def rng_states() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def restore_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def cpu_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached CPU copies, so the checkpoint does not alias the live model."""
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def model_class_name(model: nn.Module) -> str:
    """The class of the model under any PEFT wrapper."""
    return type(model.get_base_model() if isinstance(model, PeftModel) else model).__name__


def federated_state(
    model: nn.Module,
    strategy: Strategy,
    model_state: dict,
    strategy_state: dict,
    progress: RunProgress,
    state: TrainerState,
) -> dict:
    """The contents of `federated_state.pt` after the round `progress.round`."""
    frozen = quantized_weight_keys(model)
    return {
        "format": FORMAT,
        "round": progress.round,
        "strategy": strategy.name,
        "model_class": model_class_name(model),
        "model": cpu_state({k: v for k, v in model_state.items() if k not in frozen}),
        "strategy_state": strategy_state,
        "progress": dataclasses.asdict(progress),
        "log_history": copy.deepcopy(state.log_history),
        "best": {name: getattr(state, name) for name in BEST_FIELDS},
        "stateful_callbacks": copy.deepcopy(state.stateful_callbacks),
        "rng": rng_states(),
    }


def load_round_checkpoint(path: Path, model: nn.Module, strategy: Strategy) -> dict:
    """Load the round checkpoint in `path` into the live `model` and `strategy`, restore the RNG states, and return
    its contents (progress, log history); refuse one written by another strategy or for another model, before
    anything is changed."""
    checkpoint = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)  # our own file
    if checkpoint["strategy"] != strategy.name:
        raise ValueError(
            f"{path} was written by a run with strategy {checkpoint['strategy']!r}, but this run uses "
            f"{strategy.name!r}: resume with the same strategy, or start a new run in another output_dir."
        )
    saved, live = checkpoint["model"], model.state_dict().keys() - quantized_weight_keys(model)
    differing = sorted(saved.keys() ^ live)
    if checkpoint["model_class"] != model_class_name(model) or differing:
        raise ValueError(
            f"{path} holds a {checkpoint['model_class']} whose weights do not match this {model_class_name(model)} "
            f"(e.g. {differing[:3]}): resume with the model (and peft_config) of the checkpointed run."
        )
    try:
        strategy.load_state_dict(model, checkpoint["strategy_state"], saved)
    except RuntimeError as err:  # shapes differ
        raise ValueError(f"{path} holds a model of other shapes than this one: {err}") from err
    restore_rng_states(checkpoint["rng"])
    return checkpoint


def callback_states(trainer: FederatedTrainer) -> dict:
    """The states of the trainer's `ExportableState` callbacks and of its `TrainerControl`, by class name (a list for
    several of one class): `TrainerState.stateful_callbacks` as `Trainer` writes it into a checkpoint."""
    states: dict = {}
    for callback in [*trainer.callback_handler.callbacks, trainer.control]:
        if isinstance(callback, ExportableState):
            name, value = type(callback).__name__, callback.state()
            if name not in states:
                states[name] = value
            else:  # several of one class
                states[name] = [*(states[name] if isinstance(states[name], list) else [states[name]]), value]
    return states


def save_round(trainer: FederatedTrainer) -> Path:
    """Write `output_dir/round-N` for the trainer's last finished round N: the merged global model (a plain
    transformers model), `federated_state.pt` to resume from and `trainer_state.json`; its path. Every rank calls
    it (under ZeRO-3 the weights are gathered); the main process writes, the others wait until it is complete."""
    args, state, progress = trainer.args, trainer.state, trainer.round_progress
    directory = Path(args.output_dir) / f"{PREFIX}{progress.round}"
    if state.best_global_step == state.global_step:  # this round holds the best metric so far
        state.best_model_checkpoint = str(directory)
    model_state = trainer.global_state_dict()
    strategy, strategy_state = trainer.strategy, trainer.strategy.state_dict()
    progress.saved_client_rounds = dict(progress.client_rounds)  # what a resume from it will ask the clients for
    state.stateful_callbacks = callback_states(trainer)
    if args.should_save:

        def write(staging: Path) -> None:
            # without ZeRO-3 the live model saves itself (save_pretrained edits a state dict it is given)
            trainer._save(str(staging), state_dict=model_state if strategy.sharded else None)
            model = trainer.accelerator.unwrap_model(trainer.model)
            torch.save(
                federated_state(model, strategy, model_state, strategy_state, progress, state), staging / STATE_FILE
            )
            state.save_to_json(str(staging / TRAINER_STATE_NAME))

        write_checkpoint(directory, write, keep=args.save_total_limit, best=state.best_model_checkpoint)
    trainer.accelerator.wait_for_everyone()  # no rank reads or reports the checkpoint before it is complete
    return directory


def load_round(trainer: FederatedTrainer, path: Path) -> dict:
    """Load the round checkpoint in `path` into the trainer's live model and strategy (and restore the RNGs)."""
    checkpoint = load_round_checkpoint(path, trainer.accelerator.unwrap_model(trainer.model), trainer.strategy)
    reload_partitions(trainer.client_runner.engine)
    return checkpoint


def resume(trainer: FederatedTrainer, path: Path) -> None:
    """Continue from the round checkpoint in `path`: the live model, the strategy, the RNGs, the progress, the best
    metric so far and (with `restore_callback_states_from_checkpoint`) the callbacks' states."""
    checkpoint = load_round(trainer, path)
    trainer.state.log_history = checkpoint["log_history"]
    for name, value in checkpoint.get("best", {}).items():  # absent from older checkpoints
        setattr(trainer.state, name, value)
    if "stateful_callbacks" in checkpoint:  # (older checkpoints have none)
        trainer.state.stateful_callbacks = checkpoint["stateful_callbacks"]
        trainer._load_callback_state()  # with restore_callback_states_from_checkpoint, as Trainer does
    trainer.round_progress = RunProgress(**checkpoint["progress"])
    logger.info(f"Resuming from {path}: {trainer.round_progress.round} of {trainer.args.num_rounds} rounds done.")


def load_best_round(trainer: FederatedTrainer) -> None:
    """Make the best evaluated round's global model (`state.best_model_checkpoint`) the live one, with its strategy
    state: what `save_model`, `evaluate` and `push_to_hub` see after `load_best_model_at_end`."""
    path, state = trainer.state.best_model_checkpoint, trainer.state
    logger.info(f"Loading the global model of the best round from {path} ({trainer.args.metric_for_best_model} = "
                f"{state.best_metric}).")  # fmt: skip
    load_round(trainer, Path(path))
