import pytest
import yaml
from transformers import HfArgumentParser

from fed_trainer import FederatedConfig

ZERO2 = {"zero_optimization": {"stage": 2}}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(num_clients=0), "num_clients must be at least 1"),
        (dict(num_clients=4, clients_per_round=5), "clients_per_round=5 must be between 1 and num_clients=4"),
        (dict(num_rounds=0), "num_rounds must be at least 1"),
        (dict(local_steps=5, local_epochs=1.0), "either local_steps or local_epochs"),
        (dict(local_steps=0), "local_steps must be at least 1"),
        (dict(partition="random"), "partition must be one of"),
        (dict(partition="column:"), "needs a column name"),
        (dict(partition_alpha=0.0), "partition_alpha must be positive"),
        (dict(client_weighting="size"), "client_weighting must be one of"),
        (dict(strategy="fedprox"), "Unknown strategy 'fedprox'"),
        (dict(eval_every_rounds=-1), "must be >= 0"),
        (dict(optim="galore_adamw_layerwise", optim_target_modules=["attention"]), "Use optim='galore_adamw'"),
        (
            dict(
                optim="galore_adamw", optim_target_modules=["attention"], deepspeed={"zero_optimization": {"stage": 2}}
            ),
            "GaLore does not work under DeepSpeed ZeRO",
        ),
        (dict(fsdp=True, use_cpu=True), "does not support FSDP"),
        (dict(deepspeed={**ZERO2, "scheduler": {"type": "WarmupLR"}}), "restart the learning-rate schedule"),
    ],
)
def test_invalid_config_raises_a_message_that_names_the_fix(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        FederatedConfig(output_dir=str(tmp_path), **overrides)


def test_defaults(tmp_path, caplog):
    config = FederatedConfig(output_dir=str(tmp_path))
    # a plain script's run: TrainingArguments' 3 epochs spread over the 10 rounds, said in a warning
    assert config.local_steps is None and config.local_epochs == pytest.approx(0.3)
    assert "num_train_epochs=3 is spread over num_rounds=10 rounds" in caplog.text
    assert config.strategy == "fedavg" and config.client_weighting == "num_examples"
    assert FederatedConfig(output_dir=str(tmp_path), local_epochs=2.0).local_steps is None


def test_loads_from_yaml_and_command_line(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            dict(
                output_dir=str(tmp_path),
                num_clients=8,
                clients_per_round=4,
                partition="dirichlet",
                partition_alpha=0.1,
            )
        )
    )
    (config,) = HfArgumentParser(FederatedConfig).parse_yaml_file(str(recipe))
    assert (config.num_clients, config.clients_per_round, config.partition, config.partition_alpha) == (
        8,
        4,
        "dirichlet",
        0.1,
    )
    (config,) = HfArgumentParser(FederatedConfig).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--num_rounds", "3", "--client_weighting", "uniform", "--local_epochs", "1"]
    )
    assert (config.num_rounds, config.client_weighting, config.local_epochs, config.local_steps) == (
        3,
        "uniform",
        1.0,
        None,
    )
