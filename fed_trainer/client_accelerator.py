"""The `Accelerator` classes of the client trainer, which trains one client after another on the same model."""

from __future__ import annotations

from accelerate import Accelerator
from accelerate.utils import DistributedType


class ClientAccelerator(Accelerator):
    """Accelerate's `Accelerator`, minus what its `free_memory()` does at every `Trainer.train()` start that does not
    fit a trainer that trains one client after another on the same model.

    - No `gc.collect()`: about 0.3 s in a process that holds a tokenized data set; with 25 client trainings per run
      that was a quarter of a MiniLM federated run's time. Between two clients the model is the same and the last
      optimizer is freed by reference counting, so dropping the references is enough.
    - The DeepSpeed engine is kept, not destroyed: it is built once and serves every client of every round (a new
      engine per client leaks memory and partitions ZeRO-3 parameters twice).
    """

    def free_memory(self, *objects):
        self._schedulers, self._optimizers, self._models, self._dataloaders = [], [], [], []
        self.step = 0
        return [None] * len(objects)


class RankLocalAccelerator(ClientAccelerator):
    """The client trainer's `Accelerator` in client-parallel rounds: it reports one process, so `prepare` neither
    wraps the model in DDP nor shards the client's data, and `gather` is the identity. Each rank then trains its
    client exactly as a one-process run would, with no collective inside local training (ranks train different
    numbers of clients, so one would deadlock)."""

    @property
    def distributed_type(self):
        return DistributedType.NO

    @property
    def use_distributed(self) -> bool:
        return False

    @property
    def num_processes(self) -> int:
        return 1

    @property
    def process_index(self) -> int:
        return 0

    def gather(self, tensor):
        return tensor

    def reduce(self, tensor, reduction="sum", scale=1.0):
        return tensor * scale if scale != 1.0 else tensor
