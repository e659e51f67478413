"""Overhead of federation: one round of K clients x S steps against a plain Trainer run of K*S steps.

Same model (the bundled MiniLM), same data, same batch size; the two runs alternate, and the reported ratio is
the median over repeats of federated time / plain time (each `train()` call, start to end).

    python bench/overhead.py --clients 4 --steps 10 --repeats 5 --json bench/results/overhead.json
"""

from __future__ import annotations

import tempfile
import time

from common import median, minilm_and_data, parser, report
from transformers import Trainer, TrainingArguments

from fed_trainer import FederatedConfig, FederatedTrainer


def timed_train(trainer) -> float:
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    a = p.parse_args()
    common = dict(
        per_device_train_batch_size=a.batch_size, learning_rate=5e-5, report_to="none", disable_tqdm=True,
        save_strategy="no", use_cpu=True, dataloader_pin_memory=False, seed=0,
    )  # fmt: skip
    num_examples = a.clients * a.steps * a.batch_size
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for repeat in range(a.repeats):
            model, data, collator = minilm_and_data(num_examples, a.seq_len)
            plain = Trainer(
                model=model,
                args=TrainingArguments(output_dir=out, max_steps=a.clients * a.steps, **common),
                train_dataset=data,
                data_collator=collator,
            )
            plain_s = timed_train(plain)
            model, data, collator = minilm_and_data(num_examples, a.seq_len)
            fed = FederatedTrainer(
                model=model,
                args=FederatedConfig(
                    output_dir=out, num_clients=a.clients, num_rounds=1, local_steps=a.steps, **common
                ),
                train_dataset=data,
                data_collator=collator,
            )
            fed_s = timed_train(fed)
            rows.append({"repeat": repeat, "plain_s": plain_s, "federated_s": fed_s, "ratio": fed_s / plain_s})
    summary = {
        "clients": a.clients,
        "local_steps": a.steps,
        "plain_steps": a.clients * a.steps,
        "median_plain_s": median([r["plain_s"] for r in rows]),
        "median_federated_s": median([r["federated_s"] for r in rows]),
        "median_ratio": median([r["ratio"] for r in rows]),
        "target_ratio": 1.10,
    }
    report("Federated round vs plain Trainer (MiniLM, BBC News)", rows, summary, a.json)


if __name__ == "__main__":
    main()
