"""The federated LoRA family, each method's semantics computed independently of fed_trainer."""

import copy

import pytest
import torch
from conftest import tiny_bert, toy_dataset
from peft import LoraConfig, PeftModel
from transformers import (
    AutoModelForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
)

from fed_trainer import FederatedCallback, FederatedTrainer, Strategy, register_strategy
from fed_trainer.lowrank import truncated_svd_of_product
from fed_trainer.strategies.keys import parse


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32, num_labels=2, pad_token_id=0)
    return GPT2ForSequenceClassification(config)


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=32, num_labels=2, pad_token_id=0,
    )  # fmt: skip
    return LlamaForSequenceClassification(config)


MODELS = {
    "bert": (lambda: tiny_bert(dropout=0.0), ["query", "value"], False),
    "gpt2": (tiny_gpt2, ["c_attn"], True),
    "llama": (tiny_llama, ["q_proj", "v_proj"], False),
}
CLIENTS = [toy_dataset(8, 1), toy_dataset(16, 2), toy_dataset(24, 3)]


def lora_config(target_modules, fan_in_fan_out=False, r=4, **kwargs):
    return LoraConfig(
        r=r, lora_alpha=8, target_modules=target_modules, fan_in_fan_out=fan_in_fan_out, task_type="SEQ_CLS", **kwargs
    )


def effective(model: PeftModel) -> dict:
    """W_k: PEFT's own merge of a copy of the client's adapter model."""
    return {k: v.double() for k, v in copy.deepcopy(model).merge_and_unload().state_dict().items()}


class Probe(FederatedCallback):
    """Records each client's starting and final model and the global model after each round."""

    def __init__(self):
        self.rounds = []

    def on_round_begin(self, args, state, control, client_weights=None, **kwargs):
        self.rounds.append({"weights": client_weights, "start": {}, "end": {}, "raw_start": {}, "raw_end": {}})

    def on_client_begin(self, args, state, control, client_id=None, model=None, **kwargs):
        self.rounds[-1]["start"][client_id] = effective(model)
        self.rounds[-1]["raw_start"][client_id] = {k: v.clone() for k, v in model.state_dict().items()}

    def on_client_end(self, args, state, control, client_id=None, model=None, **kwargs):
        self.rounds[-1]["end"][client_id] = effective(model)
        self.rounds[-1]["raw_end"][client_id] = {k: v.clone() for k, v in model.state_dict().items()}

    def on_round_end(self, args, state, control, model=None, **kwargs):
        self.rounds[-1]["global"] = effective(model)


def weighted_average(record) -> dict:
    ends, weights = record["end"], record["weights"]
    names = next(iter(ends.values()))
    return {n: sum(weights[c] * ends[c][n] for c in ends) for n in names}


def run(make_config, strategy, model="bert", ranks=None, rounds=2, rslora=False, **config):
    build, targets, fan_in_fan_out = MODELS[model]
    probe = Probe()
    trainer = FederatedTrainer(
        model=build(),
        args=make_config(strategy=strategy, num_rounds=rounds, learning_rate=2e-2, **config),
        client_datasets=CLIENTS,
        peft_config=lora_config(targets, fan_in_fan_out, use_rslora=rslora),
        client_peft_configs=ranks,
        callbacks=[probe],
    )
    trainer.train()
    return trainer, probe


def assert_state_close(actual: dict, expected: dict, atol=1e-6):
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=atol, msg=name)


