"""Every federated method on equal footing, on the bundled all-MiniLM-L6-v2 and real data.

Methods: fedavg (full weights), galore_fedavg (full weights, GaLore clients), fedit, ffa_lora, flexlora,
fedex_lora, flora; references: centralized (one client holding all the data, the same number of optimizer steps
and examples as a federated run) and local_only (each client trains alone for the same number of steps; the mean
of their accuracies). Settings: BBC News topics and movie-review sentiment, Dirichlet label splits with alpha in
{0.1, 1.0} over 10 clients, 5 sampled per round; every method gets the same rounds, local steps, batch size,
examples and seeds. Learning rates: each method runs a stated grid (full fine-tuning and LoRA grids differ) on the
first setting with the first seed, and keeps its best for every setting; the sweep and its winners are reported.

    python bench/compare.py --json bench/results/compare.json --plots bench/results   # the full comparison
    python bench/compare.py --quick --json bench/results/compare_quick.json             # one setting, one seed

Reports per method and setting: final and best-round validation accuracy (mean and std over seeds), rounds to
reach the target (90% of the best final accuracy of that setting), total bytes communicated, peak RSS during the
run (sampled; all runs share one process), wall time. A table on stdout, JSON with --json, PNG plots with --plots.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    PrinterCallback,
    Trainer,
    TrainingArguments,
)

from fed_trainer import FederatedCallback, FederatedConfig, FederatedTrainer, partition_dataset  # noqa: E402
from fed_trainer.assets import load_bbc_news, load_movie_reviews, minilm_path  # noqa: E402

DATASETS = {"bbc": load_bbc_news, "movies": load_movie_reviews}
LORA = dict(r=8, lora_alpha=16, target_modules=["query", "key", "value", "dense"], task_type="SEQ_CLS")
GALORE = dict(
    optim="galore_adamw",
    optim_target_modules=["attention", "intermediate", "output.dense"],
    optim_args="rank=64,update_proj_gap=20,scale=0.25",
)
METHODS = {
    "fedavg": dict(strategy="fedavg"),
    "galore_fedavg": dict(strategy="fedavg", **GALORE),
    "fedit": dict(strategy="fedit"),
    "ffa_lora": dict(strategy="ffa_lora"),
    "flexlora": dict(strategy="flexlora"),
    "fedex_lora": dict(strategy="fedex_lora"),
    "flora": dict(strategy="flora"),
    "centralized": dict(strategy="fedavg"),
    "local_only": dict(strategy="fedavg"),
}
LR_GRID = {"full": [1e-4, 3e-4], "lora": [2e-3, 5e-3]}  # the first of each is the --quick rate


def family(method: str) -> str:
    return "lora" if METHODS[method]["strategy"] not in ("fedavg",) else "full"


class PeakRSS:
    """Samples the process's resident set size in a thread; `peak_mib` is the high-water mark while running."""

    def __enter__(self):
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed memory back, so earlier runs do not count
        except OSError:
            pass
        self.peak, self.running = self.rss(), True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.rss())
            time.sleep(0.05)

    @property
    def peak_mib(self) -> float:
        return self.peak / 2**20


class RoundPrinter(FederatedCallback):
    def __init__(self, label: str):
        self.label = label

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "round" in logs and "eval_accuracy" in logs:
            print(f"    {self.label} round {logs['round']}: accuracy {logs['eval_accuracy']:.4f}", flush=True)


def prepared(name: str, tokenizer, seq_len: int, eval_examples: int):
    data = DATASETS[name]()
    data = data.map(lambda b: tokenizer(b["text"], truncation=True, max_length=seq_len), batched=True)
    data = data.remove_columns(["text"])
    validation = data["validation"].shuffle(seed=0).select(range(min(eval_examples, len(data["validation"]))))
    return data["train"], validation, data["train"].features["label"].num_classes


def accuracy(p) -> dict:
    return {"accuracy": float(np.mean(np.argmax(p.predictions, axis=1) == p.label_ids))}


