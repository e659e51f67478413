"""Fed-SB: B and A the same everywhere and frozen, from the clients' first gradients (LoRA-SB, the default) or the
pretrained weight's SVD (LoRA-XS); only R (r x r) trains and travels, and the merged model is W0 + s B R A.
(Exactness against the clients' merged models, resume, bytes, the Flower round trip and two ranks, all with the
LoRA-SB initialisation, are in the contract matrix, tests/test_contract.py.)"""

import pytest
import torch
from conftest import tiny_bert, toy_dataset
from peft import LoraConfig
from supernodes import served_like_simulated
from transformers import default_data_collator

from fed_trainer import FederatedCallback, FederatedTrainer
from fed_trainer.flower.remote import record_tensors
from fed_trainer.round import ClientPlan, remote_update
from fed_trainer.strategies.lora import ADAPTER

CLIENTS = [toy_dataset(n, seed) for seed, n in enumerate([8, 16, 24], start=1)]
LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")


def test_only_r_trains_and_travels_and_the_merged_weight_is_w0_plus_s_b_r_a(make_config):
    base = tiny_bert(dropout=0.0).state_dict()
    trainer = FederatedTrainer(model=tiny_bert(dropout=0.0), client_datasets=CLIENTS, peft_config=LORA,
                               args=make_config(strategy="fed_sb", learning_rate=2e-2,
                                                strategy_kwargs={"init": "lora_xs"}))  # fmt: skip
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


class RoundOneStart(FederatedCallback):
    """Each layer's s B R A, B and A as round 1 starts (after round 0 built them)."""

    def __init__(self, layers) -> None:
        self.layers, self.start = layers, {}

    def on_round_begin(self, args, state, control, round=None, **kwargs):
        if round == 1:
            for name, layer in self.layers.items():
                down = layer.lora_A[ADAPTER]
                b, r, a = (t.detach().clone() for t in (layer.lora_B[ADAPTER].weight, down.R, down.A))
                self.start[name] = (layer.scaling[ADAPTER] * b @ r @ a, b, a)


def mean_gradients(dataset, names) -> dict:
    """The mean gradient of the pretrained tiny BERT's loss over all of `dataset` with respect to the weights
    `names`, computed here in one batch."""
    model = tiny_bert(dropout=0.0)
    batch = default_data_collator([dataset[i] for i in range(len(dataset))])
    params = dict(model.named_parameters())
    model(**batch).loss.backward()
    return {name: params[name].grad for name in names}


