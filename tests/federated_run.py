"""A small federated run in a process of its own, for the resume tests; it can SIGKILL itself in mid-round.

    python tests/federated_run.py --strategy fedavg --output_dir DIR [--kill_in_round 3] [--resume]

Writes DIR/final.pt (the live global model's state) and DIR/rounds.json (the per-round log entries).
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
    a = p.parse_args()
    lora = a.strategy != "fedavg"
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
    trainer = FederatedTrainer(
        model=tiny_bert(),
        args=fed_config(
            Path(a.output_dir), output_dir=a.output_dir, strategy=a.strategy, num_rounds=4, save_every_rounds=1,
            save_total_limit=2, learning_rate=2e-2 if lora else 1e-3,
        ),  # fmt: skip
        client_datasets=[toy_dataset(8, 1), toy_dataset(16, 2), toy_dataset(24, 3)],
        peft_config=peft_config if lora else None,
        client_peft_configs=[2, 4, 8] if lora else None,
        callbacks=[KillInRound(a.kill_in_round)] if a.kill_in_round else [],
    )  # fmt: skip
    trainer.train(resume_from_checkpoint=True if a.resume else None)
    torch.save(trainer.model.state_dict(), Path(a.output_dir) / "final.pt")
    rounds = [e for e in trainer.state.log_history if "round" in e]
    (Path(a.output_dir) / "rounds.json").write_text(json.dumps(rounds))


if __name__ == "__main__":
    main()
