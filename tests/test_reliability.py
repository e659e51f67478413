"""Surviving crashes, failing clients, poisoned updates and bad input."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_bert, toy_dataset
from datasets import Dataset
from peft import LoraConfig
from transformers import GPT2Config, GPT2ForSequenceClassification, TrainerCallback

from fed_trainer import FederatedCallback, FederatedConfig, FederatedTrainer
from fed_trainer.checkpoint import STATE_FILE

WORKER = Path(__file__).with_name("federated_run.py")
CLIENTS = [toy_dataset(8, 1), toy_dataset(16, 2), toy_dataset(24, 3)]


def worker(strategy, output_dir, *flags):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ranks = ["--ranks", "2,4,8"] if strategy == "flexlora" else []  # mixed ranks: adapters resized per client
    command = [sys.executable, str(WORKER), "--strategy", strategy, "--output_dir", str(output_dir), *ranks, *flags]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("strategy", ["fedavg", "flexlora"])
def test_a_run_killed_mid_round_resumes_to_the_same_global_model(tmp_path, strategy):
    killed = worker(strategy, tmp_path / "run", "--kill_in_round", "3")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "run").glob("round-*")) == ["round-1", "round-2"]
    resumed = worker(strategy, tmp_path / "run", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = worker(strategy, tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    got, expected = (torch.load(tmp_path / d / "final.pt") for d in ("run", "straight"))
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)
    logs = [json.loads((tmp_path / d / "rounds.json").read_text()) for d in ("run", "straight")]
    assert [e["round"] for e in logs[0]] == [1, 2, 3, 4]
    assert [e["loss"] for e in logs[0]] == pytest.approx([e["loss"] for e in logs[1]], abs=1e-6)
    # save_total_limit=2 keeps the newest two
    assert sorted(p.name for p in (tmp_path / "run").glob("round-*")) == ["round-3", "round-4"]


class Recorder(FederatedCallback):
    """Client weights, client end states and global states by round; optionally poisons one client with NaN."""

    def __init__(self, poison_round=None, poison_client=None):
        self.poison_round, self.poison_client = poison_round, poison_client
        self.weights, self.ends, self.globals = {}, {}, {}

    def on_round_begin(self, args, state, control, round=None, client_weights=None, **kwargs):
        self.round = round
        self.weights[round], self.ends[round] = client_weights, {}

    def on_client_begin(self, args, state, control, client_id=None, model=None, **kwargs):
        if (self.round, client_id) == (self.poison_round, self.poison_client):
            next(p for p in model.parameters() if p.requires_grad).data.fill_(float("nan"))

    def on_client_end(self, args, state, control, client_id=None, model=None, **kwargs):
        self.ends[self.round][client_id] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def on_round_end(self, args, state, control, model=None, **kwargs):
        self.globals[self.round] = {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_global_is_the_mean_of(recorder, round_number, kept):
    weights = recorder.weights[round_number]
    mass = sum(weights[c] for c in kept)
    for name, value in recorder.globals[round_number].items():
        if value.is_floating_point():
            expected = sum(weights[c] * recorder.ends[round_number][c][name] for c in kept) / mass
            torch.testing.assert_close(value, expected, rtol=0, atol=1e-6, msg=name)


def rounds(trainer):
    return [e for e in trainer.state.log_history if "round" in e]


class RunsOutOfMemory(TrainerCallback):
    """A client trainer whose first step runs out of GPU memory (raised as torch raises it)."""

    def on_step_begin(self, args, state, control, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


@pytest.mark.parametrize("state_on_gpu", [True, False])
def test_a_client_out_of_gpu_memory_beside_the_server_state_is_dropped_naming_where_to_put_the_state(
    make_config, caplog, state_on_gpu
):
    trainer = FederatedTrainer(model=tiny_bert(), args=make_config(num_clients=1, num_rounds=1),
                               client_datasets=CLIENTS[:1], client_callbacks=[RunsOutOfMemory()])  # fmt: skip
    if state_on_gpu:  # where server_state_device="auto" puts it when the weights and optimizer fit (no GPU here:
        trainer.strategy.state_device = torch.device("cuda", 0)  # the client fails before the state is touched)
    with caplog.at_level("WARNING"), pytest.raises(RuntimeError, match="only 0 of 1 clients gave a usable update"):
        trainer.train()
    dropped = [r.getMessage() for r in caplog.records if "failed and is dropped" in r.getMessage()]
    assert len(dropped) == 1 and "OutOfMemoryError: CUDA out of memory" in dropped[0]
    assert ("server_state_device='cpu' keeps it in host memory" in dropped[0]) == state_on_gpu


def test_a_failing_client_is_dropped_and_the_rest_averaged_with_renormalised_weights(make_config):
    bad = Dataset.from_dict({"input_ids": [[100] * 8] * 8, "label": [0] * 8})  # token ids beyond the vocabulary
    recorder = Recorder()
    trainer = FederatedTrainer(
        model=tiny_bert(), args=make_config(), client_datasets=[CLIENTS[0], bad, CLIENTS[2]], callbacks=[recorder]
    )
    trainer.train()
    assert all(e["num_clients"] == 2 and e["num_clients_dropped"] == 1 for e in rounds(trainer))
    for round_number in (1, 2):
        assert set(recorder.ends[round_number]) == {0, 2}
        assert_global_is_the_mean_of(recorder, round_number, kept=[0, 2])
    # the round each client's machine starts its next one from (Flower's KeptRounds): none for the failed client
    assert trainer.round_progress.client_rounds == {0: 2, 2: 2}


@pytest.mark.parametrize("strategy", ["fedavg", "fedex_lora"])
def test_an_update_with_nan_is_rejected_before_it_touches_the_aggregate(make_config, strategy):
    recorder = Recorder(poison_round=2, poison_client=1)
    lora = strategy != "fedavg"
    trainer = FederatedTrainer(
        model=tiny_bert(dropout=0.0), args=make_config(strategy=strategy), client_datasets=CLIENTS,
        peft_config=LoraConfig(r=2, lora_alpha=4, target_modules=["query"], task_type="SEQ_CLS") if lora else None,
        callbacks=[recorder],
    )  # fmt: skip
    trainer.train()
    assert [e.get("num_clients_dropped", 0) for e in rounds(trainer)] == [0, 1]
    # a rejected update reached the server: its machine moved on to the state it trained, as the simulation's did
    assert trainer.round_progress.client_rounds == {0: 2, 1: 2, 2: 2}
    assert all(torch.isfinite(v).all() for v in recorder.globals[2].values() if v.is_floating_point())
    if not lora:  # fedex folds its residual into the base: the live state is not a plain average
        assert_global_is_the_mean_of(recorder, 2, kept=[0, 2])


@pytest.mark.parametrize("strategy", ["fedavg", "flexlora"])
def test_too_few_clients_stop_the_run_after_checkpointing_the_last_global_model(make_config, tmp_path, strategy):
    recorder = Recorder(poison_round=2, poison_client=1)
    lora = strategy != "fedavg"
    trainer = FederatedTrainer(
        model=tiny_bert(dropout=0.0), args=make_config(strategy=strategy, min_clients_per_round=3),
        client_datasets=CLIENTS, callbacks=[recorder],
        peft_config=LoraConfig(r=2, lora_alpha=4, target_modules=["query"], task_type="SEQ_CLS") if lora else None,
        client_peft_configs=[2, 2, 4] if lora else None,
    )  # fmt: skip
    with pytest.raises(RuntimeError, match=r"only 2 of 3 clients .* fewer than min_clients_per_round=3"):
        trainer.train()
    saved = torch.load(tmp_path / "out" / "round-1" / STATE_FILE, weights_only=False)
    assert saved["round"] == 1 and 2 not in recorder.globals
    for name, value in recorder.globals[1].items():
        assert torch.equal(saved["model"][name], value), name
        assert torch.equal(trainer.model.state_dict()[name], value), name  # the live model is put back too


def test_a_crash_while_writing_a_checkpoint_leaves_the_previous_one(make_config, tmp_path, monkeypatch):
    trainer = FederatedTrainer(model=tiny_bert(), args=make_config(save_every_rounds=1), client_datasets=CLIENTS)
    real_save, calls = torch.save, []

    def failing_save(obj, path, *args, **kwargs):
        if str(path).endswith(STATE_FILE):
            calls.append(path)
            if len(calls) == 2:  # the second round's checkpoint
                raise OSError("disk full")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr("fed_trainer.checkpoint.torch.save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        trainer.train()
    out = tmp_path / "out"
    assert (out / "round-1" / STATE_FILE).exists() and not (out / "round-2").exists()
    monkeypatch.setattr("fed_trainer.checkpoint.torch.save", real_save)
    resumed = FederatedTrainer(model=tiny_bert(), args=make_config(save_every_rounds=1), client_datasets=CLIENTS)
    resumed.train(resume_from_checkpoint=True)
    assert [e["round"] for e in rounds(resumed)] == [1, 2]


def checkpointed_run(make_config, **config):
    FederatedTrainer(
        model=tiny_bert(), args=make_config(save_every_rounds=1, **config), client_datasets=CLIENTS
    ).train()


def test_resume_refuses_a_checkpoint_of_another_strategy_or_model(make_config, tmp_path):
    checkpointed_run(make_config, num_rounds=1)
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["query"], task_type="SEQ_CLS")
    other_strategy = FederatedTrainer(
        model=tiny_bert(), args=make_config(strategy="ffa_lora", num_rounds=2), client_datasets=CLIENTS,
        peft_config=lora,
    )  # fmt: skip
    with pytest.raises(ValueError, match="written by a run with strategy 'fedavg', but this run uses 'ffa_lora'"):
        other_strategy.train(resume_from_checkpoint=True)
    gpt2 = GPT2ForSequenceClassification(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, num_labels=2))
    gpt2.config.pad_token_id = 0
    other_model = FederatedTrainer(model=gpt2, args=make_config(num_rounds=2), client_datasets=CLIENTS)
    with pytest.raises(ValueError, match="holds a BertForSequenceClassification whose weights do not match"):
        other_model.train(resume_from_checkpoint=True)
    with pytest.raises(ValueError, match="is not a round checkpoint"):
        other_model.train(resume_from_checkpoint=str(tmp_path))


def test_resume_with_nothing_to_resume_from_says_how_to_get_a_checkpoint(make_config):
    trainer = FederatedTrainer(model=tiny_bert(), args=make_config(), client_datasets=CLIENTS)
    with pytest.raises(ValueError, match="set save_every_rounds"):
        trainer.train(resume_from_checkpoint=True)


def test_an_unknown_strategy_name_suggests_the_closest(tmp_path):
    with pytest.raises(ValueError, match="Unknown strategy 'flex_lora'. Did you mean 'flexlora'?"):
        FederatedConfig(output_dir=str(tmp_path), strategy="flex_lora")


def test_a_rank_larger_than_a_layer_allows_is_refused_and_the_model_left_as_it_was(make_config):
    model = tiny_bert()  # hidden size 32
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="LoRA rank 64 is larger than layer .* allows"):
        FederatedTrainer(
            model=model, args=make_config(strategy="fedit"), client_datasets=CLIENTS,
            peft_config=LoraConfig(r=64, lora_alpha=8, target_modules=["query"], task_type="SEQ_CLS"),
        )  # fmt: skip
    assert not any("lora" in name for name, _ in model.named_modules())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_min_clients_per_round_must_fit_a_round(tmp_path):
    with pytest.raises(ValueError, match="min_clients_per_round=4 must be between 1 and the clients of a round"):
        FederatedConfig(output_dir=str(tmp_path), num_clients=5, clients_per_round=3, min_clients_per_round=4)


def test_target_modules_that_match_nothing_are_refused_and_the_model_left_as_it_was(make_config):
    model = tiny_bert()
    with pytest.raises(ValueError, match=r"matched no layer of the model; its linear layers end in \['classifier',"):
        FederatedTrainer(
            model=model, args=make_config(strategy="fedit"), client_datasets=CLIENTS,
            peft_config=LoraConfig(r=2, lora_alpha=4, target_modules=["attention_proj"], task_type="SEQ_CLS"),
        )  # fmt: skip
    assert not any("lora" in name for name, _ in model.named_modules())
