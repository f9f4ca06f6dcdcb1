-- fh-tasks job store, schema version 7: scheduling and flow control (docs/flow.md).
--
--   priority   -- higher runs first within a queue (see the due index below for the rule against starvation)
--   ukey       -- uniqueness key: at most one job with a given key is waiting, scheduled, queued, retrying or running
--   limit_key  -- the key a task's concurrency and rate limits count against (the task's name, or a per-call key);
--                 NULL for a job of a task without limits
--   takes      -- what the job receives at run time before its own arguments: 'parent' (the result of the previous
--                 job of its chain) or 'group' (the list of results of the jobs of its group); NULL: nothing
--   grp        -- for a member of a group: the id of the group's callback job, released once every member succeeded
ALTER TABLE fh_jobs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
ALTER TABLE fh_jobs ADD COLUMN ukey TEXT;
ALTER TABLE fh_jobs ADD COLUMN limit_key TEXT;
ALTER TABLE fh_jobs ADD COLUMN takes TEXT;
ALTER TABLE fh_jobs ADD COLUMN grp TEXT;
-- Uniqueness: one live job per key; the insert of a duplicate conflicts here (`insert ... ON CONFLICT DO NOTHING`).
CREATE UNIQUE INDEX IF NOT EXISTS fh_jobs_ukey ON fh_jobs (ukey)
    WHERE ukey IS NOT NULL AND state IN ('waiting', 'scheduled', 'queued', 'retrying', 'running');
-- Priorities (docs/flow.md): the claim takes the due jobs of a queue in the order of run_at - priority * 60.0, then
-- seq: a job of priority p runs as if it had become due p minutes earlier, so higher priorities go first and a job
-- waiting long enough overtakes any newer one (no starvation). The due index is on that expression, which the `due`
-- query repeats word for word, so the claim reads it in order and stays O(batch).
DROP INDEX IF EXISTS fh_jobs_due;
-- Jobs of limited tasks (limit_key, fh_tasks/limits.py) are claimed through indexes of their own (migration 008):
-- left out here, a backlog of them costs the plain claim nothing.
CREATE INDEX IF NOT EXISTS fh_jobs_due ON fh_jobs (queue, run_at - priority * 60.0, seq, task)
    WHERE state IN ('queued', 'scheduled', 'retrying') AND limit_key IS NULL;
-- Live jobs of negative priority (few, or none): their lowest priority bounds how far past `now` the claim reads
-- the due index (a due job of priority p sorts at or before now - p * 60).
CREATE INDEX IF NOT EXISTS fh_jobs_lowered ON fh_jobs (priority)
    WHERE priority < 0 AND state IN ('queued', 'scheduled', 'retrying');
-- When the next delayed job or retry falls due (`next_due`): the due index is not in run_at order any more.
CREATE INDEX IF NOT EXISTS fh_jobs_later ON fh_jobs (queue, run_at)
    WHERE state IN ('scheduled', 'retrying') AND limit_key IS NULL;
