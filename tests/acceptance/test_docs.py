"""The documentation site: it builds offline with warnings as errors, documents every public name with an example
that runs, agrees with the package's version, and its styling page names the classes `JobStatus` renders."""
from __future__ import annotations

import dataclasses
import inspect
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import ROOT

import fh_tasks
from fh_tasks.testing import drain

DOCS = ROOT / "docs"
MKDOCS = str(Path(sys.executable).with_name("mkdocs"))
#: Proxies that lead nowhere: a build that tried to fetch anything (a CDN, a remote inventory) would fail.
OFFLINE = {"HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9",
           "https_proxy": "http://127.0.0.1:9", "NO_PROXY": "", "no_proxy": ""}


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    "The site, built as `make docs` builds it (strict), offline, into a temporary folder."
    out = tmp_path_factory.mktemp("site")
    r = subprocess.run([MKDOCS, "build", "--strict", "--site-dir", str(out)], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env={**os.environ, **OFFLINE})
    assert r.returncode == 0, r.stderr
    assert "WARNING" not in r.stderr, r.stderr
    return out


def test_the_site_builds_with_every_page_and_loads_nothing_remote(site: Path) -> None:
    pages = {p.name for p in site.glob("*.html")}
    assert {f"{p.stem}.html" for p in DOCS.glob("*.md")} | {"changelog.html"} <= pages
    for page in site.glob("*.html"):
        html = page.read_text()
        remote = re.findall(r'<(?:script|img)[^>]+src="(?:https?:)?//[^"]+"|<link[^>]+href="(?:https?:)?//[^"]+"', html)
        assert remote == [], (page.name, remote)


def test_every_public_name_is_in_the_reference_with_a_docstring_and_an_example(site: Path) -> None:
    api_md = (DOCS / "api.md").read_text()
    html = (site / "api.html").read_text()
    code = "\n".join(python_blocks(api_md))
    for name in fh_tasks.__all__:
        obj = getattr(fh_tasks, name)
        path = f"{obj.__module__}.{obj.__qualname__}"
        assert f"::: {path}\n" in api_md, f"{name}: no `::: {path}` in docs/api.md"
        assert f'id="{path}"' in html, f"{name}: not rendered in the API reference"
        assert (inspect.getdoc(obj) or "").strip(), f"{name} has no docstring"
        assert re.search(rf"\b{name}\b", code), f"{name}: no example in docs/api.md uses it"


def test_the_reference_examples_run_as_one_program(tmp_path: Path) -> None:
    # Given every python block of the API reference, in order, as one program
    (tmp_path / "api_examples.py").write_text("\n".join(python_blocks((DOCS / "api.md").read_text())))
    # When it runs, Then every assertion in it holds
    r = subprocess.run([sys.executable, "api_examples.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr


def test_the_package_the_changelog_and_the_site_agree_on_the_version(site: Path) -> None:
    changelog = (ROOT / "CHANGELOG.md").read_text()
    released = re.findall(r"^## (\d+\.\d+\.\d+\S*)", changelog, re.M)
    assert released and released[0] == fh_tasks.__version__
    assert f"<title>fh-tasks {fh_tasks.__version__}</title>" in (site / "index.html").read_text()
    assert "Changelog" in (site / "changelog.html").read_text()


def rendered_classes(tmp_path: Path) -> tuple[set[str], set[str]]:
    "The `fh-job*` classes and `data-state` values `JobStatus` renders, over jobs in every state."
    from fastcore.xml import to_xml

    from fh_tasks import BackgroundTasks, JobState, JobStatus, Tasks, current_job
    tasks = Tasks(db=str(tmp_path / "styling.db"), workers=0)

    @tasks.task
    def ok() -> int: return 1

    @tasks.task
    def bad() -> None: raise ValueError("no")

    @tasks.task
    def step() -> None: current_job()

    jobs = [ok.defer(), bad.defer(), ok.with_options(delay=3600).defer()]
    chain = BackgroundTasks()
    chain.add_task(step)
    chain.add_task(step)
    cancelled = ok.defer()
    tasks.cancel(cancelled.id)
    queued = [j.id for j in chain.jobs] + [jobs[2].id]
    records = [tasks.get(j) for j in queued]
    drain(tasks)
    records += [tasks.get(j.id) for j in (*jobs[:2], cancelled)]
    base = records[-3]
    now = time.time()
    records += [dataclasses.replace(base, state=JobState.running, started_at=now - 5, finished_at=None,
                                    progress={"done": 1, "total": 4, "message": "one of four"}),
                dataclasses.replace(base, state=JobState.retrying, error={"type": "OSError", "message": "down"}),
                dataclasses.replace(base, state=JobState.queued, started_at=None, finished_at=None)]
    html = "".join(to_xml(JobStatus(r, tasks, cancel=True, result=True)) for r in records if r is not None)
    html += to_xml(JobStatus("no-such-job", tasks))
    classes = {c for attr in re.findall(r'class="([^"]*)"', html) for c in attr.split() if c.startswith("fh-job")}
    return classes, set(re.findall(r'data-state="([^"]*)"', html))


def test_the_styling_page_names_every_class_and_state_jobstatus_renders(tmp_path: Path) -> None:
    # Given the classes and states JobStatus renders for jobs in every state
    classes, states = rendered_classes(tmp_path)
    page = (DOCS / "styling.md").read_text()
    documented = set(re.findall(r"`(fh-job(?:-[a-z]+)?)`", page))
    # Then the page documents each of them (fh-job-{state} through its pattern), and names no class it lacks
    per_state = {f"fh-job-{s}" for s in [s.value for s in fh_tasks.JobState]}
    assert classes - per_state <= documented, classes - per_state - documented
    assert documented <= classes | {"fh-job"}, documented - classes
    assert states <= {s.value for s in fh_tasks.JobState} and {"failed", "succeeded", "running"} <= states
    for s in fh_tasks.JobState: assert f"`{s.value}`" in page, s
