"""The global model evaluated on every client's own held-out data: each client's metrics equal a plain `Trainer`'s
evaluation of that client's set, and the summary over clients is their weighted mean, worst and spread."""

import copy

import numpy as np
import pytest
import torch
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


def test_personalized_metrics_are_each_clients_fine_tuned_global_model_which_stays_unchanged(make_config, tmp_path):
    steps, config = 4, dict(eval_strategy="epoch", learning_rate=3e-3, warmup_steps=1)
    runs = [
        FederatedTrainer(
            model=tiny_bert(dropout=0.0),
            args=make_config(**config, personalization_steps=n),
            client_datasets=CLIENTS,
            client_eval_datasets=HELD_OUT,
            compute_metrics=accuracy,
        )  # fmt: skip
        for n in (steps, 0)
    ]
    for run in runs:
        run.train()
    personalized, plain_run = runs
    # the global model, and its metrics, are those of the run without personalization
    expected_state = plain_run.model.state_dict()
    for name, value in personalized.model.state_dict().items():
        assert torch.equal(value, expected_state[name]), name
    last, plain_last = ({k: v for k, v in [e for e in run.state.log_history if "round" in e][-1].items()
                         if k != "round_runtime"} for run in runs)  # fmt: skip
    assert {k: v for k, v in last.items() if "personalized" not in k} == plain_last
    # each client's: a plain Trainer fine-tuning the global model on the client's training set, evaluated on its own
    for k, (train, held_out) in enumerate(zip(CLIENTS, HELD_OUT)):
        args = TrainingArguments(
            output_dir=str(tmp_path / f"plain{k}"), max_steps=steps, learning_rate=3e-3, lr_scheduler_type="constant",
            per_device_train_batch_size=4, seed=7 + k, use_cpu=True, report_to="none", disable_tqdm=True,
        )  # fmt: skip
        model = copy.deepcopy(plain_run.merged_model())  # (FedAvg's merged model is the live one)
        plain = Trainer(model=model, args=args, train_dataset=train, compute_metrics=accuracy)
        plain.train()
        for name, value in plain.evaluate(eval_dataset=held_out).items():
            if name in ("eval_loss", "eval_accuracy"):
                got = last[name.replace("eval_", f"eval_personalized_client_{k}_")]
                assert got == pytest.approx(value, rel=1e-5), (k, name)
        assert last[f"eval_personalized_client_{k}_loss"] != last[f"eval_client_{k}_loss"]  # it did train
    sizes = np.array([len(ds) for ds in HELD_OUT]) / sum(len(ds) for ds in HELD_OUT)
    losses = [last[f"eval_personalized_client_{k}_loss"] for k in range(3)]
    assert last["eval_personalized_clients_mean_loss"] == pytest.approx(float(sizes @ losses), rel=1e-6)
    assert last["eval_personalized_clients_worst_loss"] == max(losses)


@pytest.mark.parametrize(
    "config, eval_sets, message",
    [
        (dict(), HELD_OUT[:2], "one dataset per client"),
        (dict(client_eval_split=0.2), HELD_OUT, "client_eval_datasets or set client_eval_split, not both"),
        (dict(personalization_steps=2), None, "personalization_steps evaluates .* set client_eval_split"),
    ],
)
def test_bad_client_eval_sets_are_refused(make_config, config, eval_sets, message):
    with pytest.raises(ValueError, match=message):
        FederatedTrainer(model=tiny_bert(), args=make_config(**config), client_datasets=CLIENTS,
                         client_eval_datasets=eval_sets)  # fmt: skip
