"""Split a `datasets.Dataset` into client shards."""

from __future__ import annotations

import numpy as np
from datasets import Dataset

_MAX_DIRICHLET_DRAWS = 100


def partition_dataset(
    dataset: Dataset,
    num_clients: int,
    method: str = "iid",
    alpha: float = 0.5,
    label_column: str = "label",
    seed: int = 42,
    shards_per_client: int = 2,
) -> list[Dataset]:
    """Split `dataset` into `num_clients` client datasets.

    Args:
        method: `"iid"` (uniform random split), `"dirichlet"` (per-class proportions drawn from
            Dir(alpha); smaller alpha gives more label skew), `"shards"` (sort by label, cut into
            `num_clients * shards_per_client` shards, deal each client `shards_per_client` of them), or
            `"column:<name>"` (one client per distinct value of column `name`, in sorted order; the natural
            clients of a data set, so `num_clients` must equal the number of distinct values).
        alpha: Dirichlet concentration, used by `"dirichlet"`.
        label_column: the label column, used by `"dirichlet"` and `"shards"`.
        seed: the same seed gives the same split.

    Returns:
        A list of `num_clients` non-empty datasets that together hold every example exactly once.
    """
    if num_clients < 1:
        raise ValueError(f"num_clients must be at least 1, got {num_clients}.")
    if len(dataset) < num_clients:
        raise ValueError(
            f"Cannot split {len(dataset)} examples into {num_clients} non-empty clients: lower num_clients to at "
            f"most {len(dataset)} or provide more data."
        )
    rng = np.random.default_rng(seed)
    if method.startswith("column:"):
        shards = _by_column(dataset, method[len("column:") :], num_clients)
    elif method == "iid":
        shards = np.array_split(rng.permutation(len(dataset)), num_clients)
    elif method == "dirichlet":
        shards = _dirichlet(_labels(dataset, label_column, method), num_clients, alpha, rng)
    elif method == "shards":
        shards = _label_shards(_labels(dataset, label_column, method), num_clients, shards_per_client, rng)
    else:
        raise ValueError(f"Unknown partition method {method!r}: use 'iid', 'dirichlet', 'shards' or 'column:<name>'.")
    return [dataset.select(np.sort(indices)) for indices in shards]


def _labels(dataset: Dataset, label_column: str, method: str) -> np.ndarray:
    if label_column not in dataset.column_names:
        raise ValueError(
            f"partition {method!r} needs a label column, but {label_column!r} is not among the dataset's columns "
            f"{dataset.column_names}; set partition_label_column (label_column=) to the right one."
        )
    return np.asarray(dataset[label_column])


def _dirichlet(labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    classes = np.unique(labels)
    for _ in range(_MAX_DIRICHLET_DRAWS):
        shards: list[list[int]] = [[] for _ in range(num_clients)]
        for c in classes:
            members = rng.permutation(np.flatnonzero(labels == c))
            proportions = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(int)
            for client, part in enumerate(np.split(members, cuts)):
                shards[client].extend(part.tolist())
        if min(len(s) for s in shards) > 0:
            return [np.asarray(s, dtype=np.int64) for s in shards]
    raise ValueError(
        f"Dirichlet partition with alpha={alpha} left a client empty in {_MAX_DIRICHLET_DRAWS} draws: "
        f"raise partition_alpha, lower num_clients ({num_clients}) or provide more data."
    )


def _label_shards(
    labels: np.ndarray, num_clients: int, shards_per_client: int, rng: np.random.Generator
) -> list[np.ndarray]:
    num_shards = num_clients * shards_per_client
    if len(labels) < num_shards:
        raise ValueError(
            f"partition 'shards' needs at least num_clients * shards_per_client = {num_shards} examples, "
            f"got {len(labels)}: lower num_clients or use partition='iid'."
        )
    shards = np.array_split(np.argsort(labels, kind="stable"), num_shards)
    order = rng.permutation(num_shards)
    return [
        np.concatenate([shards[s] for s in order[c * shards_per_client : (c + 1) * shards_per_client]])
        for c in range(num_clients)
    ]


def _by_column(dataset: Dataset, column: str, num_clients: int) -> list[np.ndarray]:
    if column not in dataset.column_names:
        raise ValueError(
            f"partition 'column:{column}' names a column the dataset does not have; its columns are "
            f"{dataset.column_names}."
        )
    values = np.asarray(dataset[column])
    keys = np.unique(values)
    if len(keys) != num_clients:
        raise ValueError(
            f"partition 'column:{column}' gives {len(keys)} natural clients but num_clients={num_clients}: "
            f"set num_clients={len(keys)}."
        )
    return [np.flatnonzero(values == key) for key in keys]
