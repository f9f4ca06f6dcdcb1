"""`python -m fh_tasks ...` runs the `fh-tasks` command."""
from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
