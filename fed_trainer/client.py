"""Local training of one client for one round, reusing a single inner `Trainer`.

Trainer internals used here (and nowhere else in fed_trainer): `_prepare_for_training`, `_created_lr_scheduler`,
`_get_learning_rate`, `_prepare_inputs` (a batch on the model's device, for round 0's gradients), and for FedProx's
term the attributes `training_step` scales a loss by (`loss_is_scaled_for_ga`, `model_accepts_loss_kwargs`,
`current_gradient_accumulation_steps`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import time

import torch
from datasets import Dataset
from torch.optim.lr_scheduler import LambdaLR
from transformers import PrinterCallback, ProgressCallback, Trainer, TrainingArguments, get_scheduler
from transformers.trainer_utils import TrainOutput, set_seed

from fed_trainer.callbacks import ClientStepProgressCallback
from fed_trainer.client_accelerator import ClientAccelerator, RankLocalAccelerator
from fed_trainer.config import FederatedConfig
from fed_trainer.distributed import is_client_parallel
from fed_trainer.zero import restart_optimizer

TRAINER_LOGGER = "transformers.trainer"  # where Trainer logs, e.g. the dataset columns a model's forward ignores


class _FirstOccurrence(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


@contextlib.contextmanager
def each_message_once(logger_name: str):
    """Within the block, let each distinct message of the logger `logger_name` through once: the client trainer
    would otherwise repeat the same line (e.g. the columns it ignores) for every client of every round."""
    logger = logging.getLogger(logger_name)
    once = _FirstOccurrence()
    logger.addFilter(once)
    try:
        yield
    finally:
        logger.removeFilter(once)


def _shifted(lr_lambda, offset: int, step: int) -> float:
    return lr_lambda(step + offset)


def _constant(step: int) -> float:
    return 1.0


class ClientTrainerMixin:
    """What makes a `Trainer` (or a subclass of it) run every client's local steps on the one shared model.

    Its learning-rate schedule is a window of the schedule of the whole federated run: steps
    `[offset, offset + local steps)` of `schedule_steps` in all. Its optimizer is created anew for every client.
    Mixed in front of the client trainer class (`client_trainer_class`), so a subclass's own `compute_loss`,
    `training_step` or data preparation runs unchanged.
    """

    schedule_offset: int = 0
    schedule_steps: int = 1
    zero_optimizer = None  # under DeepSpeed: the optimizer of the one engine, restarted for every client
    proximal_mu: float = 0.0  # FedProx's mu
    constant_schedule: bool = False  # the learning rate stays at learning_rate (personalization's steps)
    anchor: tuple[tuple[torch.nn.Parameter, torch.Tensor], ...] = ()  # (trainable weight, value at the client start)

    def take_anchor(self) -> None:
        """Remember the trainable weights the client starts from (the global model as the strategy loaded it), for
        FedProx's term; nothing without `proximal_mu`."""
        if self.proximal_mu:
            self.anchor = tuple((p, p.detach().clone()) for p in self.model.parameters() if p.requires_grad)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The client trainer's loss, plus FedProx's mu/2 ||w - w_start||^2 over the trainable weights when
        `proximal_mu` is set (Li et al. 2020), scaled so that one optimizer step sees it once whatever the gradient
        accumulation."""
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        if not self.proximal_mu or not model.training:
            return result
        loss, outputs = result if return_outputs else (result, None)
        term = sum(((p - start) ** 2).sum() for p, start in self.anchor) * (self.proximal_mu / 2)
        scaled_for_ga = self.loss_is_scaled_for_ga
        if scaled_for_ga is None:  # as `Trainer.training_step` decides whether it divides the loss by the steps
            scaled_for_ga = (
                self.model_accepts_loss_kwargs and num_items_in_batch is not None
            ) or self.compute_loss_func is not None
        if scaled_for_ga:
            term = term / self.current_gradient_accumulation_steps
        loss = loss + term.to(loss.dtype)
        return (loss, outputs) if return_outputs else loss

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        # Trainer builds a plain Accelerator; these subclasses add no state, only change behaviour
        if is_client_parallel(self.args):  # this rank trains its clients alone: no DDP, no sharded batches
            self.accelerator.__class__ = RankLocalAccelerator
        else:
            self.accelerator.__class__ = ClientAccelerator

    def _prepare_for_training(self, max_steps, train_dataloader, resume):
        """Trainer's preparation, except that under DeepSpeed the engine built for the first client is reused, with
        its optimizer restarted from the client's starting weights (see `fed_trainer.zero`)."""
        if self.zero_optimizer is None:
            model, train_dataloader = super()._prepare_for_training(max_steps, train_dataloader, resume)
            if self.is_deepspeed_enabled:
                self.zero_optimizer = self.optimizer
            return model, train_dataloader
        restart_optimizer(self.deepspeed)
        self.optimizer, self.lr_scheduler = self.zero_optimizer, None
        self.create_scheduler(max_steps)
        for attr in ("model", "optimizer", "lr_scheduler"):
            setattr(self.callback_handler, attr, getattr(self, attr))
        self.callback_handler.train_dataloader = train_dataloader
        return self.deepspeed, train_dataloader

    def store_flos(self) -> None:
        if is_client_parallel(self.args):  # Trainer's would broadcast, a collective the other ranks are not in
            self.state.total_flos += self.current_flos
            self.current_flos = 0
        else:
            super().store_flos()

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            optimizer = optimizer or self.optimizer
            run_schedule = get_scheduler(
                self.args.lr_scheduler_type,
                optimizer=optimizer,
                num_warmup_steps=self.args.get_warmup_steps(self.schedule_steps),
                num_training_steps=self.schedule_steps,
                scheduler_specific_kwargs=self.args.lr_scheduler_kwargs,
            )
            if not isinstance(run_schedule, LambdaLR):
                raise ValueError(
                    f"lr_scheduler_type={self.args.lr_scheduler_type!r} cannot continue across rounds; use a "
                    "step-based schedule such as 'linear', 'cosine' or 'constant_with_warmup'."
                )
            lambdas = [functools.partial(_shifted, f, self.schedule_offset) for f in run_schedule.lr_lambdas]
            if self.constant_schedule:
                lambdas = [_constant] * len(lambdas)
            self.lr_scheduler = LambdaLR(optimizer, lambdas)
            self._created_lr_scheduler = True
        return self.lr_scheduler


