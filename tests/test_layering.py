"""The layering README describes: ops <- memory <- hf <- cli, every arrow one way, no circles."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "ctxmem"
ORDER = {"ops": 0, "memory": 1, "hf": 2}  # a package may import only packages of lower or equal rank


def test_memory_imports_no_transformers():
    code = ("import sys, ctxmem.memory, ctxmem.ops\n"
            "bad = sorted(m for m in sys.modules if m == 'transformers' or m.startswith('transformers.'))\n"
            "assert not bad, bad[:5]\nprint('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def _imports(path: Path) -> set[str]:
    """ctxmem subpackages a module imports (relative or absolute, top level or inside functions)."""
    found = set()
    rel = path.relative_to(PKG).parts
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # resolve ``from ..x import y`` against the module's own package
                base = list(rel[:-1])[: len(rel) - 1 - (node.level - 1)]
                target = base + (node.module.split(".") if node.module else [])
                if not node.module:  # ``from .. import x``: the names are the modules
                    target = base + [node.names[0].name]
            elif node.module and node.module.startswith("ctxmem."):
                target = node.module.split(".")[1:]
            else:
                continue
            if target:
                found.add(target[0])
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("ctxmem."):
                    found.add(a.name.split(".")[1])
    return found


def test_imports_run_one_way():
    wrong = []
    for pkg, rank in ORDER.items():
        for f in sorted((PKG / pkg).rglob("*.py")):
            for dep in _imports(f):
                if dep in ORDER and ORDER[dep] > rank:
                    wrong.append(f"{f.relative_to(PKG)} imports ctxmem.{dep}")
    assert not wrong, wrong
