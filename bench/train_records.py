"""What a Flower ServerApp builds to send a round's train messages: one record per client, or one per distinct message.

FedAvg on the bundled SmolLM2-135M in bfloat16 (float32 master copy on the server, so each client's message is a
fresh bfloat16 copy of it), with `--clients` clients stood for by `RemoteClient`s as on the ServerApp: the round's
records built one per client (`tensor_record` of each message, as `GridClients` built them until train_contents
came) against `fed_trainer.flower.server_app.train_contents` (clients with equal messages share one record, each
later message compared with `record_holds`). Wall time and the peak of Python-allocated memory (tracemalloc: the
records' bytes live there), alternating, medians over repeats.

    python bench/train_records.py --clients 8 --json bench/results/train_records.json
"""

from __future__ import annotations

import gc
import tempfile
import time
import tracemalloc

import torch
from common import median, parser, report
from transformers import AutoModelForCausalLM

from fed_trainer import FederatedConfig, FederatedTrainer
from fed_trainer.assets import smollm2_path
from fed_trainer.clients import RemoteClient
from fed_trainer.flower.remote import roster, tensor_record
from fed_trainer.flower.server_app import train_contents
from fed_trainer.round import Round


def one_record_per_client(round: Round, everyone: dict) -> list:
    return [tensor_record(round.message(client_id)) for client_id in round.client_ids]


def shared_records(round: Round, everyone: dict) -> list:
    return [content["arrays"] for content in train_contents(round, everyone).values()]


def measured(build, trainer) -> tuple[float, float, int]:
    """(seconds, peak MiB of Python-allocated memory, distinct records) of `build(round, roster)` (the round's
    records, one per client) for round 1."""
    round, everyone = Round(trainer, 1, trainer.args.local_steps), roster(trainer)
    gc.collect()
    tracemalloc.start()
    start = time.perf_counter()
    records = build(round, everyone)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return seconds, peak, len({id(record) for record in records})


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--clients", type=int, default=8)
    a = p.parse_args()
    model = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.bfloat16)
    with tempfile.TemporaryDirectory() as out:
        args = FederatedConfig(output_dir=out, num_clients=a.clients, num_rounds=1, local_steps=1, report_to="none",
                               use_cpu=True, disable_tqdm=True, save_strategy="no")  # fmt: skip
        trainer = FederatedTrainer(model=model, args=args, client_datasets=[RemoteClient(64)] * a.clients)
        rows = []
        for repeat in range(a.repeats):
            for name, build in (("one per client", one_record_per_client), ("train_contents", shared_records)):
                seconds, peak, records = measured(build, trainer)
                rows.append({"repeat": repeat, "records": name, "distinct": records, "seconds": seconds,
                             "peak_MiB": peak})  # fmt: skip
    model_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    summary = {"clients": a.clients, "model_MiB (bf16)": model_mib}
    for name in ("one per client", "train_contents"):
        mine = [r for r in rows if r["records"] == name]
        summary[f"{name}: median seconds"] = median([r["seconds"] for r in mine])
        summary[f"{name}: median peak MiB"] = median([r["peak_MiB"] for r in mine])
    report("A round's train records on the ServerApp (SmolLM2-135M, bf16, FedAvg)", rows, summary, a.json)


if __name__ == "__main__":
    main()
