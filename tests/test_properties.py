"""Property tests of every LoRA aggregation on random shapes, ranks, client counts and weights: the exactness
invariants of DESIGN.md section 3, and that the order of the clients changes nothing."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig
from torch import nn

from fed_trainer import FederatedConfig, get_strategy
from fed_trainer.strategies.lora import lora_parameters

ALPHA = 4


def scaling_of(rank: int, rslora: bool) -> float:
    """LoRA's scaling written out (not the implementation's): alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return ALPHA / rank**0.5 if rslora else ALPHA / rank


class OneLayer(nn.Module):
    def __init__(self, out_features, in_features, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.proj = nn.Linear(in_features, out_features, bias=False)

    def forward(self, x):
        return self.proj(x)


@st.composite
def federations(draw, same_ranks):
    out_features, in_features = draw(st.integers(2, 7)), draw(st.integers(2, 7))
    k = draw(st.integers(1, 4))
    top = min(out_features, in_features)
    ranks = [draw(st.integers(1, top))] * k if same_ranks else [draw(st.integers(1, top)) for _ in range(k)]
    raw = draw(st.lists(st.floats(0.05, 1.0), min_size=k, max_size=k))
    weights = [w / sum(raw) for w in raw]
    return out_features, in_features, ranks, weights, draw(st.integers(0, 2**16)), draw(st.booleans())


def aggregate_once(strategy_name, out_features, in_features, ranks, weights, seed, rslora, order):
    """One round on a one-layer model: each client's factors are replaced by random ones (its "training"); returns
    the merged global weight, the expected sum_k p_k W_k, and the clients' weights."""
    model = OneLayer(out_features, in_features, seed)
    w0 = model.proj.weight.detach().double().clone()
    configs = {
        c: LoraConfig(r=r, lora_alpha=ALPHA, target_modules=["proj"], use_rslora=rslora) for c, r in enumerate(ranks)
    }
    strategy = get_strategy(strategy_name)
    args = FederatedConfig(output_dir="unused", strategy=strategy_name, num_clients=len(ranks), seed=seed)
    model = strategy.setup(model, args, configs)
    (layer,) = strategy.layers.values()
    strategy.begin_round(1)
    rng = np.random.default_rng(seed)
    draws = {
        c: (rng.standard_normal((r, in_features)), rng.standard_normal((out_features, r))) for c, r in enumerate(ranks)
    }
    expected = torch.zeros_like(w0)
    for c in order:
        strategy.load_client(model, strategy.server_message(c), c)
        a, b = lora_parameters(layer)  # one adapter of the largest rank: client c trains its first r_c directions
        r = ranks[c]
        if strategy_name != "ffa_lora":  # FFA-LoRA's A is frozen and shared
            a.data[:r] = torch.tensor(draws[c][0], dtype=a.dtype)
        b.data[:, :r] = torch.tensor(draws[c][1], dtype=b.dtype)
        scaling = scaling_of(r, rslora)
        expected += weights[c] * (w0 + scaling * b.detach().double() @ a.detach().double())
        strategy.aggregate(strategy.client_payload(model, c), weights[c], c)
    strategy.finish_round(model)
    merged = strategy.merged_model(model).proj.weight.detach().double()
    return merged, expected


@pytest.mark.parametrize("strategy", ["fedex_lora", "ffa_lora", "flora", "flexlora"])
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_exact_strategies_give_the_weighted_sum_and_ignore_client_order(strategy, data):
    out_f, in_f, ranks, weights, seed, rslora = data.draw(
        federations(same_ranks=strategy in ("fedex_lora", "ffa_lora"))
    )
    forward, expected = aggregate_once(strategy, out_f, in_f, ranks, weights, seed, rslora, range(len(ranks)))
    torch.testing.assert_close(forward, expected, rtol=0, atol=1e-5)
    backward, _ = aggregate_once(strategy, out_f, in_f, ranks, weights, seed, rslora, reversed(range(len(ranks))))
    torch.testing.assert_close(backward, forward, rtol=0, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_fedit_averages_each_factor_with_weights_summing_to_one(data):
    out_f, in_f, ranks, weights, seed, rslora = data.draw(federations(same_ranks=True))
    merged, _ = aggregate_once("fedit", out_f, in_f, ranks, weights, seed, rslora, range(len(ranks)))
    again, _ = aggregate_once("fedit", out_f, in_f, ranks, weights, seed, rslora, reversed(range(len(ranks))))
    torch.testing.assert_close(again, merged, rtol=0, atol=1e-5)
    rng = np.random.default_rng(seed)
    draws = [(rng.standard_normal((r, in_f)), rng.standard_normal((out_f, r))) for r in ranks]
    a = sum(w * d[0] for w, d in zip(weights, draws))
    b = sum(w * d[1] for w, d in zip(weights, draws))
    w0 = OneLayer(out_f, in_f, seed).proj.weight.detach().double()
    scaling = scaling_of(ranks[0], rslora)
    torch.testing.assert_close(merged, w0 + scaling * torch.tensor(b @ a), rtol=0, atol=1e-5)
