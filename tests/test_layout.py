"""The house rules of lark/ (README "Where things live"), checked on the source itself: imports point one way
(no cycle at any depth, no lark import inside a function, a wing never imports the run's orchestration), and every
module and function stays small enough to read in one sitting."""

import ast

import pytest
from conftest import ROOT

LARK = ROOT / "lark"
WINGS = ("lark.data", "lark.kernel", "lark.analysis", "lark.validation")
ORCHESTRATION = ("lark.experiment", "lark.checkpoint", "lark.training", "lark.callbacks")
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 60


def module_name(path):
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(LARK.rglob("*.py"))}


def imports(path):
    """[(imported lark module, line, inside a function)] of one file."""
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.ImportFrom) and child.level == 0 and (child.module or "").startswith("lark"):
                for alias in child.names:
                    name = f"{child.module}.{alias.name}"
                    found.append((name if name in MODULES else child.module, child.lineno, in_function))
            elif isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, in_function) for a in child.names if a.name.startswith("lark"))
            visit(child, inside)

    visit(ast.parse(path.read_text()), False)
    return found


GRAPH = {name: {m for m, _, _ in imports(path) if m in MODULES and m != name} for name, path in MODULES.items()}


def test_the_import_graph_has_no_cycle():
    state = {}

    def walk(node, stack):
        state[node] = "open"
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == "open":
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(nxt) :] + [nxt]))
            if nxt not in state:
                walk(nxt, stack + [nxt])
        state[node] = "done"

    for name in MODULES:
        if name not in state:
            walk(name, [name])


def test_no_lark_import_inside_a_function():
    inner = [
        f"{MODULES[n].relative_to(ROOT)}:{line} imports {m}" for n in MODULES for m, line, f in imports(MODULES[n]) if f
    ]
    assert inner == []


def test_wings_never_import_the_runs_orchestration():
    wrong = [f"{n} imports {m}" for n, deps in GRAPH.items() if n.startswith(WINGS) for m in deps if m in ORCHESTRATION]
    assert wrong == []


def test_the_data_wing_imports_no_other_wing():
    wrong = [
        f"{n} imports {m}"
        for n, deps in GRAPH.items()
        if n.startswith("lark.data")
        for m in deps
        if m.startswith(WINGS) and not m.startswith("lark.data")
    ]
    assert wrong == []


def test_modules_and_functions_are_small():
    big = [
        f"{p.relative_to(ROOT)}: {n} lines"
        for p in MODULES.values()
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    ]
    long = [
        f"{p.relative_to(ROOT)}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines"
        for p in MODULES.values()
        for node in ast.walk(ast.parse(p.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert big == [] and long == []


def test_the_checker_sees_a_cycle_and_an_inner_import(tmp_path):
    # the rules above must be able to fail: a hand-made file with both faults is caught
    bad = tmp_path / "bad.py"
    bad.write_text("from lark.data import io\n\n\ndef f():\n    from lark.kernel import stores\n")
    assert imports(bad) == [("lark.data.io", 1, False), ("lark.kernel.stores", 5, True)]
