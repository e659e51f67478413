"""The global model evaluated on every client's own held-out data: each client's metrics equal a plain `Trainer`'s
evaluation of that client's set, and the summary over clients is their weighted mean, worst and spread."""

import numpy as np
import pytest
from conftest import tiny_bert, toy_dataset
from transformers import Trainer, TrainingArguments

from fed_trainer import FederatedTrainer

CLIENTS = [toy_dataset(n, seed) for seed, n in enumerate([12, 16, 20], start=1)]
HELD_OUT = [toy_dataset(n, seed) for seed, n in enumerate([6, 10, 14], start=11)]


def accuracy(prediction):
    return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}


def test_each_clients_metrics_are_a_plain_evaluation_of_its_set_and_the_summary_weighs_them(make_config, tmp_path):
    trainer = FederatedTrainer(
        model=tiny_bert(dropout=0.0), args=make_config(eval_strategy="epoch", learning_rate=3e-3),
        client_datasets=CLIENTS, client_eval_datasets=HELD_OUT, compute_metrics=accuracy,
    )  # fmt: skip
    trainer.train()
    last = [e for e in trainer.state.log_history if "round" in e][-1]
    plain = Trainer(
        model=trainer.merged_model(), compute_metrics=accuracy,
        args=TrainingArguments(output_dir=str(tmp_path / "plain"), use_cpu=True, report_to="none"),
    )  # fmt: skip
    expected = {k: plain.evaluate(eval_dataset=ds) for k, ds in enumerate(HELD_OUT)}
    sizes = np.array([len(ds) for ds in HELD_OUT]) / sum(len(ds) for ds in HELD_OUT)
    for name, worst in [("loss", max), ("accuracy", min)]:
        values = [expected[k][f"eval_{name}"] for k in expected]
        for k, value in enumerate(values):
            assert last[f"eval_client_{k}_{name}"] == pytest.approx(value, rel=1e-5)
        mean = sum(p * v for p, v in zip(sizes, values))
        assert last[f"eval_clients_mean_{name}"] == pytest.approx(mean, rel=1e-5)
        assert last[f"eval_clients_worst_{name}"] == pytest.approx(worst(values), rel=1e-5)
        spread = sum(p * (v - mean) ** 2 for p, v in zip(sizes, values)) ** 0.5
        assert last[f"eval_clients_std_{name}"] == pytest.approx(spread, rel=1e-5, abs=1e-9)
    assert len({last[f"eval_client_{k}_loss"] for k in range(3)}) == 3  # three different sets, three values


def test_client_eval_split_holds_out_a_share_of_each_clients_data(make_config):
    trainer = FederatedTrainer(
        model=tiny_bert(), args=make_config(eval_strategy="epoch", client_eval_split=0.25), client_datasets=CLIENTS,
    )  # fmt: skip
    for k, data in enumerate(CLIENTS):
        train, held_out = trainer.client_datasets[k], trainer.client_eval_datasets[k]
        assert (len(train), len(held_out)) == (len(data) - len(data) // 4, len(data) // 4)
        rows = sorted(map(str, zip(train["input_ids"], train["label"])))
        rows += list(map(str, zip(held_out["input_ids"], held_out["label"])))
        assert sorted(rows) == sorted(map(str, zip(data["input_ids"], data["label"])))  # a split, nothing lost
    trainer.train()
    assert all("eval_clients_worst_loss" in e for e in trainer.state.log_history if "round" in e)


def test_the_best_round_can_be_the_one_that_serves_the_worst_client_best(make_config):
    trainer = FederatedTrainer(
        model=tiny_bert(dropout=0.0), client_datasets=CLIENTS, client_eval_datasets=HELD_OUT,
        args=make_config(num_rounds=3, eval_strategy="epoch", load_best_model_at_end=True,
                         metric_for_best_model="clients_worst_loss"),
    )  # fmt: skip
    trainer.train()
    worst = {e["round"]: e["eval_clients_worst_loss"] for e in trainer.state.log_history if "round" in e}
    assert trainer.state.best_metric == min(worst.values())
    assert trainer.state.best_model_checkpoint.endswith(f"round-{min(worst, key=worst.get)}")


@pytest.mark.parametrize(
    "config, eval_sets, message",
    [
        (dict(), HELD_OUT[:2], "one dataset per client"),
        (dict(client_eval_split=0.2), HELD_OUT, "client_eval_datasets or set client_eval_split, not both"),
    ],
)
def test_bad_client_eval_sets_are_refused(make_config, config, eval_sets, message):
    with pytest.raises(ValueError, match=message):
        FederatedTrainer(model=tiny_bert(), args=make_config(**config), client_datasets=CLIENTS,
                         client_eval_datasets=eval_sets)  # fmt: skip
