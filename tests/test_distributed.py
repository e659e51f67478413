"""Client-parallel rounds: how clients are shared over ranks and outcomes merged (gloo on CPU), and the DDP recipe.

Two ranks against one process, for every strategy, are in the contract matrix (tests/test_contract.py)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fed_trainer import distributed
from fed_trainer.distributed import all_reduce_sums, merged, share_of


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


def _bucketed_sum_worker(process: int, init_file: str, results: str) -> None:
    distributed.BUCKET_VALUES = 5  # spawned: the patch is made in the worker
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=process, world_size=2)
    try:
        shapes = {"a": (2,), "b": (3,), "c": (2, 5), "d": (1,), "e": (4,)}
        mine = {k: torch.arange(float(torch.Size(s).numel())).view(s) + 10 * process for k, s in shapes.items()}
        torch.save(all_reduce_sums(mine), f"{results}/rank{process}.pt")
    finally:
        dist.destroy_process_group()


def test_all_reduce_sums_in_buckets_adds_up_every_tensor(tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "BUCKET_VALUES", 5)
    tensors = {k: torch.zeros(n) for k, n in dict(a=2, b=3, c=10, d=1, e=4).items()}
    assert distributed._buckets(list(tensors), tensors) == [["a", "b"], ["c"], ["d", "e"]]
    mp.spawn(_bucketed_sum_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for r in (0, 1):
        total = torch.load(tmp_path / f"rank{r}.pt")
        torch.testing.assert_close(total["c"], 2 * torch.arange(10.0).view(2, 5) + 10)
        torch.testing.assert_close(total["e"], 2 * torch.arange(4.0) + 10)
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