@pytest.mark.parametrize("model", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize(
    "strategy, ranks", [("fedex_lora", None), ("flora", [2, 4, 8]), ("flora", None), ("ffa_lora", None)]
)
def test_exact_strategies_give_the_weighted_average_of_client_weights(make_config, strategy, ranks, model):
    trainer, probe = run(make_config, strategy, model=model, ranks=ranks)
    for record in probe.rounds:
        assert_state_close(record["global"], weighted_average(record))
        # clients really differ, so exactness is not trivial
        ends = list(record["end"].values())
        assert max((ends[0][n] - ends[2][n]).abs().max() for n in ends[0]) > 1e-4
    merged = {k: v.double() for k, v in trainer.merged_model().state_dict().items()}
    assert_state_close(merged, probe.rounds[-1]["global"])


def test_rslora_scaling_with_heterogeneous_ranks_stays_exact(make_config):
    _, probe = run(make_config, "flora", ranks=[1, 4, 16], rslora=True)
    for record in probe.rounds:
        assert_state_close(record["global"], weighted_average(record))


def test_fedit_averages_factors_separately_and_misses_the_average_of_products(make_config):
    trainer, probe = run(make_config, "fedit")
    record = probe.rounds[-1]
    weights, raw = record["weights"], record["raw_end"]
    live = trainer.model.state_dict()
    for name in live:
        if ".lora_A." in name or ".lora_B." in name or "modules_to_save" in name:
            expected = sum(weights[c] * raw[c][name].double() for c in raw)
            torch.testing.assert_close(live[name].double(), expected, rtol=0, atol=1e-6)
    target = weighted_average(record)
    error = max((record["global"][n] - target[n]).abs().max().item() for n in target)
    assert error > 1e-5  # the product of the means is not the mean of the products
    # the head (modules_to_save) is still averaged exactly
    for n in ("classifier.weight", "classifier.bias"):
        torch.testing.assert_close(record["global"][n], target[n], rtol=0, atol=1e-6)


def test_ffa_lora_keeps_one_seeded_a_everywhere(make_config):
    trainer, probe = run(make_config, "ffa_lora", rounds=3)
    a_names = [n for n in trainer.model.state_dict() if ".lora_A." in n]
    reference = {n: trainer.model.state_dict()[n].clone() for n in a_names}
    for record in probe.rounds:
        for state in [*record["raw_start"].values(), *record["raw_end"].values()]:
            for n in a_names:
                assert torch.equal(state[n], reference[n]), n
    # A comes from the seed: the same seed gives the same A, another seed another A
    again, _ = run(make_config, "ffa_lora", rounds=1)
    other, _ = run(make_config, "ffa_lora", rounds=1, seed=99)
    assert all(torch.equal(again.model.state_dict()[n], reference[n]) for n in a_names)
    assert not any(torch.equal(other.model.state_dict()[n], reference[n]) for n in a_names)


def test_flora_folds_the_round_into_the_base_and_starts_lora_afresh(make_config):
    _, probe = run(make_config, "flora", ranks=[2, 4, 8], rounds=2)
    first, second = probe.rounds
    for cid, raw in second["raw_start"].items():
        for name, value in raw.items():
            if ".lora_B." in name:
                assert not value.any(), name  # fresh LoRA: B = 0, so the client starts from the folded base
        assert_state_close(second["start"][cid], first["global"])
    for record in probe.rounds:  # one adapter of rank 8: a client of rank r trains its first r directions
        for cid, r in enumerate([2, 4, 8]):
            for state in (record["raw_start"][cid], record["raw_end"][cid]):
                a = state[next(n for n in state if ".lora_A." in n)]
                b = state[next(n for n in state if ".lora_B." in n)]
                assert a.shape[0] == 8 and a[:r].abs().min() > 0
                assert not a[r:].any() and not b[:, r:].any()  # the padding gets no gradient: it stays zero


def test_a_flora_client_on_its_own_machine_catches_up_with_the_rounds_it_missed(make_config):
    # 4 rounds, 2 of 3 clients each: every message carries the stacks of the rounds since the client's last update,
    # and a fresh copy of the initial model plus what the client kept ends up with the round's global base.
    build, targets, _ = MODELS["bert"]
    config = dict(strategy="flora", num_rounds=4, clients_per_round=2, learning_rate=2e-2)
    trainer = FederatedTrainer(
        model=build(), args=make_config(**config), client_datasets=CLIENTS,
        peft_config=lora_config(targets), client_peft_configs=[2, 4, 8], callbacks=[probe := Probe()],
    )  # fmt: skip
    messages, server_message = [], trainer.strategy.server_message

    def recorded(cid):  # a copy, as a transport would send: the folded base is a view of the live weights
        messages.append((cid, {k: t.clone() for k, t in server_message(cid).items()}))
        return messages[-1][1]

    trainer.strategy.server_message = recorded
    trainer.train()
    node = FederatedTrainer(
        model=build(), args=make_config(**config), client_datasets=CLIENTS,
        peft_config=lora_config(targets), client_peft_configs=[2, 4, 8],
    )  # fmt: skip
    kept, since, kinds = {}, {}, []
    starts = [(record_round, cid) for record_round, record in enumerate(probe.rounds, 1) for cid in record["start"]]
    assert len(starts) == len(messages) == 8
    for (round_number, cid), (sent_to, message) in zip(starts, messages, strict=True):
        assert sent_to == cid
        rounds = sorted({parse(k).round for k in message if parse(k).round is not None})
        stacks = sum(t.numel() for k, t in message.items() if parse(k).round is not None)
        # the stacks the client has not folded, or the folded base where they would weigh more (32 x 32 layers)
        if any(parse(k).part == "base" for k in message):
            kinds.append("base")
            missed = [r for r in trainer.strategy.history if r > since.get(cid, 0)]
            assert not rounds and (since.get(cid, 0) < trainer.strategy.dropped_through or missed)
        else:
            kinds.append("stacks")
            assert rounds == list(range(since.get(cid, 0) + 1, round_number)), (round_number, cid)
            assert stacks <= 4 * 32 * 32
        since[cid] = round_number - 1
        node.strategy.begin_round(round_number)
        kept[cid] = node.strategy.catch_up(node.model, message, kept.get(cid, {}))
        bases = {n: v for n, v in probe.rounds[round_number - 1]["raw_start"][cid].items() if "base_layer" in n}
        assert bases and all(torch.equal(node.model.state_dict()[n], v) for n, v in bases.items())
    assert "base" in kinds and "stacks" in kinds, kinds
    # the server keeps no more rounds of stacks than the base weights weigh
    assert sum(t.numel() for s in trainer.strategy.history.values() for t in s.values()) <= 4 * 32 * 32
    stacked = next(m for _, m in messages if not any(parse(k).part == "base" for k in m))
    with pytest.raises(RuntimeError, match="was its machine restarted"):  # a client's machine that lost its state
        node.strategy.catch_up(node.model, stacked | {"synced_round": torch.tensor(3)}, {})


@pytest.mark.parametrize("ranks", [[2, 4, 8], [4, 4, 4]])
def test_flexlora_serves_each_client_the_best_rank_r_approximation(make_config, ranks):
    trainer, probe = run(make_config, "flexlora", ranks=ranks, rounds=2)
    first, second = probe.rounds
    initial = probe.rounds[0]["start"][0]  # W0: round-one clients start with B = 0
    for record in probe.rounds:
        assert_state_close(record["global"], weighted_average(record))
    for cid, r in zip([0, 1, 2], ranks):
        start = second["start"][cid]
        for name, layer in trainer.strategy.layers.items():
            weight_name = name.removeprefix("base_model.model.") + ".weight"
            update = first["global"][weight_name] - initial[weight_name]
            if layer.fan_in_fan_out:
                update = update.T
            u, s, vh = torch.linalg.svd(update)
            best = u[:, :r] @ torch.diag(s[:r]) @ vh[:r]
            got = start[weight_name] - initial[weight_name]
            torch.testing.assert_close(got.T if layer.fan_in_fan_out else got, best, rtol=0, atol=1e-6)
        # everything else (the head) starts from the global average
        torch.testing.assert_close(start["classifier.weight"], first["global"]["classifier.weight"], rtol=0, atol=0)


def test_flexlora_keeps_learning_after_a_round_with_no_update(make_config):
    # Warm-up makes round 1's only step use learning rate 0, so dW = 0 after it. Clients must then start from
    # PEFT's init (A random, B zero), not from zero factors, which would never get a gradient.
    _, probe = run(make_config, "flexlora", ranks=[2, 4, 8], rounds=2, local_steps=1, warmup_steps=1)
    first, second = probe.rounds
    initial = first["start"][0]
    targets = [n for n in initial if n.endswith(("query.weight", "value.weight"))]
    assert all(torch.equal(first["global"][n], initial[n]) for n in targets)
    assert all((second["global"][n] - initial[n]).abs().max() > 1e-4 for n in targets)
    for cid, raw in second["raw_start"].items():
        a_name = next(n for n in raw if ".lora_A." in n)
        assert raw[a_name][: [2, 4, 8][cid]].abs().min(dim=1).values.gt(0).all(), cid  # its own r directions


@pytest.mark.parametrize("strategy", ["fedit", "ffa_lora", "fedex_lora", "flora", "flexlora"])
def test_merged_model_is_plain_and_matches_the_global_peft_model(make_config, strategy, tmp_path):
    trainer, _ = run(make_config, strategy, ranks=[2, 4, 8] if strategy in ("flora", "flexlora") else None)
    inputs = torch.tensor(toy_dataset(6, seed=9)["input_ids"])
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model(input_ids=inputs).logits
    trainer.save_model(str(tmp_path / "merged"))
    loaded = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "merged")).eval()
    assert not isinstance(loaded, PeftModel) and not any("lora" in n for n in loaded.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=inputs).logits, expected, rtol=1e-5, atol=1e-5)


