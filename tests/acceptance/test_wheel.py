"""The package as users get it: a wheel built with `python -m build`, installed in a clean venv, runs the README
example from the installed files, not from this checkout."""
from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import pytest
from support import ROOT, free_port, wait_port
from test_readme import readme_example

import fh_tasks


def run(*cmd: str | Path, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd}:\n{r.stdout}\n{r.stderr}"
    return r.stdout


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_wheel_installs_in_a_clean_venv_and_runs_the_readme_example(tmp_path: Path) -> None:
    # Given a wheel built from the checkout
    run(sys.executable, "-m", "build", "--wheel", "--outdir", tmp_path / "dist", ROOT, cwd=tmp_path)
    [wheel] = (tmp_path / "dist").glob("*.whl")
    assert wheel.name == f"fh_tasks-{fh_tasks.__version__}-py3-none-any.whl"
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"fh_tasks/py.typed", "fh_tasks/store/queries.sql", "fh_tasks/store/migrations/001_initial.sql"} <= names
    assert not [n for n in names if n.endswith((".db", ".pyc"))]
    meta = zipfile.ZipFile(wheel).read(f"fh_tasks-{fh_tasks.__version__}.dist-info/METADATA").decode()
    assert "Classifier: Typing :: Typed" in meta and "Requires-Python: >=3.10" in meta
    # When it is installed in a fresh venv (its dependencies from PyPI), nothing else
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    py = venv / "bin" / "python"
    run(py, "-m", "pip", "install", "-q", "--disable-pip-version-check", wheel, cwd=tmp_path, timeout=540)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "FH_TASKS_DB")}
    app = tmp_path / "app"
    app.mkdir()
    # Then the package imported is the installed one, and its command knows its version
    where = run(py, "-c", "import fh_tasks; print(fh_tasks.__file__)", cwd=app, env=env).strip()
    assert where.startswith(str(venv)) and not where.startswith(str(ROOT)), where
    assert run(venv / "bin" / "fh-tasks", "--version", cwd=app, env=env).strip() == f"fh-tasks {fh_tasks.__version__}"
    # And the README example, saved as app.py, serves its page and runs its job from the installed wheel
    (app / "app.py").write_text(readme_example())
    port = free_port()
    server = subprocess.Popen([py, "-m", "uvicorn", "app:app", "--port", str(port), "--log-level", "warning"], cwd=app,
                              env=env)
    try:
        wait_port(port, timeout=60, proc=server)
        r = httpx.get(f"http://127.0.0.1:{port}/")
        assert r.status_code == 200 and "Signup successful!" in r.text
        deadline, state = time.monotonic() + 15, None
        while state != "succeeded" and time.monotonic() < deadline:
            with sqlite3.connect(app / "fh_tasks.db") as c: state = c.execute("SELECT state FROM fh_jobs").fetchone()[0]
            time.sleep(0.05)
    finally:
        server.terminate()
        server.wait(20)
    assert state == "succeeded"
    # And type checkers see the package as typed
    assert re.search(r"py\.typed", run(py, "-m", "pip", "show", "-f", "fh-tasks", cwd=app, env=env))
