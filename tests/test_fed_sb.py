"""Fed-SB: B and A from the pretrained weight's SVD, the same everywhere and frozen; only R (r x r) trains and
travels, and the merged model is W0 + s B R A. (Exactness against the clients' merged models, resume, bytes, the
Flower round trip and two ranks are in the contract matrix, tests/test_contract.py.)"""

import pytest
import torch
from conftest import tiny_bert, toy_dataset
from peft import LoraConfig

from fed_trainer import FederatedTrainer
from fed_trainer.strategies.lora import ADAPTER

CLIENTS = [toy_dataset(n, seed) for seed, n in enumerate([8, 16, 24], start=1)]
LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")


def test_only_r_trains_and_travels_and_the_merged_weight_is_w0_plus_s_b_r_a(make_config):
    base = tiny_bert(dropout=0.0).state_dict()
    trainer = FederatedTrainer(model=tiny_bert(dropout=0.0), client_datasets=CLIENTS, peft_config=LORA,
                               args=make_config(strategy="fed_sb", learning_rate=2e-2))  # fmt: skip
    layers = trainer.strategy.layers
    start = {name: (layer.lora_A[ADAPTER].A.detach().clone(), layer.lora_B[ADAPTER].weight.detach().clone())
             for name, layer in layers.items()}  # fmt: skip
    for name, (a, b) in start.items():  # the rank-4 truncated SVD of the pretrained weight: B = U_r S_r, A = V_r^T
        w0 = base[name.removeprefix("base_model.model.") + ".weight"]
        u, s, vh = torch.linalg.svd(w0, full_matrices=False)
        torch.testing.assert_close(b @ a, (u[:, :4] * s[:4]) @ vh[:4], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a @ a.T, torch.eye(4), rtol=0, atol=1e-5)
    trainer.train()
    rounds = [e for e in trainer.state.log_history if "round" in e]
    heads = sum(p.numel() for n, p in trainer.model.named_parameters() if p.requires_grad and "lora_" not in n)
    assert [e["bytes_up"] for e in rounds] == [3 * 4 * (len(layers) * 4 * 4 + heads)] * 2
    merged = trainer.merged_model().state_dict()
    for name, layer in layers.items():
        a, b = start[name]
        assert torch.equal(layer.lora_A[ADAPTER].A, a) and torch.equal(layer.lora_B[ADAPTER].weight, b)
        r = layer.lora_A[ADAPTER].R.detach()
        assert r.abs().max() > 1e-4  # R trained
        key = name.removeprefix("base_model.model.") + ".weight"
        torch.testing.assert_close(merged[key], base[key] + 2.0 * b @ r @ a, rtol=1e-5, atol=1e-6)


def test_fed_sb_refuses_clients_of_other_ranks(make_config):
    with pytest.raises(ValueError, match="clients of different LoRA ranks"):
        FederatedTrainer(model=tiny_bert(), client_datasets=CLIENTS, peft_config=LORA, client_peft_configs=[2, 4, 4],
                         args=make_config(strategy="fed_sb"))  # fmt: skip
