"""Every federated method on equal footing, on bundled real models and real data.

Methods: fedavg (full weights), galore_fedavg (full weights, GaLore clients), galore_lowrank (the same aggregate,
rank-r uplink), galore_shared (one server-picked projector for all clients, R-only uplink; also kept 4 rounds,
without and with averaged Adam moments: galore_shared_r4, galore_shared_r4_moments), fedit, ffa_lora, flexlora,
fedex_lora, flora, rolora, lora_fair, fed_sb (LoRA-SB's initialisation from a round of gradients; fed_sb_xs:
LoRA-XS's from the pretrained weights), fedsa_lora (whose global model is the shared part: its clients are judged by
their own models in the worst-client figure); server optimizers on fedavg (fedavgm, nesterov, fedadam) and on
fedex_lora (fedex_lora_fedadam), fedprox on fedavg, fed_sb_eta (Fed-SB's init_learning_rate) on fed_sb, each
sweeping its own option (eta, mu, the first step's rate) at its base method's winning rate; scaffold with SGD
clients, and fedavg_sgd, FedAvg with the same SGD clients, to compare it with; references: centralized (one client
holding all the data, the same number of optimizer steps and examples as a federated run) and local_only (each
client trains alone for the same number of steps; the mean of their results); compressed uplinks on fedavg and
fedit at their base's rate: <base>_int8, <base>_nf4, and with error feedback <base>_int8_ef, <base>_nf4_ef; both
ways (the downlink too): <base>_int8_ef_both, <base>_nf4_ef_both; on fed_sb (whose round-0 gradients they
compress): fed_sb_int8, fed_sb_nf4.
Tasks (bench/tasks.py):

- `text` (default): all-MiniLM-L6-v2 on BBC News topics and movie-review sentiment, Dirichlet label splits with
  alpha in {0.1, 1.0} over 10 clients, 5 sampled per round; metric: validation accuracy.
- `instruct`: SmolLM2-135M-Instruct on chatterbot-corpus Q/A, one natural client per topic (21), 4 per round;
  metric: validation loss on the answers.
- `vision`: EfficientNet-Lite0 on Fashion-MNIST (6,000 training images at 64x64), Dirichlet splits over 10
  clients, 5 per round; metric: validation accuracy.

Every method gets the same rounds, local steps, batch size, examples and seeds. Learning rates: each method runs a
stated grid (full fine-tuning, GaLore and LoRA grids differ) on the first setting with the first seed and keeps its
best for every setting; the sweep and its winners are reported.

    python bench/compare.py --json bench/results/compare.json --plots bench/results   # the full text comparison
    python bench/compare.py --quick --json bench/results/compare_quick.json             # one setting, one seed
    python bench/compare.py --task instruct --quick --json bench/results/compare_instruct.json
    python bench/compare.py --task vision --quick --json bench/results/compare_vision.json

Reports per method and setting: final and best-round metric (mean and std over seeds), the worst client's accuracy
(label-split classification: the final model's validation accuracy on each class weighted by the client's share of
that class, the lowest over the clients; `label_mix_accuracies`), rounds to reach the target (90% of the best final
accuracy of that setting, or 110% of the best final loss), total bytes communicated, peak RSS during the run
(sampled; all runs share one process), wall time. A table on stdout, JSON with --json, PNG plots with --plots.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
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
from results_tables import rates, worst_client  # noqa: E402
from tasks import TASKS, Task  # noqa: E402
from transformers import PrinterCallback, Trainer, TrainingArguments, set_seed  # noqa: E402

from fed_trainer import FederatedCallback, FederatedConfig, FederatedTrainer, partition_dataset  # noqa: E402
from fed_trainer.client_eval import own_model  # noqa: E402

# Compressed uplinks (`update_compression`, with or without error feedback) on FedAvg and FedIT, at their base
# method's winning rate (the base runs first): fedavg_int8, fedavg_int8_ef, ..., fedit_nf4_ef; and both ways
# (`downlink_compression` too): fedavg_int8_ef_both, ..., fedit_nf4_ef_both
COMPRESSED = {
    f"{base}_{fmt}{'_ef' if ef else ''}": (base, dict(update_compression=fmt, compression_error_feedback=ef))
    for base in ("fedavg", "fedit")
    for fmt in ("int8", "nf4")
    for ef in (False, True)
}
COMPRESSED.update({
    f"{base}_{fmt}_ef_both": (base, dict(update_compression=fmt, compression_error_feedback=True,
                                         downlink_compression=fmt))
    for base in ("fedavg", "fedit")
    for fmt in ("int8", "nf4")
})  # fmt: skip
# Fed-SB's uplink compressed (R is r^2 per layer: what shrinks is round 0's dense gradients): fed_sb_int8, fed_sb_nf4
COMPRESSED.update({f"fed_sb_{fmt}": ("fed_sb", dict(update_compression=fmt)) for fmt in ("int8", "nf4")})


METHODS = [
    "fedavg",
    "galore_fedavg",
    "galore_lowrank",
    "galore_shared",
    "galore_shared_r4",
    "galore_shared_r4_moments",
    "fedit",
    "ffa_lora",
    "flexlora",
    "fedex_lora",
    "flora",
    "rolora",
    "lora_fair",
    "fedsa_lora",
    "fed_sb",
    "fed_sb_xs",
    "fed_sb_eta",
    "fedavgm",
    "nesterov",
    "fedadam",
    "fedex_lora_fedadam",
    "fedprox",
    "fedavg_sgd",
    "scaffold",
    "centralized",
    "local_only",
    *COMPRESSED,
]
STRATEGY = {
    "galore_fedavg": "fedavg",
    "galore_shared_r4": "galore_shared",
    "galore_shared_r4_moments": "galore_shared",
    "fedavg_sgd": "fedavg",
    "fed_sb_xs": "fed_sb",
    "centralized": "fedavg",
    "local_only": "fedavg",
}
# galore_shared keeping each projector 4 rounds (picked after round 1: one for rounds 2-5), without and with
# averaged Adam moments: the ablation that says whether averaging the moments helps
OPTIONS = {
    "galore_shared_r4": dict(strategy_kwargs={"refresh_rounds": 4}),
    "galore_shared_r4_moments": dict(strategy_kwargs={"refresh_rounds": 4, "average_moments": True}),
    "fedavg_sgd": dict(optim="sgd"),
    "scaffold": dict(optim="sgd"),
    "fed_sb_xs": dict(strategy_kwargs={"init": "lora_xs"}),  # Fed-SB on LoRA-XS's bases: no gradient round
}
# Methods built on another: (base method, its fixed settings, the option it sweeps, that option's grid; the first
# value is --quick's). They train at their base method's winning learning rate (so the base runs first) and sweep
# their own option instead: the server's eta, FedProx's mu.
ADAPTIVE_ETA = [1e-3, 3e-4, 3e-3]
VARIANTS = {
    "fedavgm": ("fedavg", dict(server_optimizer="fedavgm"), "server_learning_rate", [1.0, 0.5, 2.0]),
    "nesterov": ("fedavg", dict(server_optimizer="nesterov"), "server_learning_rate", [0.7, 0.3, 1.0]),
    "fedadam": ("fedavg", dict(server_optimizer="fedadam"), "server_learning_rate", ADAPTIVE_ETA),
    "fedex_lora_fedadam": ("fedex_lora", dict(server_optimizer="fedadam"), "server_learning_rate", ADAPTIVE_ETA),
    "fedprox": ("fedavg", {}, "proximal_mu", [0.1, 0.01, 1.0]),
    # Fed-SB's LoRA-SB initialisation with a first step smaller than the clients' rate (a strategy option)
    "fed_sb_eta": ("fed_sb", {}, "strategy_kwargs.init_learning_rate", [5e-4, 1e-4, 2e-5]),
}


def option_config(option: str, value: float) -> dict:
    """The config that sets a variant's swept `option`: a `FederatedConfig` field, or `strategy_kwargs.<name>`."""
    group, dot, name = option.partition(".")
    return {group: {name: value}} if dot else {option: value}


