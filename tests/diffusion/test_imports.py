"""The diffusion package's modules import one way (no cycle), and each imports on its own.

A cycle of module-level ``from .a import name`` statements fails at import time only for
some entry points (the module imported first sees its partner half-initialised), so both
are checked: the static graph of every intra-package import (module level and inside
functions) is acyclic, and every module imports first in a clean package state.
"""
import ast
import os
import subprocess
import sys

import diffusion

PKG = os.path.dirname(os.path.abspath(diffusion.__file__))
MODULES = sorted(f[:-3] for f in os.listdir(PKG) if f.endswith(".py") and f != "__main__.py")


def _imports(name):
    """Modules of the package that ``diffusion/<name>.py`` imports, anywhere in the file."""
    tree = ast.parse(open(os.path.join(PKG, name + ".py"), encoding="utf-8").read())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level == 1:
                targets = [mod] if mod else [a.name for a in node.names]
            elif mod == "diffusion":
                targets = [a.name for a in node.names]
            elif mod.startswith("diffusion."):
                targets = [mod.split(".")[1]]
            else:
                continue
            out.update(t.split(".")[0] for t in targets if t.split(".")[0] in MODULES)
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names
                       if a.name.startswith("diffusion.") and a.name.split(".")[1] in MODULES)
    out.discard(name)
    return out


def test_import_graph_is_acyclic():
    graph = {m: _imports(m) for m in MODULES}
    assert graph["methods"] == set(), "the method registry must import nothing from the package"
    assert "train" not in graph["flow"] and "flow" not in graph["config"]
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                cycle = stack[stack.index(d):] + [d]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in MODULES:
        if m not in state:
            visit(m)


def test_each_module_imports_first():
    """Every module imported first, in a fresh interpreter (the package's modules dropped from
    sys.modules between entries; torch stays loaded), then every other module in reverse order:
    an entry point in the middle of a cycle would raise ImportError here."""
    script = (
        "import importlib, sys\n"
        f"mods = {MODULES!r}\n"
        "for first in mods:\n"
        "    for k in [k for k in sys.modules if k == 'diffusion' or k.startswith('diffusion.')]:\n"
        "        del sys.modules[k]\n"
        "    for m in [first] + [m for m in reversed(mods) if m != first]:\n"
        "        try:\n"
        "            importlib.import_module('diffusion.' + m)\n"
        "        except Exception as e:\n"
        "            raise SystemExit(f'importing diffusion.{m} (after diffusion.{first}) failed: {e!r}')\n"
        "print('ok', len(mods))\n")
    root = os.path.dirname(PKG)
    r = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().endswith(f"ok {len(MODULES)}")
