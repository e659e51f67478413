"""DeepSpeed ZeRO rounds: two real processes (torchrun, gloo on CPU) train every client together on a sharded model,
with one engine for the whole run, and end where one process without DeepSpeed ends."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import federated_run
import pytest
import torch
from safetensors.torch import load_file
from transformers import BertForSequenceClassification

from fed_trainer.assets import minilm_path

REPO = Path(__file__).parent.parent
WORKER = Path(__file__).with_name("federated_run.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
# Three clients of 8 examples; without dropout. One process takes batches of 8, two ZeRO ranks 4 each: a step then
# sees the same 8 examples either way and averages the same gradient.
SAME_WORK = ["--rounds", "2", "--client_sizes", "8", "8", "8", "--dropout", "0"]


def run(launcher, output_dir, *flags, succeeds=True, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    command = [*launcher, str(WORKER), "--output_dir", str(output_dir), *SAME_WORK, *flags]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    assert (done.returncode == 0) == succeeds, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def assert_same_saved_model(saved: Path, expected: Path):
    reference, weights = (load_file(d / "model.safetensors") for d in (expected, saved))
    assert weights.keys() == reference.keys()
    for name, value in reference.items():
        torch.testing.assert_close(weights[name], value, rtol=1e-5, atol=1e-5, msg=f"{saved.name}: {name}")


def run_here(output_dir, *flags):
    """The same run as `run`, without DeepSpeed, in this process on one thread (as a launched process with
    OMP_NUM_THREADS=1): it saves the start-up of a process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        federated_run.main(["--output_dir", str(output_dir), *SAME_WORK, *flags])
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference runs, without DeepSpeed, by strategy."""
    cache = {}

    def reference(*flags):
        if flags not in cache:
            cache[flags] = tmp_path_factory.mktemp("one")
            run_here(cache[flags], *flags, "--batch_size", "8")
        return cache[flags]

    return reference


@pytest.mark.parametrize(
    "config, flags",
    [
        # (plain FedAvg under ZeRO-3 and ZeRO-3 offload is the recipes' test below, launched as the README says)
        ("zero2", ["--strategy", "fedavg"]),
        # FedAvg under ZeRO-3 with the norm of the whole update; FedAdam's moments kept and saved shard by shard
        ("zero3", ["--strategy", "fedavg", "--update_clip_norm", "0.01", "--server_optimizer", "fedadam"]),
        ("zero3", ["--strategy", "fedit"]),  # LoRA factors averaged shard by shard; saved merged from the gather
        ("zero3", ["--strategy", "fedex_lora"]),  # the factors gathered for the products, the residual by shard
        # mixed ranks in one adapter of the largest rank (the rest zero-padded): the engine's parameters keep shape
        ("zero2_offload", ["--strategy", "flexlora", "--ranks", "2,4,8"]),
        ("zero3", ["--strategy", "flexlora", "--ranks", "2,4,8"]),  # dW folded into base partitions between rounds
        # the stacks folded into base partitions, each rank stepping its part of the dense update with FedYogi
        ("zero3", ["--strategy", "flora", "--ranks", "2,4,8", "--server_optimizer", "fedyogi"]),
    ],
    ids=lambda value: value if isinstance(value, str) else "-".join(value[1::2]),
)
def test_two_zero_processes_end_with_the_global_model_of_one(tmp_path, one_process, config, flags):
    expected = one_process(*flags)
    deepspeed = REPO / "recipes" / "deepspeed" / f"{config}.json"
    run(TORCHRUN, tmp_path, *flags, "--deepspeed", str(deepspeed))
    two = tmp_path
    # the saved model (save_model, and each round's checkpoint) is whole, merged, and a plain transformers model
    for saved in (two / "model", two / "round-2"):
        assert_same_saved_model(saved, expected / "model")
        assert isinstance(BertForSequenceClassification.from_pretrained(saved), BertForSequenceClassification)
    merged, reference = (torch.load(d / "merged.pt") for d in (two, expected))  # trainer.merged_model()
    assert merged.keys() == reference.keys()
    for name, value in reference.items():
        torch.testing.assert_close(merged[name], value, rtol=1e-5, atol=1e-5, msg=name)
    one, zero = (json.loads((d / "rounds.json").read_text()) for d in (expected, two))
    for a, b in zip(one, zero, strict=True):  # bytes of whole tensors, not of one rank's shards; loss of both halves
        assert (a["num_clients"], a["bytes_up"], a["bytes_down"]) == (b["num_clients"], b["bytes_up"], b["bytes_down"])
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)


def test_a_zero3_run_killed_mid_round_resumes_to_the_global_model_of_one_process(tmp_path):
    # FLoRA with mixed ranks and FedYogi on the server: the checkpoint holds the folded base weights and the server
    # optimizer's moments of every targeted layer, gathered from the partitions; resuming loads both back into them
    flora = ["--strategy", "flora", "--ranks", "2,4,8", "--rounds", "3", "--server_optimizer", "fedyogi"]
    zero3 = [*flora, "--deepspeed", str(REPO / "recipes" / "deepspeed" / "zero3.json")]
    run(TORCHRUN, tmp_path / "run", *zero3, "--kill_in_round", "3", succeeds=False)
    assert sorted(p.name for p in (tmp_path / "run").glob("round-*")) == ["round-1", "round-2"]
    state = torch.load(tmp_path / "run" / "round-2" / "federated_state.pt", weights_only=False)
    moments = state["strategy_state"]["server_optimizer"]
    assert moments and all(t.abs().sum() > 0 for group in moments.values() for t in group.values()), moments.keys()
    run(TORCHRUN, tmp_path / "run", *zero3, "--resume")  # the checkpoint's whole weights loaded into partitions
    run_here(tmp_path / "one", *flora, "--batch_size", "8")
    assert_same_saved_model(tmp_path / "run" / "model", tmp_path / "one" / "model")


def test_a_client_failing_on_one_zero_rank_stops_every_rank_at_once_naming_the_rank_and_client(tmp_path):
    # client 1's first batch raises on rank 1 only, in round 2, while rank 0 goes on into the step's collectives:
    # without the stop, rank 0 waits there for the process-group timeout (30 minutes) and rank 1 in the next client
    zero3 = ["--strategy", "fedavg", "--deepspeed", str(REPO / "recipes" / "deepspeed" / "zero3.json")]
    start = time.monotonic()
    done = run(TORCHRUN, tmp_path, *zero3, "--fail_client", "2:1:1", succeeds=False, timeout=240)
    assert time.monotonic() - start < 180  # the whole run, round 1 included, took 31 s here
    assert "Round 2: the training of client 1 raised on rank 1 of 2: ValueError" in done.stderr
    # Rank 0 stops too: its pending collective loses its peer and it raises ("raised on rank 0 of 2"), but the
    # launcher's SIGTERM, sent when rank 1 exits, can end it before that message is written (a race that failed this
    # line in a clean-clone CI run on 2026-12-02); torchrun's failure summary lists rank 0 either way
    assert re.search(r"rank\s+: 0 \(local_rank: 0\)\n\s+exitcode\s+: (1|-15) ", done.stderr), done.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("round-*")) == ["round-1"]  # the last finished round, to resume


# The example's short run: 2 clients of 32 articles, one step each (no warm-up: its first step would have rate 0).
# Two ZeRO processes take 16 articles a step each, one process 32: the same step either way.
TINY_EXAMPLE = ["--num_clients", "2", "--num_rounds", "1", "--local_steps", "1", "--max_train_samples", "64",
                "--max_eval_samples", "16", "--max_seq_length", "32", "--warmup_steps", "0",
                "--disable_tqdm", "true"]  # fmt: skip


@pytest.fixture(scope="module")
def minilm_without_dropout(tmp_path_factory) -> Path:
    """The bundled MiniLM with dropout off, so that two processes and one draw no masks and do the same work."""
    folder = tmp_path_factory.mktemp("minilm")
    for file in Path(minilm_path()).iterdir():
        if file.is_file() and file.name != "config.json":
            (folder / file.name).symlink_to(file)
    config = json.loads((Path(minilm_path()) / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def one_process_example(tmp_path_factory, minilm_without_dropout) -> Path:
    out = tmp_path_factory.mktemp("example")
    command = [sys.executable, str(REPO / "examples/fed_glue.py"), *TINY_EXAMPLE, "--per_device_train_batch_size",
               "32", "--model_name_or_path", str(minilm_without_dropout), "--output_dir", str(out)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return out


@pytest.mark.parametrize("recipe", ["zero2", "zero3", "zero3_offload"])
def test_the_zero_recipes_launch_the_example_and_end_where_one_process_ends(
    tmp_path, recipe, minilm_without_dropout, one_process_example
):
    accelerate = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file"]
    launch = [*accelerate, str(REPO / f"recipes/accelerate/{recipe}.yaml"), str(REPO / "examples/fed_glue.py")]
    flags = [*TINY_EXAMPLE, "--use_cpu", "--per_device_train_batch_size", "16", "--model_name_or_path",
             str(minilm_without_dropout), "--output_dir", str(tmp_path / "out")]  # fmt: skip
    done = subprocess.run([*launch, *flags], capture_output=True, text=True, cwd=REPO, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    results, expected = (
        json.loads((d / "eval_results.json").read_text()) for d in (tmp_path / "out", one_process_example)
    )
    # the loss of one step taken on both halves of the batch (it was twice as large when transformers doubled it)
    assert results["eval_loss"] == pytest.approx(expected["eval_loss"], rel=1e-4)
    assert results["eval_accuracy"] == expected["eval_accuracy"]
    # the step moved the weights by about 1e-4; the two runs agreed to 2e-6 here
    assert_same_saved_model(tmp_path / "out", one_process_example)
