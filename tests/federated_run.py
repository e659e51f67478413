"""A small federated run in a process of its own, for the resume and multi-process tests; it can SIGKILL itself
in mid-round, and runs under `torchrun` as well.

    python tests/federated_run.py --strategy fedavg --output_dir DIR [--kill_in_round 3] [--resume]
    torchrun --nproc_per_node 2 tests/federated_run.py --strategy fedavg --output_dir DIR

Writes DIR/final.pt and DIR/rounds.json (the per-round log entries) from the main process, and every rank's live
global model to DIR/final-rank<R>.pt.
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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--strategy", required=True)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--kill_in_round", type=int)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--aggregation_rule", default="mean")
    a = p.parse_args()
    lora = a.strategy != "fedavg"
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
    trainer = FederatedTrainer(
        model=tiny_bert(),
        args=fed_config(
            Path(a.output_dir), output_dir=a.output_dir, strategy=a.strategy, num_rounds=a.rounds, save_every_rounds=1,
            save_total_limit=2, learning_rate=2e-2 if lora else 1e-3,
            aggregation_rule=a.aggregation_rule,
        ),  # fmt: skip
        client_datasets=[toy_dataset(8, 1), toy_dataset(16, 2), toy_dataset(24, 3)],
        peft_config=peft_config if lora else None,
        client_peft_configs=[2, 4, 8] if a.strategy in ("flexlora", "flora") else None,
        callbacks=[KillInRound(a.kill_in_round)] if a.kill_in_round else [],
    )  # fmt: skip
    trainer.train(resume_from_checkpoint=True if a.resume else None)
    out = Path(a.output_dir)
    torch.save(trainer.model.state_dict(), out / f"final-rank{trainer.args.process_index}.pt")
    if trainer.is_world_process_zero():
        torch.save(trainer.model.state_dict(), out / "final.pt")
        (out / "rounds.json").write_text(json.dumps([e for e in trainer.state.log_history if "round" in e]))
    end_process_group()


if __name__ == "__main__":
    main()