def base_of(method: str) -> str | None:
    """The method a variant or a compressed method is built on (None for the others)."""
    if method in VARIANTS:
        return VARIANTS[method][0]
    return COMPRESSED[method][0] if method in COMPRESSED else None


def strategy_of(method: str) -> str:
    if base_of(method) is not None:
        return strategy_of(base_of(method))
    return STRATEGY.get(method, method)


GALORE_METHODS = ("galore_fedavg", "galore_lowrank", "galore_shared", "galore_shared_r4", "galore_shared_r4_moments")
FAMILIES = ("full", "galore", "lora", "sgd")  # the learning-rate grids (`family`), as --lr-grid names them


def family(method: str) -> str:
    """Which learning-rate grid a method trains with: `lora`, `galore`, `sgd` (plain SGD clients) or `full`."""
    if base_of(method) is not None:
        return family(base_of(method))
    if method in GALORE_METHODS:
        return "galore"
    if OPTIONS.get(method, {}).get("optim") == "sgd":
        return "sgd"
    return "lora" if strategy_of(method) != "fedavg" else "full"


def swept(task: Task, method: str) -> tuple[str, list[float]]:
    """The option a method sweeps and its grid: the learning rate of its family, or a variant's own option."""
    if method in VARIANTS:
        return VARIANTS[method][2], VARIANTS[method][3]
    return "learning_rate", task.lr_grid[family(method)]


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
    def __init__(self, label: str, metric: str):
        self.label, self.key = label, f"eval_{metric}"

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "round" in logs and self.key in logs:
            print(f"    {self.label} round {logs['round']}: {self.key} {logs[self.key]:.4f}", flush=True)


