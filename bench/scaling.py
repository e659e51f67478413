"""Client-parallel scaling: wall time per round of the same federated work with 1 and with N processes.

The work: the bundled MiniLM, full fine-tuning (`fedavg`), `--clients` clients per round of `--steps` local steps
each. The one-process run is plain `python`; the N-process run is `torchrun --standalone --nproc_per_node N`
(gloo on CPU, NCCL on GPUs: the same script is what a GPU user runs). The machine's cores are shared out equally
(each process gets cores / N threads), so both runs use the whole machine. Runs alternate; round 1 (warm-up) is
left out; the ratio reported is the median over repeats of (seconds per round with 1) / (seconds per round with N).

    python bench/scaling.py --processes 2 --repeats 3 --json bench/results/scaling.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import launcher, median, minilm_and_data, parser, report


def worker(a) -> None:
    """One run (one process of it under torchrun): writes seconds per round and peak RSS to `a.worker_out`."""
    import torch

    from fed_trainer import FederatedCallback, FederatedConfig, FederatedTrainer
    from fed_trainer.distributed import end_process_group

    class RoundClock(FederatedCallback):
        def __init__(self):
            self.seconds = []

        def on_round_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_round_end(self, args, state, control, **kwargs):  # after the aggregate of all ranks is applied
            self.seconds.append(time.perf_counter() - self.start)

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    model, data, collator = minilm_and_data(a.clients * a.steps * a.batch_size, a.seq_len)
    clock = RoundClock()
    with tempfile.TemporaryDirectory() as out:
        trainer = FederatedTrainer(
            model=model,
            args=FederatedConfig(
                output_dir=out,
                num_clients=a.clients,
                num_rounds=a.rounds,
                local_steps=a.steps,
                per_device_train_batch_size=a.batch_size,
                learning_rate=5e-5,
                report_to="none",
                disable_tqdm=True,
                use_cpu=not torch.cuda.is_available(),
                dataloader_pin_memory=False,
                save_strategy="no",
                seed=0,
            ),  # fmt: skip
            train_dataset=data,
            data_collator=collator,
            callbacks=[clock],
        )
        trainer.train()
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {"round_s": clock.seconds, "peak_rss_mib": peak_mib}
    Path(f"{a.worker_out}.rank{trainer.args.process_index}").write_text(json.dumps(result))
    end_process_group()


FORWARDED = ("clients", "steps", "rounds", "seq_len", "batch_size")  # the work, the same for every run


def timed_run(a, processes: int, directory: str) -> dict:
    """Launch one run with `processes` processes; its seconds per round (rank 0) and summed peak RSS."""
    out = f"{directory}/run{processes}"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items() if k in FORWARDED]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, a.cores // processes)))
    start = time.perf_counter()
    subprocess.run([*launcher(processes), __file__, "--worker-out", out, *flags], env=env, check=True)
    wall = time.perf_counter() - start
    ranks = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(processes)]
    return {
        "round_s": median(ranks[0]["round_s"][1:]),  # round 1 warms up
        "process_wall_s": wall,
        "peak_rss_mib_total": sum(r["peak_rss_mib"] for r in ranks),
    }


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--processes", type=int, default=2, help="processes of the parallel run")
    p.add_argument("--clients", type=int, default=4, help="clients per round (all clients train every round)")
    p.add_argument("--steps", type=int, default=10, help="local steps per client and round")
    p.add_argument("--rounds", type=int, default=3, help="rounds per run; the first is left out as warm-up")
    p.add_argument("--cores", type=int, default=os.cpu_count(), help="threads shared out over each run's processes")
    p.add_argument("--worker-out", help=argparse.SUPPRESS)  # set on the runs it launches
    a = p.parse_args()
    if a.worker_out:
        worker(a)
        return
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        for repeat in range(a.repeats):
            for processes in (1, a.processes):
                run = timed_run(a, processes, directory)
                rows.append({"repeat": repeat, "processes": processes, **run})
    one = [r for r in rows if r["processes"] == 1]
    many = [r for r in rows if r["processes"] == a.processes]
    summary = {
        "work": f"MiniLM fedavg, {a.clients} clients x {a.steps} steps x batch {a.batch_size} per round",
        "cores": a.cores,
        "median_round_s_1": median([r["round_s"] for r in one]),
        f"median_round_s_{a.processes}": median([r["round_s"] for r in many]),
        "median_speedup": median([o["round_s"] / m["round_s"] for o, m in zip(one, many)]),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    report(f"Seconds per round, 1 process against {a.processes} (client-parallel)", rows, summary, a.json)


if __name__ == "__main__":
    main()
