"""Trainer's run-length, interval and best-model fields, read in rounds: what a script written for `Trainer` gets."""

import json
import logging
import re
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from conftest import tiny_bert, toy_dataset
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForSequenceClassification, EarlyStoppingCallback

from fed_trainer import FederatedCallback, FederatedConfig, FederatedTrainer
from fed_trainer.checkpoint import checkpoint_dirs

CLIENTS = [toy_dataset(12, seed) for seed in (1, 2, 3)]


class GlobalModels(FederatedCallback):
    """The global model after every round, by round."""

    def __init__(self):
        self.models = {}

    def on_round_end(self, args, state, control, round=None, model=None, **kwargs):
        self.models[round] = {k: v.detach().clone() for k, v in model.state_dict().items()}


class ScriptedScore:
    """`compute_metrics` whose `score` after round t is `scores[t]` (the round read from the trainer), so that the
    best round is known in advance; `accuracy` is real."""

    def __init__(self, scores: dict):
        self.scores, self.trainer = scores, None

    def __call__(self, prediction):
        accuracy = float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())
        return {"score": self.scores[int(self.trainer.state.epoch)], "accuracy": accuracy}


def build(make_config, scores=None, callbacks=(), **config):
    metrics = ScriptedScore(scores) if scores else None
    trainer = FederatedTrainer(
        model=tiny_bert(dropout=0.0), args=make_config(**config), client_datasets=CLIENTS,
        eval_dataset=toy_dataset(16, seed=9), compute_metrics=metrics, callbacks=list(callbacks),
    )  # fmt: skip
    if metrics:
        metrics.trainer = trainer
    return trainer


def evaluated_rounds(trainer) -> list[int]:
    return [e["round"] for e in trainer.state.log_history if "round" in e and "eval_loss" in e]


def saved_rounds(output_dir) -> list[int]:
    return [int(p.name.split("-")[1]) for p in checkpoint_dirs(output_dir)]


def test_steps_strategies_act_at_the_round_ends_that_reach_each_multiple(make_config):
    # 3 steps a round: rounds end at steps 3, 6, ..., 18; multiples of 7 are reached at the ends of rounds 3 and 5
    steps = dict(eval_strategy="steps", eval_steps=7, save_strategy="steps", save_steps=7)
    trainer = build(make_config, num_rounds=6, **steps)
    trainer.train()
    assert evaluated_rounds(trainer) == [3, 5]
    assert saved_rounds(trainer.args.output_dir) == [3, 5, 6]  # "steps" also saves after the last round


def test_epoch_strategies_act_every_round_and_rounds_fields_win(make_config):
    trainer = build(make_config, num_rounds=3, eval_strategy="epoch", save_strategy="epoch", save_total_limit=2)
    trainer.train()
    assert evaluated_rounds(trainer) == [1, 2, 3] and saved_rounds(trainer.args.output_dir) == [2, 3]
    config = make_config(eval_every_rounds=2, num_rounds=5, save_every_rounds=0)
    assert (config.eval_strategy, config.save_strategy) == ("epoch", "no")


def test_a_plain_config_evaluates_nothing_and_checkpoints_the_last_round_so_resume_works(tmp_path):
    args = FederatedConfig(output_dir=str(tmp_path), num_clients=3, num_rounds=2, local_steps=2, use_cpu=True,
                           report_to="none", disable_tqdm=True)  # fmt: skip
    trainer = FederatedTrainer(model=tiny_bert(), args=args, client_datasets=CLIENTS)
    trainer.train()
    assert evaluated_rounds(trainer) == [] and saved_rounds(tmp_path) == [2]
    state = json.loads((tmp_path / "round-2" / "trainer_state.json").read_text())
    assert state["epoch"] == 2.0 and state["global_step"] == 4
    resumed = FederatedTrainer(model=tiny_bert(), args=args, client_datasets=CLIENTS)
    resumed.train(resume_from_checkpoint=True)  # nothing left to do: the checkpoint is the end of the run
    for name, value in trainer.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, rtol=0, atol=0)


@pytest.mark.parametrize(
    "config, local_steps, epochs",
    [(dict(num_train_epochs=2.0), None, 0.5), (dict(max_steps=10), 3, None), (dict(), None, 0.75)],
)
def test_num_train_epochs_and_max_steps_are_spread_over_the_rounds(tmp_path, caplog, config, local_steps, epochs):
    args = FederatedConfig(output_dir=str(tmp_path), num_rounds=4, **config)
    assert (args.local_steps, args.local_epochs) == (local_steps, epochs)
    assert "is spread over num_rounds=4 rounds" in caplog.text