def test_bytes_per_round_follow_the_methods_table(make_config):
    # tiny BERT: hidden 32, query and value in 2 layers = 4 LoRA layers of 32 x 32; head 32*2 + 2 floats
    layers, out, inn, head = 4, 32, 32, 32 * 2 + 2
    r, ranks = 4, [2, 4, 8]
    expected = {
        "fedit": (3 * (layers * r * (out + inn) + head), 3 * (layers * r * (out + inn) + head)),
        "ffa_lora": (3 * (layers * r * out + head), 3 * (layers * r * out + head)),
        "fedex_lora": (3 * (layers * r * (out + inn) + head), 3 * (layers * (r * (out + inn) + out * inn) + head)),
        "flora": (
            sum(layers * k * (out + inn) + head for k in ranks),
            3 * (layers * sum(ranks) * (out + inn) + head) + 3 * 2,  # + the int64 synced round, in floats
        ),
        "flexlora": (
            sum(layers * k * (out + inn) + head for k in ranks),
            sum(layers * k * (out + inn) + head for k in ranks),
        ),
    }
    for strategy, (up, down_round_two) in expected.items():
        trainer, _ = run(make_config, strategy, ranks=ranks if strategy in ("flora", "flexlora") else None)
        first, second = [e for e in trainer.state.log_history if "round" in e]
        assert (first["bytes_up"], second["bytes_up"]) == (4 * up, 4 * up), strategy
        assert second["bytes_down"] == 4 * down_round_two, strategy


