"""The engine contract suite: every engine must pass every test here. `engine` is parametrized by engine name;
Celery and Dramatiq join the params when their engines exist (see engines_support.ENGINES)."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from engines_support import ENGINES, Engine, Unavailable
from support import CI


@pytest.fixture(params=["sqlite", "celery-redis", "celery-rabbitmq", "dramatiq-redis", "dramatiq-rabbitmq"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    "The engine under test, on a store of this test's own; its hubs and worker processes end with the test."
    try: e = ENGINES[request.param](tmp_path)
    except Unavailable as why:
        if CI: raise
        pytest.skip(str(why))
    try: yield e
    finally: e.close()