def client_split(task: Task, train, a, alpha: float | None, seed: int) -> list:
    """The clients' datasets: one per value of the task's natural client column, else a Dirichlet label split."""
    if task.client_column is None:
        return partition_dataset(train, a.clients, method="dirichlet", alpha=alpha, seed=seed)
    return partition_dataset(train, a.clients, method=f"column:{task.client_column}")


def seeded_model(task: Task, seed: int):
    """The task's model with its new parts (a classification head) initialised from `seed`, not from whatever
    state earlier runs left the global RNG in."""
    set_seed(seed)
    return task.model()


def label_mix_accuracies(predicted: np.ndarray, labels: np.ndarray, client_labels: list) -> list[float]:
    """Each client's accuracy on data of its own label mix: the accuracy on every class of the validation set
    (`predicted` against `labels`), weighted by that class's share of the client's training labels (the expected
    accuracy on a test set drawn like the client's data; classes absent from the validation set are left out and
    the weights renormalised)."""
    classes = int(max(labels.max(), *(max(c) for c in client_labels))) + 1
    count = np.bincount(labels, minlength=classes)
    right = np.bincount(labels, weights=(predicted == labels).astype(float), minlength=classes)
    per_class = np.divide(right, count, where=count > 0, out=np.zeros(classes))
    shares = [np.bincount(c, minlength=classes) * (count > 0) for c in client_labels]
    return [float(share @ per_class / share.sum()) for share in shares]


class KeptPredictions:
    """A task's `compute_metrics` that also keeps the predicted classes and labels of the evaluation it last scored
    (`last`), so that the final model's per-client accuracies take no second pass over the validation set."""

    def __init__(self, compute_metrics) -> None:
        self.compute_metrics, self.last = compute_metrics, None

    def __call__(self, prediction) -> dict:
        self.last = prediction.predictions.argmax(-1), prediction.label_ids
        return self.compute_metrics(prediction)


def client_accuracies(trainer: Trainer, validation, clients: list) -> list[float]:
    """`label_mix_accuracies` of the trainer's model for each of `clients` (datasets with a `label` column), from its
    last evaluation (`KeptPredictions`: the final model's); of each client's own model where the strategy keeps one
    per client (FedSA-LoRA's B: `own_model`)."""
    labels = [c["label"] for c in clients]
    strategy = getattr(trainer, "strategy", None)
    if strategy is None or not strategy.personal_state(0):
        return label_mix_accuracies(*trainer.compute_metrics.last, labels)
    accuracies = []
    for k, client_labels in enumerate(labels):
        with own_model(trainer, k):
            output = trainer.predict(validation)
        accuracies += label_mix_accuracies(output.predictions.argmax(-1), output.label_ids, [client_labels])
    return accuracies