@functools.cache
def client_trainer_class(base: type[Trainer]) -> type[Trainer]:
    """The class a client trains with: `base` (`Trainer` or a subclass) with `ClientTrainerMixin` in front."""
    if not (isinstance(base, type) and issubclass(base, Trainer)):
        raise TypeError(f"client_trainer_cls must be transformers.Trainer or a subclass of it, got {base!r}.")
    if issubclass(base, ClientTrainerMixin):
        return base
    return type(f"Client{base.__name__}", (ClientTrainerMixin, base), {"__module__": base.__module__})


def client_training_args(args: FederatedConfig) -> TrainingArguments:
    """The outer config as the arguments of one local run (`args.client_args_class`: `TrainingArguments`, or TRL's
    `SFTConfig` / `DPOConfig`), less the federated fields: no saving, eval, logging or reports."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(args.client_args_class) if f.init}
    values.update(
        max_steps=args.local_steps if args.local_steps is not None else -1,
        num_train_epochs=args.local_epochs if args.local_epochs is not None else 1.0,
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        push_to_hub=False,
        load_best_model_at_end=False,
        eval_on_start=False,
    )
    return args.client_args_class(**values)


def local_steps_for(args: FederatedConfig, num_examples: int) -> int:
    """Optimizer steps one client takes in one round."""
    if args.local_steps is not None:
        return args.local_steps
    processes = 1 if is_client_parallel(args) else args.world_size  # client-parallel: a client's data is not split
    batches = math.ceil(num_examples / (args.train_batch_size * processes))
    return math.ceil(args.local_epochs * max(batches // args.gradient_accumulation_steps, 1))


class ClientRunner:
    """Builds the inner client trainer once and trains one client at a time on the shared model.

    The client trainer is an instance of `client_trainer_class(outer.client_trainer_cls)`, built with the outer
    trainer's model and processing class and `outer.client_trainer_kwargs()`, and given its
    `optimizer_cls_and_kwargs` (which not every TRL trainer takes as an argument); `outer.client_callbacks` are added
    to it (they see every client's local steps, like callbacks of a plain `Trainer` run).
    """

    def __init__(self, outer: Trainer) -> None:
        self.trainer = client_trainer_class(outer.client_trainer_cls)(
            model=outer.model,
            args=client_training_args(outer.args),
            processing_class=outer.processing_class,
            **outer.client_trainer_kwargs(),
        )
        self.trainer.optimizer_cls_and_kwargs = outer.optimizer_cls_and_kwargs
        self.trainer.proximal_mu = outer.args.proximal_mu
        self.trainer.pop_callback(PrinterCallback)
        self.trainer.pop_callback(ProgressCallback)
        self.last_learning_rate = outer.args.learning_rate
        self.progress = ClientStepProgressCallback()
        if not outer.args.disable_tqdm:
            self.trainer.add_callback(self.progress)
        for callback in [*outer.strategy.client_callbacks(), *outer.client_callbacks]:
            self.trainer.add_callback(callback)
        if self.trainer.is_deepspeed_enabled:  # the one engine, built before any client (ZeRO-3 partitions here)
            self.trainer._prepare_for_training(self.trainer.schedule_steps, None, None)

    @property
    def engine(self):
        """The DeepSpeed engine every client trains with; None without DeepSpeed."""
        return self.trainer.deepspeed

    def train(self, dataset: Dataset, client_id, seed: int, offset: int, schedule_steps: int) -> TrainOutput:
        """Run one client's local training from the model's current weights, with a fresh optimizer."""
        trainer = self.trainer
        trainer.train_dataset = dataset
        trainer.optimizer = trainer.lr_scheduler = None
        trainer.schedule_offset, trainer.schedule_steps = offset, schedule_steps
        self.progress.description = f"client {client_id}"
        set_seed(seed)
        trainer.take_anchor()
        output = trainer.train()
        self.last_learning_rate = trainer._get_learning_rate()
        return output

    def mean_gradients(
        self, dataset: Dataset, parameters: dict[str, torch.nn.Parameter], examples: int, seed: int
    ) -> tuple[dict[str, torch.Tensor], TrainOutput]:
        """The client's mean gradient of its training loss with respect to `parameters` (by name) over its first
        `examples` examples (whole batches, in the order its training would take them with `seed`), at the model's
        current weights, which are not changed; and a `TrainOutput` with the mean loss and the seconds taken.

        The loss is the client trainer's own (`compute_loss`, without FedProx's term), each batch's mean weighted by
        its rows, so the gradient is the mean over the examples whatever the batch size."""
        trainer, model = self.trainer, self.trainer.model
        trainer.train_dataset = dataset
        set_seed(seed)
        start = time.time()
        frozen = [p for p in parameters.values() if not p.requires_grad]
        for p in frozen:
            p.requires_grad_(True)
        model.train()
        loss_sum, rows = 0.0, 0
        try:
            for batch in trainer.get_train_dataloader():
                inputs = trainer._prepare_inputs(batch)
                count = len(next(v for v in inputs.values() if isinstance(v, torch.Tensor)))
                loss = super(ClientTrainerMixin, trainer).compute_loss(model, inputs)
                (loss * count).backward()
                loss_sum, rows = loss_sum + loss.item() * count, rows + count
                if rows >= examples:
                    break
            gradients = {name: torch.zeros_like(p) if p.grad is None else p.grad.detach() / rows
                         for name, p in parameters.items()}  # fmt: skip
        finally:
            for p in frozen:
                p.requires_grad_(False)
            model.zero_grad(set_to_none=True)
        metrics = {"train_runtime": time.time() - start, "train_loss": loss_sum / rows}
        return gradients, TrainOutput(0, loss_sum / rows, metrics)

    def fine_tune(self, dataset: Dataset, client_id, steps: int, seed: int) -> TrainOutput:
        """`steps` local steps of a client from the model's current weights at the constant `learning_rate`, outside
        the run's schedule (a client fine-tuning the global model for itself); the round's logged learning rate
        stays that of its clients."""
        trainer, last_learning_rate = self.trainer, self.last_learning_rate
        max_steps, trainer.args.max_steps, trainer.constant_schedule = trainer.args.max_steps, steps, True
        try:
            return self.train(dataset, client_id, seed=seed, offset=0, schedule_steps=steps)
        finally:
            trainer.args.max_steps, trainer.constant_schedule = max_steps, False
            self.last_learning_rate = last_learning_rate
            self.release()

    def release(self) -> None:
        """Drop the last client's optimizer, scheduler and FedProx anchor, with the references its callback handler
        and accelerator hold: they would otherwise live on through the aggregation (and after the run's last
        client), an AdamW's two moments beside the server state."""
        trainer = self.trainer
        trainer.optimizer = trainer.lr_scheduler = None
        trainer.callback_handler.optimizer = trainer.callback_handler.lr_scheduler = None
        trainer.accelerator.free_memory()
        trainer.anchor = ()
