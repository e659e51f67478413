"""Fashion-MNIST (Zalando; 60,000 training and 10,000 test images of 28x28 grey pixels, 10 classes) from Debian's
`dataset-fashion-mnist`, and a collator that feeds it to an ImageNet model."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Array2D, ClassLabel, Dataset, DatasetDict, Features

CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"


def fashion_mnist_dir() -> Path:
    """`$FASHION_MNIST_DIR`, else where Debian's package puts the idx files."""
    root = Path(os.environ.get("FASHION_MNIST_DIR", DEBIAN_DIR))
    if not (root / "train-images-idx3-ubyte.gz").exists():
        raise FileNotFoundError(
            f"Fashion-MNIST is not in {root}. On Debian or Ubuntu run `sudo apt-get install dataset-fashion-mnist` "
            "(`make install` does it where apt is available); elsewhere download the four idx .gz files from "
            "https://github.com/zalandoresearch/fashion-mnist and set FASHION_MNIST_DIR to their folder."
        )
    return root


def _idx(path: Path) -> np.ndarray:
    """An idx file (gzip): big-endian dims after a 4-byte magic whose last byte is the number of dims."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load_fashion_mnist(max_train: int | None = None, max_validation: int | None = None, seed: int = 42) -> DatasetDict:
    """`train` (from the 60,000 training images) and `validation` (from the 10,000 test images), each optionally
    a seeded random subset. Columns: `pixel_values` (28x28 uint8) and `label` (a `ClassLabel`)."""
    root = fashion_mnist_dir()
    features = Features({"pixel_values": Array2D((28, 28), "uint8"), "label": ClassLabel(names=CLASSES)})
    rng = np.random.default_rng(seed)
    splits = {}
    for split, prefix, limit in (("train", "train", max_train), ("validation", "t10k", max_validation)):
        images, labels = _idx(root / f"{prefix}-images-idx3-ubyte.gz"), _idx(root / f"{prefix}-labels-idx1-ubyte.gz")
        keep = np.sort(rng.permutation(len(labels))[:limit]) if limit is not None else np.arange(len(labels))
        splits[split] = Dataset.from_dict(
            {"pixel_values": images[keep], "label": labels[keep].astype(np.int64)}, features=features
        )
    return DatasetDict(splits)


class GreyImageCollator:
    """Batches 28x28 grey images for an RGB ImageNet model: resize to `image_size` (bilinear), repeat the channel
    three times and scale as `(x - mean) / scale`. Returns `pixel_values` (B x 3 x S x S) and `labels`."""

    def __init__(self, image_size: int, mean: float = 127.0, scale: float = 128.0):
        self.image_size, self.mean, self.scale = image_size, mean, scale

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        pixels = torch.stack([torch.as_tensor(np.asarray(e["pixel_values"], dtype=np.float32)) for e in examples])
        pixels = F.interpolate(pixels[:, None], size=self.image_size, mode="bilinear", align_corners=False)
        pixels = ((pixels - self.mean) / self.scale).expand(-1, 3, -1, -1).contiguous()
        return {"pixel_values": pixels, "labels": torch.tensor([e["label"] for e in examples], dtype=torch.long)}


if __name__ == "__main__":  # `make install` ends with this check: python -m fed_trainer.assets.fashion_mnist
    try:
        print(f"Fashion-MNIST: {fashion_mnist_dir()}")
    except FileNotFoundError as err:
        raise SystemExit(f"make install: {err}") from None
