"""The run that both sides build, as a simulation script would: all-MiniLM-L6-v2 (bundled) classifying BBC News
topics (bundled), configured by `fed-args` (a recipe and flags, parsed like examples/fed_glue.py's).

A SuperNode's data: `--node-config "partition-id=K"` takes client K's share of the bundled corpus, split as the
simulation splits it (`partition`, `partition_alpha`, `seed`); add `data-path=DIR` to train on a dataset saved
with `Dataset.save_to_disk` instead (a `text` and a `label` column).
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from datasets import load_from_disk
from flwr.app import Context
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, set_seed

from fed_trainer import FederatedConfig, FederatedTrainer, partition_dataset
from fed_trainer.assets import load_bbc_news, minilm_path
from fed_trainer.cli import EXAMPLE_DEFAULTS, LoraArguments, parse_args_with_recipe

DEFAULTS = dict(
    **EXAMPLE_DEFAULTS,
    output_dir="fed_flower_output",
    num_clients=2,
    num_rounds=3,
    local_steps=10,
    per_device_train_batch_size=16,
    per_device_eval_batch_size=64,
    learning_rate=1e-4,
    warmup_steps=5,
    lora_target_modules=["query", "key", "value", "dense"],
    disable_tqdm=True,
)


@dataclass
class DataArguments:
    max_seq_length: int = field(default=64, metadata={"help": "Longer inputs are truncated."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the validation set."})


def parse(run_config: Mapping) -> tuple[LoraArguments, DataArguments, FederatedConfig]:
    argv = shlex.split(str(run_config.get("fed-args", "")))
    lora_args, data_args, args = parse_args_with_recipe(
        (LoraArguments, DataArguments, FederatedConfig), argv, DEFAULTS
    )
    nodes = run_config.get("num-clients")
    if nodes is not None and int(nodes) != args.num_clients:
        raise ValueError(
            f"the run config's num-clients={nodes} (SuperNodes) differs from num_clients={args.num_clients} in "
            "fed-args (or its recipe): the corpus would be split for the wrong number of clients. Set both to the "
            "number of SuperNodes."
        )
    return lora_args, data_args, args


def tokenized(data, tokenizer, data_args: DataArguments):
    return data.map(lambda b: tokenizer(b["text"], truncation=True, max_length=data_args.max_seq_length), batched=True)


def corpus(data_args: DataArguments, args: FederatedConfig):
    """The bundled BBC News train and validation splits (raw text), truncated as configured."""
    raw = load_bbc_news(seed=args.seed)
    train, evaluation = raw["train"], raw["validation"]
    if data_args.max_train_samples is not None:
        train = train.select(range(min(len(train), data_args.max_train_samples)))
    if data_args.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(len(evaluation), data_args.max_eval_samples)))
    return train, evaluation


def accuracy(prediction) -> dict:
    return {"accuracy": float(np.mean(np.argmax(prediction.predictions, axis=1) == prediction.label_ids))}


def build_trainer(run_config: Mapping, client_datasets: Mapping | None = None) -> FederatedTrainer:
    """The run's `FederatedTrainer`. Without `client_datasets` it is the in-process simulation of the same run
    (the bundled corpus split into `num_clients` clients)."""
    lora_args, data_args, args = parse(run_config)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    train, evaluation = (tokenized(split, tokenizer, data_args) for split in corpus(data_args, args))
    set_seed(args.seed)  # the classifier head starts the same on the server, every SuperNode and a simulation
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=5)
    return FederatedTrainer(
        model=model,
        args=args,
        train_dataset=train if client_datasets is None else None,
        client_datasets=client_datasets,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=accuracy,
        peft_config=lora_args.peft_config(args.strategy, task_type="SEQ_CLS"),
        client_peft_configs=lora_args.lora_ranks,
    )


def flower_trainer(context: Context, client_datasets: Mapping) -> FederatedTrainer:
    """The run's `FederatedTrainer` on the ServerApp and on a SuperNode: from the context's run config."""
    return build_trainer(context.run_config, client_datasets)


def load_client_data(context: Context):
    """This SuperNode's (client id, dataset), tokenized."""
    client_id = int(context.node_config["partition-id"])
    _, data_args, args = parse(context.run_config)
    if "data-path" in context.node_config:
        data = load_from_disk(str(context.node_config["data-path"]))
    elif not 0 <= client_id < args.num_clients:
        raise ValueError(f"partition-id={client_id} is not one of the run's {args.num_clients} clients.")
    else:
        train, _ = corpus(data_args, args)
        data = partition_dataset(
            train, args.num_clients, method=args.partition, alpha=args.partition_alpha,
            label_column=args.partition_label_column, seed=args.seed,
        )[client_id]  # fmt: skip
    return client_id, tokenized(data, AutoTokenizer.from_pretrained(minilm_path()), data_args)
