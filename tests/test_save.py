"""The global model leaves as a plain transformers model, with a model card that states the federation."""

import torch
from conftest import tiny_bert, toy_dataset
from transformers import AutoModelForSequenceClassification

from fed_trainer import FederatedTrainer


def test_save_model_gives_a_plain_model_equal_to_the_global_one(make_config, tmp_path):
    trainer = FederatedTrainer(
        model=tiny_bert(),
        args=make_config(save_every_rounds=1),
        train_dataset=toy_dataset(30),
        eval_dataset=toy_dataset(10),
    )
    trainer.train()
    out = tmp_path / "final"
    trainer.save_model(str(out))
    loaded = AutoModelForSequenceClassification.from_pretrained(str(out))
    merged = trainer.merged_model()
    assert type(loaded) is type(merged)
    for name, value in merged.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    for round_number in (1, 2):
        assert (tmp_path / "out" / f"round-{round_number}" / "model.safetensors").exists()


def test_model_card_states_strategy_rounds_clients_partition_and_metrics(make_config):
    trainer = FederatedTrainer(
        model=tiny_bert(),
        args=make_config(num_clients=3, num_rounds=2, partition="dirichlet", partition_alpha=1.0),
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
