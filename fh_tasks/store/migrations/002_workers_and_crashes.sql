-- fh-tasks job store, schema version 2: a worker crash is charged to the job that caused it; workers register.
--
-- A worker that dies takes its running jobs with it. When their leases expire (see `expire` in queries.sql):
--   a job that ran alone in its process is charged the attempt (it is the likely cause);
--   a job that ran beside others is not: `excused` counts such runs, and each one also adds 1 to `max_attempts`,
--   so `attempts` (the fencing token) keeps growing and `attempts < max_attempts` still decides retries.
-- `lost` counts the runs of a job lost with its worker. A job with lost > 0 is suspect: a worker claims it only
-- with nothing else running in its process, and claims nothing more while it runs.
ALTER TABLE fh_jobs ADD COLUMN excused INTEGER NOT NULL DEFAULT 0;
ALTER TABLE fh_jobs ADD COLUMN lost INTEGER NOT NULL DEFAULT 0;
-- Due suspect jobs; empty but for the aftermath of a crash, so the claim's look at it costs next to nothing.
CREATE INDEX IF NOT EXISTS fh_jobs_suspect ON fh_jobs (run_at, seq)
    WHERE lost > 0 AND state IN ('queued', 'scheduled', 'retrying');
-- The claim reads the due index in order and keeps the jobs of tasks the worker can run: `task` in the index
-- spares a table lookup per job read.
DROP INDEX IF EXISTS fh_jobs_due;
CREATE INDEX IF NOT EXISTS fh_jobs_due ON fh_jobs (queue, run_at, seq, task)
    WHERE state IN ('queued', 'scheduled', 'retrying');
-- Live workers: registered when they start, `last_seen` renewed by their heartbeat, removed when they stop.
-- A row whose last_seen is older than a few `lease` periods belongs to a worker that died.
CREATE TABLE IF NOT EXISTS fh_workers (
    id          TEXT PRIMARY KEY,
    host        TEXT    NOT NULL,
    pid         INTEGER NOT NULL,
    queues      TEXT    NOT NULL,  -- JSON list of queue names
    tasks       TEXT    NOT NULL,  -- JSON list of the task names it can run
    concurrency INTEGER NOT NULL,
    lease       REAL    NOT NULL,
    started_at  REAL    NOT NULL,
    last_seen   REAL    NOT NULL
);
CREATE INDEX IF NOT EXISTS fh_workers_process ON fh_workers (host, pid);
