-- fh-tasks job store, schema version 1.
--
-- States (a job moves left to right; `running` may go back to `queued`/`retrying`):
--   waiting    -- in an ordered chain, waits for `parent` to succeed
--   scheduled  -- deferred with a delay; due at run_at
--   queued     -- due now (run_at <= now)
--   retrying   -- failed an attempt; due again at run_at
--   running    -- claimed by `worker` until `lease_until`; `attempts` counts claims (the fencing token)
--   succeeded | failed | cancelled   -- final
CREATE TABLE IF NOT EXISTS fh_jobs (
    seq          INTEGER PRIMARY KEY,
    id           TEXT    NOT NULL UNIQUE,
    task         TEXT    NOT NULL,
    queue        TEXT    NOT NULL DEFAULT 'default',
    args         TEXT    NOT NULL,
    state        TEXT    NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL DEFAULT 1,
    timeout      REAL,
    run_at       REAL    NOT NULL,
    created_at   REAL    NOT NULL,
    started_at   REAL,
    finished_at  REAL,
    lease_until  REAL,
    worker       TEXT,
    parent       TEXT,
    result       TEXT,
    error        TEXT,
    progress     TEXT
);
-- The claim reads this index in due order, one queue at a time.
CREATE INDEX IF NOT EXISTS fh_jobs_due ON fh_jobs (queue, run_at, seq)
    WHERE state IN ('queued', 'scheduled', 'retrying');
-- The lease sweep and worker heartbeats read running jobs only.
CREATE INDEX IF NOT EXISTS fh_jobs_running ON fh_jobs (lease_until) WHERE state = 'running';
CREATE INDEX IF NOT EXISTS fh_jobs_waiting ON fh_jobs (parent) WHERE state = 'waiting';
-- Listing and pruning finished jobs.
CREATE INDEX IF NOT EXISTS fh_jobs_state ON fh_jobs (state, finished_at);
CREATE TABLE IF NOT EXISTS fh_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT OR IGNORE INTO fh_meta (key, value) VALUES ('schema_version', '1');
