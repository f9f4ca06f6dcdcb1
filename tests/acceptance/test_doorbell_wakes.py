"""A job stored by one process wakes a worker in another at once, without waiting for its poll."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from support import ROOT

from fh_tasks.store.doorbell import Doorbell

APP = '''
import time
from fh_tasks import Tasks
tasks = Tasks(db={db!r}, workers=0, poll_interval=30.0)

@tasks.task
def stamp(sent: float) -> float:
    return time.time() - sent
'''


def test_a_worker_in_another_process_is_rung_not_polled(tmp_path: Path) -> None:
    # Given a standalone worker process that would poll only every 30 s
    db = str(tmp_path / "jobs.db")
    (tmp_path / "bellapp.py").write_text(APP.format(db=db))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    worker = subprocess.Popen([sys.executable, "-m", "fh_tasks", "worker", "bellapp:tasks"], cwd=tmp_path, env=env)
    try:
        sys.path.insert(0, str(tmp_path))
        import bellapp
        deadline = time.monotonic() + 15
        folder = Doorbell(db).folder
        while not (folder.exists() and any(folder.iterdir())) and time.monotonic() < deadline: time.sleep(0.05)
        assert folder.exists() and any(folder.iterdir()), "the worker never listened"
        time.sleep(1.1)  # past the ringer's folder refresh
        # When this process stores jobs
        jobs = [bellapp.stamp.defer(time.time()) for _ in range(5)]
        # Then every one of them has run long before the worker's next poll
        records = [j.wait(timeout=10) for j in jobs]
        assert all(r.state == "succeeded" for r in records)
        assert max(r.result for r in records) < 5.0
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("bellapp", None)
        worker.terminate()
        worker.wait(20)
