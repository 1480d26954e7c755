"""The package's shape: one folder per layer, imports pointing one way (models <- images
<- generation <- chat <- serve <- cli; convert beside, reading models only), no module
importing one that imports it back, the drafter loop and the torch path free of MLX,
the server clear of the command line's REPL, and no file or function past the size a
reader takes in at once."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mlx_diffgemma"
MAX_FUNCTION_LINES = 80
MAX_FILE_LINES = 700
# layer -> its rank: a module imports only from layers of a lower rank (or its own).
LAYERS = {"models": 0, "images": 1, "generation": 2, "torch_backend": 3, "bench": 3, "chat": 4, "serve": 5,
          "cli": 6, "__main__": 6}
# Layers outside the stack, and the only layers they may import.
BESIDE = {"convert": {"models"}}
# The command line's own modules (the REPL, rich's console): the server never reaches them.
CLI_MODULES = {"mlx_diffgemma.cli", "mlx_diffgemma.chat.commands", "mlx_diffgemma.chat.repl"}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


def _imports(name: str, path: Path, known: set, top_only: bool = False) -> set:
    """The package modules `name` imports, at the top or (unless `top_only`) inside
    functions too."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in (tree.body if top_only else ast.walk(tree)):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            candidates = [base] + [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        out |= {c for c in candidates if c in known and c != name}
    return out


def _graph(top_only: bool = False):
    modules = dict(_modules())
    known = set(modules)
    return {m: _imports(m, p, known, top_only) for m, p in modules.items()}


def test_no_import_cycles():
    graph = _graph()
    # The package's own __init__ resolves its names lazily, on first use: not an edge.
    graph.pop("mlx_diffgemma", None)
    for deps in graph.values():
        deps.discard("mlx_diffgemma")
    state: dict = {}
    cycles = []

    def visit(m, stack):
        state[m] = "open"
        for d in sorted(graph.get(m, ())):
            if state.get(d) == "open":
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_framework_free_modules():
    """What the torch path, the drafter loop and the session import when they are
    imported never reaches MLX (the MLX path's own imports happen inside functions)."""
    graph = _graph(top_only=True)
    for root in ("mlx_diffgemma.generation.loop", "mlx_diffgemma.torch_backend.drafter",
                 "mlx_diffgemma.chat.session", "mlx_diffgemma.models.paths", "mlx_diffgemma.models.checkpoint",
                 "mlx_diffgemma.models.recipes"):
        seen, todo = set(), [root]
        while todo:
            m = todo.pop()
            if m in seen:
                continue
            seen.add(m)
            todo += graph.get(m, ())
        for m in seen:
            source = dict(_modules())[m].read_text()
            tree = ast.parse(source)
            top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
            names = [a.name for n in top if isinstance(n, ast.Import) for a in n.names]
            names += [n.module or "" for n in top if isinstance(n, ast.ImportFrom) and not n.level]
            assert not any(x.split(".")[0] in ("mlx", "mlx_lm") for x in names), (
                f"{m} (reached from {root}) imports MLX at the top")


def test_functions_are_short():
    long = []
    for name, path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name} ({n} lines)")
    assert not long, "functions over {} lines: {}".format(MAX_FUNCTION_LINES, ", ".join(long))


def _layer(module: str) -> str:
    return module.split(".")[1]


def test_layers_import_one_way():
    wrong = []
    for m, deps in _graph().items():
        if m == "mlx_diffgemma":  # the package's lazy public names
            continue
        for d in deps - {"mlx_diffgemma"}:
            a, b = _layer(m), _layer(d)
            if a == b:
                continue
            allowed = BESIDE[a] if a in BESIDE else {x for x, r in LAYERS.items() if r < LAYERS[a]}
            if b not in allowed:
                wrong.append(f"{m} -> {d}")
    assert set(LAYERS) | set(BESIDE) >= {_layer(m) for m in _graph() if m != "mlx_diffgemma"}
    assert not wrong, "imports against the layers: " + ", ".join(sorted(wrong))


def test_serve_never_imports_the_cli():
    graph = _graph()
    seen, todo = set(), [m for m in graph if m.startswith("mlx_diffgemma.serve")]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += graph.get(m, ())
    assert not seen & CLI_MODULES, f"the server reaches {sorted(seen & CLI_MODULES)}"


def test_files_are_short():
    long = [f"{name} ({n} lines)" for name, path in _modules()
            if (n := len(path.read_text().splitlines())) > MAX_FILE_LINES]
    assert not long, "files over {} lines: {}".format(MAX_FILE_LINES, ", ".join(long))
