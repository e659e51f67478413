"""Write the tables of docs/ from the JSON files the benchmarks write, so that no figure is copied by hand.

A table's place in a page is a pair of markers naming the JSON it comes from:

    <!-- compare-table: docs/data/compare_quick.json -->      (bench/compare.py's results)
    ... (replaced) ...
    <!-- end compare-table -->

    <!-- bench-table: docs/data/overhead.json -->              (any other benchmark's rows and summary)
    ... (replaced) ...
    <!-- end bench-table -->

    python bench/results_tables.py           # every marked table of docs/ (the pages in PAGES)
    python bench/results_tables.py --check   # exit 1 if a table differs from its JSON

    <!-- memory-model-table -->                                (fed_trainer.memory_model's formulas at 1B, 7B, 70B)
    ... (replaced) ...
    <!-- end memory-model-table -->

A compare table is preceded by the command, date, wall time, versions and git commit its JSON records.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKED = re.compile(r"(<!-- compare-table: (?P<path>\S+) -->\n)(?P<body>.*?)(<!-- end compare-table -->)", re.S)
BENCH_MARKED = re.compile(r"(<!-- bench-table: (?P<path>\S+) -->\n)(?P<body>.*?)(<!-- end bench-table -->)", re.S)
MODEL_MARKED = re.compile(r"(<!-- memory-model-table -->\n)(?P<body>.*?)(<!-- end memory-model-table -->)", re.S)
PAGES = ("results.md", "benchmarks.md", "scaling.md", "llm.md", "deployment.md")


def provenance(report: dict) -> str:
    """One line that says where the figures come from."""
    versions = ", ".join(f"{k} {v}" for k, v in report.get("versions", {}).items())
    commit = report.get("commit", "unrecorded")
    return (
        f"Measured by `{report['command']}` on {report['date']} at commit {commit}, "
        f"{report['wall_s_total']:.0f} s in all ({versions}; {report['machine']['cpus']} CPUs)."
    )


def worst_client(summary: dict) -> str:
    """A method's mean worst-client accuracy (bench/compare.py's `client_accuracies`), or "-" where the run did not
    record one (a loss metric, natural clients, or a JSON from before it was recorded)."""
    worst = summary.get("worst_client_mean")
    return "-" if worst is None else f"{worst:.3f}"


def table(report: dict) -> str:
    """The results of a compare JSON as a markdown table (the columns bench/compare.py prints)."""
    metric = report["metric"]
    lines = [
        provenance(report),
        "",
        f"| setting | method | lr | final {metric} | worst client | best round | rounds to target | MB sent "
        "| peak RSS MiB | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for setting, methods in report["results"].items():
        for method, s in methods.items():
            reached = "-" if s["rounds_to_target"] is None else f"{s['rounds_to_target']:.1f}"
            lines.append(
                f"| {setting} | {method} | {rates(report, method, s)} | "
                f"{s['final_mean']:.4f} ± {s['final_std']:.4f} | {worst_client(s)} | "
                f"{s['best_mean']:.3f} | {reached} | {s['total_bytes'] / 1e6:.1f} | {s['peak_rss_mib']:.0f} | "
                f"{s['wall_s_mean']:.1f} |"
            )
    if report["lr_sweep"]["final"]:
        lines += ["", sweep(report)]
    targets = ", ".join(f"{setting} {value:.4f}" for setting, value in report["target"].items())
    rule = "90% of the best final mean" if metric == "accuracy" else "110% of the best final mean"
    lines += ["", f"Targets ({rule} of each setting): {targets}."]
    return "\n".join(lines) + "\n"


OPTION_NAMES = {"server_learning_rate": "eta", "proximal_mu": "mu", "strategy_kwargs.init_learning_rate": "init lr"}


def rates(report: dict, method: str, summary: dict) -> str:
    """The "lr" cell: the local learning rate, and the option a method built on another swept (eta, mu)."""
    option = report.get("swept_options", {}).get(method, "learning_rate")
    cell = f"{summary['learning_rate']:g}"
    return cell if option == "learning_rate" else f"{cell}, {OPTION_NAMES.get(option, option)} {summary[option]:g}"


def sweep(report: dict) -> str:
    """The sweep: each method's final metric at every value of its grid (its learning rate, or for a method built
    on another its own option), the value it kept in bold."""
    parts = []
    for method, finals in report["lr_sweep"]["final"].items():
        kept = report["learning_rates"][method]
        option = report.get("swept_options", {}).get(method, "learning_rate")
        name = "" if option == "learning_rate" else f"{OPTION_NAMES.get(option, option)} "
        cells = [f"**{v:.4g}** ({name}{float(lr):g})" if float(lr) == kept else f"{v:.4g} ({name}{float(lr):g})"
                 for lr, v in finals.items()]  # fmt: skip
        parts.append(f"{method} " + " / ".join(cells))
    where = f"{report['lr_sweep']['setting']} (final {report['metric']} at each rate; kept in bold)"
    return f"Learning-rate sweep on {where}: " + "; ".join(parts) + "."


def cell(value) -> str:
    """A number as the benchmarks print it: floats to 3 decimals."""
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def rows_table(report: dict) -> str:
    """A benchmark's `rows` as a markdown table (its columns, in order), then its `summary` as one line."""
    columns = list(report["rows"][0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in report["rows"]]
    summary = ", ".join(f"{key} {cell(value)}" for key, value in report.get("summary", {}).items())
    return "\n".join(lines) + (f"\n\nSummary: {summary}.\n" if summary else "\n")


# what the memory-model table projects: (setup, strategy, server optimizer, client optimizer, ZeRO stage); AdamW is
# Trainer's default, the fused kernel, whose step holds no temporaries
PROJECTED = [
    ("FedAvg", "fedavg", "none", "adamw_torch_fused", 0),
    ("FedAvg + FedAdam", "fedavg", "fedadam", "adamw_torch_fused", 0),
    ("SCAFFOLD", "scaffold", "none", "sgd", 0),
    ("FedAvg + FedAdam, ZeRO-2", "fedavg", "fedadam", "adamw_torch_fused", 2),
    ("FedAvg + FedAdam, ZeRO-3", "fedavg", "fedadam", "adamw_torch_fused", 3),
]
PROJECTED_RANKS = 8


def memory_model_table() -> str:
    """`fed_trainer.memory_model`'s bytes per process for full fine-tuning of a bfloat16 model (T = P) at 1B, 7B and
    70B parameters, with the server state on the GPU and on the CPU."""
    from fed_trainer.memory_model import client_training_bytes, server_state_bytes

    sizes, p = (1e9, 7e9, 70e9), 10**9
    lines = [
        f"| setup (N = {PROJECTED_RANKS} under ZeRO) | state on | GPU per process | CPU per process | "
        + " | ".join(f"{size / 1e9:g}B: GPU / CPU GB" for size in sizes) + " |",
        "|---|---|---|---|" + "---|" * len(sizes),
    ]  # fmt: skip
    for setup, strategy, server_optimizer, optim, stage in PROJECTED:
        ranks = PROJECTED_RANKS if stage else 1
        training = client_training_bytes(p, p, 2, optim=optim, zero_stage=stage, ranks=ranks, strategy=strategy)
        shards = ranks if stage == 3 else 1  # ZeRO-3 partitions the server state with the weights
        state = server_state_bytes(p // shards, 2, server_optimizer=server_optimizer, strategy=strategy)
        for on_cpu in (False, True):
            gpu, cpu = (training, state) if on_cpu else (training + state, 0)
            cells = [f"{size * gpu / p / 1e9:.1f} / {size * cpu / p / 1e9:.1f}" for size in sizes]
            lines.append(
                f"| {setup} | {'CPU' if on_cpu else 'GPU'} | {gpu / p:g}P | {cpu / p:g}P | " + " | ".join(cells) + " |"
            )
    return "\n".join(lines) + "\n"


def rewritten(page: str) -> str:
    """`page` with every marked table generated anew from its JSON."""

    def replace(match: re.Match, render) -> str:
        report = json.loads((ROOT / match["path"]).read_text())
        return match.group(1) + render(report) + match.group(4)

    page = MARKED.sub(lambda m: replace(m, table), page)
    page = BENCH_MARKED.sub(lambda m: replace(m, rows_table), page)
    return MODEL_MARKED.sub(lambda m: m.group(1) + memory_model_table() + m.group(3), page)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--page", action="append", help="a page to rewrite (default: docs/ " + ", ".join(PAGES) + ")")
    p.add_argument("--check", action="store_true", help="do not write; exit 1 if a page differs from its JSON")
    a = p.parse_args()
    stale = []
    for page in map(Path, a.page or [ROOT / "docs" / name for name in PAGES]):
        before = page.read_text()
        after = rewritten(before)
        if a.check:
            stale += [str(page)] if after != before else []
            continue
        page.write_text(after)
        count = sum(len(marked.findall(before)) for marked in (MARKED, BENCH_MARKED, MODEL_MARKED))
        print(f"{page}: {count} tables written")
    if stale:
        sys.exit(f"{', '.join(stale)}: a table differs from its JSON; run bench/results_tables.py")


if __name__ == "__main__":
    main()
