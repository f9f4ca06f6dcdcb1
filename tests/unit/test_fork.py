"""A store opened before a fork is never used by the child: the child opens its own connection (and its own bell)."""
from __future__ import annotations

import json
import os

from fh_tasks.pid import pid


def _in_child(fn) -> dict:
    "Run `fn` in a forked child; return what it wrote as JSON."
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child
        try: os.write(w, json.dumps(fn()).encode())
        finally: os._exit(0)
    os.close(w)
    with os.fdopen(r) as f: out = f.read()
    os.waitpid(child, 0)
    return json.loads(out)


def test_a_forked_child_knows_its_own_pid():
    # Given this process's id, as the store and the broker engines read it (cached)
    assert pid() == os.getpid()
    # When the process forks
    seen = _in_child(lambda: {"cached": pid(), "real": os.getpid()})
    # Then the child reads its own id, not its parent's
    assert seen["cached"] == seen["real"] != os.getpid()


def test_a_store_used_before_a_fork_gets_a_new_connection_in_the_child(make_tasks):
    # Given a hub whose store connection is open in this process
    tasks = make_tasks(workers=0)

    @tasks.task(name="forked")
    def forked(n: int) -> None: ...

    forked.defer(1)
    parent_conn = tasks.store._conn
    # When a forked child defers a job
    seen = _in_child(lambda: {"job": forked.defer(2).id, "same": tasks.store._conn is parent_conn})
    # Then the child stored it through a connection of its own, and the parent's still works
    assert seen["same"] is False
    assert tasks.get(seen["job"]) is not None
    forked.defer(3)
    assert tasks.counts() == {"queued": 3}
