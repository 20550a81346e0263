"""The package's floors, stated as data: every import points down (or stays on its floor), and
no import cycle exists. Imports inside functions count too.

A module belongs to the first floor whose prefixes match its dotted name (``minilora.`` dropped).
The library is floors 0-7; the experiments floor (experiments, course, bench, cli) sits on top and
nothing below it may import it.
"""
import ast
import pathlib

import pytest

import minilora

PKG = pathlib.Path(minilora.__file__).parent

LAYERS = [
    ["", "errors"],                                         # 0 the package root, error classes
    ["backend", "threads"],                                 # 1 NumPy or CuPy; CPU threads
    ["config", "io", "peft_format"],                        # 2 configs, the typed file format, PEFT's
    ["nn", "data"],                                         # 3 ops and layers; corpora, tokenizer
    ["model", "optim", "sample", "gradcheck", "memory", "paged"],  # 4 the GPT and its training parts
    ["checkpoint", "train"],                                # 5 files of models, the training loop
    ["quant", "methods"],                                   # 6 4-bit weights, the methods (one home each)
    ["methods.qlora", "methods.registry", "adapters", "analysis"],  # 7 LoRA on a 4-bit base, the
                                                            #   registry, many adapters, ΔW maths
    ["experiments.paths", "experiments.presets", "experiments.tasks"],  # 8 experiments: what to run on
    ["experiments", "course"],                              # 9 methods, harness, studies, figures, homework
    ["bench"],                                              # 10 measurements
    ["cli"],                                                # 11 the command line
]
LIBRARY_TOP = 7


def floor_of(name: str) -> int:
    """The floor of module ``name`` (dotted, without the leading ``minilora.``)."""
    best = None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if name == p or (p and name.startswith(p + ".")):
                if best is None or len(p) > best[1]:
                    best = (i, len(p))
    if best is None:
        raise AssertionError(f"module minilora.{name} is on no floor: add it to LAYERS")
    return best[0]


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PKG).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: pathlib.Path, known: set):
    """(imported module, line) for every ``minilora`` import in the file, at any depth."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and (node.module == "minilora" or node.module.startswith("minilora.")):
            base = node.module[len("minilora."):] if node.module != "minilora" else ""
            for alias in node.names:
                sub = f"{base}.{alias.name}" if base else alias.name
                yield (sub if sub in known else base), node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("minilora."):
                    yield alias.name[len("minilora."):], node.lineno


def upward_imports(edges) -> list:
    """The (importer, imported, line) edges that point to a higher floor, as messages."""
    return [f"minilora/{a.replace('.', '/') or '__init__'}.py:{line}: imports minilora.{b} "
            f"(floor {floor_of(b)}) from floor {floor_of(a)}"
            for a, b, line in edges if floor_of(b) > floor_of(a)]


def cycles(edges) -> list:
    """Strongly connected components with more than one module (Tarjan)."""
    graph = {}
    for a, b, _ in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def package_edges():
    files = {module_name(p): p for p in PKG.rglob("*.py")}
    edges = []
    for name, path in files.items():
        for dep, line in imports_of(path, set(files)):
            # a package's __init__ re-exporting its own modules is not an edge between floors
            if dep != name and not (dep.startswith(name + ".") and path.name == "__init__.py"):
                edges.append((name, dep, line))
    return files, edges


def test_every_module_is_on_a_floor():
    files, _ = package_edges()
    for name in files:
        floor_of(name)


def test_no_import_points_up():
    _, edges = package_edges()
    bad = upward_imports(edges)
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    _, edges = package_edges()
    # submodules of one package importing its __init__ (and back) are one module for this check
    found = cycles(edges)
    assert not found, f"import cycles: {found}"


def test_the_library_never_imports_the_experiments_floor():
    _, edges = package_edges()
    bad = [f"minilora.{a} imports minilora.{b} (line {line})" for a, b, line in edges
           if floor_of(a) <= LIBRARY_TOP and floor_of(b) > LIBRARY_TOP]
    assert not bad, bad


def test_the_checker_catches_an_upward_import_and_a_cycle():
    # a library module importing the CLI, and two modules importing each other
    edges = [("methods.lora.layers", "cli", 12), ("model", "nn.ops", 3)]
    assert upward_imports(edges) == [
        "minilora/methods/lora/layers.py:12: imports minilora.cli (floor 11) from floor 6"]
    assert cycles([("a", "b", 1), ("b", "a", 2), ("b", "c", 3)]) == [["a", "b"]]


#: the only modules a function may import lazily: optional or slow-to-import dependencies
LAZY_OK = ("cupy", "torch", "matplotlib", "nbformat", "nbclient", "scipy.stats", "dask",
           "distributed", "nbgrader", "playwright", "IPython", "pygments")


def test_imports_sit_at_the_top_of_the_file():
    """Imports inside functions are only for optional heavy dependencies, each with a reason
    (a comment on its line or in the three lines above, for a block of them); every ``minilora`` import is at the top."""
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        lines = path.read_text().splitlines()
        for f in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for n in ast.walk(f):
                if not isinstance(n, (ast.Import, ast.ImportFrom)):
                    continue
                mods = [n.module] if isinstance(n, ast.ImportFrom) else [a.name for a in n.names]
                where = f"{path.relative_to(PKG.parent)}:{n.lineno}"
                if not all(m.startswith(LAZY_OK) for m in mods):
                    bad.append(f"{where}: {mods} imported inside a function")
                elif not any("#" in line for line in lines[max(0, n.lineno - 4):n.end_lineno]):
                    bad.append(f"{where}: lazy import of {mods} without a one-line reason")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("module", ["minilora.methods", "minilora.methods.lora", "minilora.nn.modules_to_save",
                                    "minilora.quant", "minilora.methods.qlora", "minilora.adapters",
                                    "minilora.analysis", "minilora.experiments", "minilora.bench",
                                    "minilora.cli"])
def test_each_package_imports_first_in_a_fresh_interpreter(module):
    """Package __init__ files import their modules eagerly, so an import cycle between two
    packages shows only when one of them is imported first; import each one first."""
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True,
                          text=True, cwd=str(PKG.parent))
    assert proc.returncode == 0, proc.stderr[-2000:]
