"""The tables of README.md and docs/methods.md written from the built-in strategies' declarations (their class
docstring, `title`, `paper` and `capabilities`), so that they cannot drift from the code:

    python -m fed_trainer.strategies.tables           # write them
    python -m fed_trainer.strategies.tables --check   # exit 1 if a page differs (tests/test_package.py checks too)
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path

from fed_trainer.strategies.capabilities import COLUMNS, Capabilities, registered


def mark(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return "any" if value is None else f"`{value}`"


def capability_table() -> str:
    """docs/methods.md's capability table: every registered strategy's declarations, one row each."""
    fields = [f.name for f in dataclasses.fields(Capabilities) if f.name != "lora"]
    lines = [
        "| `strategy=` | trains | " + " | ".join(COLUMNS[f][0] for f in fields) + " | paper |",
        "|---" * (len(fields) + 3) + "|",
    ]
    for name, cls in registered(built_in=True).items():
        caps = cls.capabilities
        paper = f"[arXiv {cls.paper[1]}](https://arxiv.org/abs/{cls.paper[1]})" if cls.paper else "-"
        cells = [f"`{name}`", "LoRA adapters" if caps.lora else "all weights"]
        lines.append("| " + " | ".join([*cells, *(mark(getattr(caps, f)) for f in fields), paper]) + " |")
    return "\n".join(lines) + "\n"


def method_table() -> str:
    """README.md's method table: every registered strategy, what its clients train, what its server does (the first
    paragraph of its docstring), and what it needs."""
    lines = ["| method | `strategy=` | clients train | the server | needs | paper |", "|---|---|---|---|---|---|"]
    for name, cls in registered(built_in=True).items():
        caps = cls.capabilities
        needs = ["`peft_config=LoraConfig(...)`"] if caps.lora else []
        if caps.heterogeneous_ranks:
            needs.append("ranks may differ per client")
        if caps.local_optimizer:
            needs.append(f'`optim="{caps.local_optimizer}"`')
        paper = f"[{cls.paper[0]}](https://arxiv.org/abs/{cls.paper[1]})" if cls.paper else "-"
        summary = " ".join((cls.__doc__ or "-").strip().split("\n\n")[0].split())
        trains = "LoRA adapters" if caps.lora else "all weights"
        cells = [cls.title, f"`{name}`", trains, summary, ", ".join(needs) or "-"]
        lines.append("| " + " | ".join([*cells, paper]) + " |")
    return "\n".join(lines) + "\n"


TABLES = {"capability-table": capability_table, "method-table": method_table}
PAGES = {"capability-table": "docs/methods.md", "method-table": "README.md"}
ROOT = Path(__file__).resolve().parents[2]


def rewritten(page: str, marker: str) -> str:
    """`page` with the table between `<!-- marker -->` and `<!-- end marker -->` generated anew."""
    pattern = re.compile(rf"(<!-- {marker} -->\n).*?(<!-- end {marker} -->)", re.S)
    if not pattern.search(page):
        raise ValueError(f"no <!-- {marker} --> ... <!-- end {marker} --> markers in the page")
    return pattern.sub(lambda m: m.group(1) + TABLES[marker]() + m.group(2), page)


def main() -> None:
    p = argparse.ArgumentParser(description="Write the tables generated from the strategies' declarations.")
    p.add_argument("--check", action="store_true", help="do not write; exit 1 if a page differs")
    a = p.parse_args()
    stale = []
    for marker, page in PAGES.items():
        path = ROOT / page
        before = path.read_text()
        after = rewritten(before, marker)
        if after != before:
            stale.append(page)
            if not a.check:
                path.write_text(after)
    if a.check and stale:
        sys.exit(
            f"{stale}: a table differs from the strategies' declarations; run python -m fed_trainer.strategies.tables"
        )
    print(f"{'checked' if a.check else 'written'}: {list(PAGES.values())}")


if __name__ == "__main__":
    main()
