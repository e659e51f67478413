"""The package's shape: no import circle among its modules (type-only imports sit under TYPE_CHECKING), and the
tables generated from the strategies' declarations agree with them."""

import ast
from pathlib import Path

import pytest

from fed_trainer.strategies import FedAvg, register_strategy
from fed_trainer.strategies.keys import Key, message_key, parse
from fed_trainer.strategies.tables import PAGES, ROOT, capability_table, method_table, rewritten

PACKAGE = Path(__file__).resolve().parents[1] / "fed_trainer"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_imports(path: Path, modules: set[str]) -> set[str]:
    """The package modules `path` imports when it is imported: its top-level imports, not those under
    `if TYPE_CHECKING:` or inside functions (a name imported from a package counts as its submodule if one exists)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name in modules}


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the directed graph, or None."""
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state and (found := visit(nxt, [*path, nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_cycle_finds_a_circle_and_only_a_circle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_module_of_the_package_imports_itself_back():
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: runtime_imports(path, set(paths)) - {name} for name, path in paths.items()}
    # a package's __init__ importing its own submodules is how packages work, not a circle
    graph = {name: {m for m in deps if not m.startswith(name + ".")} for name, deps in graph.items()}
    assert cycle(graph) is None, " -> ".join(cycle(graph))


def test_the_generated_tables_agree_with_the_strategies_declarations():
    for marker, page in PAGES.items():
        text = (ROOT / page).read_text()
        assert rewritten(text, marker) == text, f"{page}: run python -m fed_trainer.strategies.tables"


def test_a_drifted_table_is_caught():
    page = (ROOT / "README.md").read_text().replace("| FLoRA | `flora` | LoRA adapters |", "| FLoRA | `flora` | all |")
    assert rewritten(page, "method-table") != page


def test_a_user_strategy_stays_out_of_the_pages_tables():
    @register_strategy("tables_probe")
    class Probe(FedAvg):
        """Averages like FedAvg, for this test."""

    assert "tables_probe" not in capability_table() + method_table()


@pytest.mark.parametrize(
    "key",
    [
        Key("bert.encoder.layer.0.attention.self.query.weight"),
        Key("base_model.model.bert.encoder.layer.0.attention.self.query", "base"),
        Key("bert.encoder.layer.1.output.dense.weight", "c", period=3),
        Key("bert.encoder.layer.1.output.dense.weight", "left", period=0),
        Key("base_model.model.bert.encoder.layer.0.attention.self.value", "stack_right", round=12),
        Key("bert.encoder.layer.1.intermediate.dense.weight", "exp_avg_sq"),
    ],
)
def test_a_message_key_reads_back_as_the_key_it_was_built_from(key):
    assert parse(message_key(key.tensor, key.part, period=key.period, round=key.round)) == key


def test_the_codec_refuses_a_part_it_does_not_know():
    with pytest.raises(ValueError, match="unknown message part 'bias_correction'"):
        Key("w", "bias_correction")
