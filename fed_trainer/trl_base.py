"""What `FederatedSFTTrainer` and `FederatedDPOTrainer` share: a TRL trainer trains every client, prepares each
dataset once, and evaluates the global model.

TRL internals used here (and nowhere else in fed_trainer): `SFTTrainer._prepare_dataset`,
`SFTTrainer._formatting_func`, `SFTTrainer._skip_prepare_dataset`, `DPOTrainer._prepare_dataset`,
`DPOTrainer._is_vision_dataset`.
"""

from __future__ import annotations

from collections.abc import Mapping

from datasets import Dataset
from torch import nn
from trl import DPOTrainer, SFTTrainer

from fed_trainer.config import FederatedConfig
from fed_trainer.trainer import FederatedTrainer


def prepared_by(client, dataset, name: str, packing: bool | None = None):
    """`dataset` as the TRL trainer `client` prepares a training or evaluation set (tokenized, labels or preference
    columns built, packed for SFT when `packing`); as it is where TRL prepares on the fly (vision data), and for a
    client held elsewhere (a Flower SuperNode's stand-in for the others)."""
    if not isinstance(dataset, Dataset):
        return dataset
    if isinstance(client, SFTTrainer):
        if client._skip_prepare_dataset:
            return dataset
        return client._prepare_dataset(
            dataset, client.processing_class, client.args, packing, client._formatting_func, name
        )
    if isinstance(client, DPOTrainer):
        return dataset if client._is_vision_dataset else client._prepare_dataset(
            dataset, client.processing_class, client.args, name
        )  # fmt: skip
    raise TypeError(f"no TRL preparation for {type(client).__name__}")


class FederatedTRLTrainer(FederatedTrainer):
    """A `FederatedTrainer` whose clients train with a TRL trainer (`client_trainer_cls`).

    The TRL trainer is built once, with the first client's dataset (TRL reads its format then), and its own
    collator unless one is given. Every client's dataset, and the evaluation set, is then prepared once by TRL's own
    preprocessing; rounds reuse it. `evaluate()` runs the TRL trainer's own evaluation on the global model (its loss
    and its metrics: token accuracy for SFT, rewards and margins for DPO), logged with the round.

    A subclass names its config class and TRL trainer class and passes what only the TRL trainer takes
    (`trl_kwargs`: the collator, the metrics functions the TRL trainer takes, SFT's formatting function).
    """

    config_class: type[FederatedConfig]
    trl_trainer_class: type

    def __init__(self, model: nn.Module, args: FederatedConfig | None, trl_kwargs: dict, **kwargs) -> None:
        name, config = type(self).__name__, self.config_class.__name__
        if args is None:
            args = self.config_class(output_dir="fed_trainer_output")
        if not isinstance(args, self.config_class):
            raise TypeError(
                f"{name} needs a {config} as args, got {type(args).__name__}: build it with "
                f"{config}(**config.to_dict(), num_clients=..., num_rounds=...)."
            )
        if isinstance(model, str):
            raise TypeError(
                f"{name} needs the model instance (the initial global model), not a name: load it with "
                "AutoModelForCausalLM.from_pretrained(name) first."
            )
        self._trl_kwargs = trl_kwargs
        super().__init__(model=model, args=args, client_trainer_cls=self.trl_trainer_class, **kwargs)
        packing = getattr(args, "packing", None)
        eval_packing = getattr(args, "eval_packing", None)
        self._client_datasets_prepared_once(packing, packing if eval_packing is None else eval_packing)

    def client_trainer_kwargs(self) -> dict:
        """The subclass's `trl_kwargs` and a client's dataset: TRL reads the data format (prompt-completion,
        conversational, preference) when its trainer is built."""
        return {**self._trl_kwargs, "train_dataset": self._first_dataset()}

    def _client_datasets_prepared_once(self, packing: bool | None = None, eval_packing: bool | None = None) -> None:
        """Replace the clients' and the evaluation datasets by TRL's preparation of them (the first client's was
        prepared when the TRL trainer was built); on a Flower SuperNode the other clients' `RemoteClient`s stay."""
        client, first = self.client_runner.trainer, self._first_dataset()

        def prepared(cid, dataset):
            if dataset is first:
                return client.train_dataset
            return prepared_by(client, dataset, f"client {cid}", packing) if isinstance(dataset, Dataset) else dataset

        self.client_datasets = {cid: prepared(cid, dataset) for cid, dataset in self.client_datasets.items()}
        if isinstance(self.eval_dataset, Mapping):
            self.eval_dataset = {k: prepared_by(client, ds, k, eval_packing) for k, ds in self.eval_dataset.items()}
        elif self.eval_dataset is not None:
            self.eval_dataset = prepared_by(client, self.eval_dataset, "eval", eval_packing)
        self.data_collator, self.processing_class = client.data_collator, client.processing_class

    def _first_dataset(self) -> Dataset:
        """The first client dataset this process holds: the TRL trainer is built with it."""
        return next(ds for ds in self.client_datasets.values() if isinstance(ds, Dataset))

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """The TRL trainer's evaluation of the global model, logged (into the round's entry during training) and
        passed to `on_evaluate` of this trainer's callbacks (early stopping reads it there)."""
        client = self.client_runner.trainer
        if eval_dataset is None:  # the evaluation set prepared once; a dataset passed in is TRL's to prepare
            if self.eval_dataset is None:
                raise ValueError("evaluate() needs an eval_dataset: pass one here or to the trainer.")
            client.eval_dataset = self.eval_dataset
        metrics = client.evaluate(
            eval_dataset=eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix
        )
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics
