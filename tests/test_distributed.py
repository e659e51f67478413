"""Client-parallel rounds: two real processes (torchrun, gloo on CPU) against one, the same seed and clients."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fed_trainer.distributed import all_reduce_sums, merged, share_of

WORKER = Path(__file__).with_name("federated_run.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def run(launcher, output_dir, *flags):
    # one thread per process, and no torchrun variables leaking into the one-process run
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    command = [*launcher, str(WORKER), "--output_dir", str(output_dir), "--rounds", "2", *flags]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]


@pytest.mark.parametrize(
    "flags",
    [
        ["--strategy", "flexlora", "--ranks", "2,4,8"],  # mixed ranks: stacked factors gathered in client order
        # a second running sum (the products) reduced over ranks; the same server step on every rank
        ["--strategy", "fedex_lora", "--server_optimizer", "fedadam"],
        ["--strategy", "fedit", "--aggregation_rule", "median"],  # every payload gathered on every rank
        # 2 of 3 clients a round, so a client moves between ranks: what each client has folded is shared
        ["--strategy", "flora", "--ranks", "2,4,8", "--clients_per_round", "2", "--rounds", "4"],
        # the clients' gradient sketches summed over ranks, so every rank picks the same projectors
        ["--strategy", "galore_shared", "--clients_per_round", "2", "--rounds", "3"],
        # plain FedAvg in round 1; in round 2 client 1's training raises on the rank that trains it: every rank drops
        # it, as one process does
        ["--strategy", "fedavg", "--fail_client", "2:1"],
    ],
    ids=lambda flags: "-".join(flags[1::2]),
)
def test_two_processes_end_with_the_global_model_of_one(tmp_path, flags):
    # 3 clients on 2 ranks: rank 0 trains two of them, rank 1 one
    run([sys.executable], tmp_path / "one", *flags)
    run(TORCHRUN, tmp_path / "two", *flags)
    expected = torch.load(tmp_path / "one" / "final.pt")
    ranks = [torch.load(tmp_path / "two" / f"final-rank{r}.pt") for r in (0, 1)]
    for name, value in expected.items():
        torch.testing.assert_close(ranks[0][name], value, rtol=1e-5, atol=1e-5, msg=name)
        assert torch.equal(ranks[1][name], ranks[0][name]), f"ranks disagree on {name}"
    one, two = (json.loads((tmp_path / d / "rounds.json").read_text()) for d in ("one", "two"))
    for a, b in zip(one, two, strict=True):
        assert (a["num_clients"], a["bytes_up"], a["bytes_down"]) == (b["num_clients"], b["bytes_up"], b["bytes_down"])
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        assert a.get("num_clients_dropped") == b.get("num_clients_dropped")
    if "--fail_client" in flags:
        assert [entry.get("num_clients_dropped") for entry in two] == [None, 1]
    # checkpoints written by the main process alone (two writers would race on the round-N.partial folders)
    newest = [f"round-{n}" for n in (len(one) - 1, len(one))]  # save_total_limit=2
    assert sorted(p.name for p in (tmp_path / "two").glob("round-*")) == newest


def test_clients_are_shared_round_robin():
    ids = ["a", "b", "c", "d", "e"]
    assert [share_of(ids, r, 2) for r in (0, 1)] == [["a", "c", "e"], ["b", "d"]]
    assert merged([{"x": [1], "y": {"a": 1}, "n": 2}, {"x": [2], "y": {"b": 2}, "n": 3}]) == {
        "x": [1, 2], "y": {"a": 1, "b": 2}, "n": 5,
    }  # fmt: skip


def _sum_worker(process: int, init_file: str, results: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=process, world_size=2)
    try:
        # rank 1 aggregated nothing this round; rank 0 two tensors of two dtypes
        mine = {"w": torch.full((2, 3), 1.5), "n": torch.tensor([4], dtype=torch.int64)} if process == 0 else None
        total = all_reduce_sums(mine)
        torch.save(total, f"{results}/rank{process}.pt")
    finally:
        dist.destroy_process_group()


def test_all_reduce_sums_fills_in_a_rank_that_aggregated_nothing(tmp_path):
    mp.spawn(_sum_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for r in (0, 1):
        total = torch.load(tmp_path / f"rank{r}.pt")
        torch.testing.assert_close(total["w"], torch.full((2, 3), 1.5))
        assert total["n"].tolist() == [4] and total["n"].dtype == torch.int64
    shutil.rmtree(tmp_path / "init", ignore_errors=True)


def test_the_ddp_recipe_launches_the_example_and_a_cpu_launch_without_use_cpu_is_refused(tmp_path):
    repo = Path(__file__).parent.parent
    accelerate = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file"]
    launch = [*accelerate, str(repo / "recipes/accelerate/ddp.yaml"), str(repo / "examples/fed_glue.py")]
    tiny = ["--num_rounds", "1", "--local_steps", "1", "--max_train_samples", "32", "--max_eval_samples", "16",
            "--max_seq_length", "32", "--output_dir", str(tmp_path / "out"), "--disable_tqdm", "true"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([*launch, "--use_cpu", *tiny], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "'num_clients': 4" in done.stdout + done.stderr and (tmp_path / "out" / "model.safetensors").exists()
    refused = subprocess.run([*launch, *tiny], capture_output=True, text=True, env=env, timeout=300)
    assert refused.returncode != 0 and "pass --use_cpu" in refused.stderr
