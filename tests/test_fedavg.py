"""FedAvg over full weights, computed independently from the client models the callbacks see."""

import pytest
import torch
from conftest import tiny_bert, toy_dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from fed_trainer import FederatedCallback, FederatedTrainer


class Recorder(FederatedCallback):
    """Keeps every event in order, with copies of the client models at the end of local training."""

    def __init__(self):
        self.events = []
        self.client_states = {}
        self.global_states = []

    def on_round_begin(self, args, state, control, round=None, client_ids=None, **kwargs):
        self.events.append(("round_begin", round, tuple(client_ids)))
        self.client_states = {}

    def on_client_begin(self, args, state, control, client_id=None, model=None, num_examples=None, **kwargs):
        self.events.append(("client_begin", client_id, num_examples))
        self.start_state = {k: v.clone() for k, v in model.state_dict().items()}

    def on_client_end(self, args, state, control, client_id=None, model=None, num_examples=None, metrics=None, **kw):
        self.events.append(("client_end", client_id, num_examples))
        assert "train_loss" in metrics
        self.client_states[client_id] = (num_examples, {k: v.clone() for k, v in model.state_dict().items()})

    def on_round_end(self, args, state, control, round=None, model=None, **kwargs):
        self.events.append(("round_end", round))
        self.global_states.append(({k: v.clone() for k, v in model.state_dict().items()}, dict(self.client_states)))


def expected_average(client_states, weighting):
    total = sum(n for n, _ in client_states.values())
    weights = {
        c: (n / total if weighting == "num_examples" else 1 / len(client_states))
        for c, (n, _) in client_states.items()
    }
    names = next(iter(client_states.values()))[1]
    return {
        name: sum(weights[c] * state[name].double() for c, (_, state) in client_states.items())
        for name in names
        if names[name].is_floating_point()
    }


@pytest.mark.parametrize("weighting", ["num_examples", "uniform"])
def test_global_weights_are_the_weighted_average_of_the_client_weights(make_config, weighting):
    recorder = Recorder()
    clients = [toy_dataset(8, seed=1), toy_dataset(24, seed=2), toy_dataset(48, seed=3)]
    trainer = FederatedTrainer(
        model=tiny_bert(),
        args=make_config(client_weighting=weighting, num_rounds=2),
        client_datasets=clients,
        callbacks=[recorder],
    )
    trainer.train()
    assert len(recorder.global_states) == 2
    for global_state, client_states in recorder.global_states:
        assert len(client_states) == 3
        expected = expected_average(client_states, weighting)
        for name, value in expected.items():
            torch.testing.assert_close(global_state[name].double(), value, rtol=1e-6, atol=1e-6)
        # the clients really differ, so the average is not trivially any one of them
        a, b = client_states[0][1], client_states[2][1]
        assert any(not torch.equal(a[n], b[n]) for n in expected)
    final = trainer.merged_model().state_dict()
    for name, value in recorder.global_states[-1][0].items():
        assert torch.equal(final[name], value)


def test_events_arrive_in_order_and_every_client_starts_from_the_global_model(make_config):
    recorder = Recorder()
    starts = []

    class StartCheck(FederatedCallback):
        def on_client_begin(self, args, state, control, model=None, **kwargs):
            starts.append({k: v.clone() for k, v in model.state_dict().items()})

    trainer = FederatedTrainer(
        model=tiny_bert(),
        args=make_config(num_rounds=2),
        client_datasets={"a": toy_dataset(12, 1), "b": toy_dataset(12, 2)},
        callbacks=[recorder, StartCheck()],
    )
    initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    assert recorder.events == [
        ("round_begin", 1, ("a", "b")),
        ("client_begin", "a", 12),
        ("client_end", "a", 12),
        ("client_begin", "b", 12),
        ("client_end", "b", 12),
        ("round_end", 1),
        ("round_begin", 2, ("a", "b")),
        ("client_begin", "a", 12),
        ("client_end", "a", 12),
        ("client_begin", "b", 12),
        ("client_end", "b", 12),
        ("round_end", 2),
    ]
    for start, reference in zip(starts, [initial, initial, *[recorder.global_states[0][0]] * 2]):
        for name in reference:
            assert torch.equal(start[name], reference[name]), name