def run_one(task: Task, method: str, lr: float, seed: int, train, validation, a, alpha, out, extra=None) -> dict:
    """One run at local learning rate `lr` (with `extra` config, a variant's swept option); returns the metric per
    round, the worst client's accuracy (label-skewed classification: `client_accuracies` of the final model, each
    local-only client's own model), bytes, peak RSS and wall time."""
    key = f"eval_{task.metric}"
    per_client = task.metric == "accuracy" and task.client_column is None

    def scorer():  # a trainer's compute_metrics
        return KeptPredictions(task.compute_metrics) if per_client else task.compute_metrics

    common = dict(
        output_dir=out, per_device_train_batch_size=a.batch_size, per_device_eval_batch_size=32, learning_rate=lr,
        warmup_steps=0, seed=seed, report_to="none", disable_tqdm=True, use_cpu=True, save_strategy="no",
        dataloader_pin_memory=False,
    )  # fmt: skip
    clients = [c.remove_columns(task.client_column) if task.client_column else c for c in client_split(
        task, train, a, alpha, seed)]  # fmt: skip
    if task.client_column:
        train = train.remove_columns(task.client_column)
    start = time.perf_counter()
    with PeakRSS() as rss:
        if method == "local_only":
            results, own = [], []
            for shard in clients[: a.local_clients]:
                args = TrainingArguments(max_steps=a.rounds * a.local_steps, eval_strategy="no", **common)
                trainer = Trainer(
                    model=seeded_model(task, seed), args=args, train_dataset=shard, data_collator=task.collator,
                    eval_dataset=validation, compute_metrics=scorer(),
                )  # fmt: skip
                trainer.pop_callback(PrinterCallback)
                trainer.train()
                results.append(trainer.evaluate()[key])
                if per_client:
                    own += client_accuracies(trainer, validation, [shard])
            per_round, total_bytes = [float(np.mean(results))], 0
        else:
            centralized = method == "centralized"
            config = FederatedConfig(
                num_clients=1 if centralized else len(clients),
                clients_per_round=None if centralized else a.per_round, num_rounds=a.rounds, eval_every_rounds=1,
                local_steps=a.local_steps * a.per_round if centralized else a.local_steps,
                strategy=strategy_of(method), **(task.galore if method in GALORE_METHODS else {}),
                **OPTIONS.get(method, {}), **(VARIANTS[method][1] if method in VARIANTS else {}),
                **(COMPRESSED[method][1] if method in COMPRESSED else {}), **(extra or {}),
                **common,
            )  # fmt: skip
            trainer = FederatedTrainer(
                model=seeded_model(task, seed), args=config, client_datasets=[train] if centralized else clients,
                eval_dataset=validation, data_collator=task.collator, compute_metrics=scorer(),
                peft_config=LoraConfig(**task.lora) if family(method) == "lora" else None,
                callbacks=[RoundPrinter(method, task.metric)],
            )  # fmt: skip
            trainer.pop_callback(PrinterCallback)
            output = trainer.train()
            per_round = [e[key] for e in trainer.state.log_history if e.get("round", 0) > 0]  # (round 0: gradients)
            total_bytes = output.metrics["total_bytes_up"] + output.metrics["total_bytes_down"]
            own = client_accuracies(trainer, validation, clients) if per_client else []
    return {
        "per_round": per_round,
        "final": per_round[-1],
        "worst_client": min(own) if own else None,
        "best": max(per_round) if task.metric == "accuracy" else min(per_round),
        "total_bytes": total_bytes,
        "peak_rss_mib": rss.peak_mib,
        "wall_s": time.perf_counter() - start,
    }


def rounds_to(task: Task, per_round: list[float], target: float) -> int | None:
    return next((i + 1 for i, v in enumerate(per_round) if v == target or task.better(v, target)), None)


