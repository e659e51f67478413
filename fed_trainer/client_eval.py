"""Evaluating the global model on every client's own held-out data: how it serves each client, not only the
population a central eval set stands for.

Each evaluated round logs, for every metric m of the evaluation (`loss`, and what `compute_metrics` returns),
`eval_client_<id>_<m>` per client and over the clients `eval_clients_mean_<m>` (weighted by the clients' held-out
sizes), `eval_clients_worst_<m>` (the highest loss-like value, the lowest other value: Trainer's rule for
`greater_is_better`) and `eval_clients_std_<m>` (the weighted standard deviation). With `personalization_steps`,
the same for every client's own fine-tuned model under `eval_personalized_` (the usual "global against
personalized" report; `personalized_scores`). Where the clients are evaluated is the executor's business
(`ClientExecutor.evaluate`): in this process (`local_scores`), or each on its own machine (`remote_scores`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
from datasets import Dataset

from fed_trainer.clients import RemoteClient
from fed_trainer.schedule import eval_scores
from fed_trainer.strategies.base import trainable_state
from fed_trainer.strategies.fedavg import load_tensors

if TYPE_CHECKING:
    from fed_trainer.config import FederatedConfig
    from fed_trainer.strategies.base import TensorDict
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
    if given is not None:
        if not all(isinstance(ds, Dataset) for ds in clients.values()):
            raise ValueError(
                "client_eval_datasets needs every client's data in this process; on Flower SuperNodes set "
                "client_eval_split instead (each SuperNode holds out a share of its own data)."
            )
        held_out = dict(given) if isinstance(given, Mapping) else dict(enumerate(given))
        if held_out.keys() != clients.keys():
            raise ValueError(
                f"client_eval_datasets must have one dataset per client: clients {sorted(map(str, clients))}, "
                f"eval sets for {sorted(map(str, held_out))}."
            )
        return clients, held_out
    parts = {cid: held_out_split(ds, split, args.seed) for cid, ds in clients.items()}
    return {cid: train for cid, (train, _) in parts.items()}, {cid: test for cid, (_, test) in parts.items()}


def held_out_split(dataset: Dataset | RemoteClient, fraction: float, seed: int) -> tuple:
    """The (train, held-out) parts of a client's data: a seeded split of a `Dataset`; for a client whose data is on
    another machine (a `RemoteClient`), stand-ins of the sizes the same split makes there."""
    if isinstance(dataset, RemoteClient):
        return dataset.split(fraction)
    parts = dataset.train_test_split(test_size=fraction, seed=seed)
    return parts["train"], parts["test"]


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
    load_tensors(model, personal)
    try:
        yield
    finally:
        load_tensors(model, saved)


def remote_scores(
    trainer: FederatedTrainer,
    round_number: int,
    client_id,
    dataset: Dataset,
    tensors: TensorDict,
    kept: TensorDict | None,
) -> tuple[dict[str, float], dict[str, float]]:
    """On a client's own machine (a Flower SuperNode, its trainer built afresh), after round `round_number`: (its
    own model's metrics on its held-out `dataset`, the same after `personalization_steps` or {}), the live model
    loaded with the server's `Strategy.global_tensors` and the client's personal state taken from what the machine
    `kept` (None: lost, `Strategy.machine_kept`). The strategy is put in the round's state first (RoLoRA: which
    factor trains), as the server's is."""
    trainer.strategy.begin_round(round_number)
    load_tensors(trainer.model, tensors)
    trainer.strategy.personal_from(trainer.strategy.machine_kept(kept, training=False))
    scores, personalized = local_scores(trainer, {client_id: dataset})
    return scores[client_id], personalized.get(client_id, {})


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


def personalized_scores(trainer: FederatedTrainer, dataset: Dataset, cid, ignore_keys=None) -> dict[str, float]:
    """Client `cid`'s own model after `personalization_steps` local steps on its training data, on its held-out set
    (`dataset`), without the `eval_` prefix; the live model is put back after.

    The steps train what the global model has trainable (all weights, or the adapters a LoRA strategy left
    attached), from the client's own model (`personal_state`), with the client trainer and its optimizer at the
    constant `learning_rate`, seeded by the client's index in the run. The trainable weights and floating buffers
    are copied to the host first and put back after, so the global model is unchanged. Under client-parallel
    training every process fine-tunes the client alike (the evaluation is spread over the processes).
    """
    model, args = trainer.model, trainer.args
    saved = {name: t.detach().to("cpu", copy=True) for name, t in trainable_state(model).items()}
    seed = args.seed + list(trainer.client_datasets).index(cid)
    try:
        with own_model(trainer, cid):
            trainer.client_runner.fine_tune(trainer.client_datasets[cid], cid, args.personalization_steps, seed)
            return plain_scores(trainer, dataset, cid, ignore_keys)
    finally:
        load_tensors(model, saved)


def local_scores(trainer: FederatedTrainer, held_out: dict[object, Dataset], ignore_keys=None) -> tuple[dict, dict]:
    """(every client's own model's metrics on its held-out set, the same after `personalization_steps` or {}),
    by client, for the clients of `held_out`, evaluated in this process (`InProcessClients.evaluate`)."""
    scores = {cid: client_scores(trainer, dataset, cid, ignore_keys) for cid, dataset in held_out.items()}
    if not trainer.args.personalization_steps:
        return scores, {}
    return scores, {cid: personalized_scores(trainer, dataset, cid, ignore_keys) for cid, dataset in held_out.items()}


def summary(scores: dict[object, dict[str, float]], held_out: dict[object, Dataset], prefix: str) -> dict:
    """Every client's metrics and their mean, worst and spread over the clients (see the module docstring), as
    `<prefix>client_<id>_<m>` and `<prefix>clients_mean_<m>`, ...; {} when no client was evaluated."""
    if not scores:
        return {}
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


def evaluate_round(trainer: FederatedTrainer, logs: dict, ignore_keys=None) -> None:
    """A round's evaluation, into its log entry `logs`: every client's held-out set (when given), then `evaluate()`
    on the eval_dataset, whose metrics join `logs` (through `trainer.round_logs`) and whose `on_evaluate` the
    callbacks hear; without an eval_dataset, the callbacks' `on_evaluate` gets the clients' metrics."""
    held_out = trainer.client_eval_datasets
    if held_out:  # where the clients are: this process, or their own machines (the executor's business)
        scores, personalized = trainer.client_executor.evaluate(trainer, held_out, ignore_keys)
        logs.update(summary(scores, held_out, "eval_"))
        logs.update(summary(personalized, held_out, "eval_personalized_"))
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