def test_lora_strategies_refuse_what_they_cannot_do(make_config):
    data = [toy_dataset(8, 1), toy_dataset(8, 2)]
    lora = lora_config(["query", "value"])
    with pytest.raises(ValueError, match="trains LoRA adapters: pass peft_config"):
        FederatedTrainer(model=tiny_bert(), args=make_config(strategy="fedit"), client_datasets=data)
    with pytest.raises(ValueError, match="averages full weights and takes no peft_config: choose a LoRA strategy"):
        FederatedTrainer(model=tiny_bert(), args=make_config(), client_datasets=data, peft_config=lora)
    with pytest.raises(ValueError, match="model is a PeftModel but strategy 'fedavg'"):
        from peft import get_peft_model

        FederatedTrainer(model=get_peft_model(tiny_bert(), lora), args=make_config(), client_datasets=data)
    for strategy in ("fedit", "ffa_lora", "fedex_lora"):
        others = (
            r"does not support clients of different LoRA ranks; strategies that support it: \['flexlora', 'flora'\]"
        )
        with pytest.raises(ValueError, match=others):
            FederatedTrainer(
                model=tiny_bert(), args=make_config(strategy=strategy), client_datasets=data,
                peft_config=lora, client_peft_configs=[2, 4],
            )  # fmt: skip
    with pytest.raises(ValueError, match="beyond"):
        FederatedTrainer(
            model=tiny_bert(), args=make_config(strategy="flora"), client_datasets=data,
            client_peft_configs={0: lora, 1: lora_config(["query"])},
        )  # fmt: skip
    with pytest.raises(ValueError, match="lists 3 ranks for 2 clients"):
        FederatedTrainer(
            model=tiny_bert(), args=make_config(strategy="flora"), client_datasets=data,
            peft_config=lora, client_peft_configs=[2, 4, 8],
        )  # fmt: skip


