-- Job events: every change of a job's state, attempt or progress is appended to fh_events by a trigger,
-- so that it is announced whoever made it (a worker, a web process, the CLI, another version).
-- Subscribers in any process read the rows after the last seq they saw (see store/feed.py).
-- The triggers only write while a subscriber is registered in fh_listeners: without one, the job
-- path pays one tiny indexed lookup instead of an insert.
CREATE TABLE IF NOT EXISTS fh_listeners (
    id    TEXT PRIMARY KEY,
    until REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS fh_events (
    seq      INTEGER PRIMARY KEY,
    job      TEXT    NOT NULL,
    task     TEXT    NOT NULL,
    kind     TEXT    NOT NULL,
    state    TEXT    NOT NULL,
    attempt  INTEGER NOT NULL,
    progress TEXT,
    at       REAL    NOT NULL
);
-- A job stored already claimed (handed to an in-process worker with the request's commit) announces both.
CREATE TRIGGER IF NOT EXISTS fh_jobs_stored AFTER INSERT ON fh_jobs
WHEN EXISTS (SELECT 1 FROM fh_listeners) BEGIN
    INSERT INTO fh_events (job, task, kind, state, attempt, progress, at)
    SELECT new.id, new.task, k.kind, CASE WHEN k.n = 0 AND new.state = 'running' THEN 'queued' ELSE new.state END,
           CASE WHEN k.n = 0 THEN 0 ELSE new.attempts END, NULL, (julianday('now') - 2440587.5) * 86400.0
      FROM (SELECT 0 AS n, 'stored' AS kind UNION ALL SELECT 1, 'started' WHERE new.state = 'running') AS k
     ORDER BY k.n;
END;
CREATE TRIGGER IF NOT EXISTS fh_jobs_changed AFTER UPDATE OF state, progress, attempts ON fh_jobs
WHEN EXISTS (SELECT 1 FROM fh_listeners)
 AND (new.state IS NOT old.state OR new.progress IS NOT old.progress OR new.attempts IS NOT old.attempts) BEGIN
    INSERT INTO fh_events (job, task, kind, state, attempt, progress, at)
    VALUES (new.id, new.task,
            CASE WHEN new.state IS old.state AND new.attempts IS old.attempts THEN 'progress'
                 WHEN new.state = 'running' THEN 'started'
                 WHEN new.state IN ('queued', 'scheduled', 'waiting') THEN 'queued'
                 ELSE new.state END,
            new.state, new.attempts, new.progress, (julianday('now') - 2440587.5) * 86400.0);
END;
