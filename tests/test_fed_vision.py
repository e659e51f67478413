"""Vision: LoRA on Conv2d layers aggregated exactly, and examples/fed_vision.py on EfficientNet-Lite0 and
Fashion-MNIST in a short configuration."""

import json
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from test_lora import Probe, assert_state_close, weighted_average
from torch import nn
from transformers.modeling_outputs import ImageClassifierOutput

from fed_trainer import FederatedTrainer
from fed_trainer.assets.efficientnet_lite import EfficientNetLiteForImageClassification, efficientnet_lite0
from fed_trainer.assets.fashion_mnist import GreyImageCollator, fashion_mnist_dir, load_fashion_mnist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import fed_vision  # noqa: E402


class TinyConvNet(nn.Module):
    """A 3x3 and a 1x1 convolution and a linear head, over 1 x 6 x 6 images."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv3 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv1 = nn.Conv2d(4, 6, 1)
        self.head = nn.Linear(6, 2)

    def forward(self, pixel_values, labels=None):
        x = torch.relu(self.conv1(torch.relu(self.conv3(pixel_values)))).mean(dim=(2, 3))
        logits = self.head(x)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)


def image_dataset(n, seed):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 1, 6, 6, generator=g)
    return Dataset.from_dict({"pixel_values": images.tolist(), "labels": (images[:, 0, 0, 0] > 0).long().tolist()})


@pytest.mark.parametrize("strategy, ranks", [("fedex_lora", None), ("flora", [1, 2, 3]), ("flexlora", [2, 2, 3])])
def test_conv2d_lora_aggregates_exactly(make_config, strategy, ranks):
    probe = Probe()
    trainer = FederatedTrainer(
        model=TinyConvNet(),
        args=make_config(strategy=strategy, learning_rate=5e-2, remove_unused_columns=False),
        client_datasets=[image_dataset(8, 1), image_dataset(12, 2), image_dataset(16, 3)],
        peft_config=LoraConfig(r=2, lora_alpha=4, target_modules=["conv3", "conv1"], modules_to_save=["head"]),
        client_peft_configs=ranks,
        callbacks=[probe],
    )
    trainer.train()
    for record in probe.rounds:
        assert_state_close(record["global"], weighted_average(record))
        ends = list(record["end"].values())
        assert (ends[0]["conv3.weight"] - ends[2]["conv3.weight"]).abs().max() > 1e-4  # clients really differ
    merged = {k: v.double() for k, v in trainer.merged_model().state_dict().items()}
    assert_state_close(merged, probe.rounds[-1]["global"])


def test_fashion_mnist_loads_with_its_classes_and_a_clear_error_when_missing(tmp_path, monkeypatch):
    data = load_fashion_mnist(max_train=100, max_validation=50, seed=0)
    assert len(data["train"]) == 100 and len(data["validation"]) == 50
    assert data["train"].features["label"].names[9] == "Ankle boot"
    batch = GreyImageCollator(32)([data["train"][i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 32, 32) and batch["labels"].shape == (4,)
    assert -1.0 <= batch["pixel_values"].min() and batch["pixel_values"].max() <= 1.0
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist_dir()


def test_efficientnet_lite0_carries_imagenet_weights():
    a, b = efficientnet_lite0(num_labels=10, image_size=64), efficientnet_lite0(num_labels=3, image_size=32)
    assert torch.equal(a.efficientnet._conv_stem.weight, b.efficientnet._conv_stem.weight)
    assert a.efficientnet._conv_stem.weight.std() > 0.05  # trained filters, not a fresh init
    assert b(torch.zeros(2, 3, 32, 32)).logits.shape == (2, 3)


SHORT = [
    "--num_clients", "4", "--clients_per_round", "2", "--num_rounds", "2", "--local_steps", "8", "--warmup_steps", "0",
    "--max_train_samples", "400", "--max_eval_samples", "64", "--image_size", "32", "--disable_tqdm", "true",
]  # fmt: skip


@pytest.mark.parametrize("strategy, lr", [("fedavg", "3e-3"), ("fedex_lora", "1e-2")])
def test_fed_vision_trains_and_saves_a_loadable_model(tmp_path, strategy, lr):
    metrics = fed_vision.main([*SHORT, "--strategy", strategy, "--learning_rate", lr, "--output_dir", str(tmp_path)])
    assert metrics["eval_samples"] == 64 and metrics["eval_accuracy"] > 0.2  # 10 classes: chance is 0.1
    state = json.loads((tmp_path / "trainer_state.json").read_text())
    rounds = [e for e in state["log_history"] if "round" in e]
    assert len(rounds) == 2 and rounds[-1]["eval_loss"] < rounds[0]["eval_loss"]
    model = EfficientNetLiteForImageClassification.from_pretrained(str(tmp_path))
    assert model.config.id2label[9] == "Ankle boot" and not any("lora" in k for k in model.state_dict())
