"""Integration fixtures: a FastHTML app bound to a hub on a temporary SQLite file."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from fasthtml.common import fast_app

from fh_tasks import Tasks


@pytest.fixture
def site(make_tasks) -> Callable[..., tuple[Any, Any, Tasks]]:
    "make(**hub_options) -> (app, rt, tasks): a FastHTML app with a hub bound to it."
    def make(**kw: Any) -> tuple[Any, Any, Tasks]:
        app, rt = fast_app(secret_key="fh-tasks-tests")
        kw.setdefault("grace", 2.0)
        return app, rt, make_tasks(app, **kw)
    return make
