"""What the server knows of each client's own machine, kept alike on every rank of a client-parallel run."""

from __future__ import annotations

from fed_trainer.distributed import all_gather_objects


class ClientLedger(dict):
    """client id -> what the server knows of that client's machine (FLoRA: the round of the global model it holds;
    Fed-SB: whether it holds B and A). `note` records a change; `synchronize` gives every rank the changes each
    rank of a client-parallel round noted since `begin_round` (each served its own clients)."""

    def __init__(self) -> None:
        super().__init__()
        self.changes: dict = {}

    def begin_round(self) -> None:
        self.changes = {}

    def note(self, client_id, value) -> None:
        self[client_id] = self.changes[client_id] = value

    def synchronize(self) -> None:
        for changes in all_gather_objects(self.changes):
            self.update(changes)
