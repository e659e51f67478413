"""Where the server's state lives (`FederatedConfig.server_state_device`) and how it meets the model.

The server state is what a strategy keeps beside the live model: the global copy, the round's running sum, a server
optimizer's buffers, SCAFFOLD's controls (`fed_trainer.memory_model` counts it). For a 7B bfloat16 model that is
28 GB of float32 master copy and 28 GB of sum, 56 GB more with FedAdam: on a GPU it decides whether a run fits. On
the CPU it costs the device nothing but the tensor in transit: a client's start copies the global tensors into the
model one at a time (from pinned memory, without blocking), and aggregation adds the payload to the sum tensor by
tensor (`Strategy.aggregate`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping

import torch

logger = logging.getLogger(__name__)

SERVER_STATE_DEVICES = ("auto", "cpu", "cuda")
HEADROOM = 0.9  # "auto" keeps the state on the GPU when it and a client's training fill at most this much free memory


def state_device(
    setting: str, train_device: torch.device, state_bytes: int, training_bytes: int, free_bytes: int | None = None
) -> torch.device:
    """The device for the server state under `setting` (one of `SERVER_STATE_DEVICES`) in a run that trains on
    `train_device`. "auto": the training device when `state_bytes` plus a client's `training_bytes` fit in
    `HEADROOM` of its free memory (`free_bytes`, measured when None), else the CPU."""
    cpu = torch.device("cpu")
    if setting == "cpu" or train_device.type == "cpu":
        return cpu
    if setting == "cuda":
        return train_device
    if free_bytes is None:
        free_bytes = torch.cuda.mem_get_info(train_device)[0]
    if state_bytes + training_bytes <= HEADROOM * free_bytes:
        return train_device
    logger.info(
        "server_state_device='auto': the server state (%.2f GB) and a client's training (%.2f GB, without "
        "activations) do not fit in %.0f%% of %s's free %.2f GB, so the state stays on the CPU.",
        state_bytes / 1e9, training_bytes / 1e9, 100 * HEADROOM, train_device, free_bytes / 1e9,
    )  # fmt: skip
    return cpu


def out_of_memory_hint(err: BaseException, state_device: torch.device | None) -> str:
    """What to add to the report of a client's training that ran out of GPU memory while the server state lives on
    that GPU: where to put the state instead ("" for another error, or a state elsewhere)."""
    if not isinstance(err, torch.OutOfMemoryError) or state_device is None or state_device.type != "cuda":
        return ""
    return (
        f" The server state lives on {state_device} beside the training: server_state_device='cpu' keeps it in host "
        "memory ('auto' put it there by the weights, gradients and optimizer state, without the activations)."
    )


def placed(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A copy of `tensor` (in `dtype`, default its own) on `device`, in pinned memory when that is the CPU of a
    machine with a GPU, so that copies from it to the GPU need not wait."""
    copy = tensor.detach().to(device=device, dtype=dtype or tensor.dtype, copy=True)
    if copy.device.type == "cpu" and torch.cuda.is_available():
        return copy.pin_memory()
    return copy


def zeros_placed(like: torch.Tensor, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Zeros shaped like `like` on `device` (pinned as `placed`)."""
    pin = device.type == "cpu" and torch.cuda.is_available()
    return torch.zeros(like.shape, dtype=dtype, device=device, pin_memory=pin)


class OnDevice(Mapping):
    """A read-only view of named tensors that hands each out on `device` as it is read (one copy in flight at a time,
    not a second copy of them all): how a client reads a message kept on another device than its model's."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], device: torch.device) -> None:
        self.tensors, self.device = tensors, device

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name].to(self.device, non_blocking=self.device.type == "cuda")  # from pinned memory

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)
