"""bench/compare.py end to end in a tiny configuration: the JSON shape, the sweep, the plots."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import compare  # noqa: E402


def test_compare_writes_results_sweep_and_plots(tmp_path, monkeypatch):
    out = tmp_path / "compare.json"
    argv = [
        "compare.py", "--datasets", "bbc", "--alphas", "1.0", "--seeds", "1", "--methods", "fedavg", "ffa_lora",
        "local_only", "--rounds", "2", "--local-steps", "1", "--clients", "3", "--per-round", "2",
        "--eval-examples", "16", "--seq-len", "16", "--json", str(out), "--plots", str(tmp_path),
    ]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    compare.main()
    report = json.loads(out.read_text())
    results = report["results"]["bbc/alpha=1.0"]
    assert set(results) == {"fedavg", "ffa_lora", "local_only"}
    assert set(report["lr_sweep"]["final_accuracy"]) == {"fedavg", "ffa_lora", "local_only"}
    for method, lrs in report["lr_sweep"]["final_accuracy"].items():
        assert len(lrs) == 2 and str(report["learning_rates"][method]) in {str(float(lr)) for lr in lrs}
    assert len(results["fedavg"]["accuracy_per_round_mean"]) == 2
    assert results["ffa_lora"]["total_bytes"] < results["fedavg"]["total_bytes"]
    assert results["local_only"]["total_bytes"] == 0
    assert (tmp_path / "accuracy_per_round.png").stat().st_size > 0
    assert (tmp_path / "accuracy_vs_bytes.png").stat().st_size > 0
