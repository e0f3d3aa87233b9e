"""invarbench's own import graph, read from the source with ``ast``: no cycle among the module-level imports,
and no import of an invarbench module inside a function except where it keeps start-up light (LAZY)."""

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: The modules allowed to import invarbench modules inside functions, and why: `invarbench --help` and
#: `import invarbench` must not load torch, pandas or jinja2 (tests/test_cli_help.py).
LAZY = {
    "invarbench": "the package exposes `evaluate` and `Results` on first use (module __getattr__)",
    "invarbench.cli": "each command imports what it needs when it runs, so that --help stays light",
    "invarbench.api": "the CLI imports format_table and DEFAULT_RUNS_DIR from it at start-up",
}


def _modules() -> dict[str, Path]:
    """Every invarbench module and its source file, from pyproject.toml's package layout."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    roots = setuptools["package-dir"]
    modules = {}
    for package in setuptools["packages"]:
        root = max((name for name in roots if package == name or package.startswith(name + ".")), key=len)
        folder = ROOT / roots[root] / Path(*package[len(root) :].split(".")[1:])
        for path in folder.glob("*.py"):
            modules[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return modules


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    return (
        isinstance(node.test, ast.Name)
        and node.test.id == "TYPE_CHECKING"
        or isinstance(node.test, ast.Attribute)
        and node.test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, in_function=False):
    """(import node, inside a function) for every import that runs, skipping `if TYPE_CHECKING:` blocks."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node, in_function
        elif isinstance(node, ast.If) and _is_type_checking(node):
            yield from (
                item
                for child in node.orelse
                for item in _imports(ast.Module(body=[child], type_ignores=[]), in_function)
            )
        else:
            yield from _imports(
                node, in_function or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            )


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    """The invarbench modules an import statement in `module` executes: the named module, the packages above
    it (except the importer's own, which are already being imported), and `from x import y` where y is a
    submodule."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module if MODULES[module].stem == "__init__" else module.rpartition(".")[0]
            package = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
            base = f"{package}.{base}" if base else package
        names = [base] + [f"{base}.{alias.name}" for alias in node.names]
    targets = set()
    for name in names:
        parts = name.split(".")
        for end in range(1, len(parts) + 1):
            prefix = ".".join(parts[:end])
            if prefix in MODULES and not (module == prefix or module.startswith(prefix + ".")):
                targets.add(prefix)
    return targets


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module-level edges, function-level edges) between invarbench modules."""
    top, lazy = {module: set() for module in MODULES}, {module: set() for module in MODULES}
    for module, path in MODULES.items():
        for node, in_function in _imports(ast.parse(path.read_text(), str(path))):
            (lazy if in_function else top)[module] |= _targets(module, node)
    return top, lazy


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a list of modules, first repeated at the end) per strongly connected component of more
    than one module or with a self-import."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            member = None
            while member != node:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
            if len(component) > 1 or node in graph[node]:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_in(graph, component) for component in components]


def _cycle_in(graph, component):
    start = min(component)
    paths, seen = [[start]], {start}
    while paths:  # breadth first, back to start through the component
        path = paths.pop(0)
        for target in sorted(graph[path[-1]] & component):
            if target == start:
                return [*path, start]
            if target not in seen:
                seen.add(target)
                paths.append([*path, target])
    raise AssertionError(component)


def test_the_graph_sees_every_package_and_its_imports():
    top, _ = import_graph()
    assert {
        "invarbench",
        "invarbench.cli",
        "invarbench.attacks.invariance.linf",
        "invarbench.leaderboard.check",
    } <= set(MODULES)
    assert "invarbench.attacks.base" in top["invarbench.attacks"]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_module_level_imports_have_no_cycle():
    top, _ = import_graph()
    cycles = find_cycles(top)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_invarbench_modules_are_imported_inside_functions_only_to_keep_start_up_light():
    _, lazy = import_graph()
    hidden = {module: sorted(targets) for module, targets in lazy.items() if targets and module not in LAZY}
    assert not hidden, f"imports inside functions (move them to the top, breaking any cycle that appears): {hidden}"


def test_the_lazy_modules_would_have_no_cycle_either():
    top, lazy = import_graph()
    cycles = find_cycles({module: top[module] | (lazy[module] if module in LAZY else set()) for module in MODULES})
    assert not cycles, "import cycles through the lazy imports:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_the_oracles_depend_on_neither_the_attacks_nor_the_labelling_app():
    """Attacks and the labelling app read oracles; oracles are judged apart from both."""
    top, _ = import_graph()
    oracles = {module: targets for module, targets in top.items() if module.split(".")[:2] == ["invarbench", "oracles"]}
    assert "invarbench.oracles.people" in oracles and "invarbench.oracles.calibration" in oracles
    for module, targets in oracles.items():
        above = sorted(
            target for target in targets if target.startswith(("invarbench.attacks", "invarbench.labelling"))
        )
        assert not above, f"{module} imports {above}"
    assert "invarbench.oracles.people" in top["invarbench.labelling"]


def test_the_models_import_no_attack_so_attacks_and_models_form_no_cycle():
    """Attacks load models (an invariance search's guide); training and card figures, which run attacks,
    live above both (invarbench.training, invarbench.measure)."""
    top, lazy = import_graph()
    models = [module for module in top if module.split(".")[:2] == ["invarbench", "models"]]
    assert "invarbench.models.registry" in models
    for module in models:
        above = sorted(target for target in top[module] | lazy[module] if target.startswith("invarbench.attacks"))
        assert not above, f"{module} imports {above}"
    assert "invarbench.models" in top["invarbench.attacks.invariance.guide"]
    assert "invarbench.attacks" in top["invarbench.measure"]
