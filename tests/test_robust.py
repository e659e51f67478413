"""Robust aggregation: the rules against independent computations, their invariants on random inputs, and an
attack by one client of five."""

import numpy as np
import pytest
import torch
from conftest import tiny_bert, toy_dataset
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig
from scipy import stats

from fed_trainer import FederatedCallback, FederatedTrainer
from fed_trainer.robust import clipped, coordinate_median, robust_aggregate, trimmed_mean

shapes = st.tuples(st.integers(1, 5), st.integers(1, 4))
clients = st.integers(1, 9)


def random_stack(k, shape, seed):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((k, *shape))).float()


@settings(max_examples=40, deadline=None)
@given(k=clients, shape=shapes, seed=st.integers(0, 2**16), fraction=st.sampled_from([0.0, 0.1, 0.2, 0.3, 0.45]))
def test_median_and_trimmed_mean_match_numpy_and_scipy_and_ignore_client_order(k, shape, seed, fraction):
    stack = random_stack(k, shape, seed)
    np.testing.assert_allclose(coordinate_median(stack), np.median(stack.numpy(), axis=0), rtol=0, atol=1e-6)
    np.testing.assert_allclose(
        trimmed_mean(stack, fraction), stats.trim_mean(stack.numpy(), fraction, axis=0), rtol=0, atol=1e-6
    )
    order = torch.from_numpy(np.random.default_rng(seed + 1).permutation(k))
    for rule in ("median", "trimmed_mean"):
        payloads = [{"w": s} for s in stack]
        shuffled = [payloads[i] for i in order]
        a, b = robust_aggregate(payloads, rule, fraction), robust_aggregate(shuffled, rule, fraction)
        assert torch.equal(a["w"], b["w"])
        # a robust aggregate lies within the clients' range, coordinate by coordinate
        assert (a["w"] >= stack.min(0).values - 1e-6).all() and (a["w"] <= stack.max(0).values + 1e-6).all()


@settings(max_examples=40, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**16), max_norm=st.floats(0.01, 10.0))
def test_clipping_bounds_the_update_norm_and_keeps_its_direction(shape, seed, max_norm):
    rng = np.random.default_rng(seed)
    reference = {
        "a": torch.tensor(rng.standard_normal(shape)).float(),
        "b": torch.tensor(rng.standard_normal(3)).float(),
    }
    payload = {k: v + torch.tensor(rng.standard_normal(v.shape)).float() * 3 for k, v in reference.items()}
    out = clipped(payload, reference, max_norm)
    delta = torch.cat([(out[k] - reference[k]).flatten() for k in reference])
    original = torch.cat([(payload[k] - reference[k]).flatten() for k in reference])
    assert delta.norm() <= max_norm * (1 + 1e-5)
    if original.norm() > max_norm:
        # out = reference + delta is rounded to float32: an error of eps * |out| per entry, large against a small norm
        rounding = 2 * torch.finfo(torch.float32).eps * max(t.abs().max().item() for t in out.values()) / max_norm
        torch.testing.assert_close(delta / delta.norm(), original / original.norm(), rtol=0, atol=1e-5 + rounding)
    else:
        assert out is payload


class SignFlipAttacker(FederatedCallback):
    """Client `attacker` sends its update flipped and scaled by `factor` (it runs before the aggregation)."""

    def __init__(self, strategy, attacker, factor=-10.0):
        self.strategy, self.attacker, self.factor = strategy, attacker, factor

    def on_client_end(self, args, state, control, client_id=None, model=None, **kwargs):
        if client_id != self.attacker:
            return
        live = self.strategy.averaged_state(model)
        for name, start in self.strategy.global_state.items():
            live[name].data.copy_(start + self.factor * (live[name].detach() - start))


class Ends(FederatedCallback):
    def on_round_begin(self, args, state, control, **kwargs):
        self.ends = {}

    def on_client_end(self, args, state, control, client_id=None, model=None, **kwargs):
        self.ends[client_id] = {k: v.detach().clone() for k, v in model.state_dict().items()}


def distance_to_honest_mean(make_config, strategy="fedavg", **rule):
    lora = strategy != "fedavg"
    trainer = FederatedTrainer(
        model=tiny_bert(dropout=0.0),
        args=make_config(num_rounds=1, local_steps=4, learning_rate=5e-3, client_weighting="uniform",
                         strategy=strategy, **rule),
        client_datasets=[toy_dataset(16, seed) for seed in range(5)],
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS") if lora
        else None,
    )  # fmt: skip
    ends = Ends()
    trainer.add_callback(ends)
    trainer.callback_handler.callbacks.insert(0, SignFlipAttacker(trainer.strategy, attacker=4))
    start = {name: t.clone() for name, t in trainer.strategy.global_state.items()}
    trainer.train()
    live = trainer.strategy.averaged_state(trainer.model)
    honest = {name: sum(ends.ends[c][name] for c in range(4)) / 4 for name in live}

    def norm(a, b):
        return torch.sqrt(sum(((a[n] - b[n]) ** 2).sum() for n in live)).item()

    return norm(live, honest), float(np.median([norm(ends.ends[c], start) for c in range(4)]))


@pytest.mark.parametrize("strategy", ["fedavg", "ffa_lora"])
def test_robust_rules_keep_one_hostile_client_of_five_from_dragging_the_global_model(make_config, strategy):
    mean, honest_norm = distance_to_honest_mean(make_config, strategy)
    for rule in (dict(aggregation_rule="median"), dict(aggregation_rule="trimmed_mean", trim_fraction=0.2),
                 dict(update_clip_norm=honest_norm)):  # fmt: skip
        robust, _ = distance_to_honest_mean(make_config, strategy, **rule)
        assert robust < 0.3 * mean, (rule, robust, mean)


@pytest.mark.parametrize("strategy", ["flexlora", "flora", "fedex_lora"])
def test_robust_rules_are_refused_where_the_aggregate_is_a_product_of_factors(make_config, strategy):
    supported = r"strategies that support it: \['fedavg', 'galore_lowrank', 'galore_shared', 'fedit', 'ffa_lora'"
    with pytest.raises(ValueError, match=f"{supported}.*built from products of LoRA factors"):
        FederatedTrainer(
            model=tiny_bert(), args=make_config(strategy=strategy, aggregation_rule="median"),
            client_datasets=[toy_dataset(8, 0), toy_dataset(8, 1)],
            peft_config=LoraConfig(r=2, lora_alpha=4, target_modules=["query"], task_type="SEQ_CLS"),
        )  # fmt: skip
