"""Shared set-up for the benchmarks: the bundled MiniLM on tokenized BBC News, a table and a JSON file."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding  # noqa: E402

from fed_trainer.assets import load_bbc_news, minilm_path  # noqa: E402


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    p.add_argument("--repeats", type=int, default=3, help="repeats of each measurement; the median is reported")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    return p


def minilm_and_data(num_examples: int, seq_len: int) -> tuple[torch.nn.Module, Dataset, DataCollatorWithPadding]:
    """A fresh MiniLM classifier, `num_examples` tokenized BBC News training articles and a padding collator."""
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    train = load_bbc_news()["train"].select(range(num_examples))
    train = train.map(lambda b: tokenizer(b["text"], truncation=True, max_length=seq_len), batched=True)
    train = train.remove_columns(["text"])
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=5)
    return model, train, DataCollatorWithPadding(tokenizer)


def launcher(processes: int) -> list[str]:
    """The command prefix that runs a script in `processes` processes: plain python for one, torchrun for more."""
    if processes == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]


def current_rss_mib() -> float:
    """This process's resident set size now, in MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def median(values: list[float]) -> float:
    return statistics.median(values)


def report(title: str, rows: list[dict], summary: dict, json_path: str | None, runs: list[dict] | None = None) -> None:
    """Print `rows` as a table and `summary` below it; write both to `json_path` if given, with the `runs` they were
    computed from."""
    columns = list(rows[0])
    widths = [max(len(c), *(len(_fmt(r[c])) for r in rows)) for c in columns]
    print(f"\n{title}")
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_fmt(r[c]).ljust(w) for c, w in zip(columns, widths)))
    for k, v in summary.items():
        print(f"{k}: {_fmt(v)}")
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "title": title,
            "rows": rows,
            "summary": summary,
            **({"runs": runs} if runs else {}),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        }
        Path(json_path).write_text(json.dumps(payload, indent=2))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.2e}" if 0 < abs(v) < 1e-2 else f"{v:.3f}"
    return str(v)