# local-training options of TrainingArguments, each doing in a client what it does in a plain Trainer run
LOCAL_OPTIONS = {
    "plain": {},
    "gradient_accumulation": dict(gradient_accumulation_steps=2),
    "bf16_autocast": dict(bf16=True),
    "gradient_checkpointing": dict(gradient_checkpointing=True),
    "neftune": dict(neftune_noise_alpha=5.0),
    # dynamo's graph capture without inductor's code generation, which takes over a minute on a CPU
    "torch_compile": dict(torch_compile=True, torch_compile_backend="aot_eager"),
}


@pytest.mark.parametrize("options", list(LOCAL_OPTIONS.values()), ids=list(LOCAL_OPTIONS))
def test_one_client_one_round_equals_a_plain_trainer(make_config, tmp_path, options):
    steps, data = 6, toy_dataset(40, seed=5)
    common = dict(
        per_device_train_batch_size=4, learning_rate=1e-3, warmup_steps=2, seed=7, report_to="none",
        use_cpu=True, disable_tqdm=True, dataloader_pin_memory=False, **options,
    )  # fmt: skip
    plain_model = tiny_bert(seed=3)
    Trainer(
        model=plain_model,
        args=TrainingArguments(output_dir=str(tmp_path / "plain"), max_steps=steps, **common),
        train_dataset=data,
    ).train()
    fed = FederatedTrainer(
        model=tiny_bert(seed=3),
        args=make_config(num_clients=1, num_rounds=1, local_steps=steps, **common),
        client_datasets=[data],
    )
    fed.train()
    fed_state = fed.merged_model().state_dict()
    for name, value in plain_model.state_dict().items():
        torch.testing.assert_close(fed_state[name], value, rtol=1e-5, atol=1e-6)
    if options.get("gradient_checkpointing"):  # the same weights with or without it: check it was on
        assert fed.model.is_gradient_checkpointing
    if options.get("torch_compile"):
        assert isinstance(fed.client_runner.trainer.model_wrapped, torch._dynamo.eval_frame.OptimizedModule)


def test_round_logs_losses_bytes_and_eval(make_config):
    trainer = FederatedTrainer(
        model=tiny_bert(),
        args=make_config(num_clients=3, num_rounds=3, eval_every_rounds=2),
        train_dataset=toy_dataset(60),
        eval_dataset=toy_dataset(20, seed=9),
    )
    output = trainer.train()
    rounds = [entry for entry in trainer.state.log_history if "round" in entry]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    # evaluated every 2 rounds and after the last one
    assert ["eval_loss" in r for r in rounds] == [False, True, True]
    params = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    per_client = 4 * params  # float32 weights; BERT has no floating-point buffers
    for r in rounds:
        assert r["bytes_up"] == r["bytes_down"] == 3 * per_client
        assert r["total_bytes_up"] == r["round"] * 3 * per_client
        assert r["num_clients"] == 3 and r["loss"] > 0
    assert output.metrics["total_bytes_up"] == 9 * per_client
    assert output.global_step == 9


def test_learning_rate_schedule_spans_the_whole_run(make_config):
    trainer = FederatedTrainer(
        model=tiny_bert(),
        args=make_config(num_rounds=3, local_steps=4, learning_rate=1e-3, lr_scheduler_type="linear"),
        train_dataset=toy_dataset(36),
    )
    trainer.train()
    lrs = [entry["learning_rate"] for entry in trainer.state.log_history if "round" in entry]
    # linear decay over 3 rounds x 4 steps = 12 steps: after round t the schedule is at step 4t
    assert lrs == pytest.approx([1e-3 * (1 - 4 / 12), 1e-3 * (1 - 8 / 12), 0.0])


def test_training_lowers_the_loss(make_config):
    trainer = FederatedTrainer(
        model=tiny_bert(dropout=0.0),
        args=make_config(
            num_clients=4,
            num_rounds=6,
            local_steps=5,
            learning_rate=3e-3,
            per_device_train_batch_size=8,
            eval_strategy="epoch",
        ),
        train_dataset=toy_dataset(320),
        eval_dataset=toy_dataset(100, seed=9),
    )
    trainer.train()
    rounds = [entry for entry in trainer.state.log_history if "round" in entry]
    assert rounds[-1]["eval_loss"] < rounds[0]["eval_loss"] - 0.05
    assert rounds[-1]["loss"] < rounds[0]["loss"]


