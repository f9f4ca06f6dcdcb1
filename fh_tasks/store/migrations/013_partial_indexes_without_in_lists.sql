-- fh-tasks job store, schema version 13: the partial indexes name their states with OR, not IN.
--
-- SQLite evaluates `state IN ('a', 'b', 'c')` (three values or more) by building a temporary b-tree of the values,
-- once per run of a statement. An index's WHERE is evaluated on every insert and, for the old and the new row, on
-- every update of a column it names: with IN, each `defer()` and each recorded outcome built such a table for
-- fh_jobs_due, about a fifth of the instructions of an insert. `state = 'a' OR state = 'b' OR state = 'c'` is a few
-- comparisons. The planner uses a partial index only for a query whose WHERE repeats the index's condition, so the
-- queries (queries.sql) now spell these conditions the same way, word for word.
DROP INDEX IF EXISTS fh_jobs_due;
CREATE INDEX fh_jobs_due ON fh_jobs (queue, run_at - priority * 60.0, seq, task)
    WHERE (state = 'queued' OR state = 'scheduled' OR state = 'retrying') AND limit_key IS NULL;
DROP INDEX IF EXISTS fh_jobs_suspect;
CREATE INDEX fh_jobs_suspect ON fh_jobs (run_at, seq)
    WHERE lost > 0 AND (state = 'queued' OR state = 'scheduled' OR state = 'retrying');
DROP INDEX IF EXISTS fh_jobs_ukey;
CREATE UNIQUE INDEX fh_jobs_ukey ON fh_jobs (ukey)
    WHERE ukey IS NOT NULL
      AND (state = 'waiting' OR state = 'scheduled' OR state = 'queued' OR state = 'retrying' OR state = 'running');
DROP INDEX IF EXISTS fh_jobs_lowered;
CREATE INDEX fh_jobs_lowered ON fh_jobs (priority)
    WHERE priority < 0 AND (state = 'queued' OR state = 'scheduled' OR state = 'retrying');
DROP INDEX IF EXISTS fh_jobs_limited;
CREATE INDEX fh_jobs_limited ON fh_jobs (run_at, seq, limit_key, queue, task)
    WHERE limit_key IS NOT NULL AND (state = 'queued' OR state = 'scheduled' OR state = 'retrying');
DROP INDEX IF EXISTS fh_jobs_limit_waiting;
CREATE INDEX fh_jobs_limit_waiting ON fh_jobs (limit_key, run_at)
    WHERE limit_key IS NOT NULL AND (state = 'queued' OR state = 'scheduled' OR state = 'retrying');
