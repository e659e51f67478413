"""A small federated run in a process of its own, for the resume and multi-process tests; it can SIGKILL itself
in mid-round, and runs under `torchrun` as well.

    python tests/federated_run.py --strategy fedavg --output_dir DIR [--kill_in_round 3] [--resume]
    torchrun --nproc_per_node 2 tests/federated_run.py --strategy fedavg --output_dir DIR

`--fail_client ROUND:CLIENT[:RANK]` makes that client's training raise in that round (on that rank only, if given).

Writes DIR/final.pt and DIR/rounds.json (the per-round log entries) from the main process, every rank's live
global model to DIR/final-rank<R>.pt, and the saved model to DIR/model.
"""

import argparse
import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from conftest import fed_config, tiny_bert, toy_dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import default_data_collator  # noqa: E402

from fed_trainer import FederatedCallback, FederatedTrainer  # noqa: E402
from fed_trainer.distributed import end_process_group  # noqa: E402


class KillInRound(FederatedCallback):
    """SIGKILL this process as the second client of round `round_number` starts training."""

    def __init__(self, round_number: int):
        self.round_number, self.round = round_number, 0

    def on_round_begin(self, args, state, control, round=None, **kwargs):
        self.round, self.clients = round, 0

    def on_client_begin(self, args, state, control, **kwargs):
        self.clients += 1
        if self.round == self.round_number and self.clients == 2:
            os.kill(os.getpid(), signal.SIGKILL)


class FailClient(FederatedCallback):
    """Make one client's local training raise in one round, on one rank (or on every rank that trains it): its data
    collator raises on the client's first batch, inside the client's training, like a bad example would."""

    def __init__(self, spec: str, collator):
        round_number, client, *rank = (int(part) for part in spec.split(":"))
        self.target, self.rank, self.collator, self.now = (
            (round_number, client),
            rank[0] if rank else None,
            collator,
            None,
        )

    def on_round_begin(self, args, state, control, round=None, **kwargs):
        self.round = round

    def on_client_begin(self, args, state, control, client_id=None, **kwargs):
        failing = (self.round, client_id) == self.target and self.rank in (None, args.process_index)
        self.now = f"client {client_id} of round {self.round} fails here" if failing else None

    def __call__(self, features):
        if self.now is not None:
            raise ValueError(self.now)
        return self.collator(features)


def main(argv: list[str] | None = None) -> None:
    """The run `argv` (default: the command line) asks for; also called in-process by tests/test_zero.py."""
    p = argparse.ArgumentParser()
    p.add_argument("--strategy", required=True)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--kill_in_round", type=int)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--aggregation_rule", default="mean")
    p.add_argument("--server_optimizer", default="none")
    p.add_argument("--deepspeed", help="a DeepSpeed config (JSON): every rank trains every client on a sharded model")
    p.add_argument("--batch_size", type=int, default=4, help="per process")
    p.add_argument("--client_sizes", type=int, nargs="+", default=[8, 16, 24])
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--update_clip_norm", type=float)
    p.add_argument("--clients_per_round", type=int)
    p.add_argument("--fail_client", help="ROUND:CLIENT[:RANK]: that client's training raises (see FailClient)")
    p.add_argument("--ranks", help="the clients' LoRA ranks, e.g. 2,4,8 (default: peft_config's rank for all)")
    a = p.parse_args(argv)
    galore = a.strategy.startswith("galore_")  # galore_lowrank, galore_shared: GaLore clients
    lora = a.strategy != "fedavg" and not galore
    optimizer = dict(optim="galore_adamw", optim_target_modules=["attention", "intermediate"],
                     optim_args="rank=4,update_proj_gap=2,scale=0.5") if galore else {}  # fmt: skip
    failing = FailClient(a.fail_client, default_data_collator) if a.fail_client else None
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
    trainer = FederatedTrainer(
        model=tiny_bert(dropout=a.dropout),
        args=fed_config(
            Path(a.output_dir), output_dir=a.output_dir, strategy=a.strategy, num_rounds=a.rounds, save_every_rounds=1,
            save_total_limit=2, learning_rate=2e-2 if lora else 1e-3,
            aggregation_rule=a.aggregation_rule, update_clip_norm=a.update_clip_norm, deepspeed=a.deepspeed,
            server_optimizer=a.server_optimizer,
            per_device_train_batch_size=a.batch_size, clients_per_round=a.clients_per_round, **optimizer,
        ),  # fmt: skip
        client_datasets=[toy_dataset(n, seed) for seed, n in enumerate(a.client_sizes, start=1)],
        peft_config=peft_config if lora else None,
        client_peft_configs=[int(r) for r in a.ranks.split(",")] if a.ranks else None,
        data_collator=failing,
        callbacks=[c for c in (KillInRound(a.kill_in_round) if a.kill_in_round else None, failing) if c is not None],
    )  # fmt: skip
    trainer.train(resume_from_checkpoint=True if a.resume else None)
    out = Path(a.output_dir)
    trainer.save_model(str(out / "model"))  # under ZeRO-3 a collective: the weights are gathered from the ranks
    torch.save(trainer.model.state_dict(), out / f"final-rank{trainer.args.process_index}.pt")
    merged = trainer.merged_model()  # under ZeRO-3 a collective too; None on the other ranks
    if trainer.is_world_process_zero():
        torch.save(merged.state_dict(), out / "merged.pt")
        torch.save(trainer.model.state_dict(), out / "final.pt")
        (out / "rounds.json").write_text(json.dumps([e for e in trainer.state.log_history if "round" in e]))
    end_process_group()


if __name__ == "__main__":
    main()
