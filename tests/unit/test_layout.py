"""The module layout: plain data without Starlette, no import cycles, one direction of dependency."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "fh_tasks"
MODULES = sorted("fh_tasks." + ".".join(p.relative_to(PKG).with_suffix("").parts).removesuffix(".__init__")
                 for p in PKG.rglob("*.py") if p.name != "__main__.py")
# Broker engines need their extras; they are checked by their own tests.
OPTIONAL = {"fh_tasks.engines.celery", "fh_tasks.engines.dramatiq", "fh_tasks.engines.status",
            "fh_tasks.engines.broker", "fh_tasks.engines.outbox", "fh_tasks.engines.threads"}


def _imported(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sys.modules))"],
                         capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_records_events_engine_and_hooks_import_without_starlette():
    # When the plain parts are imported in a fresh interpreter
    mods = _imported("import fh_tasks.records, fh_tasks.events, fh_tasks.engine, fh_tasks.hooks, fh_tasks.store.sqlite")
    # Then neither Starlette nor FastHTML was loaded
    assert not {m for m in mods if m.split(".")[0] in ("starlette", "fasthtml")}


@pytest.mark.parametrize("module", [m for m in MODULES if m not in OPTIONAL])
def test_every_module_imports_first_without_a_cycle(module):
    # A module that only works when another was imported before it hides an import cycle
    _imported(f"import {module}")


def _runtime_imports(path: Path) -> set[str]:
    "The fh_tasks modules `path` imports at run time (not under TYPE_CHECKING)."
    tree, found = ast.parse(path.read_text()), set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test): continue
        for n in ast.walk(node):
            if isinstance(n, ast.ImportFrom) and n.level:
                base = path.relative_to(PKG).parent.parts[: len(path.relative_to(PKG).parent.parts) - (n.level - 1)]
                mods = [n.module] if n.module else [a.name for a in n.names]  # `from . import web`
                found |= {".".join([*base, *m.split(".")]) for m in mods}
    return found


def test_only_the_hub_knows_the_engines_and_the_web_binding_and_nothing_imports_the_hub():
    imports = {p: _runtime_imports(p) for p in PKG.rglob("*.py")}
    for path, names in imports.items():
        rel = path.relative_to(PKG).as_posix()
        if rel in ("hub.py", "__init__.py") or rel.startswith("cli/"): continue
        # Then no module but the hub (and the CLI, its user) imports the hub at run time
        assert "hub" not in names, f"{rel} imports the hub"
        # And the web binding is the hub's alone
        assert "web" not in names, f"{rel} imports the web binding"
    # And the worker does not know the hub, the web or the engines above it
    for path in (PKG / "worker").glob("*.py"):
        assert not {"hub", "web", "engines", "engines.sqlite"} & imports[path], path.name
