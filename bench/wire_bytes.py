"""Bytes each method sends per client and round: what a Flower deployment puts on the wire (docs/deployment.md).

Runs the example Flower app's trainer (examples/flower: all-MiniLM-L6-v2 on BBC News, LoRA r = 8) in-process for
two rounds of one local step per method, and divides round 2's logged `bytes_up` / `bytes_down` by its clients.
The counts are the same in the simulation and over Flower (tests/test_flower.py checks it).

    python bench/wire_bytes.py --json bench/results/wire_bytes.json
"""

from __future__ import annotations

import sys
from pathlib import Path

from common import parser, report

sys.path.insert(0, str(Path(__file__).parent.parent / "examples" / "flower"))
from fed_flower.task import build_trainer  # noqa: E402

RECIPES = Path(__file__).parent.parent / "recipes"
METHODS = {
    "fedavg": "--strategy fedavg",
    "galore_fedavg": f"{RECIPES / 'galore_fedavg.yaml'}",
    "galore_lowrank": f"{RECIPES / 'galore_lowrank.yaml'}",
    "galore_shared (new projector each round)": f"{RECIPES / 'galore_shared.yaml'}",
    "galore_shared (projector kept)": f"{RECIPES / 'galore_shared.yaml'} --strategy_kwargs '{{\"refresh_rounds\":4}}'",
    "fedit": "--strategy fedit",
    "ffa_lora": "--strategy ffa_lora",
    "flexlora (ranks 4, 8)": "--strategy flexlora --lora_ranks 4 8",
    "fedex_lora": "--strategy fedex_lora",
    "flora (ranks 4, 8)": "--strategy flora --lora_ranks 4 8",
}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    a = p.parse_args()
    rows = []
    for method, flags in METHODS.items():
        fed_args = (
            f"{flags} --num_clients 2 --num_rounds 2 --local_steps 1 --lora_r 8 --max_train_samples 32 "
            "--max_seq_length 16 --eval_every_rounds 0 --output_dir /tmp/fed_trainer_wire_bytes"
        )
        trainer = build_trainer({"fed-args": fed_args})
        trainer.train()
        second = next(e for e in trainer.state.log_history if e.get("round") == 2)
        scale = 1e6 * second["num_clients"]  # MB per client
        rows.append({"method": method, "up_MB": second["bytes_up"] / scale, "down_MB": second["bytes_down"] / scale})
    report("Bytes per client and round (round 2)", rows, {}, a.json)


if __name__ == "__main__":
    main()
