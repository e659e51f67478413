"""Peak memory against the number of clients: 4 clients against 32 on the same total data.

Each configuration runs in its own process (peak RSS is per process) for one round of `--steps` local steps per
client on the bundled MiniLM; the processes alternate over repeats and the median peak RSS is reported.

    python bench/memory.py --repeats 3 --json bench/results/memory.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile

from common import median, minilm_and_data, parser, report

from fed_trainer import FederatedConfig, FederatedTrainer


def child(clients: int, steps: int, examples: int, seq_len: int, batch_size: int) -> None:
    model, data, collator = minilm_and_data(examples, seq_len)
    with tempfile.TemporaryDirectory() as out:
        args = FederatedConfig(
            output_dir=out, num_clients=clients, num_rounds=1, local_steps=steps,
            per_device_train_batch_size=batch_size, report_to="none", disable_tqdm=True, use_cpu=True,
            dataloader_pin_memory=False, seed=0,
        )  # fmt: skip
        FederatedTrainer(model=model, args=args, train_dataset=data, data_collator=collator).train()
    print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--few", type=int, default=4)
    p.add_argument("--many", type=int, default=32)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--examples", type=int, default=512)
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a.child, a.steps, a.examples, a.seq_len, a.batch_size)
        return
    rows = []
    for repeat in range(a.repeats):
        for clients in (a.few, a.many):
            cmd = [sys.executable, __file__, "--child", str(clients), "--steps", str(a.steps)]
            cmd += ["--examples", str(a.examples), "--seq-len", str(a.seq_len), "--batch-size", str(a.batch_size)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            peak = json.loads(out.strip().splitlines()[-1])["peak_rss_mib"]
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


if __name__ == "__main__":
    main()
