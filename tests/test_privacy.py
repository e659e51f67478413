"""Client-level differential privacy (DP-FedAvg): clipping, calibrated noise, and the privacy spent."""

import pytest
import torch
from conftest import tiny_bert, toy_dataset
from opacus.accountants import RDPAccountant
from peft import LoraConfig

from fed_trainer import FederatedCallback, FederatedConfig, FederatedTrainer

CLIENTS = [toy_dataset(16, seed) for seed in range(6)]


class Snapshots(FederatedCallback):
    def on_round_begin(self, args, state, control, **kwargs):
        self.start, self.ends = None, {}

    def on_client_begin(self, args, state, control, model=None, **kwargs):
        if self.start is None:  # every client starts from the global model
            self.start = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}

    def on_client_end(self, args, state, control, client_id=None, model=None, **kwargs):
        self.ends[client_id] = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def dp_trainer(make_config, sigma, clip=0.05, rounds=1, callbacks=(), **config):
    return FederatedTrainer(
        model=tiny_bert(dropout=0.0),
        args=make_config(
            num_rounds=rounds,
            clients_per_round=3,
            client_weighting="uniform",
            learning_rate=5e-3,
            update_clip_norm=clip,
            dp_noise_multiplier=sigma,
            **config,
        ),  # fmt: skip
        client_datasets=CLIENTS,
        callbacks=list(callbacks),
    )


def dp_run(make_config, sigma, clip=0.05, rounds=1, **config):
    snapshots = Snapshots()
    trainer = dp_trainer(make_config, sigma, clip, rounds, callbacks=[snapshots], **config)
    trainer.train()
    return trainer, snapshots


def clipped_mean(snapshots, clip):
    """G0 + (1/m) sum_k clip(W_k - G0), computed here from the clients' end states."""
    start, ends = snapshots.start, snapshots.ends
    total = {k: torch.zeros_like(v) for k, v in start.items()}
    for end in ends.values():
        delta = {k: end[k] - start[k] for k in start}
        norm = torch.sqrt(sum((d * d).sum() for d in delta.values()))
        for k in start:
            total[k] += delta[k] * min(1.0, clip / norm.item())
    return {k: start[k] + total[k] / len(ends) for k in start}


def test_without_noise_the_global_model_is_the_mean_of_the_clipped_updates(make_config):
    trainer, snapshots = dp_run(make_config, sigma=0.0)
    expected = clipped_mean(snapshots, 0.05)
    live = dict(trainer.model.named_parameters())
    for name, value in expected.items():
        torch.testing.assert_close(live[name].detach(), value, rtol=0, atol=1e-6, msg=name)


def test_the_noise_is_gaussian_with_the_calibrated_standard_deviation(make_config):
    sigma, clip = 1.5, 0.05
    trainer, snapshots = dp_run(make_config, sigma=sigma, clip=clip)
    expected = clipped_mean(snapshots, clip)
    live = dict(trainer.model.named_parameters())
    noise = torch.cat([(live[n].detach() - v).flatten() for n, v in expected.items()]).double()
    n, std = noise.numel(), sigma * clip / 3  # sigma S / m, m = 3 clients per round
    assert n > 20_000
    # each bound is 5 standard errors of its estimate (std: std / sqrt(2n); mean: std / sqrt(n); a share: 0.5/sqrt(n))
    assert abs(noise.std().item() / std - 1) < 5 / (2 * n) ** 0.5
    assert abs(noise.mean().item()) < 5 * std / n**0.5
    within_one_std = (noise.abs() < std).double().mean().item()
    assert abs(within_one_std - 0.682689) < 2.5 / n**0.5  # Gaussian, not merely of the right spread
    first, second = noise[: n // 2], noise[n // 2 : 2 * (n // 2)]  # independent across coordinates and tensors
    assert abs(torch.corrcoef(torch.stack([first, second]))[0, 1].item()) < 5 / (n // 2) ** 0.5


def final_state(trainer) -> dict:
    return {name: value.detach().clone() for name, value in trainer.model.named_parameters()}


def test_the_noise_comes_from_the_run_seed_so_runs_repeat_and_resume_exactly(make_config, tmp_path):
    first = final_state(dp_run(make_config, sigma=1.0, rounds=2, save_every_rounds=1)[0])
    again = final_state(dp_run(make_config, sigma=1.0, rounds=2, output_dir=str(tmp_path / "again"))[0])
    other_seed = final_state(dp_run(make_config, sigma=1.0, rounds=2, seed=8, output_dir=str(tmp_path / "other"))[0])
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not torch.equal(first["classifier.weight"], other_seed["classifier.weight"])
    # a fresh trainer resumed from the first run's round 1 adds round 2's noise again and ends on the same model
    resumed = dp_trainer(make_config, sigma=1.0, rounds=2, output_dir=str(tmp_path / "resumed"))
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "round-1"))
    assert all(torch.equal(first[name], final_state(resumed)[name]) for name in first)


def test_privacy_spent_is_logged_every_round_and_written_to_the_model_card(make_config):
    trainer, _ = dp_run(make_config, sigma=1.0, rounds=3, dp_delta=1e-5)
    logged = [e["dp_epsilon"] for e in trainer.state.log_history if "round" in e]
    accountant = RDPAccountant()
    expected = []
    for _ in range(3):
        accountant.step(noise_multiplier=1.0, sample_rate=3 / 6)
        expected.append(accountant.get_epsilon(1e-5))
    assert logged == pytest.approx(expected, rel=1e-9) and logged[0] < logged[1] < logged[2]
    trainer.create_model_card(model_name="private")
    card = open(trainer.args.output_dir + "/README.md", encoding="utf-8").read()
    assert f"(epsilon, delta) = ({expected[-1]:.3g}, 1e-05) after 3 rounds" in card


@pytest.mark.parametrize(
    "config, message",
    [
        (dict(dp_noise_multiplier=1.0), "needs update_clip_norm"),
        (dict(dp_noise_multiplier=1.0, update_clip_norm=1.0), "needs client_weighting='uniform'"),
        (
            dict(dp_noise_multiplier=1.0, update_clip_norm=1.0, client_weighting="uniform", aggregation_rule="median"),
            "aggregation_rule='mean'",
        ),  # fmt: skip
    ],
)
def test_dp_settings_that_would_void_the_guarantee_are_refused(tmp_path, config, message):
    with pytest.raises(ValueError, match=message):
        FederatedConfig(output_dir=str(tmp_path), **config)


def test_dp_is_refused_for_strategies_whose_server_sees_each_clients_factors(make_config):
    with pytest.raises(ValueError, match="differential privacy"):
        FederatedTrainer(
            model=tiny_bert(), client_datasets=CLIENTS[:2],
            args=make_config(strategy="flora", client_weighting="uniform", update_clip_norm=1.0,
                             dp_noise_multiplier=1.0),
            peft_config=LoraConfig(r=2, lora_alpha=4, target_modules=["query"], task_type="SEQ_CLS"),
        )  # fmt: skip
