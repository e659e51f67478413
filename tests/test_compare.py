"""bench/compare.py end to end in tiny configurations: the JSON shape, the sweep, the plots, every task."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import compare  # noqa: E402


def run_compare(monkeypatch, tmp_path, *args) -> dict:
    out = tmp_path / "compare.json"
    monkeypatch.setattr(sys, "argv", ["compare.py", *args, "--json", str(out), "--plots", str(tmp_path)])
    compare.main()
    return json.loads(out.read_text())


def test_compare_writes_results_sweep_and_plots(tmp_path, monkeypatch):
    report = run_compare(
        monkeypatch, tmp_path, "--datasets", "bbc", "--alphas", "1.0", "--seeds", "1", "--methods", "fedavg",
        "ffa_lora", "local_only", "fedavg_nf4_ef", "fed_sb",
        "--rounds", "2", "--local-steps", "1", "--clients", "3", "--per-round", "2",
        "--eval-examples", "16", "--seq-len", "16", "--lr-grid", "lora=0.02,0.005",
    )  # fmt: skip
    results = report["results"]["bbc/alpha=1.0"]
    fed_sb = results.pop("fed_sb")  # its round 0 (gradients, no evaluation) is not one of the rounds of its curve
    assert len(fed_sb["per_round_mean"]) == 2 and report["lr_sweep"]["final"].pop("fed_sb").keys() == {"0.02", "0.005"}
    assert fed_sb["total_bytes"] > results["ffa_lora"]["total_bytes"]  # round 0's dense gradients
    compressed = results.pop("fedavg_nf4_ef")  # not swept: at fedavg's rate, on nf4 uplinks
    assert compressed["learning_rate"] == results["fedavg"]["learning_rate"]
    assert compressed["total_bytes"] < results["fedavg"]["total_bytes"]
    assert report["metric"] == "accuracy" and set(results) == {"fedavg", "ffa_lora", "local_only"}
    assert set(report["lr_sweep"]["final"]) == {"fedavg", "ffa_lora", "local_only"}
    assert report["lr_grid"]["lora"] == [0.02, 0.005]  # --lr-grid's, not the task's
    families = {"fedavg": "full", "local_only": "full", "ffa_lora": "lora"}
    for method, lrs in report["lr_sweep"]["final"].items():
        assert [float(lr) for lr in lrs] == report["lr_grid"][families[method]]
        assert str(report["learning_rates"][method]) in {str(float(lr)) for lr in lrs}
    assert len(results["fedavg"]["per_round_mean"]) == 2
    assert all(results[m]["worst_client_mean"] is not None for m in results)
    assert results["ffa_lora"]["total_bytes"] < results["fedavg"]["total_bytes"]
    assert results["local_only"]["total_bytes"] == 0
    assert (tmp_path / "accuracy_per_round.png").stat().st_size > 0
    assert (tmp_path / "accuracy_vs_bytes.png").stat().st_size > 0


@pytest.mark.parametrize(
    "task, setting, extra",
    [
        ("instruct", "chatterbot/topic", ["--seq-len", "48", "--batch-size", "2", "--eval-examples", "4"]),
        ("vision", "fashion_mnist/alpha=1.0", ["--clients", "3", "--eval-examples", "32", "--batch-size", "8"]),
    ],
)
def test_compare_runs_the_instruct_and_vision_tasks(tmp_path, monkeypatch, task, setting, extra):
    report = run_compare(
        monkeypatch, tmp_path, "--task", task, "--quick", "--methods", "fedavg", "flexlora", "--rounds", "1",
        "--local-steps", "1", "--per-round", "2", *extra,
    )  # fmt: skip
    results = report["results"][setting]
    assert report["task"] == task and set(results) == {"fedavg", "flexlora"}
    assert report["metric"] == ("loss" if task == "instruct" else "accuracy")
    assert results["flexlora"]["total_bytes"] < results["fedavg"]["total_bytes"]
    metric = report["metric"]
    assert (results["fedavg"]["worst_client_mean"] is None) == (task == "instruct")  # natural clients, a loss
    assert (tmp_path / f"{metric}_per_round.png").exists() and (tmp_path / f"{metric}_vs_bytes.png").exists()


def test_a_clients_accuracy_weighs_the_per_class_accuracies_by_its_label_mix():
    labels, predicted = np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 1, 0])  # per class: 1/2, 1, 0
    clients = [[0, 0, 0, 1], [2, 2], [3, 1], [0, 1, 2]]  # class 3 is not in the validation set: left out
    got = compare.label_mix_accuracies(predicted, labels, clients)
    assert got == pytest.approx([0.75 * 0.5 + 0.25 * 1.0, 0.0, 1.0, (0.5 + 1.0 + 0.0) / 3])
