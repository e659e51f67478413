"""Evaluating the global model on every client's own held-out data: how it serves each client, not only the
population a central eval set stands for.

Each evaluated round logs, for every metric m of the evaluation (`loss`, and what `compute_metrics` returns),
`eval_client_<id>_<m>` per client and over the clients `eval_clients_mean_<m>` (weighted by the clients' held-out
sizes), `eval_clients_worst_<m>` (the highest loss-like value, the lowest other value: Trainer's rule for
`greater_is_better`) and `eval_clients_std_<m>` (the weighted standard deviation). With `personalization_steps`,
the same for every client's own fine-tuned model under `eval_personalized_` (the usual "global against
personalized" report; `personalized_metrics`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
import torch
from datasets import Dataset

from fed_trainer.schedule import eval_scores
from fed_trainer.strategies.fedavg import load_parameters

if TYPE_CHECKING:
    from fed_trainer.config import FederatedConfig
    from fed_trainer.trainer import FederatedTrainer


def held_out_sets(
    args: FederatedConfig, clients: dict[object, Dataset], given: Sequence[Dataset] | Mapping[object, Dataset] | None
) -> tuple[dict[object, Dataset], dict[object, Dataset]]:
    """(the clients' training sets, their held-out sets): `given` (a list in client order or a dict by client id,
    one per client), or a `client_eval_split` share of each client's data held out by a seeded split, or none."""
    split = args.client_eval_split
    if given is not None and split is not None:
        raise ValueError("Pass client_eval_datasets or set client_eval_split, not both.")
    if given is None and split is None:
        if args.personalization_steps:
            raise ValueError(
                "personalization_steps evaluates each client's fine-tuned model on the client's held-out data: set "
                "client_eval_split (or pass client_eval_datasets), or drop personalization_steps."
            )
        return clients, {}
    if not all(isinstance(ds, Dataset) for ds in clients.values()):
        raise ValueError(
            "Per-client evaluation needs every client's data in this process; on Flower SuperNodes it is not "
            "supported yet: evaluate the global model with eval_dataset."
        )
    if given is not None:
        held_out = dict(given) if isinstance(given, Mapping) else dict(enumerate(given))
        if held_out.keys() != clients.keys():
            raise ValueError(
                f"client_eval_datasets must have one dataset per client: clients {sorted(map(str, clients))}, "
                f"eval sets for {sorted(map(str, held_out))}."
            )
        return clients, held_out
    parts = {cid: ds.train_test_split(test_size=split, seed=args.seed) for cid, ds in clients.items()}
    return {cid: p["train"] for cid, p in parts.items()}, {cid: p["test"] for cid, p in parts.items()}


def eval_strategy_for_trainer(args: FederatedConfig, eval_dataset, held_out: dict[object, Dataset]) -> str:
    """The `eval_strategy` for `Trainer.__init__` to see: "no" when only the clients' held-out sets are evaluated
    (Trainer would ask for an eval_dataset), else the run's own. Refuses an evaluation schedule with nothing to
    evaluate."""
    evaluation = args.eval_strategy
    if eval_dataset is not None or evaluation == "no":
        return evaluation
    if not held_out:
        schedule = (f"eval_every_rounds={args.eval_every_rounds}" if args.eval_every_rounds is not None
                    else f"eval_strategy={evaluation.value!r}")  # fmt: skip
        raise ValueError(
            f"{schedule} evaluates the global model after rounds, but no eval_dataset was given: pass "
            "eval_dataset=... (or client_eval_datasets / client_eval_split), or leave eval_strategy='no' and "
            "eval_every_rounds unset."
        )
    return "no"


@contextmanager
def own_model(trainer: FederatedTrainer, cid):
    """Inside: the live model is client `cid`'s own (the strategy's `personal_state` loaded over the global model;
    the global model itself for most strategies); put back on leaving."""
    personal, model = trainer.strategy.personal_state(cid), trainer.model
    params = dict(model.named_parameters())
    saved = {name: params[name].detach().clone() for name in personal}
    load_parameters(model, personal)
    try:
        yield
    finally:
        load_parameters(model, saved)


def client_scores(trainer: FederatedTrainer, dataset: Dataset, cid, ignore_keys=None) -> dict[str, float]:
    """Client `cid`'s own model's metrics on its held-out set, without the `eval_` prefix. Every process takes
    part (the set is spread over the processes, as `evaluate` spreads an eval set)."""
    with own_model(trainer, cid):
        return plain_scores(trainer, dataset, cid, ignore_keys)


