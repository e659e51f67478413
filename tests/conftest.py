import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
# trackio reads its folder once, on import: a throwaway one, never the user's ~/.cache/huggingface/trackio, made by the
# first pytest process (xdist's workers inherit it) and removed when that process ends
if "TRACKIO_DIR" not in os.environ:
    os.environ["TRACKIO_DIR"] = tempfile.mkdtemp(prefix="trackio-")
    atexit.register(shutil.rmtree, os.environ["TRACKIO_DIR"], ignore_errors=True)

import pytest  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification  # noqa: E402

from fed_trainer import FederatedConfig  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two test processes on the machine's cores: a thread each
    torch.set_num_threads(1)

# The longest files first (from `make test`'s --durations), so that `pytest -n 2 --dist loadfile` starts them at once
# on its two workers and fills in with the short ones, instead of leaving one long file alone at the end. (`make test`
# passes --no-loadscope-reorder: by default pytest-xdist 3.8 reorders the files by their number of tests, which put
# test_flower.py's three long tests last, the other worker idle meanwhile.)
LONGEST_FIRST = ["test_flower.py", "test_zero.py", "test_fed_glue.py", "test_trl.py", "test_compare.py",
                 "test_gpu_check.py", "test_fed_instruct.py", "test_reliability.py", "test_distributed.py",
                 "test_fed_dpo.py"]  # fmt: skip


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))  # stable: file order kept otherwise


def tiny_bert(seed: int = 0, dropout: float = 0.1) -> BertForSequenceClassification:
    """A randomly initialised 2-layer BERT classifier (about 40k parameters)."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=2,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    return BertForSequenceClassification(config)


def toy_dataset(n: int, seed: int = 0) -> Dataset:
    """A learnable task: the label is whether the first token id is in the upper half of the vocabulary."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (n, 8), generator=g)
    labels = (ids[:, 0] >= 32).long()
    return Dataset.from_dict({"input_ids": ids.tolist(), "label": labels.tolist()})


def fed_config(tmp_path, **overrides) -> FederatedConfig:
    kwargs = dict(
        output_dir=str(tmp_path / "out"),
        num_clients=3,
        num_rounds=2,
        local_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        dataloader_pin_memory=False,
        save_strategy="no",  # Trainer's default would checkpoint after the last round (tests/test_schedule.py)
        seed=7,
    )
    kwargs.update(overrides)
    return FederatedConfig(**kwargs)


@pytest.fixture
def make_config(tmp_path):
    return lambda **overrides: fed_config(tmp_path, **overrides)