def test_lora_training_lowers_the_loss(make_config):
    trainer = FederatedTrainer(
        model=tiny_bert(dropout=0.0),
        args=make_config(strategy="flexlora", num_clients=4, num_rounds=6, local_steps=5, learning_rate=1e-2,
                         per_device_train_batch_size=8, eval_strategy="epoch"),
        train_dataset=toy_dataset(320),
        eval_dataset=toy_dataset(100, seed=9),
        peft_config=lora_config(["query", "value", "key", "dense"]),
        client_peft_configs=[2, 4, 4, 8],
    )  # fmt: skip
    trainer.train()
    rounds = [e for e in trainer.state.log_history if "round" in e]
    assert rounds[-1]["eval_loss"] < rounds[0]["eval_loss"] - 0.05


def test_truncated_svd_from_factors_matches_the_dense_svd():
    g = torch.Generator().manual_seed(0)
    left, right = torch.randn(40, 12, generator=g), torch.randn(12, 30, generator=g)
    u, s, vh = truncated_svd_of_product(left, right, rank=5)
    dense_u, dense_s, dense_vh = torch.linalg.svd(left.double() @ right.double())
    torch.testing.assert_close(s.double(), dense_s[:5], rtol=1e-5, atol=1e-5)
    best = dense_u[:, :5] @ torch.diag(dense_s[:5]) @ dense_vh[:5]
    torch.testing.assert_close((u * s) @ vh, best.float(), rtol=1e-4, atol=1e-4)
    assert u.shape == (40, 5) and vh.shape == (5, 30)


def test_a_user_strategy_registers_without_touching_the_package(make_config):
    @register_strategy("keep_first_client")
    class KeepFirst(Strategy):
        def setup(self, model, args, peft_configs=None):
            self.state = {n: p.detach().clone() for n, p in model.named_parameters()}
            return super().setup(model, args)

        def server_message(self, client_id):
            return self.state

        def load_client(self, model, message, client_id):
            for n, p in model.named_parameters():
                p.data.copy_(message[n])

        def client_payload(self, model, client_id):
            if not self.kept:
                self.kept = {n: p.detach().clone() for n, p in model.named_parameters()}
            return {}

        def begin_round(self, round_number):
            self.kept = None

        def finish_round(self, model):
            self.state = self.kept
            self.load_client(model, self.state, None)

    class RecordClients(FederatedCallback):
        """Each client's weights as its local training starts and ends, in training order."""

        def __init__(self):
            self.started, self.trained = [], []

        def on_client_begin(self, args, state, control, model=None, **kwargs):
            self.started.append({n: p.detach().clone() for n, p in model.named_parameters()})

        def on_client_end(self, args, state, control, model=None, **kwargs):
            self.trained.append({n: p.detach().clone() for n, p in model.named_parameters()})

    record = RecordClients()
    trainer = FederatedTrainer(
        model=tiny_bert(),
        args=make_config(strategy="keep_first_client", num_rounds=2),
        client_datasets=CLIENTS,
        callbacks=[record],
    )
    start = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert len(record.trained) == 2 * len(CLIENTS)
    # the user's rule, computed from the clients: each round's global model is that round's first client's
    first_of_round_1, first_of_round_2 = record.trained[0], record.trained[len(CLIENTS)]
    for name, value in trainer.model.named_parameters():
        assert torch.equal(value, first_of_round_2[name]), name
    second_of_round_2 = record.trained[len(CLIENTS) + 1]
    assert not torch.equal(first_of_round_2["classifier.weight"], second_of_round_2["classifier.weight"])
    # every client of round 1 started from the initial model, every client of round 2 from round 1's first client
    assert not torch.equal(first_of_round_1["classifier.weight"], start["classifier.weight"])
    for position, began in enumerate(record.started):
        expected = start if position < len(CLIENTS) else first_of_round_1
        assert all(torch.equal(began[n], expected[n]) for n in expected), position
