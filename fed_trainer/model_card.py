"""The "Federated training" section of the model card `FederatedTrainer` writes, from a template: the set-up of
the run, the paper of its strategy (each strategy contributes its own, as TRL's trainers do) and the final metrics
of the global model."""

from __future__ import annotations

import contextlib
import os
from string import Template
from typing import TYPE_CHECKING

from fed_trainer.privacy import privacy_spent
from fed_trainer.quantized import merged_dtype, quantization_of
from fed_trainer.schedule import eval_scores

if TYPE_CHECKING:
    from transformers import TrainerState

    from fed_trainer.config import FederatedConfig
    from fed_trainer.trainer import FederatedTrainer

SECTION = Template("""
## Federated training

Trained with [fed_trainer](https://pypi.org/project/fed-trainer/)'s `FederatedTrainer`.

- strategy: `$strategy`$paper
$quantized- local optimizer: `$optimizer`
- rounds: $rounds of $num_rounds
- clients: $num_clients ($per_round per round)
- local steps per round: $local_steps
- partition: `$partition`$alpha
- client weighting: `$weighting`
- aggregation rule: `$rule`$clip
$privacy
$metrics
$round_table""")

ROUND_COLUMNS = {"round": "Round", "step": "Step", "loss": "Train loss", "learning_rate": "Learning rate",
                 "bytes_up": "Bytes up", "bytes_down": "Bytes down", "dp_epsilon": "DP epsilon"}  # fmt: skip


def card_tags(trainer: FederatedTrainer) -> list[str]:
    """The Hub tags of a federated model: the library's, federated learning's and the strategy's name."""
    return ["fed_trainer", "federated-learning", trainer.strategy.name]


def card_log_history(log_history: list[dict]) -> list[dict]:
    """`log_history` as Trainer's model card reads it (`transformers.modelcard.parse_log_history`): each round
    becomes a training entry (its `loss`) and, when it was evaluated, an entry of its `eval_*` metrics, both at the
    round's epoch (the rounds done) and step; other entries (the run's summary) pass unchanged."""
    view = []
    for entry in log_history:
        if "round" not in entry:
            view.append(entry)
            continue
        at = {"epoch": entry.get("epoch", float(entry["round"])), "step": entry.get("step")}
        view.append({"loss": entry["loss"], "learning_rate": entry["learning_rate"], **at})
        metrics = eval_scores(entry)
        if metrics:
            view.append({**metrics, **at})
    return view


@contextlib.contextmanager
def rounds_as_card_rows(state: TrainerState):
    """Within the block, `state.log_history` is `card_log_history`'s view of it (for Trainer's model card)."""
    history = state.log_history
    state.log_history = card_log_history(history)
    try:
        yield
    finally:
        state.log_history = history


@contextlib.contextmanager
def run_length_as_card_hyperparameters(args: FederatedConfig):
    """Within the block, `max_steps` / `num_train_epochs` say what a client sampled in every round trained over the
    run (`local_steps` or `local_epochs` times `num_rounds`, the inverse of `fed_trainer.schedule.resolve_run_length`),
    so that Trainer's model card lists that (`training_steps` / `num_epochs`) rather than fields the run ignored."""
    saved = args.max_steps, args.num_train_epochs
    if args.local_steps is not None:
        args.max_steps = args.local_steps * args.num_rounds
    else:
        args.max_steps, args.num_train_epochs = -1, args.local_epochs * args.num_rounds
    try:
        yield
    finally:
        args.max_steps, args.num_train_epochs = saved


def append_federated_section(trainer: FederatedTrainer) -> None:
    """Add the federated section to the model card `Trainer.create_model_card` wrote (main process only)."""
    if trainer.is_world_process_zero():
        with open(os.path.join(trainer.args.output_dir, "README.md"), "a", encoding="utf-8") as f:
            f.write(federated_section(trainer))


