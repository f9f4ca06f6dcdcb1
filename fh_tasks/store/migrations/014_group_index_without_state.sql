-- fh-tasks job store, schema version 14: the members of a group are indexed by their group alone.
--
-- fh_jobs_grp (009) was (grp, state): with `state` in its key, SQLite looks at it on every change of any job's
-- state (the claim, the outcome), to find out whether the row is in it, though jobs outside groups never are. A
-- partial index whose key and condition name only `grp` is left alone by those statements: about a microsecond less
-- per claim and per outcome of each job. What reads it looks up a group's members (a few rows) and their states.
DROP INDEX IF EXISTS fh_jobs_grp;
CREATE INDEX fh_jobs_grp ON fh_jobs (grp) WHERE grp IS NOT NULL;