def test_lora_sb_starts_round_1_from_the_best_rank_r_approximation_of_the_first_adam_step(make_config):
    """Round 0: every client sends its mean gradient of each targeted weight over its examples (all of them here);
    with G = sum_k p_k G_k, round 1 starts from W0 + the rank-4 truncated SVD of -lr/10 sign(G) (lr/10 the default
    first step), with orthonormal B and A, which training leaves as they are."""
    trainer = FederatedTrainer(model=tiny_bert(dropout=0.0), client_datasets=CLIENTS, peft_config=LORA,
                               args=make_config(strategy="fed_sb", learning_rate=2e-2, seed=0,
                                                strategy_kwargs={"init_examples": 24}))  # fmt: skip
    layers = trainer.strategy.layers
    start = RoundOneStart(layers)
    trainer.add_callback(start)
    trainer.train()
    names = {name: name.removeprefix("base_model.model.") + ".weight" for name in layers}
    sizes = [len(ds) for ds in CLIENTS]
    grads = [mean_gradients(ds, names.values()) for ds in CLIENTS]
    for name, weight in names.items():
        g = sum(n * grad[weight] for n, grad in zip(sizes, grads)) / sum(sizes)
        u, s, vh = torch.linalg.svd(-2e-3 * torch.sign(g))  # init_learning_rate by default: a tenth of the rate
        delta, b, a = start.start[name]
        torch.testing.assert_close(delta, (u[:, :4] * s[:4]) @ vh[:4], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(b.T @ b, torch.eye(4), rtol=0, atol=1e-5)
        torch.testing.assert_close(a @ a.T, torch.eye(4), rtol=0, atol=1e-5)
        layer = layers[name]
        assert torch.equal(layer.lora_B[ADAPTER].weight, b) and torch.equal(layer.lora_A[ADAPTER].A, a)
    rounds = [e for e in trainer.state.log_history if "round" in e]
    assert [e["round"] for e in rounds] == [0, 1, 2]
    dense = len(layers) * 32 * 32 * 4  # round 0: each client's float32 gradient of every targeted weight
    bases = len(layers) * (32 * 4 + 4 * 32) * 4  # B and A, in each client's first message after round 0
    r_and_heads = rounds[2]["bytes_down"] // 3
    assert [(e["bytes_up"], e["bytes_down"]) for e in rounds] == [
        (3 * dense, 0),
        (3 * r_and_heads, 3 * (r_and_heads + bases)),
        (3 * r_and_heads, 3 * r_and_heads),
    ]
    assert trainer.state.log_history[-1]["train_loss"] == pytest.approx((rounds[1]["loss"] + rounds[2]["loss"]) / 2)


def test_round_0_is_logged_but_neither_evaluated_nor_saved(make_config, tmp_path):
    """Every round is evaluated and saved, but round 0 (gradients, no training) only counted and logged."""
    args = make_config(strategy="fed_sb", eval_every_rounds=1, save_every_rounds=1, save_strategy="steps")
    trainer = FederatedTrainer(model=tiny_bert(dropout=0.0), client_datasets=CLIENTS, peft_config=LORA, args=args,
                               eval_dataset=CLIENTS[0], data_collator=default_data_collator)  # fmt: skip
    trainer.train()
    rounds = [e for e in trainer.state.log_history if "round" in e]
    assert [(e["round"], "eval_loss" in e) for e in rounds] == [(0, False), (1, True), (2, True)]
    assert rounds[0]["total_bytes_up"] == rounds[0]["bytes_up"] > 0
    assert sorted(p.name for p in (tmp_path / "out").glob("round-*")) == ["round-1", "round-2"]


def test_a_compressed_uplink_compresses_round_0s_gradients_without_keeping_residuals(make_config):
    """int8 with error feedback: round 0's gradients travel at 1 byte a value plus a float32 scale per 64 values and
    the int64 shape; no residual is kept for them (no later payload continues them); round 1's R payloads keep
    theirs."""
    config = make_config(strategy="fed_sb", learning_rate=2e-2, num_rounds=1, update_compression="int8",
                         compression_error_feedback=True)  # fmt: skip
    trainer = FederatedTrainer(model=tiny_bert(dropout=0.0), client_datasets=CLIENTS, peft_config=LORA, args=config)
    trainer.train()
    round_0 = next(e for e in trainer.state.log_history if e.get("round") == 0)
    per_weight = 32 * 32 + 4 * (32 * 32 // 64) + 8 * 2
    assert round_0["bytes_up"] == 3 * len(trainer.strategy.layers) * per_weight
    residuals = trainer.strategy.compressor.residuals
    assert sorted(residuals) == [0, 1, 2]
    assert all(name.endswith(".R") or "classifier" in name for r in residuals.values() for name in r)


def test_a_client_machine_that_lost_the_bases_is_dropped_and_sent_them_again(make_config, tmp_path):
    """On its own machine a client takes B and A from the message or from what the machine kept; with neither
    it fails (the round drops it), and the server, which has not heard back, sends them in its next message."""
    config = dict(strategy="fed_sb", learning_rate=2e-2, num_rounds=3)
    trainer = FederatedTrainer(model=tiny_bert(dropout=0.0), client_datasets=CLIENTS, peft_config=LORA,
                               args=make_config(**config))  # fmt: skip
    trainer.train()
    strategy = trainer.strategy
    strategy.begin_round(4)
    message = strategy.server_message(0)
    assert not any(key.endswith(".basis_A") for key in message)  # client 0 answered in round 3: it holds them
    node = FederatedTrainer(model=tiny_bert(dropout=0.0), client_datasets=CLIENTS, peft_config=LORA,
                            args=make_config(**config, output_dir=str(tmp_path / "node")))  # fmt: skip
    plan = ClientPlan(seed=1, offset=9, schedule_steps=12)
    with pytest.raises(RuntimeError, match="does not hold Fed-SB's B and A"):
        remote_update(node, 4, 0, message, plan, kept={})
    again = strategy.server_message(0)  # no update from client 0 since: B and A go with its next message
    assert sum(key.endswith((".basis_A", ".basis_B")) for key in again) == 2 * len(strategy.layers)
    _, _, kept = remote_update(node, 4, 0, again, plan, kept={})
    assert sorted(kept) == sorted(key for key in again if key.endswith((".basis_A", ".basis_B")))


def test_supernodes_built_afresh_for_every_message_end_where_the_simulation_ends(make_config, tmp_path):
    """Round 0 and three rounds of 2 of the 3 clients through the records a Flower server sends, each answered by a
    trainer built afresh on the node (as a SuperNode does): round 0's order to send gradients, B and A reaching each
    node in its first message after it and kept in the node's file. The served run ends with the simulation's model
    and bytes. A round that sends B and A to some clients only sends two records, one to the clients of each kind
    (clients sent equal messages share one: `train_contents`)."""
    config = dict(strategy="fed_sb", learning_rate=2e-2, num_rounds=3, clients_per_round=2)

    def build(context=None, client_datasets=CLIENTS):
        return FederatedTrainer(model=tiny_bert(dropout=0.0), client_datasets=client_datasets, peft_config=LORA,
                                args=make_config(**config))  # fmt: skip

    logged, nodes = served_like_simulated(build, CLIENTS, tmp_path / "nodes")
    sent = nodes.sent
    assert [entry[0] for entry in logged] == [0, 1, 2, 3]
    kinds = []  # per round: which sampled clients were sent B and A, and the number of distinct records
    for contents in sent:
        bases = {cid: any(k.endswith(".basis_A") for k in record_tensors(c["arrays"])) for cid, c in contents.items()}
        records = len({id(c["arrays"]) for c in contents.values()})
        kinds.append((sorted(cid for cid, carries in bases.items() if carries), records))
    assert kinds[0] == ([], 1) and kinds[1] == ([*sorted(sent[1])], 1)  # round 0: nothing; round 1: B and A to all
    assert any(0 < len(carried) < 2 for carried, _ in kinds[2:])  # a round of both kinds (here 2: client 0's first)
    for carried, records in kinds[2:]:
        assert records == (2 if 0 < len(carried) < 2 else 1)


def test_lora_sb_refuses_client_level_dp(make_config):
    with pytest.raises(ValueError, match="raw gradients.*'init': 'lora_xs'"):
        FederatedTrainer(model=tiny_bert(), client_datasets=CLIENTS, peft_config=LORA,
                         args=make_config(strategy="fed_sb", update_clip_norm=1.0, dp_noise_multiplier=1.0,
                                          client_weighting="uniform"))  # fmt: skip
