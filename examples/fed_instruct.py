#!/usr/bin/env python
"""Federated instruction tuning of a causal LM with TRL's SFTTrainer as every client's trainer: each client holds the
question/answer pairs of one topic.

Runs offline with no arguments: the bundled SmolLM2-135M-Instruct (rebuilt once from its GGUF as a plain fp32
model) on the chatterbot-corpus English Q/A pairs, one client per topic file (21 natural clients of very unequal
size). Each pair is a two-turn conversation (`messages`); TRL applies the chat template, puts the loss on the
assistant's reply only (`assistant_only_loss`) and cuts to `max_length`. Reports validation loss and perplexity.
Every `SFTConfig` option applies to the clients' local training (`--packing`, `--max_length`, ...).

    python examples/fed_instruct.py
    accelerate launch examples/fed_instruct.py
    python examples/fed_instruct.py --strategy fedit --learning_rate 5e-4
    python examples/fed_instruct.py --strategy fedit --load_in_4bit --learning_rate 5e-4   # QLoRA clients
    python examples/fed_instruct.py --strategy flexlora --lora_ranks 4 8 16 --clients_per_round 3 --learning_rate 5e-4
    python examples/fed_instruct.py --strategy fedavg --optim galore_adamw --optim_target_modules self_attn mlp \\
        --optim_args "rank=64,update_proj_gap=20,scale=0.25" --learning_rate 1e-4
    python examples/fed_instruct.py --train_file qa.jsonl --client_column site   # your own data

A file given with --train_file needs `question` and `answer` columns, and a column naming each example's client
(--client_column, default `topic`).
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass, field

import transformers
from datasets import DatasetDict, load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

from fed_trainer import FederatedSFTConfig, FederatedSFTTrainer
from fed_trainer.assets import SMOLLM2_TRAINING_CHAT_TEMPLATE, load_chatterbot_qa, smollm2_path
from fed_trainer.cli import (
    EXAMPLE_DEFAULTS,
    LoraArguments,
    QuantizationArguments,
    parse_args_with_recipe,
    train_save_evaluate,
)
from fed_trainer.distributed import end_process_group

logger = logging.getLogger(__name__)

# The embedded default run: 4 of the 21 topic clients per round, 3 rounds of 5 local steps; a few minutes on 2
# CPU cores. Full fine-tuning wants a small rate; LoRA strategies want about 10x more (pass --learning_rate). TRL's
# bf16 and gradient checkpointing defaults are turned off: this runs in fp32 on CPUs.
DEFAULTS = dict(
    **EXAMPLE_DEFAULTS,
    output_dir="fed_instruct_output",
    num_rounds=3,
    clients_per_round=4,
    local_steps=5,
    per_device_train_batch_size=4,
    per_device_eval_batch_size=16,
    learning_rate=2e-5,
    warmup_steps=2,
    max_eval_samples=64,
    max_length=96,
    assistant_only_loss=True,
    bf16=False,
    gradient_checkpointing=False,
)


@dataclass
class ModelArguments(QuantizationArguments, LoraArguments):
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A causal LM with a chat template (default: the bundled SmolLM2-135M); with assistant_only_loss "
            "its template needs TRL's {% generation %} markers, which TRL adds for the templates it knows."
        },
    )


@dataclass
class DataArguments:
    train_file: str | None = field(
        default=None, metadata={"help": "CSV/JSON(L) with question, answer and client columns (default: chatterbot)."}
    )
    validation_file: str | None = field(default=None, metadata={"help": "Validation file with the same columns."})
    client_column: str = field(default="topic", metadata={"help": "The column that names each example's client."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set (debugging)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the validation set."})


def parse_args(argv: list[str]) -> tuple[ModelArguments, DataArguments, FederatedSFTConfig]:
    """CLI flags over a YAML recipe (`--config FILE` or a lone positional `.yaml`) over the embedded defaults."""
    return parse_args_with_recipe((ModelArguments, DataArguments, FederatedSFTConfig), argv, DEFAULTS)


def conversation(example: dict) -> dict:
    """A question/answer pair as TRL's conversational format."""
    return {
        "messages": [
            {"role": "user", "content": example["question"]},
            {"role": "assistant", "content": example["answer"]},
        ]
    }


def load_raw_datasets(data_args: DataArguments, seed: int) -> DatasetDict:
    if data_args.train_file is None:
        return load_chatterbot_qa(seed=seed)
    files = {"train": data_args.train_file}
    if data_args.validation_file is not None:
        files["validation"] = data_args.validation_file
    extension = data_args.train_file.rsplit(".", 1)[-1]
    raw = load_dataset("json" if extension in ("json", "jsonl") else extension, data_files=files)
    missing = {"question", "answer", data_args.client_column} - set(raw["train"].column_names)
    if missing:
        raise ValueError(
            f"{data_args.train_file} lacks the columns {sorted(missing)}: it needs 'question', 'answer' and the "
            f"client column (--client_column, now {data_args.client_column!r})."
        )
    if "validation" not in raw:
        split = raw["train"].train_test_split(test_size=0.1, seed=seed)
        raw = DatasetDict(train=split["train"], validation=split["test"])
    return raw


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, training_args = parse_args(sys.argv[1:] if argv is None else argv)
    set_seed(training_args.seed)  # before the model is built: its new head is drawn from the seed
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    raw = load_raw_datasets(data_args, training_args.seed)
    if data_args.max_train_samples is not None:
        raw["train"] = raw["train"].shuffle(seed=training_args.seed).select(range(data_args.max_train_samples))
    if data_args.max_eval_samples is not None:
        raw["validation"] = raw["validation"].select(range(min(len(raw["validation"]), data_args.max_eval_samples)))

    model_path = model_args.model_name_or_path or smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if model_args.model_name_or_path is None:  # the same text, with the assistant's turns marked for TRL
        tokenizer.chat_template = SMOLLM2_TRAINING_CHAT_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(model_path, **model_args.model_kwargs(training_args))

    client_column = data_args.client_column
    conversations = raw.map(conversation, remove_columns=["question", "answer"], desc="conversations")
    train, validation = conversations["train"], conversations["validation"].remove_columns(client_column)
    clients = {
        name: train.filter(lambda e, name=name: e[client_column] == name).remove_columns(client_column)
        for name in sorted(set(train[client_column]))
    }
    logger.info("%d clients: %s", len(clients), {name: len(ds) for name, ds in clients.items()})

    trainer = FederatedSFTTrainer(
        model=model,
        args=training_args,
        client_datasets=clients,
        eval_dataset=validation,
        processing_class=tokenizer,
        peft_config=model_args.peft_config(training_args.strategy, task_type="CAUSAL_LM"),
        client_peft_configs=model_args.lora_ranks,
    )
    return train_save_evaluate(trainer, lambda m: {"perplexity": math.exp(min(m["eval_loss"], 50.0))})


if __name__ == "__main__":
    main()
    end_process_group()