def plain_scores(trainer: FederatedTrainer, dataset: Dataset, cid, ignore_keys=None) -> dict[str, float]:
    """The live model's metrics on client `cid`'s held-out set, without the `eval_` prefix."""
    output = trainer.evaluation_loop(
        trainer.get_eval_dataloader(dataset), description=f"client {cid}", ignore_keys=ignore_keys,
        metric_key_prefix="eval",
    )  # fmt: skip
    return {k[len("eval_") :]: float(v) for k, v in eval_scores(output.metrics).items()}


def summary(scores: dict[object, dict[str, float]], held_out: dict[object, Dataset], prefix: str) -> dict:
    """Every client's metrics and their mean, worst and spread over the clients (see the module docstring), as
    `<prefix>client_<id>_<m>` and `<prefix>clients_mean_<m>`, ..."""
    sizes = np.array([len(held_out[cid]) for cid in scores], dtype=float)
    weights = sizes / sizes.sum()
    logs = {f"{prefix}client_{cid}_{name}": value for cid, values in scores.items() for name, value in values.items()}
    for name in next(iter(scores.values())):
        values = np.array([scores[cid][name] for cid in scores])
        mean = float(weights @ values)
        logs[f"{prefix}clients_mean_{name}"] = mean
        logs[f"{prefix}clients_worst_{name}"] = float(values.max() if name.endswith("loss") else values.min())
        logs[f"{prefix}clients_std_{name}"] = float(np.sqrt(weights @ (values - mean) ** 2))
    return logs


def per_client_metrics(trainer: FederatedTrainer, held_out: dict[object, Dataset], ignore_keys=None) -> dict:
    """Every client's own model (the global one, for most strategies) on its held-out set: `eval_client_<id>_<m>`,
    `eval_clients_mean_<m>`, ..."""
    scores = {cid: client_scores(trainer, dataset, cid, ignore_keys) for cid, dataset in held_out.items()}
    return summary(scores, held_out, "eval_")


def personalized_metrics(trainer: FederatedTrainer, held_out: dict[object, Dataset], ignore_keys=None) -> dict:
    """Every client's own model, `personalization_steps` local steps from the global model (from the client's own,
    for a strategy with `personal_state`) on its training data, on its held-out set:
    `eval_personalized_client_<id>_<m>`, `eval_personalized_clients_mean_<m>`, ...

    The steps train what the global model has trainable (all weights, or the adapters a LoRA strategy left
    attached), with the client trainer and its optimizer at the constant `learning_rate`, seeded by the client's
    position. The trainable weights and floating buffers are copied to the host first and put back after each
    client, so the global model is unchanged. Under client-parallel training every process fine-tunes every client
    alike (the evaluation of each set is spread over the processes).
    """
    model, steps = trainer.model, trainer.args.personalization_steps
    changing = [p for p in model.parameters() if p.requires_grad]
    changing += [b for b in model.buffers() if b.is_floating_point()]
    saved = [t.detach().to("cpu", copy=True) for t in changing]
    scores = {}
    for position, (cid, dataset) in enumerate(held_out.items()):
        try:
            with own_model(trainer, cid):
                trainer.client_runner.fine_tune(trainer.client_datasets[cid], cid, steps, trainer.args.seed + position)
                scores[cid] = plain_scores(trainer, dataset, cid, ignore_keys)
        finally:
            with torch.no_grad():
                for tensor, value in zip(changing, saved, strict=True):
                    tensor.copy_(value)
    return summary(scores, held_out, "eval_personalized_")


def evaluate_round(trainer: FederatedTrainer, logs: dict, ignore_keys=None) -> None:
    """A round's evaluation, into its log entry `logs`: every client's held-out set (when given), then `evaluate()`
    on the eval_dataset, whose metrics join `logs` (through `trainer.round_logs`) and whose `on_evaluate` the
    callbacks hear; without an eval_dataset, the callbacks' `on_evaluate` gets the clients' metrics."""
    if trainer.client_eval_datasets:
        logs.update(per_client_metrics(trainer, trainer.client_eval_datasets, ignore_keys))
        if trainer.args.personalization_steps:
            logs.update(personalized_metrics(trainer, trainer.client_eval_datasets, ignore_keys))
    if trainer.eval_dataset is None:  # EarlyStoppingCallback and the others hear the clients' metrics
        trainer.control = trainer.callback_handler.on_evaluate(
            trainer.args, trainer.state, trainer.control, metrics=eval_scores(logs)
        )
        return
    trainer.round_logs = logs
    try:
        trainer.evaluate(ignore_keys=ignore_keys)
    finally:
        trainer.round_logs = None
