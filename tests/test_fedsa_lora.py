"""FedSA-LoRA: A averaged, each client's B its own from round to round, and each client evaluated with its own B.
(Resume, bytes, the Flower round trip and two ranks are in the contract matrix, tests/test_contract.py.)"""

import copy

import pytest
import torch
from conftest import tiny_bert, toy_dataset
from peft import LoraConfig
from supernodes import SuperNodesInProcess
from transformers import Trainer, TrainingArguments

from fed_trainer import FederatedCallback, FederatedTrainer
from fed_trainer.flower.remote import record_tensors, tensor_record
from fed_trainer.round import ClientPlan, remote_update, sampled_clients
from fed_trainer.strategies.lora import factor_names

CLIENTS = [toy_dataset(n, seed) for seed, n in enumerate([8, 16, 24], start=1)]
HELD_OUT = [toy_dataset(n, seed) for seed, n in enumerate([6, 10, 14], start=11)]
LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")


class Factors(FederatedCallback):
    """Each client's A and B when it starts and ends its training, by round; the global A after each round."""

    def __init__(self):
        self.starts, self.ends, self.global_a, self.weights = [], [], [], []

    def factors(self, model, which: int) -> dict:
        return {n: p.detach().clone() for n, p in model.named_parameters() if n in self.names[which]}

    def on_round_begin(self, args, state, control, model=None, client_weights=None, **kwargs):
        self.names = [[n for n, _ in model.named_parameters() if f".lora_{ab}." in n] for ab in "AB"]
        self.starts.append({})
        self.ends.append({})
        self.weights.append(client_weights)

    def on_client_begin(self, args, state, control, client_id=None, model=None, **kwargs):
        self.starts[-1][client_id] = (self.factors(model, 0), self.factors(model, 1))

    def on_client_end(self, args, state, control, client_id=None, model=None, **kwargs):
        self.ends[-1][client_id] = (self.factors(model, 0), self.factors(model, 1))

    def on_round_end(self, args, state, control, model=None, **kwargs):
        self.global_a.append(self.factors(model, 0))


def run(make_config, **config) -> tuple[FederatedTrainer, Factors]:
    factors = Factors()
    trainer = FederatedTrainer(
        model=tiny_bert(dropout=0.0), client_datasets=CLIENTS, peft_config=LORA, callbacks=[factors],
        args=make_config(strategy="fedsa_lora", num_rounds=3, clients_per_round=2, learning_rate=2e-2, **config),
    )  # fmt: skip
    trainer.train()
    return trainer, factors


def test_a_is_averaged_and_each_client_trains_on_from_its_own_b(make_config):
    trainer, factors = run(make_config)
    last_b = {}  # client -> its B after the last round it trained
    for number, (starts, ends, weights) in enumerate(zip(factors.starts, factors.ends, factors.weights), 1):
        for cid, (_, b) in starts.items():
            expected = last_b.get(cid)
            for name, value in b.items():
                if expected is None:  # new to the run: LoRA's initial B
                    assert not value.any(), (number, cid, name)
                else:
                    assert torch.equal(value, expected[name]), (number, cid, name)
        for name, value in factors.global_a[number - 1].items():
            mean = sum(weights[cid] * ends[cid][0][name] for cid in ends)
            torch.testing.assert_close(value, mean, rtol=1e-5, atol=1e-7, msg=name)
        last_b.update({cid: b for cid, (_, b) in ends.items()})
    assert len(last_b) == 3  # every client trained, some skipped a round between
    for cid, b in last_b.items():  # what the strategy keeps (and checkpoints) for each client
        for name, value in b.items():
            assert torch.equal(trainer.strategy.client_bs[cid][name], value)
    # B never travels; the live (and merged) model between rounds has the initial B: its adapters add nothing
    rounds = [e for e in trainer.state.log_history if "round" in e]
    a_and_head = sum(p.numel() for n, p in trainer.model.named_parameters() if p.requires_grad and ".lora_B." not in n)
    assert [e["bytes_up"] for e in rounds] == [2 * 4 * a_and_head] * 3
    base = tiny_bert(dropout=0.0).state_dict()
    merged = trainer.merged_model().state_dict()
    for name in (
        "bert.encoder.layer.0.attention.self.query.weight",
        "bert.encoder.layer.1.attention.self.value.weight",
    ):  # noqa: E501
        assert torch.equal(merged[name], base[name])


def test_each_client_is_evaluated_with_its_own_b(make_config, tmp_path):
    factors = Factors()
    trainer = FederatedTrainer(
        model=tiny_bert(dropout=0.0), client_datasets=CLIENTS, client_eval_datasets=HELD_OUT, peft_config=LORA,
        callbacks=[factors],
        args=make_config(strategy="fedsa_lora", num_rounds=2, learning_rate=2e-2, eval_strategy="epoch"),
    )  # fmt: skip
    trainer.train()
    last = [e for e in trainer.state.log_history if "round" in e][-1]
    losses = []
    for k, held_out in enumerate(HELD_OUT):
        own = copy.deepcopy(trainer.model)  # the global A and heads, with client k's B from its last round
        params = dict(own.named_parameters())
        with torch.no_grad():
            for name, value in factors.ends[-1][k][1].items():
                params[name].copy_(value)
        args = TrainingArguments(output_dir=str(tmp_path / f"k{k}"), use_cpu=True, report_to="none")
        loss = Trainer(model=own.merge_and_unload(), args=args).evaluate(eval_dataset=held_out)["eval_loss"]
        assert last[f"eval_client_{k}_loss"] == pytest.approx(loss, rel=1e-5), k
        losses.append(loss)
    shared = Trainer(model=trainer.merged_model(), args=TrainingArguments(str(tmp_path / "s"), use_cpu=True,
                                                                           report_to="none"))  # fmt: skip
    assert losses != pytest.approx([shared.evaluate(eval_dataset=ds)["eval_loss"] for ds in HELD_OUT], rel=1e-4)


