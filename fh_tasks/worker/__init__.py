"""The SQLite engine's worker (`Worker`): `loop.py` claims jobs and records their outcomes in rounds, `runs.py` runs
one claimed job and turns its end into an outcome, `upkeep.py` renews leases, writes progress, checks for cancelled
jobs and checkpoints the WAL."""
from .loop import Worker

__all__ = ["Worker"]
