"""SCAFFOLD against an independent implementation written here in plain torch, on tiny BERT.

The clients train with plain SGD at a constant rate on batches that hold their whole shard (so the order of the
examples does not matter), without clipping; 2 of 3 clients a round over 4 rounds, so that controls persist over
skipped rounds and |S| / N is not 1. The reference takes the rounds' sampled clients from the run and does the rest
itself: the corrected local steps, the control updates (option II), the weighted average and c's update.
"""

import copy

import pytest
import torch
from conftest import tiny_bert, toy_dataset
from transformers import default_data_collator

from fed_trainer import FederatedCallback, FederatedTrainer
from fed_trainer.flower.remote import record_tensors, tensor_record
from fed_trainer.round import ClientPlan, local_update, remote_update
from fed_trainer.strategies.keys import message_key

SIZES = [8, 16, 24]
CLIENTS = [toy_dataset(n, seed) for seed, n in enumerate(SIZES, start=1)]
LR, STEPS, ROUNDS = 0.5, 3, 4
SGD = dict(optim="sgd", learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
           max_grad_norm=0.0, local_steps=STEPS, per_device_train_batch_size=max(SIZES), num_rounds=ROUNDS,
           clients_per_round=2)  # fmt: skip


class Sampled(FederatedCallback):
    def __init__(self):
        self.rounds = []

    def on_round_begin(self, args, state, control, client_ids=None, client_weights=None, **kwargs):
        self.rounds.append((list(client_ids), dict(client_weights)))


def reference(sampled) -> dict:
    """SCAFFOLD option II, written out: the global weights after the last round."""
    model = tiny_bert(dropout=0.0)
    names = [name for name, _ in model.named_parameters()]
    x = {name: p.detach().clone() for name, p in model.named_parameters()}
    c = {name: torch.zeros_like(v) for name, v in x.items()}
    own = [{name: torch.zeros_like(v) for name, v in x.items()} for _ in CLIENTS]
    batches = [default_data_collator([dict(row) for row in data]) for data in CLIENTS]
    for client_ids, weights in sampled:
        new_x = {name: torch.zeros_like(v) for name, v in x.items()}
        change_sum = {name: torch.zeros_like(v) for name, v in x.items()}
        for k in client_ids:
            client = copy.deepcopy(model)
            client.load_state_dict(x, strict=False)
            client.train()
            params = dict(client.named_parameters())
            for _ in range(STEPS):
                client.zero_grad()
                client(**batches[k]).loss.backward()
                with torch.no_grad():
                    for name in names:
                        params[name] -= LR * (params[name].grad + c[name] - own[k][name])
            y = {name: params[name].detach() for name in names}
            for name in names:
                change = (x[name] - y[name]) / (STEPS * LR) - c[name]  # c_k+ - c_k
                own[k][name] = own[k][name] + change
                change_sum[name] += change
                new_x[name] += weights[k] * y[name]
        x = new_x
        c = {name: c[name] + change_sum[name] / len(CLIENTS) for name in names}
    return x


def test_scaffold_ends_where_the_written_out_algorithm_ends(make_config):
    sampled = Sampled()
    trainer = FederatedTrainer(model=tiny_bert(dropout=0.0), args=make_config(strategy="scaffold", **SGD),
                               client_datasets=CLIENTS, callbacks=[sampled])  # fmt: skip
    trainer.train()
    assert {k for ids, _ in sampled.rounds for k in ids} == {0, 1, 2}  # every client, and some skip rounds
    expected = reference(sampled.rounds)
    final = dict(trainer.model.named_parameters())
    for name, value in expected.items():
        torch.testing.assert_close(final[name].detach(), value, rtol=1e-4, atol=1e-5, msg=name)
    # without the correction (FedAvg, same everything) the run ends elsewhere
    plain = FederatedTrainer(model=tiny_bert(dropout=0.0), args=make_config(strategy="fedavg", **SGD),
                             client_datasets=CLIENTS)  # fmt: skip
    plain.train()
    gap = max((p.detach() - expected[n]).abs().max().item() for n, p in plain.model.named_parameters())
    assert gap > 1e-3, gap
    # both directions carry the controls too: twice FedAvg's bytes, and each message the round of the client's c_k
    rounds = [e for e in trainer.state.log_history if "round" in e]
    plain_rounds = [e for e in plain.state.log_history if "round" in e]
    for a, b in zip(rounds, plain_rounds, strict=True):
        assert (a["bytes_up"], a["bytes_down"]) == (2 * b["bytes_up"], 2 * b["bytes_down"] + 8 * a["num_clients"])


