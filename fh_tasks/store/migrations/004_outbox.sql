-- fh-tasks job store, schema version 4: the outbox of the broker engines (Celery, Dramatiq).
--
-- A broker engine keeps its jobs in the broker and its status store, not here. But the jobs a request deferred
-- must be stored before its response starts, even while the broker is down: they are committed to this table in
-- one transaction, and a relay thread hands them to the broker in order (`fh_tasks/engines/outbox.py`).
-- A row is claimed by a relay (`claimed_until`) so that the relays of several web processes do not send it twice;
-- a claim that outlives a crashed relay runs out. Sent rows keep `sent_at` for a while, then are deleted.
CREATE TABLE IF NOT EXISTS fh_outbox (
    seq           INTEGER PRIMARY KEY,
    id            TEXT    NOT NULL UNIQUE,  -- the job id, also the broker message's id
    engine        TEXT    NOT NULL,         -- the engine (and its namespace) the job goes to
    job           TEXT    NOT NULL,         -- the job as JSON: task, args, queue, max_attempts, timeout, run_at...
    created_at    REAL    NOT NULL,
    claimed_until REAL    NOT NULL DEFAULT 0,
    tries         INTEGER NOT NULL DEFAULT 0,
    error         TEXT,                     -- the last error a relay met sending it
    sent_at       REAL,
    dead          INTEGER NOT NULL DEFAULT 0  -- given up: it could not be sent for a reason other than a broker down
);
CREATE INDEX IF NOT EXISTS fh_outbox_pending ON fh_outbox (engine, seq) WHERE sent_at IS NULL AND dead = 0;
CREATE INDEX IF NOT EXISTS fh_outbox_sent ON fh_outbox (sent_at) WHERE sent_at IS NOT NULL;
