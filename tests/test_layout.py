"""The package's import layering (docs/architecture.md): no module imports one that imports it back, lazily
or not, and the readable core knows nothing of the CPU fast paths but the `Linear` it builds with."""

import ast
from pathlib import Path

import transformer

ROOT = Path(transformer.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that `name` imports anywhere in its file (inside functions too)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                full = f"{target}.{alias.name}"
                found.add(full if full in modules else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_the_graph_sees_lazy_imports():
    # a check that found no edges would pass anything: the known ones, top-level and inside a function, are seen
    graph = _graph()
    assert "transformer.tokenizers" in graph["transformer.checkpoint"]
    assert "transformer.train" in graph["transformer.cli.common"]  # imported inside run_trainer


def test_no_module_imports_one_that_imports_it_back():
    graph, state, path = _graph(), {}, []

    def visit(name):
        state[name] = "open"
        path.append(name)
        for dep in sorted(graph[name]):
            assert state.get(dep) != "open", "import cycle: " + " -> ".join(path[path.index(dep) :] + [dep])
            if dep not in state:
                visit(dep)
        state[name] = "done"
        path.pop()

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_the_readable_core_knows_only_the_linear_of_the_fast_paths():
    graph = _graph()
    for core in ("transformer.attention", "transformer.layers", "transformer.model"):
        fast = {m for m in graph[core] if m.startswith("transformer.cpu")}
        assert fast <= {"transformer.cpu.linear"}, (core, fast)


def test_checkpoints_do_not_import_data_reading_or_training():
    graph = _graph()
    assert not graph["transformer.checkpoint"] & {
        "transformer.data",
        "transformer.tasks",
        "transformer.train",
        "transformer.prepare",
    }
