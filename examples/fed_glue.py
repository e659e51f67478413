#!/usr/bin/env python
"""Federated fine-tuning for text classification, in the style of transformers' `run_glue.py`.

Runs offline with no arguments: the bundled all-MiniLM-L6-v2 on BBC News (5 topics), 4 clients, 5 rounds.

    python examples/fed_glue.py
    accelerate launch examples/fed_glue.py
    python examples/fed_glue.py recipes/galore_fedavg.yaml
    python examples/fed_glue.py --config recipes/fedavg.yaml --num_rounds 3
    python examples/fed_glue.py --strategy flexlora --lora_ranks 4 8 8 16 --learning_rate 5e-4
    python examples/fed_glue.py --train_file train.csv --validation_file dev.csv --partition dirichlet
    python examples/fed_glue.py --task_name sst2 --model_name_or_path bert-base-uncased   # needs the Hub

Metrics (accuracy, macro F1) are computed with numpy and scikit-learn, so they need no download.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field

import numpy as np
import transformers
from datasets import ClassLabel, DatasetDict, load_dataset
from sklearn.metrics import f1_score
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    EvalPrediction,
    set_seed,
)

from fed_trainer import FederatedConfig, FederatedTrainer
from fed_trainer.assets import load_bbc_news, minilm_path
from fed_trainer.cli import EXAMPLE_DEFAULTS, LoraArguments, parse_args_with_recipe, train_save_evaluate
from fed_trainer.distributed import end_process_group

logger = logging.getLogger(__name__)

TASK_TO_KEYS = {
    "cola": ("sentence", None),
    "mnli": ("premise", "hypothesis"),
    "mrpc": ("sentence1", "sentence2"),
    "qnli": ("question", "sentence"),
    "qqp": ("question1", "question2"),
    "rte": ("sentence1", "sentence2"),
    "sst2": ("sentence", None),
    "stsb": ("sentence1", "sentence2"),
    "wnli": ("sentence1", "sentence2"),
}

# The embedded default run: what `python examples/fed_glue.py` does with no arguments. BBC articles open with
# their headline and lead, so 64 tokens suffice for the topic and keep the run to a few minutes on 2 CPU cores.
DEFAULTS = dict(
    **EXAMPLE_DEFAULTS,
    output_dir="fed_glue_output",
    num_clients=4,
    num_rounds=5,
    local_steps=10,
    per_device_train_batch_size=16,
    per_device_eval_batch_size=64,
    learning_rate=1e-4,
    warmup_steps=5,
    max_seq_length=64,
    lora_target_modules=["query", "key", "value", "dense"],
)


@dataclass
class ModelArguments(LoraArguments):
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Model path or Hub id (default: the bundled all-MiniLM-L6-v2)."}
    )


@dataclass
class DataTrainingArguments:
    task_name: str | None = field(default=None, metadata={"help": f"A GLUE task from the Hub: {list(TASK_TO_KEYS)}"})
    train_file: str | None = field(default=None, metadata={"help": "CSV or JSON file with text and label columns."})
    validation_file: str | None = field(default=None, metadata={"help": "CSV or JSON validation file."})
    max_seq_length: int = field(default=128, metadata={"help": "Longer inputs are truncated."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set (debugging)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the validation set (debugging)."})


def parse_args(argv: list[str]) -> tuple[ModelArguments, DataTrainingArguments, FederatedConfig]:
    """CLI flags over a YAML recipe (`--config FILE` or a lone positional `.yaml`) over the embedded defaults."""
    return parse_args_with_recipe((ModelArguments, DataTrainingArguments, FederatedConfig), argv, DEFAULTS)


def load_raw_datasets(data_args: DataTrainingArguments, seed: int) -> DatasetDict:
    if data_args.task_name is not None:
        try:
            raw = load_dataset("nyu-mll/glue", data_args.task_name)
        except Exception as err:
            raise RuntimeError(
                f"Could not load GLUE task {data_args.task_name!r} from the Hub ({err}). Offline, use --train_file "
                "and --validation_file, or run with no data arguments for the bundled BBC News default."
            ) from err
        return DatasetDict(
            train=raw["train"], validation=raw["validation_matched" if data_args.task_name == "mnli" else "validation"]
        )
    if data_args.train_file is not None:
        files = {"train": data_args.train_file}
        if data_args.validation_file is not None:
            files["validation"] = data_args.validation_file
        extension = data_args.train_file.rsplit(".", 1)[-1]
        raw = load_dataset("json" if extension == "jsonl" else extension, data_files=files)
        if "validation" not in raw:
            split = raw["train"].train_test_split(test_size=0.1, seed=seed)
            raw = DatasetDict(train=split["train"], validation=split["test"])
        return raw
    return load_bbc_news(seed=seed)


def text_columns(data_args: DataTrainingArguments, columns: list[str]) -> tuple[str, str | None]:
    if data_args.task_name is not None:
        return TASK_TO_KEYS[data_args.task_name]
    for pair in (("sentence1", "sentence2"), ("question", "sentence")):
        if set(pair) <= set(columns):
            return pair
    for single in ("sentence", "text"):
        if single in columns:
            return single, None
    raise ValueError(f"No text column found in {columns}: name it 'sentence' or 'text' (or 'sentence1'/'sentence2').")


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, training_args = parse_args(sys.argv[1:] if argv is None else argv)
    set_seed(training_args.seed)  # before the model is built: its new head is drawn from the seed
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    raw = load_raw_datasets(data_args, training_args.seed)

    label_feature = raw["train"].features["label"]
    is_regression = data_args.task_name == "stsb" or raw["train"].features["label"].dtype in ("float32", "float64")
    if is_regression:
        num_labels = 1
    elif isinstance(label_feature, ClassLabel):
        num_labels = label_feature.num_classes
    else:
        names = sorted(set(raw["train"]["label"]))
        num_labels = len(names)
        raw = raw.cast_column("label", ClassLabel(names=[str(n) for n in names]))

    model_path = model_args.model_name_or_path or minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=num_labels)

    key1, key2 = text_columns(data_args, raw["train"].column_names)

    def tokenize(batch):
        texts = (batch[key1],) if key2 is None else (batch[key1], batch[key2])
        return tokenizer(*texts, truncation=True, max_length=data_args.max_seq_length)

    with training_args.main_process_first(desc="tokenizing"):
        raw = raw.map(tokenize, batched=True, desc="tokenizing")
    train_dataset, eval_dataset = raw["train"], raw["validation"]
    if data_args.max_train_samples is not None:
        train_dataset = train_dataset.select(range(min(len(train_dataset), data_args.max_train_samples)))
    if data_args.max_eval_samples is not None:
        eval_dataset = eval_dataset.select(range(min(len(eval_dataset), data_args.max_eval_samples)))

    def compute_metrics(p: EvalPrediction) -> dict:
        if is_regression:
            return {"mse": float(np.mean((np.squeeze(p.predictions) - p.label_ids) ** 2))}
        preds = np.argmax(p.predictions, axis=1)
        return {
            "accuracy": float(np.mean(preds == p.label_ids)),
            "f1_macro": float(f1_score(p.label_ids, preds, average="macro")),
        }

    trainer = FederatedTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
        peft_config=model_args.peft_config(training_args.strategy, task_type="SEQ_CLS"),
        client_peft_configs=model_args.lora_ranks,
    )
    return train_save_evaluate(trainer)


if __name__ == "__main__":
    main()
    end_process_group()
