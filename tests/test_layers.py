"""The layering of the package: dependencies point down only.

steer.kernels <- steer.core <- steer.engine <- steer.vllm <- steer.find <- steer.experiments <-
steer.cli; the
top-level `steer` re-exports the API. Checked on the source (every import statement, also
those inside functions), so a new upward import fails here, not in a reader's head.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["steer.kernels", "steer.core", "steer.engine", "steer.vllm", "steer.find", "steer.experiments", "steer.cli"]


def layer(module: str) -> int | None:
    for i, name in enumerate(LAYERS):
        if module == name or module.startswith(name + "."):
            return i
    return None


def modules():
    for path in sorted((ROOT / "steer").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), path
    for path in sorted((ROOT / "kernels").glob("*.py")):
        yield "steer.kernels" + ("" if path.stem == "__init__" else "." + path.stem), path


def imports(path: Path, module: str):
    package = module if path.stem == "__init__" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            yield base
            yield from (f"{base}.{a.name}" for a in node.names)  # `from steer import engine`


def test_dependencies_point_down():
    upward = []
    for module, path in modules():
        own = layer(module)
        if own is None:  # steer/__init__.py: the public API, above everything
            continue
        for target in imports(path, module):
            other = layer(target)
            if other is not None and other > own:
                upward.append(f"{module} imports {target}")
    assert not upward, upward


def test_the_check_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from steer.engine.collect import collect\n")
    assert "steer.engine.collect" in set(imports(bad, "steer.core.bad"))
    assert layer("steer.engine.collect") > layer("steer.core.bad")


def _graph() -> dict[str, set[str]]:
    """steer module -> the steer modules it imports (at the top or inside a function)."""
    names = {module for module, _ in modules()}
    graph = {}
    for module, path in modules():
        targets = set()
        for target in imports(path, module):
            while target and target not in names:  # `from steer.core.x import f` -> steer.core.x
                target = target.rpartition(".")[0]
            if target and target != module and target != "steer":
                targets.add(target)
        graph[module] = targets
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (its modules in order), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node):
        state[node], _ = 1, path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node], _ = 2, path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles():
    """No two modules import each other, directly or through others (lazy imports count)."""
    assert _cycle(_graph()) is None, " -> ".join(_cycle(_graph()))


def test_the_cycle_check_sees_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