def summarize(task: Task, runs: list[dict], target: float) -> dict:
    finals = [r["final"] for r in runs]
    reached = [rounds_to(task, r["per_round"], target) for r in runs]
    worst = [r.get("worst_client") for r in runs]
    return {
        "final_mean": statistics.mean(finals),
        "final_std": statistics.pstdev(finals),
        "best_mean": statistics.mean(r["best"] for r in runs),
        "rounds_to_target": None if None in reached else statistics.mean(reached),
        "worst_client_mean": None if None in worst else statistics.mean(worst),
        "total_bytes": statistics.mean(r["total_bytes"] for r in runs),
        "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
        "wall_s_mean": statistics.mean(r["wall_s"] for r in runs),
        "per_round_mean": np.mean([r["per_round"] for r in runs], axis=0).tolist(),
    }


def plot(results: dict, metric: str, directory: Path) -> list[str]:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    label = "validation accuracy" if metric == "accuracy" else "validation loss"
    settings = list(results)
    # up to 40 distinct colours (more methods than one cycle's 10 or 20); GaLore stars, compressed triangles
    colours = [*plt.cm.tab20.colors, *plt.cm.tab20b.colors]
    count = max(len(methods) for methods in results.values())
    columns = 2 if count > 16 else 1
    size = (5 * len(settings) + 2.5 * columns, 4 + count // 12)

    def marker(method: str) -> str:
        return "*" if method in GALORE_METHODS else "^" if method in COMPRESSED else "o"

    fig, axes = plt.subplots(1, len(settings), figsize=size, squeeze=False)
    for ax, setting in zip(axes[0], settings):
        for i, (method, summary) in enumerate(results[setting].items()):
            curve = summary["per_round_mean"]
            style = dict(linestyle="--") if method == "centralized" else {}
            style["color"] = colours[i % len(colours)]
            if len(curve) == 1:
                ax.axhline(curve[0], label=method, color="grey", linestyle=":")
            else:
                ax.plot(range(1, len(curve) + 1), curve, marker=marker(method), label=method, **style)
        ax.set(title=setting, xlabel="round", ylabel=label)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), ncol=columns)
    fig.tight_layout()
    curves = directory / f"{metric}_per_round.png"
    fig.savefig(curves, dpi=120)
    fig, axes = plt.subplots(1, len(settings), figsize=size, squeeze=False)
    for ax, setting in zip(axes[0], settings):
        for i, (method, summary) in enumerate(results[setting].items()):
            if summary["total_bytes"] > 0:
                ax.scatter(summary["total_bytes"], summary["final_mean"], label=method, marker=marker(method),
                           color=colours[i % len(colours)], s=80 if marker(method) == "*" else 30)  # fmt: skip
                if marker(method) != "*":  # the GaLore stars sit close together: the legend names them
                    ax.annotate(method, (summary["total_bytes"], summary["final_mean"]), fontsize=6)
        ax.set(title=setting, xlabel="bytes communicated (up + down)", ylabel=f"final {label}", xscale="log")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), ncol=columns)
    fig.tight_layout()
    scatter = directory / f"{metric}_vs_bytes.png"
    fig.savefig(scatter, dpi=120)
    return [str(curves), str(scatter)]


QUICK = {  # --quick: one setting, one seed, few rounds, each method at the first rate of its grid
    "text": dict(datasets=["bbc"], alphas=[1.0], seeds=1, rounds=3),
    "instruct": dict(seeds=1, rounds=2, local_clients=4),
    "vision": dict(alphas=[1.0], seeds=1, rounds=3),
}


def setting_name(task: Task, dataset: str, alpha: float | None) -> str:
    return f"{dataset}/{task.client_column}" if alpha is None else f"{dataset}/alpha={alpha}"


SETTINGS = ("clients", "per-round", "rounds", "local-steps", "batch-size", "seq-len", "eval-examples")


