"""`TrainingArguments`' length and interval fields read in rounds: how much a client trains per round when the
script gave `num_train_epochs` or `max_steps`, and after which rounds the global model is evaluated and saved.

A round is the unit: evaluation and checkpoints happen at round ends. `eval_strategy="epoch"` and
`save_strategy="epoch"` act after every round; `"steps"` after each round whose end reaches the next multiple of
`eval_steps` / `save_steps` optimizer steps of the run (round t ends at step t * steps_per_round); `"steps"` saving
also saves after the last round, as `Trainer` does. `eval_every_rounds` / `save_every_rounds`, when given, win
and set the strategy to match (`"epoch"`, or `"no"` for `save_every_rounds=0`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from transformers.trainer_utils import IntervalStrategy, SaveStrategy
from transformers.utils import logging

if TYPE_CHECKING:
    from fed_trainer.config import FederatedConfig

logger = logging.get_logger(__name__)

DEFAULT_EPOCHS = 3.0  # TrainingArguments.num_train_epochs' default
# what `evaluate()` reports beside the metrics: timings, not scores
EVAL_TIMINGS = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "eval_model_preparation_time")


def resolve_run_length(args: FederatedConfig) -> None:
    """Set `local_steps` or `local_epochs` when neither is given, from `max_steps` (a client's optimizer steps over
    the whole run) or `num_train_epochs` (its passes over its own data over the whole run), spread evenly over the
    rounds; warn once, by name, about the fields a run does not use."""
    rounds = args.num_rounds
    if args.local_steps is not None or args.local_epochs is not None:
        unused = [f"max_steps={args.max_steps}"] if args.max_steps > 0 else []
        if args.num_train_epochs != DEFAULT_EPOCHS:
            unused.append(f"num_train_epochs={args.num_train_epochs:g}")
        if unused:
            field_name = "local_steps" if args.local_steps is not None else "local_epochs"
            work = f"{field_name}={getattr(args, field_name)}"
            logger.warning(
                f"FederatedConfig ignores {' and '.join(unused)}: each of num_rounds={rounds} rounds trains every "
                f"sampled client for {work}. Drop {' and '.join(u.split('=')[0] for u in unused)}, or unset "
                "local_steps/local_epochs to spread them over the rounds."
            )
        return
    if args.max_steps > 0:
        args.local_steps = math.ceil(args.max_steps / rounds)
        source, work = f"max_steps={args.max_steps}", f"local_steps={args.local_steps} steps"
    else:
        if args.num_train_epochs <= 0:
            raise ValueError(f"num_train_epochs must be positive, got {args.num_train_epochs}.")
        args.local_epochs = args.num_train_epochs / rounds
        source, work = f"num_train_epochs={args.num_train_epochs:g}", f"local_epochs={args.local_epochs:g} of its data"
    logger.warning(
        f"FederatedConfig: neither local_steps nor local_epochs is set, so {source} is spread over num_rounds="
        f"{rounds} rounds (num_clients={args.num_clients}): each round trains every sampled client for {work}. "
        "Set local_steps or local_epochs for a round's work and num_rounds for the number of rounds."
    )


def resolve_intervals(args: FederatedConfig) -> None:
    """Make `eval_every_rounds` / `save_every_rounds` and `eval_strategy` / `save_strategy` agree (see the module
    docstring); refuse two schedules for evaluation."""
    if args.eval_every_rounds is not None:
        if args.eval_every_rounds < 0:
            raise ValueError("eval_every_rounds must be >= 0 (0: only after the last round).")
        if args.eval_strategy == IntervalStrategy.STEPS:
            raise ValueError(
                f"eval_every_rounds={args.eval_every_rounds} and eval_strategy='steps' (eval_steps={args.eval_steps}) "
                "both schedule the evaluation: set one (eval_every_rounds counts rounds, eval_steps optimizer steps)."
            )
        args.eval_strategy = IntervalStrategy.EPOCH
        args.do_eval = True
    elif args.eval_strategy == IntervalStrategy.EPOCH:
        args.eval_every_rounds = 1
    if args.save_every_rounds is not None:
        if args.save_every_rounds < 0:
            raise ValueError("save_every_rounds must be >= 0 (0: never).")
        args.save_strategy = SaveStrategy.EPOCH if args.save_every_rounds else SaveStrategy.NO
    elif args.save_strategy == SaveStrategy.EPOCH:
        args.save_every_rounds = 1


def _steps(every: float, total_steps: int) -> int:
    """`eval_steps` / `save_steps` in optimizer steps (a value below 1 is a ratio of the run's steps)."""
    return max(1, math.ceil(every * total_steps)) if every < 1 else int(every)


def _reaches_multiple(round_number: int, steps_per_round: int, every: int) -> bool:
    """Whether round `round_number`'s end is the first round end at or after a multiple of `every` steps."""
    return round_number * steps_per_round // every > (round_number - 1) * steps_per_round // every


def evaluation_due(args: FederatedConfig, round_number: int, steps_per_round: int) -> bool:
    """Whether the global model is evaluated after round `round_number` (from 1)."""
    if args.eval_strategy == IntervalStrategy.NO:
        return False
    every = args.eval_every_rounds
    if every is not None:
        return round_number == args.num_rounds or (every > 0 and round_number % every == 0)
    every = _steps(args.eval_steps, args.num_rounds * steps_per_round)
    return _reaches_multiple(round_number, steps_per_round, every)


def save_due(args: FederatedConfig, round_number: int, steps_per_round: int) -> bool:
    """Whether a round checkpoint is written after round `round_number` by the save schedule (a round with a new
    best metric is also saved when `load_best_model_at_end` or `save_strategy="best"` asks for it)."""
    if args.save_every_rounds is not None:
        return args.save_every_rounds > 0 and round_number % args.save_every_rounds == 0
    if args.save_strategy != SaveStrategy.STEPS:
        return False
    every = _steps(args.save_steps, args.num_rounds * steps_per_round)
    return round_number == args.num_rounds or _reaches_multiple(round_number, steps_per_round, every)


def keeps_best(args: FederatedConfig) -> bool:
    """Whether every round that sets a new best `metric_for_best_model` is checkpointed."""
    return args.load_best_model_at_end or args.save_strategy == SaveStrategy.BEST


def eval_scores(logs: dict) -> dict:
    """The eval metrics of a round's log entry, less the timings: what a hyperparameter search's objective sees."""
    return {k: v for k, v in logs.items() if k.startswith("eval_") and k not in EVAL_TIMINGS}


def is_new_best(args: FederatedConfig, state, metrics: dict) -> bool:
    """Record `metrics` (an evaluated round's) in `state.best_metric` / `state.best_global_step` if it is the best
    `metric_for_best_model` so far; whether it is. Without `metric_for_best_model`, False."""
    name = args.metric_for_best_model
    if name is None:
        return False
    name = name if name.startswith("eval_") else f"eval_{name}"
    if name not in metrics:
        raise KeyError(
            f"metric_for_best_model={args.metric_for_best_model!r} is not among the evaluation metrics "
            f"{sorted(k for k in metrics if k.startswith('eval_'))}: set it to one of them."
        )
    value = float(metrics[name])
    best = state.best_metric
    if best is not None and not (value > best if args.greater_is_better else value < best):
        return False
    state.best_metric, state.best_global_step = value, state.global_step
    return True
