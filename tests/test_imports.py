"""The harness's import structure: no circle between circuitbench modules (at any depth: a function's
own import counts too), and no circuitbench module importing the contestants (``methods``; the
harness finds methods through the registry, `circuitbench.method`), and a report that only reads
(``circuitbench.report`` reaches no engine, model loading or evaluation, even indirectly)."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "circuitbench"


def _modules(root: Path) -> dict[str, Path]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imported(module: str, path: Path, known: dict) -> set[str]:
    """Every module ``module`` imports, anywhere in its source (``from . import x`` names the
    submodule ``x`` when there is one, else the package)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                package = ".".join(base + ([node.module] if node.module else []))
            else:
                package = node.module
            for alias in node.names:
                sub = f"{package}.{alias.name}"
                out.add(sub if sub in known else package)
    return out


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    known = _modules(root)
    return {m: _imported(m, p, known) for m, p in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles of ``graph`` (edges to modules outside it ignored), each as a path that
    returns to its first module."""
    found, done = [], set()

    def visit(node, stack, on_stack):
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph or nxt in done:
                continue
            if nxt in on_stack:
                found.append(stack[stack.index(nxt):] + [nxt])
                continue
            stack.append(nxt)
            on_stack.add(nxt)
            visit(nxt, stack, on_stack)
            on_stack.discard(nxt)
            stack.pop()
        done.add(node)

    for start in sorted(graph):
        if start not in done:
            visit(start, [start], {start})
    return found


def test_the_cycle_finder_finds_circles():
    assert cycles({"a": {"b"}, "b": {"c", "os"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    graph = import_graph()
    assert "circuitbench.sweep" in graph["circuitbench.runner"]  # relative imports are resolved
    assert "circuitbench.models" in graph["circuitbench.runner"]  # imports inside functions count


def test_no_import_circle_between_circuitbench_modules():
    found = cycles(import_graph())
    assert not found, "import circles: " + "; ".join(" -> ".join(c) for c in found)


def test_no_circuitbench_module_imports_a_method():
    bad = sorted(f"{m} imports {t}" for m, targets in import_graph().items() for t in targets
                 if t == "methods" or t.startswith("methods."))
    assert not bad, "; ".join(bad)


# What the report must never reach: it draws what the store holds and runs nothing (circuits are
# tensors, so torch itself is allowed).
NOT_FOR_THE_REPORT = ("circuitbench.engine", "circuitbench.models", "circuitbench.adapters", "circuitbench.evaluate",
                      "circuitbench.workbench", "circuitbench.runner", "circuitbench.faithfulness",
                      "circuitbench.method", "circuitbench.batches")


def test_the_report_imports_no_engine():
    graph = import_graph()
    reached, stack = {}, [(m, m) for m in graph if m.startswith("circuitbench.report")]
    while stack:  # every module the report reaches, with the report module it is reached from
        module, via = stack.pop()
        if module in reached:
            continue
        reached[module] = via
        stack.extend((t, via) for t in graph.get(module, ()) if t in graph)
    bad = sorted(f"{reached[m]} reaches {m}" for m in reached
                 if any(m == n or m.startswith(n + ".") for n in NOT_FOR_THE_REPORT))
    assert not bad, "; ".join(bad)