def test_a_client_on_its_own_machine_keeps_its_control_for_its_next_round(make_config):
    """On a SuperNode the client's control is what the node keeps (`remote_update`'s third value), not server
    state: after a round it equals the simulation's c_k for that client, and fed back it corrects the next round."""
    trainer = FederatedTrainer(model=tiny_bert(dropout=0.0), args=make_config(strategy="scaffold", **SGD),
                               client_datasets=CLIENTS)  # fmt: skip
    strategy = trainer.strategy
    plan = ClientPlan(seed=3, offset=0, schedule_steps=STEPS * ROUNDS)
    node = FederatedTrainer(model=tiny_bert(dropout=0.0), args=make_config(strategy="scaffold", **SGD,
                            output_dir=str(trainer.args.output_dir) + "-node"), client_datasets=CLIENTS)  # fmt: skip
    strategy.begin_round(1)
    message = record_tensors(tensor_record(strategy.server_message(0)))
    _, _, kept = remote_update(node, 1, 0, message, plan, kept={})
    payload, _ = local_update(trainer, 0, CLIENTS[0], strategy.server_message(0), plan)
    strategy.aggregate(payload, 1.0, client_id=0)
    strategy.finish_round(trainer.model)
    for name, c_k in strategy.client_controls[0].items():
        torch.testing.assert_close(kept[message_key(name, "control")], c_k, rtol=1e-5, atol=1e-6, msg=name)
    assert max(c.abs().max().item() for c in strategy.client_controls[0].values()) > 1e-3
    # round 2 on the node: its kept control (not zeros) is what its steps are corrected with
    node.strategy.begin_round(2)
    strategy.begin_round(2)
    node.strategy.catch_up(node.model, strategy.server_message(0), kept)
    node.strategy.load_client(node.model, strategy.server_message(0), 0)
    for param, correction in node.strategy.steps.corrections:
        name = next(n for n, p in node.model.named_parameters() if p is param)
        expected = strategy.control[name] - strategy.client_controls[0][name]
        torch.testing.assert_close(correction, expected, rtol=1e-5, atol=1e-6, msg=name)


def test_a_client_whose_machine_lost_its_control_is_dropped_once_then_sent_it(make_config):
    """The server counts each client's c_k. A node that does not hold the one counted (a restarted SuperNode; a
    resumed Flower run is a new run) refuses to train, and the server's next message to that client carries its c_k
    (bytes counted), which the node then corrects its steps with."""
    trainer = FederatedTrainer(model=tiny_bert(dropout=0.0), args=make_config(strategy="scaffold", **SGD),
                               client_datasets=CLIENTS)  # fmt: skip
    strategy, plan = trainer.strategy, ClientPlan(seed=3, offset=0, schedule_steps=STEPS * ROUNDS)
    node = FederatedTrainer(model=tiny_bert(dropout=0.0), args=make_config(strategy="scaffold", **SGD,
                            output_dir=str(trainer.args.output_dir) + "-node"), client_datasets=CLIENTS)  # fmt: skip
    messages = []
    for round_number in (1, 2, 3):
        strategy.begin_round(round_number)
        messages.append(record_tensors(tensor_record(strategy.server_message(0))))
        if round_number == 1:  # client 0 trains (in the simulation): the server now counts a c_k for it
            payload, _ = local_update(trainer, 0, CLIENTS[0], strategy.server_message(0), plan)
            strategy.aggregate(payload, 1.0, client_id=0)
        elif round_number == 2:  # its node restarted, holding nothing: dropped; client 1 trains
            with pytest.raises(RuntimeError, match="from round 0 .*but the server counts the one from round 1"):
                remote_update(node, 2, 0, messages[-1], plan, kept={})
            payload, _ = local_update(trainer, 1, CLIENTS[1], strategy.server_message(1), plan)
            strategy.aggregate(payload, 1.0, client_id=1)
        else:  # sent its c_k, the node trains with it
            _, _, kept = remote_update(node, 3, 0, messages[-1], plan, kept={})
        strategy.synchronize()
        strategy.finish_round(trainer.model)
    own = {key: value for key, value in messages[2].items() if key.endswith(".own_control")}
    assert not any(key.endswith(".own_control") for message in messages[:2] for key in message)
    assert len(own) == len(strategy.control) and int(kept["control_round"]) == 3
    for name, c_k in strategy.client_controls[0].items():  # round 1's (round 3's update is not aggregated here)
        torch.testing.assert_close(own[message_key(name, "own_control")], c_k)
        torch.testing.assert_close(node.strategy.kept_control[name], c_k)
    assert max(c.abs().max().item() for c in node.strategy.kept_control.values()) > 1e-3
