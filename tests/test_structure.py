"""The package's shape, checked statically: sub-packages by role, short modules, no import
cycle (function-level imports included), nothing done at import time, and the Accessory file
names in one module."""

import ast
import re
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mixtral_convert"
ROLES = {"model", "encodings", "formats", "tokenizer", "io", "commands", "forward"}


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for p in sorted(PACKAGE.rglob("*.py")):
        parts = list(p.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = p
    return out


def imports(name: str, path: Path, known: dict) -> set[str]:
    """The package modules `name` imports anywhere in its body (top level or inside functions)."""
    pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            bases = [a.name for a in node.names]
            subs = [None]
        elif isinstance(node, ast.ImportFrom):
            base = pkg[:len(pkg) - node.level + 1] if node.level else []
            bases = [".".join(base + (node.module.split(".") if node.module else []))]
            subs = [a.name for a in node.names]
        else:
            continue
        for b in bases:
            for s in subs:
                target = f"{b}.{s}" if s and f"{b}.{s}" in known else b
                if target in known and target != name:
                    found.add(target)
    return found


def test_sub_packages_by_role_and_few_top_level_modules():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 8, top
    assert ROLES <= {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}


def test_no_module_longer_than_400_lines():
    long = {n: len(p.read_text().splitlines()) for n, p in modules().items() if len(p.read_text().splitlines()) > 400}
    assert long == {}


def test_formats_holds_at_most_ten_modules_directly():
    """One module per format; GGUF's and the adapters' several modules each in a sub-package."""
    direct = sorted(p.name for p in (PACKAGE / "formats").glob("*.py"))
    assert len(direct) <= 10, direct
    assert {"gguf", "adapters"} <= {p.name for p in (PACKAGE / "formats").iterdir() if (p / "__init__.py").is_file()}


def test_no_import_cycle():
    known = modules()
    graph = {n: imports(n, p, known) for n, p in known.items()}
    assert "mixtral_convert.formats.registry" in graph["mixtral_convert.commands.options"]  # the graph sees imports
    assert "mixtral_convert.forward.parity" in graph["mixtral_convert.commands.verdict"]  # ... function-level ones too
    state: dict[str, int] = {}

    def visit(n, stack):
        state[n] = 1
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
            if m not in state:
                visit(m, stack + [m])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])


def test_module_bodies_only_define():
    """Nothing runs at import: a module's top level holds imports, definitions, constants and a
    `__main__` guard, never a bare call (the malloc setting moved to the CLI's entry)."""
    for name, path in modules().items():
        if name.endswith("__main__"):  # `python -m mixtral_convert`: running is its purpose
            continue
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Expr) and not isinstance(node.value, ast.Constant):
                raise AssertionError(f"{name}:{node.lineno}: runs {ast.unparse(node)} at import")


def test_importing_everything_starts_no_thread():
    code = ("import importlib, pkgutil, threading, mixtral_convert\n"
            "for m in pkgutil.walk_packages(mixtral_convert.__path__, 'mixtral_convert.'):\n"
            "    if not m.name.endswith('__main__') and not m.name.endswith('.distributed'):\n"
            "        importlib.import_module(m.name)\n"
            "import mixtral_convert.forward.distributed\n"
            "print(threading.active_count())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["1"]


def test_accessory_file_names_live_in_one_module():
    """Accessory's shard file names and meta.json, as names code uses (not prose in messages),
    are spelled in formats/accessory.py only (the manifest's list of checkpoint-like names, which
    spans every format, aside)."""
    spelled = {}
    for name, path in modules().items():
        tree = ast.parse(path.read_text())
        docs = {id(n.body[0].value) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and n.body
                and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs \
                    and not any(c.isspace() for c in node.value):  # a name or pattern, not prose in a message
                v = node.value
                if "meta.json" in v or ".model.pth" in v or ("-of-" in v and ".model" in v):
                    spelled.setdefault(name, []).append(node.value)
    assert set(spelled) <= {"mixtral_convert.formats.accessory", "mixtral_convert.io.manifest"}, spelled
    assert "mixtral_convert.formats.accessory" in spelled


def test_comments_cite_the_projects_own_docs():
    """The package and its tests point at docs/ in the repository, never at a file outside it,
    and every docs/ file they name exists."""
    docs = PACKAGE.parent / "docs"
    for path in list(PACKAGE.rglob("*.py")) + list((PACKAGE.parent / "tests").rglob("*.py")):
        text = path.read_text()
        assert "FORMATS.md" not in text or path.name == "test_structure.py", path
        for name in set(re.findall(r"docs/([\w.-]+\.md)", text)):
            assert (docs / name).is_file(), f"{path.name} cites docs/{name}, which does not exist"


def test_no_module_reaches_into_another_modules_private_names():
    """`mod._name` of a package module imported as `mod`, or `from mod import _name`: a private name is
    its module's own (a name another module needs is public)."""
    known = modules()
    found = []
    for name, path in known.items():
        tree = ast.parse(path.read_text())
        mods = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("mixtral_convert")):
                for a in node.names:
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        found.append(f"{name}: from {node.module} import {a.name}")
                    mods.add(a.asname or a.name)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in mods \
                    and node.attr.startswith("_") and not node.attr.startswith("__"):
                found.append(f"{name}:{node.lineno}: {node.value.id}.{node.attr}")
    assert found == []