def earlier_rates(a: argparse.Namespace, first_setting: str) -> dict:
    """The kept rates of the runs `a.rates_from` names, refused unless each swept `first_setting` with seed 0 and
    this run's task and settings."""
    rates = {}
    for path in a.rates_from:
        earlier = json.loads(Path(path).read_text())
        config = earlier["config"]
        differing = [k for k in ("task", *(n.replace("-", "_") for n in SETTINGS)) if config[k] != getattr(a, k)]
        if earlier["lr_sweep"]["setting"] != f"{first_setting}, seed 0" or differing:
            raise ValueError(
                f"{path} swept {earlier['lr_sweep']['setting']} (settings differing: {differing}), not "
                f"{first_setting}, seed 0 with this run's settings: its rates do not carry over."
            )
        rates.update(earlier["learning_rates"])
    return rates


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="text", choices=list(TASKS))
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--plots", metavar="DIR", help="write <metric>_per_round.png and <metric>_vs_bytes.png here")
    p.add_argument("--replot", metavar="JSON", help="run nothing: write --plots from an earlier run's JSON")
    p.add_argument("--quick", action="store_true", help="one setting, one seed, few rounds, no LR sweep")
    p.add_argument("--datasets", nargs="+", help="default: all of the task's")
    p.add_argument("--alphas", nargs="+", type=float, help="Dirichlet alphas of the label splits (default 0.1 1.0)")
    p.add_argument("--seeds", type=int, help="default 3")
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--local-clients", type=int, help="clients local_only averages over (default: the task's)")
    for name in SETTINGS:
        p.add_argument(f"--{name}", type=int, help="default: the task's (bench/tasks.py)")
    p.add_argument(
        "--lr-grid", nargs="+", default=[], type=grid_override, metavar="FAMILY=RATE,RATE",
        help=f"sweep these rates for a family ({', '.join(FAMILIES)}) instead of the task's grid, e.g. "
        "lora=5e-3,2e-3,1e-3 for a long run; the first is the rate --quick uses",
    )  # fmt: skip
    p.add_argument(
        "--rates-from", nargs="+", default=[], metavar="JSON",
        help="keep each method's rate (a variant's option) from earlier runs' JSON whose sweep ran on this run's "
        "first setting and seed with the same settings; those methods are not swept again",
    )  # fmt: skip
    a = p.parse_args()
    task = TASKS[a.task]
    defaults = dict(task.defaults, datasets=list(task.datasets), alphas=[0.1, 1.0], seeds=3)
    if a.quick:
        defaults.update(QUICK[a.task])
    for key, value in defaults.items():  # flags given on the command line win
        if getattr(a, key) is None:
            setattr(a, key, value)
    a.local_clients = a.local_clients or a.clients  # tasks without a default: every client
    if task.client_column is not None:
        a.alphas = [None]  # natural clients: no label split
    return a


def grid_override(text: str) -> tuple[str, list[float]]:
    """`--lr-grid`'s FAMILY=RATE,RATE,... as (family, rates)."""
    family_name, _, rates = text.partition("=")
    if family_name not in FAMILIES or not rates:
        raise argparse.ArgumentTypeError(f"expected FAMILY=RATE,RATE, FAMILY one of {', '.join(FAMILIES)}: {text!r}")
    return family_name, [float(rate) for rate in rates.split(",")]


def main() -> None:
    a = parse_args()
    if a.replot:
        report = json.loads(Path(a.replot).read_text())
        print("\n".join(plot(report["results"], report["metric"], Path(a.plots or "."))))
        return
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # no bar per model load
    task = TASKS[a.task]()
    task.lr_grid = {**task.lr_grid, **dict(a.lr_grid)}
    seeds = list(range(a.seeds))
    started = time.perf_counter()
    commit = git_commit()  # at the start: the code that runs, whatever changes in the tree meanwhile
    sweep: dict = {}
    bases = {base_of(m) for m in a.methods} - {None}
    best_lr = {m: swept(task, m)[1][0] for m in {*a.methods, *bases}}  # the kept value of each swept option
    earlier = earlier_rates(a, setting_name(task, a.datasets[0], a.alphas[0]))
    reused = {m: v for m, v in earlier.items() if m in best_lr}
    best_lr.update(reused)
    raw: dict = {}
    with tempfile.TemporaryDirectory() as out:
        for d_index, name in enumerate(a.datasets):
            train, validation = task.prepare(name, a)
            for a_index, alpha in enumerate(a.alphas):
                setting = setting_name(task, name, alpha)
                raw[setting] = {m: [] for m in a.methods}
                for method in a.methods:
                    for seed in seeds:
                        first = d_index == 0 and a_index == 0 and seed == seeds[0] and not a.quick
                        first = first and method not in reused and method not in COMPRESSED
                        if method in COMPRESSED:  # at its base's rate
                            best_lr[method] = best_lr[COMPRESSED[method][0]]
                        option, grid = swept(task, method)
                        lrs = grid if first else [best_lr[method]]
                        tried = {}
                        for lr in lrs:
                            elapsed = time.perf_counter() - started
                            print(f"[{elapsed:6.0f}s] {setting} {method} seed={seed} {option}={lr:g}", flush=True)
                            local, extra = (lr, {})
                            if method in VARIANTS:  # at its base's winning rate
                                local, extra = best_lr[VARIANTS[method][0]], option_config(option, lr)
                            tried[lr] = run_one(task, method, local, seed, train, validation, a, alpha, out, extra)
                        if first:
                            best = lrs[0]
                            for lr in lrs[1:]:
                                best = lr if task.better(tried[lr]["final"], tried[best]["final"]) else best
                            best_lr[method] = best
                            sweep[method] = {str(lr): r["final"] for lr, r in tried.items()}
                        raw[setting][method].append(tried[best_lr[method]])
    results, targets = {}, {}
    for setting, methods in raw.items():
        finals = [statistics.mean(r["final"] for r in runs) for runs in methods.values()]
        targets[setting] = task.target(max(finals) if task.metric == "accuracy" else min(finals))
        results[setting] = {
            m: {**summarize(task, runs, targets[setting]), **kept(m, best_lr)} for m, runs in methods.items()
        }
    report = {
        "command": " ".join(["python", *sys.argv]),
        "date": time.strftime("%Y-%m-%d"),
        "commit": commit,
        "wall_s_total": time.perf_counter() - started,
        "task": a.task,
        "metric": task.metric,
        "config": {k: v for k, v in vars(a).items() if k not in ("json", "plots")},
        "lr_grid": task.lr_grid,
        "lr_sweep": {"setting": f"{next(iter(raw))}, seed 0", "final": sweep},
        "learning_rates": best_lr,
        "rates_from": {"files": a.rates_from, "methods": sorted(reused)},
        "swept_options": {m: swept(task, m)[0] for m in a.methods},
        "target": targets,
        "results": results,
        "runs": raw,
        "versions": {
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
    }  # fmt: skip
    print_table(report)
    if a.plots:
        report["plots"] = plot(results, task.metric, Path(a.plots))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(report, indent=2))
    print(f"total wall time: {report['wall_s_total']:.0f} s")


def git_commit() -> str:
    """The commit the figures are measured at; "-dirty" when tracked files differ from it."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()

    dirty = git("status", "--porcelain", "--untracked-files=no")
    return (git("rev-parse", "--short", "HEAD") or "unknown") + ("-dirty" if dirty else "")


def kept(method: str, best: dict) -> dict:
    """A method's local learning rate, and for a variant the value of the option it swept."""
    if method in VARIANTS:
        base, _, option, _ = VARIANTS[method]
        return {"learning_rate": best[base], option: best[method]}
    return {"learning_rate": best[method]}


def print_table(report: dict) -> None:
    results, targets, metric = report["results"], report["target"], report["metric"]
    header = f"{'setting':<24} {'method':<24} {'lr':>16} {'final ' + metric:>15} {'worst':>6} {'best':>6} "
    header += f"{'rounds>=tgt':>11} "
    header += f"{'MB sent':>10} {'peak MiB':>9} {'wall s':>7}"
    print("\n" + header)
    for setting, methods in results.items():
        for method, s in methods.items():
            reached = "-" if s["rounds_to_target"] is None else f"{s['rounds_to_target']:.1f}"
            print(
                f"{setting:<24} {method:<24} {rates(report, method, s):>16} "
                f"{s['final_mean']:>8.4f}±{s['final_std']:.4f} {worst_client(s):>6} {s['best_mean']:>6.3f} "
                f"{reached:>11} {s['total_bytes'] / 1e6:>10.1f} {s['peak_rss_mib']:>9.0f} {s['wall_s_mean']:>7.1f}"
            )
        rule = "90% of the best final accuracy" if metric == "accuracy" else "110% of the best final loss"
        print(f"{setting:<24} target {metric} ({rule}): {targets[setting]:.4f}")


if __name__ == "__main__":
    main()
