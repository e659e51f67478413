"""What a federated run uploads to the Hub.

`push_to_hub()` uploads what `Trainer.push_to_hub` does (the merged global model, a plain transformers model; the
processing class; the model card with its federated section), but `Trainer` leaves out only its own
`checkpoint-*` folders, and would upload every `round-N` folder of `output_dir` (a merged model and the federated
state each): `round_checkpoints_left_out` adds them to the upload's ignore patterns.

A round checkpoint is pushed as `hub_strategy` says, as `Trainer` pushes its checkpoints: `"every_save"` uploads
the round's merged model to the repo's root, `"checkpoint"` also the whole round folder (with `federated_state.pt`,
to resume from) as `last-checkpoint`, `"all_checkpoints"` as `round-N`; `"end"` pushes only in `push_to_hub()`.

Trainer internals used here (and nowhere else in fed_trainer): `Trainer.hub_model_id` and
`Trainer.push_in_progress` (set by `init_hf_repo`), and the shared `HfApi` of `transformers.utils.hub.hf_api`,
whose `upload_folder` `round_checkpoints_left_out` wraps for the length of one push.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import TYPE_CHECKING

from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import HubStrategy
from transformers.utils.hub import PushInProgress, hf_api

from fed_trainer.checkpoint import PREFIX, STATE_FILE

if TYPE_CHECKING:
    from fed_trainer.trainer import FederatedTrainer

ROUND_CHECKPOINTS = f"{PREFIX}*"


@contextlib.contextmanager
def round_checkpoints_left_out():
    """Within the block, every folder upload of transformers' shared `HfApi` leaves out the round checkpoints."""
    api = hf_api()
    upload = api.upload_folder

    @functools.wraps(upload)
    def upload_without_rounds(*args, ignore_patterns=None, **kwargs):
        patterns = [ignore_patterns] if isinstance(ignore_patterns, str) else list(ignore_patterns or [])
        return upload(*args, ignore_patterns=[*patterns, ROUND_CHECKPOINTS], **kwargs)

    api.upload_folder = upload_without_rounds
    try:
        yield
    finally:
        del api.upload_folder  # the class's method again


def push_round(trainer: FederatedTrainer, directory: Path, round_number: int) -> None:
    """Upload the round checkpoint in `directory` as `args.hub_strategy` says (nothing without `push_to_hub`, off
    the main process, or while the last push runs unless `hub_always_push`)."""
    args = trainer.args
    if not args.push_to_hub or not trainer.is_world_process_zero() or args.hub_strategy == HubStrategy.END:
        return
    running = trainer.push_in_progress
    if not args.hub_always_push and running is not None and not running.is_done():
        return
    message = f"Training in progress, round {round_number}"
    upload = functools.partial(
        hf_api().upload_folder, repo_id=trainer.hub_model_id, folder_path=str(directory), token=args.hub_token,
        run_as_future=True, revision=args.hub_revision,
    )  # fmt: skip
    jobs = [upload(commit_message=message, ignore_patterns=[STATE_FILE, TRAINER_STATE_NAME])]  # the model
    if args.hub_strategy in (HubStrategy.CHECKPOINT, HubStrategy.ALL_CHECKPOINTS):
        path = "last-checkpoint" if args.hub_strategy == HubStrategy.CHECKPOINT else directory.name
        jobs.append(upload(commit_message=f"{message}, checkpoint", path_in_repo=path))
    if running is None or running.is_done():
        trainer.push_in_progress = PushInProgress(jobs)
    else:
        running.jobs.extend(jobs)
