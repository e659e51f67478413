"""`Trainer.hyperparameter_search` over federated runs: every trial starts from a fresh global model (`model_init`),
a fresh strategy and a fresh client trainer, with the trial's fields applied (federated ones included), and reports
the eval metrics of every evaluated round, so that a pruner can stop it after any round.

Trainer internals used here (and nowhere else in fed_trainer): `_hp_search_setup` (applies a trial's arguments),
`_report_to_hp_search` (reports the objective, may raise optuna's `TrialPruned`), `_move_model_to_device`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fed_trainer.client import ClientRunner
from fed_trainer.schedule import eval_scores
from fed_trainer.strategies import get_strategy

if TYPE_CHECKING:
    from fed_trainer.trainer import FederatedTrainer

# the fields the clients' datasets were made from, when the trainer was built: fixed for a search
DATA_FIELDS = ("num_clients", "partition", "partition_alpha", "partition_label_column", "seed")


def initial_model(trainer: FederatedTrainer, model, model_init):
    """The initial global model: `model`, or what `model_init` builds (Trainer's `call_model_init`, trial None);
    `model_init` is kept to build a fresh one for every trial."""
    if model_init is None:
        return model
    if model is not None:
        raise ValueError("Pass model or model_init, not both: model_init builds the initial global model.")
    trainer.model_init = model_init
    return trainer.call_model_init()


def start_trial(trainer: FederatedTrainer, trial) -> None:
    """Apply `trial`'s arguments, then give `trainer` a fresh global model from `model_init`, a fresh strategy and a
    fresh client trainer."""
    if trainer.is_deepspeed_enabled:
        raise ValueError("hyperparameter_search is not supported under DeepSpeed: run one trial per launch.")
    args = trainer.args
    fixed = {name: getattr(args, name) for name in DATA_FIELDS}
    trainer._hp_search_setup(trial)
    changed = [name for name, value in fixed.items() if getattr(args, name) != value]
    if changed:
        raise ValueError(
            f"A hyperparameter trial may not change {changed}: the clients' datasets are made once, when the trainer "
            "is built. Search training fields (learning_rate, num_rounds, local_steps, server_learning_rate, ...) "
            "instead."
        )
    trainer.strategy = get_strategy(args.strategy, **args.strategy_kwargs)
    trainer.model = trainer.model_wrapped = trainer.federated_model(trainer.call_model_init(trial), args)
    trainer._move_model_to_device(trainer.model, args.device)
    trainer.client_runner = ClientRunner(trainer)


def report_round(trainer: FederatedTrainer, trial, logs: dict) -> None:
    """Report an evaluated round's eval metrics to the search's `trial` (nothing outside a search)."""
    trainer._report_to_hp_search(trial, trainer.state.global_step, eval_scores(logs))
