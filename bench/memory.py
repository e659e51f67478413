"""Memory of federated runs on the bundled MiniLM (BBC News), two measurements:

- default: peak RSS against the number of clients, 4 clients against 32 on the same total data. Each configuration
  runs in its own process (peak RSS is per process) for one round of `--steps` local steps per client; the
  processes alternate over repeats and the median peak RSS is reported (target: ratio at most 1.10).
- `--rounds N`: no leak across rounds under DeepSpeed ZeRO-3. `--processes` processes (torchrun, gloo on CPU)
  train every client together on the sharded model for N rounds; each records its RSS after every round. The
  ratio is RSS after round N over RSS after round 1, the largest over the processes, median over repeats (target:
  at most 1.05; an engine rebuilt per client grows it round after round).

    python bench/memory.py --repeats 3 --json bench/results/memory.json
    python bench/memory.py --rounds 10 --repeats 3 --json bench/results/memory_rounds.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from common import current_rss_mib, launcher, median, minilm_and_data, parser, report

from fed_trainer import FederatedCallback, FederatedConfig, FederatedTrainer

ZERO3 = str(Path(__file__).parent.parent / "recipes" / "deepspeed" / "zero3.json")


class RoundRSS(FederatedCallback):
    """The process's RSS (MiB) after every round, once the new global model is in place."""

    def __init__(self) -> None:
        self.mib: list[float] = []

    def on_round_end(self, args, state, control, **kwargs):
        self.mib.append(current_rss_mib())


def child(a) -> None:
    """One run (one process of it under torchrun); prints its peak RSS, or writes its RSS per round."""
    from fed_trainer.distributed import end_process_group

    model, data, collator = minilm_and_data(a.examples, a.seq_len)
    recorder = RoundRSS()
    with tempfile.TemporaryDirectory() as out:
        args = FederatedConfig(
            output_dir=out, num_clients=a.child, num_rounds=a.rounds or 1, local_steps=a.steps,
            per_device_train_batch_size=a.batch_size, report_to="none", disable_tqdm=True, use_cpu=True,
            dataloader_pin_memory=False, seed=0, deepspeed=a.deepspeed,
        )  # fmt: skip
        trainer = FederatedTrainer(
            model=model, args=args, train_dataset=data, data_collator=collator, callbacks=[recorder]
        )
        trainer.train()
    if a.worker_out:
        Path(f"{a.worker_out}.rank{trainer.args.process_index}").write_text(json.dumps(recorder.mib))
    else:
        print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
    end_process_group()


def run_child(a, clients: int, processes: int = 1, extra: tuple = ()) -> str:
    cmd = [*launcher(processes), __file__, "--child", str(clients), "--steps", str(a.steps), *extra]
    cmd += ["--examples", str(a.examples), "--seq-len", str(a.seq_len), "--batch-size", str(a.batch_size)]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // processes)))
    return subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout


def clients_main(a) -> None:
    rows = []
    for repeat in range(a.repeats):
        for clients in (a.few, a.many):
            peak = json.loads(run_child(a, clients).strip().splitlines()[-1])["peak_rss_mib"]
            rows.append({"repeat": repeat, "clients": clients, "peak_rss_mib": peak})
    few = median([r["peak_rss_mib"] for r in rows if r["clients"] == a.few])
    many = median([r["peak_rss_mib"] for r in rows if r["clients"] == a.many])
    summary = {
        "examples_in_total": a.examples,
        f"median_peak_rss_mib_{a.few}_clients": few,
        f"median_peak_rss_mib_{a.many}_clients": many,
        "ratio": many / few,
        "target_ratio": 1.10,
    }
    report(f"Peak RSS, {a.few} vs {a.many} clients (MiniLM, BBC News)", rows, summary, a.json)


def rounds_main(a) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        for repeat in range(a.repeats):
            out = f"{directory}/run{repeat}"
            extra = ("--rounds", str(a.rounds), "--deepspeed", a.deepspeed, "--worker-out", out)
            run_child(a, a.few, a.processes, extra)
            for rank in range(a.processes):
                mib = json.loads(Path(f"{out}.rank{rank}").read_text())
                rows.append({"repeat": repeat, "rank": rank, "rss_mib_round_1": mib[0],
                             f"rss_mib_round_{a.rounds}": mib[-1], "ratio": mib[-1] / mib[0]})  # fmt: skip
    summary = {
        "work": f"MiniLM fedavg, {a.few} clients x {a.steps} steps x batch {a.batch_size} per round per process",
        "deepspeed": a.deepspeed,
        "median_ratio": median([max(r["ratio"] for r in rows if r["repeat"] == k) for k in range(a.repeats)]),
        "target_ratio": 1.05,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    title = f"RSS after round 1 and round {a.rounds}, {a.processes} processes under DeepSpeed ZeRO-3"
    report(title, rows, summary, a.json)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--few", type=int, default=4, help="clients of the small run (and of the --rounds runs)")
    p.add_argument("--many", type=int, default=32)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--examples", type=int, default=512)
    p.add_argument("--rounds", type=int, help="measure RSS across this many rounds under ZeRO-3 instead")
    p.add_argument("--processes", type=int, default=2, help="processes of the --rounds runs")
    p.add_argument("--deepspeed", help=f"DeepSpeed config of the --rounds runs (default {ZERO3})")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a)
    elif a.rounds:
        a.deepspeed = a.deepspeed or ZERO3
        rounds_main(a)
    else:
        clients_main(a)


if __name__ == "__main__":
    main()
