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
