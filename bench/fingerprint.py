"""Every strategy's final global model and round logs on a tiny model, so that two versions of the code can be
shown to give bit-identical results (a refactoring must; `server_optimizer="none"` must).

Tiny BERT from tests/conftest.py (randomly initialised, dropout 0.1), 3 clients of 16 examples, 2 sampled per
round, 3 rounds of 3 local steps; LoRA r 4 on query and value (ranks 2, 4, 4 for flexlora and flora); GaLore rank 4.

    python bench/fingerprint.py --out /tmp/new.pt                     # this checkout
    PYTHONPATH=/path/to/other/checkout python bench/fingerprint.py --out /tmp/old.pt
    python bench/fingerprint.py --compare /tmp/old.pt /tmp/new.pt     # one line per run: bit-identical or not
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from peft import LoraConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import fed_config, tiny_bert, toy_dataset  # noqa: E402

GALORE = dict(
    optim="galore_adamw",
    optim_target_modules=["attention", "intermediate", "output.dense"],
    optim_args="rank=4,update_proj_gap=2,scale=0.25",
)
RUNS = {
    "fedavg": dict(strategy="fedavg"),
    "fedavg_median": dict(strategy="fedavg", aggregation_rule="median"),
    "galore_fedavg": dict(strategy="fedavg", **GALORE),
    "galore_lowrank": dict(strategy="galore_lowrank", **GALORE),
    "galore_shared": dict(strategy="galore_shared", **GALORE),
    "galore_shared_r2_moments": dict(strategy="galore_shared", galore_refresh_rounds=2, galore_average_moments=True,
                                     **GALORE),
    "fedit": dict(strategy="fedit"),
    "ffa_lora": dict(strategy="ffa_lora"),
    "flexlora": dict(strategy="flexlora"),
    "fedex_lora": dict(strategy="fedex_lora"),
    "flora": dict(strategy="flora"),
}  # fmt: skip


def fingerprints() -> dict:
    """Run name -> (final state dict, the per-round log entries)."""
    from fed_trainer import FederatedTrainer

    warnings.simplefilter("ignore")  # galore_shared's old option fields: the form every version reads
    out = {}
    for name, config in RUNS.items():
        lora = not config["strategy"].startswith(("fedavg", "galore"))
        with tempfile.TemporaryDirectory() as tmp:
            trainer = FederatedTrainer(
                model=tiny_bert(dropout=0.1),
                args=fed_config(Path(tmp), num_rounds=3, clients_per_round=2, **config),
                client_datasets=[toy_dataset(16, seed=s) for s in range(3)],
                peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
                if lora
                else None,
                client_peft_configs=[2, 4, 4] if config["strategy"] in ("flexlora", "flora") else None,
            )
            trainer.train()
        state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        out[name] = (state, [e for e in trainer.state.log_history if "round" in e])
    return out


def compare(old: dict, new: dict) -> bool:
    """Print, per run, whether the weights and the round logs are identical; True if all are."""
    same_everywhere = True
    for name in old:
        (old_state, old_log), (new_state, new_log) = old[name], new[name]
        weights = old_state.keys() == new_state.keys() and all(
            torch.equal(old_state[k], new_state[k]) for k in old_state
        )
        print(f"{name:26s} weights bit-identical: {weights}   round logs identical: {old_log == new_log}")
        same_everywhere &= weights and old_log == new_log
    return same_everywhere


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="write this checkout's fingerprints here")
    p.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"), help="compare two fingerprint files")
    a = p.parse_args()
    if a.out:
        torch.save(fingerprints(), a.out)
    if a.compare:
        sys.exit(0 if compare(*(torch.load(path) for path in a.compare)) else 1)


if __name__ == "__main__":
    main()
