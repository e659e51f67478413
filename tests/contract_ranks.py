"""The two-rank side of the contract matrix: under `torchrun --nproc_per_node 2`, every strategy of the matrix in
turn, client-parallel (tests/test_contract.py runs each in one process and compares).

    torchrun --standalone --nproc_per_node 2 tests/contract_ranks.py DIR

Writes, per strategy, DIR/<strategy>/final-rank<R>.pt (every rank's live global model) and, from the main process,
DIR/<strategy>/rounds.json (the round entries); the round checkpoints go to DIR/<strategy>/out.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from conftest import fed_config  # noqa: E402
from contract_setup import STRATEGIES, TWO_RANK_OPTIONS, TWO_RANKS, build  # noqa: E402
from federated_run import FailClient  # noqa: E402
from transformers import default_data_collator  # noqa: E402

from fed_trainer.distributed import end_process_group  # noqa: E402

FAILING = "fedavg"  # its client 1 raises in round 2 on the rank that trains it: every rank drops it


def main() -> None:
    root = Path(sys.argv[1])
    for name in STRATEGIES:
        out = root / name
        failing = FailClient("2:1", default_data_collator) if name == FAILING else None
        trainer = build(
            lambda **overrides: fed_config(out, **{**TWO_RANKS, **overrides}),  # noqa: B023
            name, callbacks=[failing] if failing else [], dropout=0.1, data_collator=failing,
            **TWO_RANK_OPTIONS.get(name, {}),
        )  # fmt: skip
        trainer.train()
        torch.save(trainer.model.state_dict(), out / f"final-rank{trainer.args.process_index}.pt")
        if trainer.is_world_process_zero():
            (out / "rounds.json").write_text(json.dumps([e for e in trainer.state.log_history if "round" in e]))
    end_process_group()


if __name__ == "__main__":
    main()
