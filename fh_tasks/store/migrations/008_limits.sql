-- fh-tasks job store, schema version 8: concurrency and rate limits (fh_tasks/limits.py, docs/flow.md).
--
-- A job of a task with limits carries the key it counts against in `limit_key` (007). The claim takes such jobs in
-- a step of its own, in the same BEGIN IMMEDIATE transaction as every other claim, so the limits hold across
-- processes: it counts the running jobs of each key (fh_jobs_limit_running) and, for rates, keeps in fh_limits
-- the earliest time the next job of a key may start (GCRA's theoretical arrival time, without burst).
CREATE TABLE IF NOT EXISTS fh_limits (
    key TEXT PRIMARY KEY,
    tat REAL NOT NULL   -- no job of this key starts before this time (Unix seconds); a past time holds nothing
) WITHOUT ROWID;
-- Waiting jobs of limited tasks, in due order, covering what the limited claim filters on. Jobs without limits are
-- not in it, so it costs them nothing.
CREATE INDEX IF NOT EXISTS fh_jobs_limited ON fh_jobs (run_at, seq, limit_key, queue, task)
    WHERE limit_key IS NOT NULL AND state IN ('queued', 'scheduled', 'retrying');
-- Waiting jobs per key: does a key whose rate window is closed have a job waiting for it to open (`limit_opens`)?
CREATE INDEX IF NOT EXISTS fh_jobs_limit_waiting ON fh_jobs (limit_key, run_at)
    WHERE limit_key IS NOT NULL AND state IN ('queued', 'scheduled', 'retrying');
-- Running jobs per key: the concurrency count.
CREATE INDEX IF NOT EXISTS fh_jobs_limit_running ON fh_jobs (limit_key, task)
    WHERE limit_key IS NOT NULL AND state = 'running';
-- Keys whose window is still closed (tat > now): read by every claim that runs limited jobs.
CREATE INDEX IF NOT EXISTS fh_limits_tat ON fh_limits (tat);
