"""Question/answer pairs from `chatterbot-corpus` (English, 21 topic files, 2,393 pairs): the topics are natural
clients for federated instruction tuning."""

from __future__ import annotations

import numpy as np
import yaml
from datasets import Dataset, DatasetDict

from fed_trainer.assets.locate import package_dir


def load_chatterbot_qa(validation_fraction: float = 0.1, seed: int = 42) -> DatasetDict:
    """Every consecutive pair of turns (question, answer) of every English conversation, with its `topic` (the
    file's name). Each topic is split on its own, so both `train` and `validation` hold every topic (at least one
    validation pair each); the split depends only on `seed`.
    """
    root = package_dir("chatterbot_corpus", "chatterbot-corpus") / "data" / "english"
    rng = np.random.default_rng(seed)
    splits: dict[str, dict[str, list]] = {
        s: {"question": [], "answer": [], "topic": []} for s in ("train", "validation")
    }
    for path in sorted(root.glob("*.yml")):
        conversations = yaml.safe_load(path.read_text(encoding="utf-8"))["conversations"]
        pairs = [(str(c[i]), str(c[i + 1])) for c in conversations for i in range(len(c) - 1)]
        held_out = set(rng.permutation(len(pairs))[: max(1, round(validation_fraction * len(pairs)))].tolist())
        for i, (question, answer) in enumerate(pairs):
            split = splits["validation" if i in held_out else "train"]
            split["question"].append(question.strip())
            split["answer"].append(answer.strip())
            split["topic"].append(path.stem)
    return DatasetDict({name: Dataset.from_dict(columns) for name, columns in splits.items()})


def chatterbot_preference_pairs(qa: Dataset, seed: int = 0) -> Dataset:
    """Conversational preference pairs for DPO from Q/A pairs (`load_chatterbot_qa`'s splits): `prompt` the question
    as a user turn, `chosen` its own answer as the assistant's turn, `rejected` the answer to a question drawn at
    random (with `seed`) from a different topic: fluent, but off the point. Keeps `topic`, the natural client."""
    rng = np.random.default_rng(seed)
    topics = np.asarray(qa["topic"])
    answers = qa["answer"]
    rejected = [answers[int(rng.choice(np.flatnonzero(topics != topic)))] for topic in topics]
    turn = lambda role, content: [{"role": role, "content": content}]  # noqa: E731
    return Dataset.from_dict(
        {
            "prompt": [turn("user", q) for q in qa["question"]],
            "chosen": [turn("assistant", a) for a in answers],
            "rejected": [turn("assistant", a) for a in rejected],
            "topic": qa["topic"],
        }
    )
