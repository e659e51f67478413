"""Message keys: the one codec that names the tensors a strategy sends and reads the names back.

A plain key is the name of an averaged tensor (a parameter or buffer of the model). Anything else a strategy sends
is a `Key`: the tensor (or layer) it belongs to, what part of it travels, and where needed the GaLore projector
period or the FLoRA round it comes from. `message_key(...)` builds the key, `parse` reads one back; no strategy
composes or splits key strings itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# The parts a key can name, by strategy: a LoRA layer's base weight (FedEx-LoRA, FLoRA); a GaLore period's decay
# factor, projector side and projected factor (galore_lowrank); a shared projector, gradient sketch and averaged
# Adam moments (galore_shared); one round's stacked factors (FLoRA); a weight's control variate, the server's or
# a client's own (SCAFFOLD); a LoRA layer's base weight's gradient and the fixed B and A built from it (Fed-SB).
PARTS = frozenset(
    {"base", "c", "left", "right", "R", "projector", "sketch", "exp_avg", "exp_avg_sq", "step", "stack_left",
     "stack_right", "control", "own_control", "gradient", "basis_B", "basis_A"}
)  # fmt: skip


@dataclass(frozen=True)
class Key:
    """The name of one tensor of a message: `tensor`, with the `part` of it that travels (None: the tensor itself),
    and where the strategy needs them the projector `period` and the `round` the tensor belongs to."""

    tensor: str
    part: str | None = None
    period: int | None = None
    round: int | None = None

    def __post_init__(self) -> None:
        if self.part is not None and self.part not in PARTS:
            raise ValueError(f"unknown message part {self.part!r}; the codec knows {sorted(PARTS)}")

    def __str__(self) -> str:
        key = self.tensor
        if self.period is not None:
            key += f"@{self.period}"
        if self.part is not None:
            key += f".{self.part}"
        return key if self.round is None else f"round{self.round}.{key}"


def message_key(tensor: str, part: str | None = None, *, period: int | None = None, round: int | None = None) -> str:
    """The key of `tensor`'s `part` (of projector `period`, of `round`) in a message: `str(Key(...))`."""
    return str(Key(tensor, part, period, round))


def parse(key: str) -> Key:
    """The `Key` a message key was built from; a plain tensor name gives `Key(tensor=key)`. (So the name of an
    averaged tensor must not itself end in one of `PARTS` after a dot: parameters end in `weight`, `bias` and the
    like.)"""
    round_number = None
    if match := re.match(r"round(\d+)\.", key):
        round_number, key = int(match[1]), key[match.end() :]
    head, dot, last = key.rpartition(".")
    part = last if dot and last in PARTS else None
    if part is not None:
        key = head
    period = None
    if match := re.fullmatch(r"(.+)@(\d+)", key):
        key, period = match[1], int(match[2])
    return Key(key, part, period, round_number)
