"""FlexLoRA server aggregation: truncated SVD from the stacked factors against a dense SVD of the same update.

For each layer shape, K clients of rank r send (A_k, B_k); the server needs the best rank-r approximation of
dW = sum_k p_k s B_k A_k. Ours: `fed_trainer.lowrank.truncated_svd_of_product` on the stacked factors (QR of both,
SVD of the R x R core, R = K r). Dense: form dW (out x in) and run `torch.linalg.svd`. Both timed from the
factors to (U, S, Vh); medians over repeats. The relative error is ||ours - dense||_F / ||dense||_F of the rank-r
reconstructions.

    python bench/aggregation.py --quick --json bench/results/aggregation.json   # 1024^2 and 4096^2, under a minute
    python bench/aggregation.py --json bench/results/aggregation.json           # plus 4096x11008 and a rank sweep
"""

from __future__ import annotations

import argparse
import time

import torch
from common import median, report

from fed_trainer.lowrank import truncated_svd_of_product


def client_factors(out: int, inn: int, clients: int, rank: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    weights = torch.rand(clients, generator=g)
    weights /= weights.sum()
    scaling = 2.0
    left = torch.cat([torch.randn(out, rank, generator=g) * (scaling * w) for w in weights], dim=1)
    right = torch.cat([torch.randn(rank, inn, generator=g) / inn**0.5 for _ in range(clients)], dim=0)
    return left, right


def dense_truncated_svd(left: torch.Tensor, right: torch.Tensor, rank: int):
    u, s, vh = torch.linalg.svd(left @ right, full_matrices=False)
    return u[:, :rank], s[:rank], vh[:rank]


def timed(fn, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return median(times), result


def measure(out: int, inn: int, clients: int, rank: int, repeats: int) -> dict:
    left, right = client_factors(out, inn, clients, rank)
    ours_s, (u, s, vh) = timed(lambda: truncated_svd_of_product(left, right, rank), repeats)
    dense_s, (du, ds, dvh) = timed(lambda: dense_truncated_svd(left, right, rank), repeats)
    reference = (du * ds) @ dvh
    rel_error = (torch.linalg.norm((u * s) @ vh - reference) / torch.linalg.norm(reference)).item()
    return {
        "shape": f"{out}x{inn}",
        "clients": clients,
        "rank": rank,
        "ours_s": ours_s,
        "dense_s": dense_s,
        "speedup": dense_s / ours_s,
        "rel_error": rel_error,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--quick", action="store_true", help="1024x1024 and 4096x4096 only, one repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--rank", type=int, default=16)
    a = p.parse_args()
    repeats = 1 if a.quick else a.repeats
    shapes = [(1024, 1024), (4096, 4096)] + ([] if a.quick else [(4096, 11008)])
    rows = [measure(out, inn, a.clients, a.rank, repeats) for out, inn in shapes]
    if not a.quick:
        rows += [measure(4096, 4096, a.clients, r, repeats) for r in (4, 64) if r != a.rank]
    at_4096 = next(r for r in rows if r["shape"] == "4096x4096" and r["rank"] == a.rank)
    summary = {
        "speedup_4096": at_4096["speedup"],
        "rel_error_max": max(r["rel_error"] for r in rows),
        "target_speedup_4096": 50.0,
        "target_rel_error": 1e-5,
        "torch_threads": torch.get_num_threads(),
    }
    report(f"FlexLoRA aggregation, {a.clients} clients: factored vs dense SVD", rows, summary, a.json)


if __name__ == "__main__":
    main()
