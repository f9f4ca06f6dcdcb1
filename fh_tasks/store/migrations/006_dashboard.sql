-- fh-tasks job store, schema version 6: what the jobs dashboard reads and steers (fh_tasks/ui/dashboard.py).
--
-- Paused queues: workers claim nothing from a queue listed here (read with the claim, cached for a second).
CREATE TABLE IF NOT EXISTS fh_paused (
    queue TEXT PRIMARY KEY,
    at    REAL NOT NULL
);
-- Attempt history: a job row keeps only its last error, so every attempt that ends in an error (retrying, failed,
-- or lost with its worker) is copied here with its error and traceback, in the transaction recording the outcome
-- (queries `record_attempt`, `record_lost_attempt`). Successful attempts write nothing (the job row has them), and
-- no trigger is added to fh_jobs' updates: the job path pays only for failures.
CREATE TABLE IF NOT EXISTS fh_attempts (
    seq        INTEGER PRIMARY KEY,
    job        TEXT    NOT NULL,
    task       TEXT    NOT NULL,
    attempt    INTEGER NOT NULL,
    state      TEXT    NOT NULL,  -- what the job became: retrying, failed, or queued (its worker was lost)
    worker     TEXT,
    started_at REAL,
    ended_at   REAL    NOT NULL,
    error      TEXT
);
CREATE INDEX IF NOT EXISTS fh_attempts_job ON fh_attempts (job, seq);
CREATE INDEX IF NOT EXISTS fh_attempts_ended ON fh_attempts (ended_at);
-- Runs of jobs that are gone (pruned or deleted), so that the metrics' run counters never go back.
CREATE TABLE IF NOT EXISTS fh_gone (
    task      TEXT PRIMARY KEY,
    succeeded INTEGER NOT NULL DEFAULT 0,
    failed    INTEGER NOT NULL DEFAULT 0  -- failed attempts
);
CREATE TRIGGER IF NOT EXISTS fh_jobs_gone AFTER DELETE ON fh_jobs BEGIN
    INSERT INTO fh_gone (task, succeeded, failed)
    VALUES (old.task, old.state = 'succeeded', (SELECT count(*) FROM fh_attempts WHERE job = old.id))
    ON CONFLICT (task) DO UPDATE SET succeeded = succeeded + excluded.succeeded, failed = failed + excluded.failed;
    DELETE FROM fh_attempts WHERE job = old.id;
END;
-- The job list filtered by task, newest first, one page at a time (keyset on seq). `task` never changes: the index
-- costs an insert per job, nothing on its state changes.
CREATE INDEX IF NOT EXISTS fh_jobs_task ON fh_jobs (task, seq);