def test_a_client_trains_its_share_of_num_train_epochs_each_round(make_config):
    # 12 examples, batch 4: 3 batches an epoch; 2 epochs over 4 rounds: ceil(0.5 * 3) = 2 steps a round
    trainer = build(make_config, num_rounds=4, local_steps=None, num_train_epochs=2.0)
    trainer.train()
    assert trainer.args.local_epochs == 0.5 and trainer.state.global_step == 4 * 2


def test_fields_a_run_does_not_use_are_named_once(tmp_path, caplog):
    FederatedConfig(output_dir=str(tmp_path), local_steps=5, num_train_epochs=2.0, max_steps=100)
    assert caplog.text.count("FederatedConfig ignores max_steps=100 and num_train_epochs=2") == 1


@pytest.mark.parametrize(
    "config, message",
    [
        (dict(eval_every_rounds=2, eval_strategy="steps", eval_steps=5), "both schedule the evaluation"),
        (dict(save_every_rounds=-1), "save_every_rounds must be >= 0"),
        (dict(num_train_epochs=0.0), "num_train_epochs must be positive"),
    ],
)
def test_conflicting_or_bad_schedules_are_refused(tmp_path, config, message):
    with pytest.raises(ValueError, match=message):
        FederatedConfig(output_dir=str(tmp_path), **config)


def test_an_evaluation_schedule_without_eval_dataset_is_refused(make_config):
    with pytest.raises(ValueError, match="eval_every_rounds=1 evaluates the global model .* no eval_dataset"):
        FederatedTrainer(model=tiny_bert(), args=make_config(eval_every_rounds=1), client_datasets=CLIENTS)


SCORES = {1: 0.5, 2: 0.9, 3: 0.7, 4: 0.6, 5: 0.95, 6: 0.4}


def test_load_best_model_at_end_keeps_and_ends_with_the_best_rounds_global_model(make_config, tmp_path):
    rounds = GlobalModels()
    trainer = build(
        make_config, SCORES, [rounds], num_rounds=4, eval_strategy="epoch", save_strategy="epoch",
        save_total_limit=1, load_best_model_at_end=True, metric_for_best_model="score",
    )  # fmt: skip
    trainer.train()
    assert trainer.state.best_metric == 0.9 and trainer.state.best_model_checkpoint.endswith("round-2")
    assert saved_rounds(trainer.args.output_dir) == [2, 4]  # save_total_limit=1 never deletes the best round
    for name, value in rounds.models[2].items():
        torch.testing.assert_close(trainer.model.state_dict()[name], value, rtol=0, atol=0)
    assert not torch.equal(rounds.models[2]["classifier.weight"], rounds.models[4]["classifier.weight"])
    trainer.save_model(str(tmp_path / "final"))  # what save_model (and push_to_hub) writes: the best round's model
    saved = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "final")).state_dict()
    for name, value in rounds.models[2].items():
        torch.testing.assert_close(saved[name], value, rtol=0, atol=0)


def test_save_strategy_best_checkpoints_only_rounds_that_improve(make_config):
    trainer = build(make_config, SCORES, num_rounds=5, eval_strategy="epoch", save_strategy="best",
                    metric_for_best_model="score")  # fmt: skip
    trainer.train()
    assert saved_rounds(trainer.args.output_dir) == [1, 2, 5] and trainer.state.best_metric == 0.95


def test_early_stopping_stops_when_patience_runs_out(make_config):
    trainer = build(
        make_config, SCORES, [EarlyStoppingCallback(early_stopping_patience=2)], num_rounds=6,
        eval_strategy="epoch", save_strategy="epoch", load_best_model_at_end=True, metric_for_best_model="score",
    )  # fmt: skip
    trainer.train()
    # best 0.9 at round 2; rounds 3 and 4 do not improve it: the run stops after round 4, not at round 5's 0.95
    assert [e["round"] for e in trainer.state.log_history if "round" in e] == [1, 2, 3, 4]
    assert trainer.state.best_model_checkpoint.endswith("round-2")


@pytest.mark.parametrize("restore", [True, False])
def test_early_stopping_patience_is_restored_on_resume_as_trainer_restores_it(make_config, restore):
    """Trainer restores callback states only with restore_callback_states_from_checkpoint (off by default)."""
    config = dict(eval_strategy="epoch", save_strategy="epoch", metric_for_best_model="score",
                  load_best_model_at_end=True, restore_callback_states_from_checkpoint=restore)  # fmt: skip
    stopping = lambda: [EarlyStoppingCallback(early_stopping_patience=2)]  # noqa: E731
    build(make_config, SCORES, stopping(), num_rounds=3, **config).train()  # round 3 did not improve: 1 of 2
    resumed = build(make_config, SCORES, stopping(), num_rounds=6, **config)
    resumed.train(resume_from_checkpoint=True)
    # restored: round 4 (no better) runs out the patience, as in the uninterrupted run; afresh: round 5 resets it
    expected = [1, 2, 3, 4] if restore else [1, 2, 3, 4, 5, 6]
    assert [e["round"] for e in resumed.state.log_history if "round" in e] == expected


