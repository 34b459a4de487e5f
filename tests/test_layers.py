"""The package reads as its pipeline: every import points down (data -> encoder -> evaluate -> adapters ->
mllm_eval -> demo -> cli), no module imports itself back through others, and `import mgll.cli` stays light.

Imports inside functions count too: a circle of lazy imports is still a circle a reader has to untangle.
Compatibility shims (a module whose docstring starts "Moved to") re-export a moved module for one release and
are exempt.
"""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "mgll"
# lowest first; a module may import its own layer and the ones below
LAYERS = [
    ("base", ["mgll.io", "mgll.optim", "mgll.verdict", "mgll.model_card", "mgll"]),
    ("data", ["mgll.data"]),
    ("encoder", ["mgll.encoder"]),
    ("evaluate", ["mgll.evaluate"]),
    ("adapters", ["mgll.adapters", "mgll.testing"]),
    ("mllm_eval", ["mgll.mllm_eval"]),
    ("demo", ["mgll.demo"]),
    ("top", ["mgll.cli", "mgll.quickstart"]),
]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer(name: str) -> int:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (name == p or name.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    assert rank is not None, name
    return rank


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PKG.rglob("*.py") if "remote" not in p.parts}


def is_shim(path: Path) -> bool:
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    return doc.startswith("Moved to")


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every mgll module ``name`` imports, anywhere in its body (``from a import b`` counts ``a.b`` when it is a module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base]) if base else ".".join(anchor)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            if t == "mgll" or t.startswith("mgll."):
                while t not in known and "." in t:
                    t = t.rpartition(".")[0]
                if t in known and t != name:
                    out.add(t)
    return out


def test_every_import_points_down_the_pipeline():
    mods = modules()
    known = set(mods)
    bad = []
    for name, path in sorted(mods.items()):
        if is_shim(path):
            continue
        for target in imports_of(name, path, known):
            if layer(target) > layer(name) and not is_shim(mods[target]):
                bad.append(f"{name} ({LAYERS[layer(name)][0]}) imports {target} ({LAYERS[layer(target)][0]})")
    assert not bad, "\n".join(bad)


def test_no_import_circle():
    mods = modules()
    known = set(mods)
    graph = {n: {t for t in imports_of(n, p, known) if not is_shim(mods[t])} for n, p in mods.items() if not is_shim(p)}
    # a package's __init__ that re-exports its submodules is the package itself, not a node of its own
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for t in sorted(graph.get(n, ())):
            if state.get(t) == 1:
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    assert not cycles, "\n".join(cycles)


def test_the_cli_module_imports_no_heavy_library():
    code = ("import sys, mgll.cli; heavy = [m for m in ('torch', 'transformers', 'deepspeed', 'gradio', 'open_clip') "
            "if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
