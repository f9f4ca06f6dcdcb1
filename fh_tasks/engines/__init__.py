"""Engines: what stores and runs a hub's jobs. `sqlite` is embedded and the default; `celery` and `dramatiq` run the
same tasks on those engines' workers and brokers (extras `fh-tasks[celery]`, `fh-tasks[dramatiq]`)."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ..errors import FhTasksError

if TYPE_CHECKING:
    from ..engine import Engine, EngineSettings

__all__ = ["make", "ENGINES"]

#: Engine name -> (module, class, the extra that installs what it needs).
ENGINES = {
    "sqlite": ("fh_tasks.engines.sqlite", "SQLiteEngine", None),
    "celery": ("fh_tasks.engines.celery", "CeleryEngine", "celery"),
    "dramatiq": ("fh_tasks.engines.dramatiq", "DramatiqEngine", "dramatiq"),
}


def make(name: str, settings: EngineSettings) -> Engine:
    "The engine called `name`, made with `settings`; a clear error for an unknown name or a missing extra."
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}; choose one of {', '.join(sorted(ENGINES))} or pass an Engine")
    module, cls, extra = ENGINES[name]
    try: mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if extra is None or (e.name or "").startswith("fh_tasks"): raise
        raise FhTasksError(f"the {name} engine needs {e.name!r}: pip install 'fh-tasks[{extra}]'") from e
    engine: Engine = getattr(mod, cls)(settings)
    return engine