def test_a_node_keeps_its_clients_b_and_trains_from_it_next_round(make_config):
    trainer = FederatedTrainer(model=tiny_bert(dropout=0.0), client_datasets=CLIENTS, peft_config=LORA,
                               args=make_config(strategy="fedsa_lora", learning_rate=2e-2))  # fmt: skip
    node = FederatedTrainer(model=tiny_bert(dropout=0.0), client_datasets=CLIENTS, peft_config=LORA,
                            args=make_config(strategy="fedsa_lora", learning_rate=2e-2,
                                             output_dir=str(trainer.args.output_dir) + "-node"))  # fmt: skip
    strategy, plan = trainer.strategy, ClientPlan(seed=3, offset=0, schedule_steps=6)
    strategy.begin_round(1)
    message = record_tensors(tensor_record(strategy.server_message(0)))
    payload, _, kept = remote_update(node, 1, 0, message, plan, kept={})
    b_names = {factor_names(layer)[1] for layer in strategy.layers}
    assert set(kept) == b_names and not b_names & set(payload)
    assert max(b.abs().max().item() for b in kept.values()) > 1e-4
    # round 2 on a freshly built node: it starts from the B it kept
    fresh = FederatedTrainer(model=tiny_bert(dropout=0.0), client_datasets=CLIENTS, peft_config=LORA,
                             args=make_config(strategy="fedsa_lora", learning_rate=2e-2,
                                              output_dir=str(trainer.args.output_dir) + "-fresh"))  # fmt: skip
    # a node that lost the B it kept cannot train from it, and says so (the server has no B to send)
    with pytest.raises(RuntimeError, match="no longer holds the B it kept"):
        remote_update(fresh, 2, 0, message, plan, kept=None)
    fresh.strategy.begin_round(2)
    fresh.strategy.catch_up(fresh.model, message, kept)
    fresh.strategy.load_client(fresh.model, message, 0)
    params = dict(fresh.model.named_parameters())
    for name, value in kept.items():
        assert torch.equal(params[name], value), name


class ServerDies(SuperNodesInProcess):
    """Nodes that train round `dies_in` and keep their new B, whose server then dies before aggregating it."""

    def __init__(self, *args, dies_in: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.dies_in = dies_in

    def train(self, round) -> None:
        super().train(round)
        if round.number == self.dies_in:
            raise RuntimeError("the server died")


def test_a_resumed_federation_starts_each_node_from_the_b_it_kept_at_the_checkpoint(make_config, tmp_path):
    """On SuperNodes each client's B lives on its node only. A run dies in round 3 after its nodes trained (and kept
    their round-3 B); resumed from round 2's checkpoint as a new Flower run, on SuperNodes restarted without keys
    (new node ids), every node starts from the B of its client's last round before the checkpoint, and the run ends
    where the uninterrupted simulation ends."""

    def build(context=None, clients=CLIENTS, **config):
        args = make_config(strategy="fedsa_lora", num_rounds=3, clients_per_round=2, learning_rate=2e-2, **config)
        return FederatedTrainer(model=tiny_bert(dropout=0.0), client_datasets=clients, peft_config=LORA, args=args)

    simulated = build(output_dir=str(tmp_path / "simulated"))
    simulated.train()
    nodes, clients = tmp_path / "nodes", dict(enumerate(CLIENTS))
    dying = build(save_every_rounds=1)
    dying.client_executor = ServerDies(build, clients, nodes, run_id=1, dies_in=3)
    with pytest.raises(RuntimeError, match="the server died"):
        dying.train()
    resumed = build(save_every_rounds=1)
    resumed.client_executor = SuperNodesInProcess(build, clients, nodes, run_id=2, first_node_id=100)
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "round-2"))
    expected = simulated.model.state_dict()
    for name, value in resumed.model.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-6, msg=name)
    logged = [[(e["round"], e["learning_rate"], e["bytes_up"]) for e in t.state.log_history if "round" in e]
              for t in (resumed, simulated)]  # fmt: skip
    assert logged[0] == logged[1] and len({rate for _, rate, _ in logged[0]}) == 3  # (the schedule decays)
    # each node keeps the B its last message started from and the one it wrote then (the newest checkpoint's is one
    # of them): its client's last two rounds
    progress = resumed.round_progress
    for client_id in clients:
        rounds = [r for r in (1, 2, 3) if client_id in sampled_clients(resumed.args, list(clients), r)]
        assert progress.client_rounds[client_id] == rounds[-1]
        folder = nodes / f"client-{client_id}" / f"federation-{progress.federation}"
        assert sorted(path.name for path in folder.iterdir()) == [f"round-{r}.safetensors" for r in rounds[-2:]]