def run_one(method, lr, seed, train, validation, num_labels, a, collator, out) -> dict:
    """One run; returns accuracy per round, bytes, peak RSS and wall time."""
    spec = {k: v for k, v in METHODS[method].items()}
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=num_labels)
    common = dict(
        output_dir=out, per_device_train_batch_size=a.batch_size, per_device_eval_batch_size=128, learning_rate=lr,
        warmup_steps=0, seed=seed, report_to="none", disable_tqdm=True, use_cpu=True, save_strategy="no",
        dataloader_pin_memory=False,
    )  # fmt: skip
    clients = partition_dataset(train, a.clients, method="dirichlet", alpha=a.alpha_now, seed=seed)
    steps_per_round = a.local_steps * a.per_round
    start = time.perf_counter()
    with PeakRSS() as rss:
        if method == "local_only":
            accuracies = []
            for shard in clients:
                model_k = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=num_labels)
                args = TrainingArguments(max_steps=a.rounds * a.local_steps, eval_strategy="no", **common)
                trainer = Trainer(model=model_k, args=args, train_dataset=shard, data_collator=collator,
                                  eval_dataset=validation, compute_metrics=accuracy)  # fmt: skip
                trainer.pop_callback(PrinterCallback)
                trainer.train()
                accuracies.append(trainer.evaluate()["eval_accuracy"])
            per_round, total_bytes = [float(np.mean(accuracies))], 0
        else:
            data = dict(client_datasets=[train]) if method == "centralized" else dict(train_dataset=train)
            local = steps_per_round if method == "centralized" else a.local_steps
            config = FederatedConfig(
                num_clients=1 if method == "centralized" else a.clients,
                clients_per_round=None if method == "centralized" else a.per_round,
                num_rounds=a.rounds, local_steps=local, partition="dirichlet", partition_alpha=a.alpha_now,
                **{k: v for k, v in spec.items() if k != "strategy"}, strategy=spec["strategy"], **common,
            )  # fmt: skip
            trainer = FederatedTrainer(
                model=model, args=config, eval_dataset=validation, data_collator=collator, compute_metrics=accuracy,
                peft_config=LoraConfig(**LORA) if family(method) == "lora" else None,
                callbacks=[RoundPrinter(method)], **data,
            )  # fmt: skip
            trainer.pop_callback(PrinterCallback)
            output = trainer.train()
            rounds = [e for e in trainer.state.log_history if "round" in e]
            per_round = [e["eval_accuracy"] for e in rounds]
            total_bytes = output.metrics["total_bytes_up"] + output.metrics["total_bytes_down"]
    return {
        "accuracy_per_round": per_round,
        "final_accuracy": per_round[-1],
        "best_accuracy": max(per_round),
        "total_bytes": total_bytes,
        "peak_rss_mib": rss.peak_mib,
        "wall_s": time.perf_counter() - start,
    }


def rounds_to(per_round: list[float], target: float) -> int | None:
    return next((i + 1 for i, acc in enumerate(per_round) if acc >= target), None)


def summarize(runs: list[dict], target: float) -> dict:
    finals = [r["final_accuracy"] for r in runs]
    reached = [rounds_to(r["accuracy_per_round"], target) for r in runs]
    return {
        "final_accuracy_mean": statistics.mean(finals),
        "final_accuracy_std": statistics.pstdev(finals),
        "best_accuracy_mean": statistics.mean(r["best_accuracy"] for r in runs),
        "rounds_to_target": None if None in reached else statistics.mean(reached),
        "total_bytes": statistics.mean(r["total_bytes"] for r in runs),
        "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
        "wall_s_mean": statistics.mean(r["wall_s"] for r in runs),
        "accuracy_per_round_mean": np.mean([r["accuracy_per_round"] for r in runs], axis=0).tolist(),
    }


