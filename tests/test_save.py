"""The global model leaves as a plain transformers model, with a model card that states the federation."""

import copy

import pytest
import torch
from conftest import tiny_bert, toy_dataset
from peft import LoraConfig, PeftModel
from transformers import AutoModelForSequenceClassification

from fed_trainer import FederatedCallback, FederatedTrainer


class MergedClients(FederatedCallback):
    """Each client's model at the end of its local training, merged to a plain model by PEFT (no fed_trainer code):
    the clients of the last round, with their example counts."""

    def on_round_begin(self, args, state, control, **kwargs):
        self.clients = []

    def on_client_end(self, args, state, control, model=None, num_examples=None, **kwargs):
        plain = copy.deepcopy(model)
        plain = plain.merge_and_unload() if isinstance(plain, PeftModel) else plain
        self.clients.append((num_examples, plain.state_dict()))


def combined(clients) -> dict:
    """sum_k p_k W_k with p_k = n_k / sum n: the last round's global model for FedAvg and every exact LoRA method."""
    total = sum(n for n, _ in clients)
    names = clients[0][1].keys()
    return {name: sum(n / total * state[name].double() for n, state in clients).float() for name in names}


@pytest.mark.parametrize(
    "strategy, ranks",
    [("fedavg", None), ("ffa_lora", None), ("fedex_lora", None), ("flora", [2, 4, 8]), ("flexlora", [2, 4, 8])],
)
def test_the_saved_model_is_the_clients_models_combined_by_the_method(make_config, tmp_path, strategy, ranks):
    record = MergedClients()
    lora = strategy != "fedavg"
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
    trainer = FederatedTrainer(
        model=tiny_bert(dropout=0.0),
        args=make_config(save_every_rounds=1, strategy=strategy, learning_rate=2e-2 if lora else 1e-3),
        client_datasets=[toy_dataset(n, seed) for seed, n in enumerate([8, 16, 24], start=1)],
        peft_config=peft_config if lora else None,
        client_peft_configs=ranks,
        callbacks=[record],
    )  # fmt: skip
    trainer.train()
    out = tmp_path / "final"
    trainer.save_model(str(out))
    loaded = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    assert not any("lora" in name for name in loaded.state_dict())
    expected = tiny_bert(dropout=0.0).eval()
    expected.load_state_dict(combined(record.clients))
    inputs = toy_dataset(16, seed=9)["input_ids"]
    with torch.no_grad():
        logits, reference = (m(input_ids=torch.tensor(inputs)).logits for m in (loaded, expected))
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(reference, tiny_bert(dropout=0.0).eval()(input_ids=torch.tensor(inputs)).logits)
    last_round = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "out" / "round-2"))
    for name, value in loaded.state_dict().items():
        assert torch.equal(last_round.state_dict()[name], value), name


@pytest.mark.parametrize(
    "run_length, listed",  # Trainer's hyperparameter list: what a client trained over the run, not num_train_epochs=3
    [
        (dict(local_steps=3), "- training_steps: 6\n"),
        (dict(local_steps=None, local_epochs=0.5), "- num_epochs: 1.0\n"),
    ],
)
def test_model_card_states_strategy_rounds_clients_partition_and_metrics(make_config, run_length, listed):
    trainer = FederatedTrainer(
        model=tiny_bert(),
        args=make_config(
            num_clients=3,
            num_rounds=2,
            partition="dirichlet",
            partition_alpha=1.0,
            eval_strategy="epoch",
            **run_length,
        ),  # fmt: skip
        train_dataset=toy_dataset(60),
        eval_dataset=toy_dataset(10),
    )
    trainer.train()
    trainer.create_model_card(model_name="tiny-fed")
    card = trainer.args.output_dir + "/README.md"
    text = open(card, encoding="utf-8").read()
    final = [e for e in trainer.state.log_history if "round" in e][-1]
    assert "strategy: `fedavg`" in text
    assert "rounds: 2 of 2" in text
    assert "clients: 3 (3 per round)" in text
    assert "partition: `dirichlet` (alpha=1.0)" in text
    assert f"eval_loss: {final['eval_loss']:.4f}" in text
    assert listed in text and text.count("num_epochs") + text.count("training_steps") == 1
    assert trainer.args.num_train_epochs == 3.0 and trainer.args.max_steps == -1  # given back as they were


def test_every_round_checkpoint_fires_on_save_after_it_is_written(make_config, tmp_path):
    class Saves(FederatedCallback):
        def __init__(self):
            self.seen = []

        def on_save(self, args, state, control, **kwargs):
            rounds = sorted(p.name for p in (tmp_path / "out").glob("round-*"))
            self.seen.append((state.global_step, rounds))

    saves = Saves()
    trainer = FederatedTrainer(
        model=tiny_bert(), args=make_config(num_rounds=3, save_every_rounds=1), client_datasets=[toy_dataset(8)] * 2,
        callbacks=[saves],
    )  # fmt: skip
    trainer.train()
    steps = trainer.args.local_steps
    assert saves.seen == [
        (steps, ["round-1"]),
        (2 * steps, ["round-1", "round-2"]),
        (3 * steps, ["round-1", "round-2", "round-3"]),
    ]