def _cell(value) -> str:
    if value is None:
        return ""
    if not isinstance(value, float):
        return str(value)
    return f"{value:.4g}" if abs(value) < 1e-3 else f"{value:.4f}"


def rounds_table(rounds: list[dict]) -> str:
    """A markdown table of the rounds' log entries: round, step, train loss, learning rate, bytes, privacy spent
    and the eval metrics of the rounds that were evaluated."""
    if not rounds:
        return ""
    seen = {k for entry in rounds for k in entry}
    columns = [k for k in ROUND_COLUMNS if k in seen]
    columns += sorted({k for entry in rounds for k in eval_scores(entry)})
    lines = ["| " + " | ".join(ROUND_COLUMNS.get(k, k) for k in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(entry.get(k)) for k in columns) + " |" for entry in rounds]
    return "\nRounds:\n\n" + "\n".join(lines) + "\n"


def reported_metrics(trainer: FederatedTrainer, rounds: list[dict]) -> str:
    """The eval metrics of the saved model: the best round's with `load_best_model_at_end`, else the last
    evaluated round's."""
    evaluated = [e for e in rounds if eval_scores(e)]
    best = trainer.state.best_global_step if trainer.args.load_best_model_at_end else None
    chosen = next((e for e in evaluated if e.get("step") == best), evaluated[-1] if evaluated else None)
    if chosen is None:
        return "The global model was not evaluated during training.\n"
    which = "best" if chosen.get("step") == best else "last evaluated"
    lines = [f"Metrics of the global model after round {chosen['round']} (the {which} round):", ""]
    lines += [f"- {k}: {_cell(v)}" for k, v in eval_scores(chosen).items()]
    return "\n".join(lines) + "\n"


def federated_section(trainer: FederatedTrainer) -> str:
    """The model card's "Federated training" section for the run `trainer` has done so far."""
    args, strategy = trainer.args, trainer.strategy
    rounds = [entry for entry in trainer.state.log_history if "round" in entry]
    metrics = reported_metrics(trainer, rounds)
    paper = f" ([{strategy.paper[0]}](https://arxiv.org/abs/{strategy.paper[1]}))" if strategy.paper else ""
    local = f"{args.local_steps}" if args.local_steps is not None else f"{args.local_epochs} epochs"
    privacy = ""
    if args.dp_noise_multiplier is not None and rounds:
        privacy = (
            f"- differential privacy: client-level DP-FedAvg, noise multiplier {args.dp_noise_multiplier}; "
            f"(epsilon, delta) = ({privacy_spent(args, len(rounds)):.3g}, {args.dp_delta:g}) after {len(rounds)} "
            "rounds (opacus RDP accountant)\n"
        )
    quantized = quantization_of(trainer.model)
    if quantized:
        quantized = (
            f"- base: {quantized} (bitsandbytes), frozen; the clients trained LoRA adapters on it. The saved model is "
            f"the dequantized base in {str(merged_dtype(trainer.model)).removeprefix('torch.')} with the adapters "
            "added: it loads without peft or bitsandbytes and computes what the quantized model with adapters "
            "computes, up to the rounding of the compute dtype (and, on an 8-bit base, of the activations)\n"
        )
    return SECTION.substitute(
        strategy=strategy.name,
        paper=paper,
        quantized=quantized or "",
        optimizer=getattr(args.optim, "value", args.optim),
        rounds=len(rounds),
        num_rounds=args.num_rounds,
        num_clients=len(trainer.client_datasets),
        per_round=args.clients_sampled_per_round,
        local_steps=local,
        partition=args.partition,
        alpha=f" (alpha={args.partition_alpha})" if args.partition == "dirichlet" else "",
        weighting=args.client_weighting,
        rule=args.aggregation_rule,
        clip=f", updates clipped to L2 norm {args.update_clip_norm}" if args.update_clip_norm is not None else "",
        privacy=privacy,
        metrics=metrics,
        round_table=rounds_table(rounds),
    )
