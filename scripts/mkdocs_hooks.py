"""MkDocs hooks of the docs site (`mkdocs.yml`): one version and one changelog, taken from the package itself."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent


def version() -> str:
    "The version in fh_tasks/__init__.py (what the wheel is built with), read without importing the package."
    m = re.search(r'^__version__ = "([^"]+)"', (ROOT / "fh_tasks" / "__init__.py").read_text(), re.M)
    if not m: raise ValueError("fh_tasks/__init__.py has no __version__")
    return m.group(1)


def on_config(config: Any) -> Any:
    config.site_name = f"fh-tasks {version()}"
    return config


def on_files(files: Files, config: Any) -> Files:
    "The site's changelog page is CHANGELOG.md, at the top of the repository."
    files.append(File.generated(config, "changelog.md", content=(ROOT / "CHANGELOG.md").read_text()))
    return files