def test_client_sampling_and_whole_run_are_deterministic(make_config):
    def run(seed):
        recorder = Recorder()
        trainer = FederatedTrainer(
            model=tiny_bert(),
            args=make_config(num_clients=6, clients_per_round=2, num_rounds=3, partition="dirichlet", seed=seed),
            train_dataset=toy_dataset(120),
            callbacks=[recorder],
        )
        trainer.train()
        sampled = [e[2] for e in recorder.events if e[0] == "round_begin"]
        return sampled, trainer.merged_model().state_dict()

    sampled_a, state_a = run(seed=1)
    sampled_b, state_b = run(seed=1)
    sampled_c, _ = run(seed=2)
    assert sampled_a == sampled_b and all(len(ids) == 2 for ids in sampled_a)
    assert sampled_a != sampled_c
    for name in state_a:
        assert torch.equal(state_a[name], state_b[name]), name


def test_bad_trainer_inputs_raise_clear_errors(make_config, tmp_path):
    data = toy_dataset(20)
    with pytest.raises(TypeError, match="needs a FederatedConfig"):
        FederatedTrainer(model=tiny_bert(), args=TrainingArguments(output_dir=str(tmp_path)), train_dataset=data)
    with pytest.raises(ValueError, match="optimizer_cls_and_kwargs"):
        model = tiny_bert()
        FederatedTrainer(
            model=model,
            args=make_config(),
            train_dataset=data,
            optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None),
        )
    with pytest.raises(ValueError, match="client_datasets, or a train_dataset"):
        FederatedTrainer(model=tiny_bert(), args=make_config())
    with pytest.raises(ValueError, match=r"Clients \['b'\] have no examples"):
        FederatedTrainer(model=tiny_bert(), args=make_config(), client_datasets={"a": data, "b": data.select([])})
    with pytest.raises(ValueError, match="clients_per_round=3 exceeds the 2 clients"):
        FederatedTrainer(model=tiny_bert(), args=make_config(clients_per_round=3), client_datasets=[data, data])


def test_local_epochs_train_each_client_over_its_own_shard(make_config):
    recorder = Recorder()
    steps = []

    class StepCounter(FederatedCallback):
        def on_client_end(self, args, state, control, optimizer=None, **kwargs):
            steps.append(next(iter(optimizer.state.values()))["step"].item())

    trainer = FederatedTrainer(
        model=tiny_bert(),
        args=make_config(local_steps=None, local_epochs=1.0, num_rounds=2, per_device_train_batch_size=4),
        client_datasets=[toy_dataset(8, 1), toy_dataset(24, 2)],
        callbacks=[recorder, StepCounter()],
    )
    output = trainer.train()
    assert steps == [2, 6, 2, 6]
    # the schedule runs over the longest client's steps per round
    assert output.global_step == 12 and trainer.state.max_steps == 12


class FrozenLossTrainer(Trainer):
    """A user's Trainer subclass with its own compute_loss: the loss times zero, so no gradient reaches a weight
    (with weight decay 0, AdamW then leaves every weight exactly where the client started, and the average of the
    clients' weights is the start up to float32 rounding)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        return (loss * 0.0, outputs) if return_outputs else loss * 0.0


class LocalSteps(TrainerCallback):
    def __init__(self):
        self.runs, self.steps = 0, 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.runs += 1

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


@pytest.mark.parametrize("client_trainer_cls", [Trainer, FrozenLossTrainer])
def test_clients_train_with_the_user_trainer_class_and_callbacks(make_config, client_trainer_cls):
    start = tiny_bert(dropout=0.0).state_dict()
    local = LocalSteps()
    trainer = FederatedTrainer(
        model=tiny_bert(dropout=0.0), args=make_config(num_rounds=2, local_steps=3, weight_decay=0.0),
        client_datasets=[toy_dataset(16, seed=s) for s in range(3)],
        client_trainer_cls=client_trainer_cls, client_callbacks=[local],
    )  # fmt: skip
    trainer.train()
    assert type(trainer.client_runner.trainer).__mro__[2] is client_trainer_cls
    assert (local.runs, local.steps) == (2 * 3, 2 * 3 * 3)  # every client's local training, every step
    moved = max((v - start[k]).abs().max().item() for k, v in trainer.model.state_dict().items())
    assert moved < 1e-6 if client_trainer_cls is FrozenLossTrainer else moved > 1e-3, moved


def test_a_client_trainer_class_must_be_a_trainer(make_config):
    with pytest.raises(TypeError, match="client_trainer_cls must be transformers.Trainer or a subclass"):
        FederatedTrainer(
            model=tiny_bert(), args=make_config(), client_datasets=[toy_dataset(8)], client_trainer_cls=object
        )
