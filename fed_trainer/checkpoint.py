"""Round checkpoints: everything a federated run needs to continue after the last completed round.

`output_dir/round-N/` holds the merged global model (a plain transformers model, loadable on its own) and
`federated_state.pt`: the live model's full state (base weights, adapters, residuals folded into the base), the
strategy's own state, the run's progress and log history, and the RNG states. A checkpoint is written into
`round-N.partial` and renamed into place, so a crash while writing leaves the previous checkpoints intact.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

PREFIX = "round-"
STATE_FILE = "federated_state.pt"
FORMAT = 1


def checkpoint_dirs(output_dir: str | os.PathLike) -> list[Path]:
    """Complete round checkpoints in `output_dir`, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if re.fullmatch(rf"{PREFIX}\d+", p.name) and (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def resolve_checkpoint(resume_from_checkpoint: bool | str, output_dir: str) -> Path:
    """The checkpoint folder meant by `resume_from_checkpoint` (True: the newest one in `output_dir`)."""
    if resume_from_checkpoint is True:
        found = checkpoint_dirs(output_dir)
        if not found:
            raise ValueError(
                f"resume_from_checkpoint=True but {output_dir!r} holds no round checkpoint ({PREFIX}N/{STATE_FILE}): "
                "set save_every_rounds in the config of the run to resume, or pass a checkpoint path."
            )
        return found[-1]
    path = Path(resume_from_checkpoint)
    if not (path / STATE_FILE).exists():
        raise ValueError(f"{path} is not a round checkpoint: it has no {STATE_FILE}.")
    return path


def write_checkpoint(directory: Path, write: Callable[[Path], None], keep: int | None) -> None:
    """Call `write(staging_dir)`, then move the staging folder to `directory` in one rename; keep the newest
    `keep` checkpoints of the folder (all if None)."""
    staging = directory.with_name(directory.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    write(staging)
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(staging, directory)
    if keep is not None:
        for old in checkpoint_dirs(directory.parent)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def rng_states() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def restore_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def cpu_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached CPU copies, so the checkpoint does not alias the live model."""
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
