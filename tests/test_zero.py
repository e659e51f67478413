"""DeepSpeed ZeRO rounds: two real processes (torchrun, gloo on CPU) train every client together on a sharded model,
with one engine for the whole run, and end where one process without DeepSpeed ends."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertForSequenceClassification

REPO = Path(__file__).parent.parent
WORKER = Path(__file__).with_name("federated_run.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
# Three clients of 8 examples; without dropout. One process takes batches of 8, two ZeRO ranks 4 each: a step then
# sees the same 8 examples either way and averages the same gradient.
SAME_WORK = ["--rounds", "2", "--client_sizes", "8", "8", "8", "--dropout", "0"]


def run(launcher, output_dir, *flags):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    command = [*launcher, str(WORKER), "--output_dir", str(output_dir), *SAME_WORK, *flags]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return output_dir


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference runs, without DeepSpeed, by strategy."""
    cache = {}

    def reference(strategy):
        if strategy not in cache:
            out = tmp_path_factory.mktemp(f"one-{strategy}")
            cache[strategy] = run([sys.executable], out, "--strategy", strategy, "--batch_size", "8")
        return cache[strategy]

    return reference


@pytest.mark.parametrize(
    "strategy, config",
    [("fedavg", "zero2"), ("fedavg", "zero3"), ("fedavg", "zero3_offload"), ("fedit", "zero2")],
)
def test_two_zero_processes_end_with_the_global_model_of_one(tmp_path, one_process, strategy, config):
    expected = one_process(strategy)
    deepspeed = REPO / "recipes" / "deepspeed" / f"{config}.json"
    two = run(TORCHRUN, tmp_path, "--strategy", strategy, "--deepspeed", str(deepspeed))
    # the saved model (save_model, and each round's checkpoint) is whole, merged, and a plain transformers model
    reference = load_file(expected / "model" / "model.safetensors")
    for saved in (two / "model", two / "round-2"):
        weights = load_file(saved / "model.safetensors")
        assert weights.keys() == reference.keys()
        for name, value in reference.items():
            torch.testing.assert_close(weights[name], value, rtol=1e-5, atol=1e-5, msg=f"{saved.name}: {name}")
        assert isinstance(BertForSequenceClassification.from_pretrained(saved), BertForSequenceClassification)
    one, zero = (json.loads((d / "rounds.json").read_text()) for d in (expected, two))
    for a, b in zip(one, zero, strict=True):  # bytes of whole tensors, not of one rank's shards; loss of both halves
        assert (a["num_clients"], a["bytes_up"], a["bytes_down"]) == (b["num_clients"], b["bytes_up"], b["bytes_down"])
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-6)


def test_the_zero3_recipe_launches_the_example(tmp_path):
    accelerate = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file"]
    launch = [*accelerate, str(REPO / "recipes/accelerate/zero3.yaml"), str(REPO / "examples/fed_glue.py")]
    tiny = ["--use_cpu", "--num_rounds", "1", "--local_steps", "1", "--max_train_samples", "32",
            "--max_eval_samples", "16", "--max_seq_length", "32", "--output_dir", str(tmp_path / "out"),
            "--disable_tqdm", "true"]  # fmt: skip
    done = subprocess.run([*launch, *tiny], capture_output=True, text=True, cwd=REPO, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert results["eval_loss"] < 2.0  # 5 topics: about ln 5 = 1.61 untrained; 3.2 when losses were doubled
    assert (tmp_path / "out" / "model.safetensors").exists()
