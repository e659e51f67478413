"""FedProx (`proximal_mu`): the client's loss gains mu/2 ||w - w_start||^2 over its trainable weights.

The gradient is checked against autograd of that formula written out here (with gradient accumulation, the term
counted once per optimizer step); runs show the term holding clients near the global model, also for a client
trainer subclass and a LoRA strategy.
"""

import pytest
import torch
from conftest import tiny_bert, toy_dataset
from peft import LoraConfig
from transformers import Trainer, default_data_collator

from fed_trainer import FederatedCallback, FederatedTrainer

CLIENTS = [toy_dataset(n, seed) for seed, n in enumerate([8, 16, 24], start=1)]
MU = 3.0


@pytest.mark.parametrize(
    ("accumulation", "counted"),
    [(1, False), (2, False), (2, True)],
    ids=["one-step", "accumulating", "accumulating-token-counted"],
)
def test_the_gradient_is_autograd_of_the_written_out_proximal_loss(make_config, accumulation, counted):
    """Trainer divides a loss by the accumulation steps unless it was normalised over the whole accumulated batch
    (num_items_in_batch given to a model that takes it, as causal LMs do); the term follows the loss, so that one
    optimizer step sees it once: whole in the first case, 1/steps of it per micro-batch in the second."""
    args = make_config(proximal_mu=MU, gradient_accumulation_steps=accumulation)
    inner = FederatedTrainer(model=tiny_bert(dropout=0.0), args=args, client_datasets=CLIENTS).client_runner.trainer
    model = inner.model
    model.train()
    inner.take_anchor()
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    with torch.no_grad():  # move away from the anchor, so that the term is not zero
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    inputs = default_data_collator([dict(row) for row in toy_dataset(4, seed=9)])
    items = {"num_items_in_batch": torch.tensor(8)} if counted else {}
    inner.current_gradient_accumulation_steps = accumulation
    model.zero_grad()
    inner.compute_loss(model, inputs, **items).backward()
    got = {name: p.grad.clone() for name, p in model.named_parameters()}

    model.zero_grad()
    share = 1 / accumulation if counted else 1.0
    proximal = MU / 2 * share * sum(((p - start[n]) ** 2).sum() for n, p in model.named_parameters())
    (model(**inputs).loss + proximal).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)
    assert max((MU * share * (p - start[n])).abs().max() for n, p in model.named_parameters()) > 0.05  # it counts


class Drift(FederatedCallback):
    """Each client's distance from the model it started from, at the end of its training."""

    def __init__(self):
        self.distances = []

    def on_client_begin(self, args, state, control, model=None, **kwargs):
        self.start = [p.detach().clone() for p in model.parameters() if p.requires_grad]

    def on_client_end(self, args, state, control, model=None, **kwargs):
        now = [p.detach() for p in model.parameters() if p.requires_grad]
        self.distances.append(sum(((a - b) ** 2).sum() for a, b in zip(now, self.start, strict=True)).sqrt().item())


class PlainSubclass(Trainer):
    """A user's client trainer: its own compute_loss (the model's loss, doubled)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        return (2 * outputs.loss, outputs) if return_outputs else 2 * outputs.loss


@pytest.mark.parametrize(
    "setting",
    [dict(), dict(client_trainer_cls=PlainSubclass), dict(strategy="fedit")],
    ids=["fedavg", "subclass", "fedit"],
)
def test_the_proximal_term_holds_clients_near_the_global_model(make_config, setting):
    setting = dict(setting)
    strategy = setting.pop("strategy", "fedavg")
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["query"], task_type="SEQ_CLS")
    lora = None if strategy == "fedavg" else lora
    drift = {}
    for mu in (0.0, 50.0):
        recorder = Drift()
        trainer = FederatedTrainer(
            model=tiny_bert(dropout=0.0),
            args=make_config(strategy=strategy, proximal_mu=mu, learning_rate=5e-2 if lora else 1e-2, local_steps=6),
            client_datasets=CLIENTS, peft_config=lora, callbacks=[recorder], **setting,
        )  # fmt: skip
        trainer.train()
        drift[mu] = sum(recorder.distances) / len(recorder.distances)
    assert drift[50.0] < 0.6 * drift[0.0], drift


def test_proximal_mu_is_refused_under_zero3_and_when_negative(make_config):
    with pytest.raises(ValueError, match="proximal_mu must be >= 0"):
        make_config(proximal_mu=-1.0)
    zero3 = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto"}
    with pytest.raises(ValueError, match="not supported under DeepSpeed ZeRO-3"):
        make_config(proximal_mu=0.1, deepspeed=zero3)
