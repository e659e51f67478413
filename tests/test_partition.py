import numpy as np
import pytest
from datasets import Dataset

from fed_trainer import partition_dataset


def labelled(n=600, classes=6, seed=0):
    rng = np.random.default_rng(seed)
    return Dataset.from_dict(
        {
            "x": np.arange(n).tolist(),
            "label": rng.integers(0, classes, n).tolist(),
            "user": (np.arange(n) % 5).tolist(),
        }
    )


@pytest.mark.parametrize("method", ["iid", "dirichlet", "shards"])
def test_every_example_lands_in_exactly_one_client(method):
    data = labelled()
    shards = partition_dataset(data, 7, method=method, alpha=0.5, seed=1)
    assert len(shards) == 7 and all(len(s) > 0 for s in shards)
    xs = np.concatenate([s["x"] for s in shards])
    assert len(xs) == len(data) and set(xs.tolist()) == set(range(len(data)))


def test_iid_sizes_are_balanced():
    sizes = [len(s) for s in partition_dataset(labelled(n=601), 6, method="iid")]
    assert sum(sizes) == 601 and max(sizes) - min(sizes) <= 1


def label_skew(shards, classes=6):
    """Mean total-variation distance between each client's label distribution and the uniform one."""
    distances = []
    for s in shards:
        p = np.bincount(s["label"], minlength=classes) / len(s)
        distances.append(0.5 * np.abs(p - 1 / classes).sum())
    return float(np.mean(distances))


def test_dirichlet_skew_grows_as_alpha_shrinks():
    data = labelled(n=3000)
    skews = [label_skew(partition_dataset(data, 10, method="dirichlet", alpha=a, seed=3)) for a in (100.0, 1.0, 0.1)]
    assert skews[0] < skews[1] < skews[2]
    assert skews[0] < 0.1 and skews[2] > 0.5


def test_shards_give_each_client_few_labels():
    data = labelled(n=1200)
    shards = partition_dataset(data, 6, method="shards", seed=0)
    assert max(len(set(s["label"])) for s in shards) <= 4


@pytest.mark.parametrize("method", ["iid", "dirichlet", "shards"])
def test_same_seed_same_split_other_seed_other_split(method):
    data = labelled()
    a = [s["x"] for s in partition_dataset(data, 5, method=method, seed=11)]
    b = [s["x"] for s in partition_dataset(data, 5, method=method, seed=11)]
    c = [s["x"] for s in partition_dataset(data, 5, method=method, seed=12)]
    assert a == b and a != c


def test_column_partition_gives_natural_clients():
    shards = partition_dataset(labelled(), 5, method="column:user")
    assert [set(s["user"]) for s in shards] == [{0}, {1}, {2}, {3}, {4}]


def test_impossible_requests_raise_clear_errors():
    data = labelled(n=10)
    with pytest.raises(ValueError, match="Cannot split 10 examples into 11 non-empty clients"):
        partition_dataset(data, 11)
    with pytest.raises(ValueError, match="'target' is not among the dataset's columns"):
        partition_dataset(data, 2, method="dirichlet", label_column="target")
    with pytest.raises(ValueError, match="set num_clients=5"):
        partition_dataset(labelled(), 3, method="column:user")
    with pytest.raises(ValueError, match="column the dataset does not have"):
        partition_dataset(data, 2, method="column:site")
    with pytest.raises(ValueError, match="left a client empty"):
        partition_dataset(labelled(n=40, classes=2), 20, method="dirichlet", alpha=0.01)
    with pytest.raises(ValueError, match="Unknown partition method"):
        partition_dataset(data, 2, method="random")
