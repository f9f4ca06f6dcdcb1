-- Named queries, loaded by name into a dict. Times are Unix seconds (REAL).

-- name: insert
INSERT INTO fh_jobs (id, task, queue, args, state, max_attempts, timeout, run_at, created_at, parent)
VALUES (:id, :task, :queue, :args, :state, :max_attempts, :timeout, :run_at, :created_at, :parent);

-- name: insert_claimed
-- A new job handed straight to an in-process worker with a free slot: stored as claimed (attempt 1).
INSERT INTO fh_jobs (id, task, queue, args, state, attempts, max_attempts, timeout, run_at, created_at,
                     worker, lease_until, started_at)
VALUES (?, ?, ?, ?, 'running', 1, ?, ?, ?, ?, ?, ?, ?);

-- name: claim
-- One statement claims a batch: the due jobs of the queues, oldest first. attempts+1 is the new fencing token.
-- {due} is the union of one `due` query per queue, so each reads the fh_jobs_due index in order (O(batch)).
UPDATE fh_jobs SET state = 'running', attempts = attempts + 1, worker = :worker,
       lease_until = :lease_until, started_at = :now
 WHERE seq IN (SELECT seq FROM ({due}) ORDER BY run_at, seq LIMIT :limit)
RETURNING id, task, queue, args, attempts, max_attempts, timeout, created_at, run_at, seq;

-- name: due
SELECT * FROM (SELECT seq, run_at FROM fh_jobs
                WHERE queue = :q{i} AND state IN ('queued', 'scheduled', 'retrying') AND run_at <= :now
                ORDER BY run_at, seq LIMIT :limit)

-- name: succeed
UPDATE fh_jobs SET state = 'succeeded', result = :result, error = NULL, finished_at = :now, lease_until = NULL
 WHERE id = :id AND state = 'running' AND attempts = :attempt;

-- name: fail
UPDATE fh_jobs SET state = 'failed', error = :error, finished_at = :now, lease_until = NULL
 WHERE id = :id AND state = 'running' AND attempts = :attempt;

-- name: retry
UPDATE fh_jobs SET state = 'retrying', error = :error, run_at = :run_at, lease_until = NULL
 WHERE id = :id AND state = 'running' AND attempts = :attempt;

-- name: release
-- Graceful shutdown: give an unfinished job back without charging the attempt.
UPDATE fh_jobs SET state = 'queued', attempts = attempts - 1, lease_until = NULL, worker = NULL
 WHERE id = :id AND state = 'running' AND attempts = :attempt;

-- name: release_children_of
-- The next jobs of the chains whose previous job (one of :ids) has just succeeded.
UPDATE fh_jobs SET state = 'queued', run_at = :now
 WHERE state = 'waiting' AND parent IN (SELECT j.id FROM json_each(:ids) AS i JOIN fh_jobs AS j ON j.id = i.value
                                         WHERE j.state = 'succeeded');

-- name: cancel_children
UPDATE fh_jobs SET state = 'cancelled', finished_at = :now, error = :error
 WHERE parent = :id AND state = 'waiting' RETURNING id;

-- name: heartbeat
UPDATE fh_jobs SET lease_until = :lease_until WHERE state = 'running' AND worker = :worker;

-- name: expire
-- Jobs whose worker stopped renewing the lease: back to the queue, or failed once out of attempts.
-- A lost worker is not the task's fault: such a job gets at least :crash_attempts attempts in all.
UPDATE fh_jobs SET
       state = CASE WHEN attempts >= max(max_attempts, :crash_attempts) THEN 'failed' ELSE 'queued' END,
       finished_at = CASE WHEN attempts >= max(max_attempts, :crash_attempts) THEN :now END,
       error = :error, lease_until = NULL, worker = NULL
 WHERE state = 'running' AND lease_until < :now
RETURNING id, state;

-- name: cancel
UPDATE fh_jobs SET state = 'cancelled', finished_at = :now
 WHERE id = :id AND state IN ('queued', 'scheduled', 'retrying', 'waiting');

-- name: requeue
-- Run a finished (failed or cancelled) job again, with a fresh set of attempts.
UPDATE fh_jobs SET state = 'queued', run_at = :now, attempts = 0, finished_at = NULL, error = NULL, result = NULL
 WHERE id = :id AND state IN ('failed', 'cancelled');

-- name: progress
UPDATE fh_jobs SET progress = :progress WHERE id = :id AND state = 'running' AND attempts = :attempt;

-- name: get
SELECT * FROM fh_jobs WHERE id = :id;

-- name: counts
SELECT state, count(*) AS n FROM fh_jobs GROUP BY state;

-- name: prune
DELETE FROM fh_jobs WHERE seq IN (
    SELECT seq FROM fh_jobs WHERE state IN ('succeeded', 'failed', 'cancelled') AND finished_at < :before LIMIT :limit);

-- name: finished_since
SELECT count(*) FROM fh_jobs WHERE state IN ('succeeded', 'failed') AND finished_at >= :since;

-- name: next_due
-- {due} is the union of one `next_due_one` query per queue.
SELECT min(run_at) FROM ({due});

-- name: next_due_one
SELECT min(run_at) AS run_at FROM fh_jobs WHERE queue = :q{i} AND state IN ('queued', 'scheduled', 'retrying')

-- name: parent_state
SELECT state FROM fh_jobs WHERE id = :id;

-- name: unwait
UPDATE fh_jobs SET state = 'queued', run_at = :now WHERE id = :id AND state = 'waiting';