def plot(results: dict, directory: Path) -> list[str]:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    settings = list(results)
    fig, axes = plt.subplots(1, len(settings), figsize=(5 * len(settings), 4), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        for method, summary in results[setting].items():
            curve = summary["accuracy_per_round_mean"]
            style = dict(linestyle="--") if method in ("centralized", "local_only") else {}
            if len(curve) == 1:
                ax.axhline(curve[0], label=method, color="grey", linestyle=":")
            else:
                ax.plot(range(1, len(curve) + 1), curve, marker="o", label=method, **style)
        ax.set(title=setting, xlabel="round", ylabel="validation accuracy")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    curves = directory / "accuracy_per_round.png"
    fig.savefig(curves, dpi=120)
    fig, axes = plt.subplots(1, len(settings), figsize=(5 * len(settings), 4), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        for method, summary in results[setting].items():
            if summary["total_bytes"] > 0:
                ax.scatter(summary["total_bytes"], summary["final_accuracy_mean"], label=method)
                ax.annotate(method, (summary["total_bytes"], summary["final_accuracy_mean"]), fontsize=7)
        ax.set(title=setting, xlabel="bytes communicated (up + down)", ylabel="final accuracy", xscale="log")
    fig.tight_layout()
    scatter = directory / "accuracy_vs_bytes.png"
    fig.savefig(scatter, dpi=120)
    return [str(curves), str(scatter)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--plots", metavar="DIR", help="write accuracy_per_round.png and accuracy_vs_bytes.png here")
    p.add_argument("--quick", action="store_true", help="BBC, alpha 1.0, one seed, 3 rounds, no LR sweep")
    p.add_argument("--datasets", nargs="+", default=["bbc", "movies"], choices=list(DATASETS))
    p.add_argument("--alphas", nargs="+", type=float, default=[0.1, 1.0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--per-round", type=int, default=5)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--local-steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--eval-examples", type=int, default=200)
    a = p.parse_args()
    if a.quick:
        a.datasets, a.alphas, a.seeds, a.rounds = ["bbc"], [1.0], 1, 3
    transformers.utils.logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    collator = DataCollatorWithPadding(tokenizer)
    seeds = list(range(a.seeds))
    started = time.perf_counter()
    sweep: dict = {}
    best_lr = {m: LR_GRID[family(m)][0] for m in a.methods}
    raw: dict = {}
    with tempfile.TemporaryDirectory() as out:
        for d_index, name in enumerate(a.datasets):
            train, validation, num_labels = prepared(name, tokenizer, a.seq_len, a.eval_examples)
            for a_index, alpha in enumerate(a.alphas):
                a.alpha_now, setting = alpha, f"{name}/alpha={alpha}"
                raw[setting] = {m: [] for m in a.methods}
                for method in a.methods:
                    for seed in seeds:
                        first = d_index == 0 and a_index == 0 and seed == seeds[0] and not a.quick
                        lrs = LR_GRID[family(method)] if first else [best_lr[method]]
                        tried = {}
                        for lr in lrs:
                            elapsed = time.perf_counter() - started
                            print(f"[{elapsed:6.0f}s] {setting} {method} seed={seed} lr={lr:g}", flush=True)
                            tried[lr] = run_one(method, lr, seed, train, validation, num_labels, a, collator, out)
                        if first:
                            best_lr[method] = max(tried, key=lambda lr: tried[lr]["final_accuracy"])
                            sweep[method] = {str(lr): r["final_accuracy"] for lr, r in tried.items()}
                        raw[setting][method].append(tried[best_lr[method]])
    results = {}
    for setting, methods in raw.items():
        target = 0.9 * max(statistics.mean(r["final_accuracy"] for r in runs) for runs in methods.values())
        results[setting] = {m: {**summarize(runs, target), "learning_rate": best_lr[m]} for m, runs in methods.items()}
        results[setting]["_target_accuracy"] = target
    targets = {s: results[s].pop("_target_accuracy") for s in results}
    print_table(results, targets)
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%d"),
        "wall_s_total": time.perf_counter() - started,
        "config": {k: v for k, v in vars(a).items() if k not in ("json", "plots", "alpha_now")},
        "lr_grid": LR_GRID,
        "lr_sweep": {"setting": f"{a.datasets[0]}/alpha={a.alphas[0]}, seed 0", "final_accuracy": sweep},
        "learning_rates": best_lr,
        "target_accuracy": targets,
        "results": results,
        "runs": raw,
        "versions": {
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
    }  # fmt: skip
    if a.plots:
        report["plots"] = plot(results, Path(a.plots))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(report, indent=2))
    print(f"total wall time: {report['wall_s_total']:.0f} s")


def print_table(results: dict, targets: dict) -> None:
    header = f"{'setting':<20} {'method':<14} {'lr':>7} {'final acc':>15} {'best':>6} {'rounds>=tgt':>11} "
    header += f"{'MB sent':>10} {'peak MiB':>9} {'wall s':>7}"
    print("\n" + header)
    for setting, methods in results.items():
        for method, s in methods.items():
            reached = "-" if s["rounds_to_target"] is None else f"{s['rounds_to_target']:.1f}"
            print(
                f"{setting:<20} {method:<14} {s['learning_rate']:>7g} "
                f"{s['final_accuracy_mean']:>8.4f}±{s['final_accuracy_std']:.4f} {s['best_accuracy_mean']:>6.3f} "
                f"{reached:>11} {s['total_bytes'] / 1e6:>10.1f} {s['peak_rss_mib']:>9.0f} {s['wall_s_mean']:>7.1f}"
            )
        print(f"{setting:<20} target accuracy (90% of the best final): {targets[setting]:.4f}")


if __name__ == "__main__":
    main()