def test_loss_is_the_default_best_metric_lower_is_better(make_config):
    trainer = build(make_config, num_rounds=3, eval_strategy="epoch", save_strategy="no", load_best_model_at_end=True)
    trainer.train()
    losses = {e["round"]: e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e}
    best = min(losses, key=losses.get)
    assert trainer.state.best_metric == losses[best] and trainer.state.best_model_checkpoint.endswith(f"round-{best}")


def test_resume_keeps_the_best_so_far(make_config):
    config = dict(eval_strategy="epoch", save_strategy="epoch", load_best_model_at_end=True)
    config["metric_for_best_model"] = "score"
    rounds = GlobalModels()
    build(make_config, SCORES, num_rounds=3, **config).train()
    resumed = build(make_config, SCORES, [rounds], num_rounds=4, **config)
    resumed.train(resume_from_checkpoint=True)
    assert list(rounds.models) == [4] and resumed.state.best_metric == 0.9
    assert resumed.state.best_model_checkpoint.endswith("round-2")
    best = torch.load(f"{resumed.state.best_model_checkpoint}/federated_state.pt", weights_only=False)["model"]
    for name, value in best.items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, rtol=0, atol=0)


def test_the_model_card_table_and_trainer_state_carry_round_values(make_config):
    trainer = build(make_config, num_rounds=2, eval_strategy="epoch")
    trainer.train()
    trainer.create_model_card(model_name="tiny-fed")
    trainer.save_state()
    card = re.sub(r" +", " ", open(f"{trainer.args.output_dir}/README.md", encoding="utf-8").read())
    rounds = [e for e in trainer.state.log_history if "round" in e]
    assert "No log" not in card and "| Training Loss | Epoch | Step | Validation Loss |" in card
    assert f"| {rounds[1]['loss']:.4f} | 2.0 | 6 | {rounds[1]['eval_loss']:.4f} |" in card
    assert f"| 2 | 6 | {rounds[1]['loss']:.4f} |" in card  # the federated section's round table
    state = json.loads(open(f"{trainer.args.output_dir}/trainer_state.json").read())
    assert state["epoch"] == 2.0 and all(e.get("epoch") is not None for e in state["log_history"])


def test_a_log_line_of_local_training_is_not_repeated_per_client(make_config):
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    trainer_logger = logging.getLogger("transformers.trainer")
    trainer_logger.addHandler(handler)
    level, trainer_logger.level = trainer_logger.level, logging.INFO
    try:
        clients = [dataset.add_column("note", ["x"] * len(dataset)) for dataset in CLIENTS]  # not a model input
        FederatedTrainer(model=tiny_bert(), args=make_config(num_rounds=2), client_datasets=clients).train()
    finally:
        trainer_logger.removeHandler(handler)
        trainer_logger.setLevel(level)
    ignored = [r for r in records if "don't have a corresponding argument" in r.getMessage()]
    assert len(ignored) == 1, [r.getMessage() for r in ignored]


def test_tensorboard_gets_one_entry_per_round_at_the_runs_step(make_config):
    dp = dict(update_clip_norm=1.0, dp_noise_multiplier=0.5, client_weighting="uniform")
    trainer = build(make_config, num_rounds=3, eval_strategy="epoch", report_to=["tensorboard"], **dp)
    trainer.train()
    (events,) = {p.parent for p in Path(trainer.args.output_dir).rglob("events.out.tfevents*")}
    scalars = EventAccumulator(str(events)).Reload()
    rounds = [e for e in trainer.state.log_history if "round" in e]
    for tag, key in [("train/loss", "loss"), ("train/bytes_up", "bytes_up"), ("train/dp_epsilon", "dp_epsilon"),
                     ("eval/loss", "eval_loss"), ("train/round", "round")]:  # fmt: skip
        logged = [(s.step, s.value) for s in scalars.Scalars(tag)]
        assert logged == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in rounds], tag
    assert [r["step"] for r in rounds] == [3, 6, 9]
    mean_loss = np.mean([r["loss"] for r in rounds])  # the summary's train_loss, once, at the last step
    assert [(s.step, s.value) for s in scalars.Scalars("train/train_loss")] == [(9, pytest.approx(mean_loss))]


