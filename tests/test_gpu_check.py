"""bench/gpu_check.sh, the one-shot accelerator check, run with --cpu: the same code a GPU machine runs, so that it
cannot rot before a GPU is lent (on one, run it without --cpu: docs/scaling.md)."""

import json
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_every_check_of_the_accelerator_script_runs_on_the_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--cpu", "--json", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = {row["check"]: row for row in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["plain_bf16", "fedavg_bf16", "fedit_bf16", "fedavg_bf16_state_cpu", "galore_fedavg",
                          "qlora_4bit", "fed_sb_bf16", "fed_sb_bf16_state_cpu", "memory_model",
                          "memory_model_state_cpu", "zero3_1proc", "client_parallel_2proc"]  # fmt: skip
    assert {row["status"] for row in rows.values()} == {"ok"}
    assert rows["plain_bf16"]["throughput_ratio"] == 1.0
    for name in ("fedavg_bf16", "fedit_bf16", "galore_fedavg", "qlora_4bit"):
        assert rows[name]["tokens_per_s"] > 0 and rows[name]["peak_mib"] > 0, rows[name]
    # the tensors at their peak are the memory model's and the activations of 2 x 32 tokens (on the CPU the state
    # lives on the model's device either way)
    for name in ("memory_model", "memory_model_state_cpu"):
        assert 1.0 <= rows[name]["model_ratio"] < 1.05, rows[name]
    # where the server state lives changes no number (on a GPU: the peak memory)
    assert rows["fedavg_bf16_state_cpu"]["loss"] == pytest.approx(rows["fedavg_bf16"]["loss"], rel=1e-6)
    assert rows["fed_sb_bf16_state_cpu"]["loss"] == pytest.approx(rows["fed_sb_bf16"]["loss"], rel=1e-6)
    # the same federated MiniLM run, sharded by ZeRO-3 in one process and shared out over two processes
    assert rows["zero3_1proc"]["loss"] == pytest.approx(rows["client_parallel_2proc"]["loss"], rel=1e-4)


def test_without_a_gpu_the_script_says_how_to_get_one_or_to_pass_cpu():
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh")], capture_output=True, text=True, cwd=REPO,
                          timeout=300)  # fmt: skip
    assert done.returncode != 0 and "TORCH_INDEX_URL" in done.stderr and "--cpu" in done.stderr