def test_trackio_gets_one_entry_per_round_at_the_runs_step(make_config):
    from trackio.sqlite_storage import SQLiteStorage  # TRACKIO_DIR: a temporary folder (tests/conftest.py)

    trainer = build(make_config, num_rounds=3, eval_strategy="epoch", report_to=["trackio"], project="fed-test",
                    run_name="rounds")  # fmt: skip
    trainer.train()
    logged = [entry for entry in SQLiteStorage.get_logs("fed-test", "rounds") if "train/round" in entry]
    rounds = [e for e in trainer.state.log_history if "round" in e]
    assert [e["train/global_step"] for e in logged] == [r["step"] for r in rounds] == [3, 6, 9]
    for entry, expected in zip(logged, rounds, strict=True):
        for tag, key in [("train/loss", "loss"), ("train/bytes_up", "bytes_up"), ("eval/loss", "eval_loss")]:
            assert entry[tag] == pytest.approx(expected[key], rel=1e-6), tag


class FirstRounds(FederatedCallback):
    """Per train() call: the global model each run starts from, and the rounds it ran."""

    def __init__(self):
        self.starts, self.rounds, self.steps = [], [], []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.rounds.append([])
        self.steps.append((state.max_steps, args.server_learning_rate))

    def on_round_begin(self, args, state, control, round=None, model=None, **kwargs):
        if round == 1:
            self.starts.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        self.rounds[-1].append(round)


def searchable(make_config, record, **config):
    return FederatedTrainer(
        model_init=lambda: tiny_bert(dropout=0.0), args=make_config(eval_strategy="epoch", **config),
        client_datasets=CLIENTS, eval_dataset=toy_dataset(16, seed=9), callbacks=[record],
    )  # fmt: skip


def federated_space(trial):
    return {
        "learning_rate": trial.suggest_float("learning_rate", 1e-4, 1e-2, log=True),
        "num_rounds": trial.suggest_int("num_rounds", 1, 3),
        "local_steps": trial.suggest_int("local_steps", 1, 3),
        "server_learning_rate": trial.suggest_float("server_learning_rate", 0.5, 1.0),
    }


def search(trainer, tmp_path, **kwargs) -> tuple:
    """Run trainer.hyperparameter_search with optuna; (its best run, the study's trials)."""
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    best = trainer.hyperparameter_search(backend="optuna", storage=storage, study_name="fed", **kwargs)
    return best, optuna.load_study(study_name="fed", storage=storage).trials


def test_hyperparameter_search_trials_start_from_a_fresh_global_model_with_their_fields(make_config, tmp_path):
    record = FirstRounds()
    trainer = searchable(make_config, record, server_optimizer="fedavgm")
    best, study = search(trainer, tmp_path, hp_space=federated_space, n_trials=3, direction="minimize",
                         sampler=optuna.samplers.RandomSampler(seed=0))  # fmt: skip
    fresh = tiny_bert(dropout=0.0).state_dict()
    for start in record.starts:  # every trial began from model_init's model, not the last trial's
        for name, value in fresh.items():
            torch.testing.assert_close(start[name], value, rtol=0, atol=0)
    trials = [t for t in study if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(trials) == 3 and len(record.rounds) == 3
    for trial, rounds, steps in zip(trials, record.rounds, record.steps):
        params = trial.params
        assert rounds == list(range(1, params["num_rounds"] + 1))
        assert steps == (params["num_rounds"] * params["local_steps"], params["server_learning_rate"])
        # the objective is the eval loss of the last evaluated round, reported after every round
        assert len(trial.intermediate_values) == trial.params["num_rounds"]
        assert trial.value == pytest.approx(trial.intermediate_values[max(trial.intermediate_values)])
    assert best.objective == min(t.value for t in trials)


class PruneTheFirstTrial(optuna.pruners.BasePruner):
    def prune(self, study, trial):
        return trial.number == 0


def test_a_trial_can_be_pruned_after_an_evaluated_round(make_config, tmp_path):
    record = FirstRounds()
    trainer = searchable(make_config, record)
    space = lambda trial: {"num_rounds": trial.suggest_int("num_rounds", 3, 3)}  # noqa: E731
    _, study = search(trainer, tmp_path, hp_space=space, n_trials=2, pruner=PruneTheFirstTrial())
    assert [t.state for t in study] == [optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.COMPLETE]
    assert record.rounds == [[1], [1, 2, 3]]  # pruned after its first evaluated round


def test_a_trial_may_not_change_the_clients(make_config):
    trainer = searchable(make_config, FirstRounds())
    with pytest.raises(ValueError, match=r"may not change \['num_clients'\]"):
        trainer.hyperparameter_search(hp_space=lambda trial: {"num_clients": 2}, backend="optuna", n_trials=1)
