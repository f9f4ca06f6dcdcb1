-- Named queries, loaded by name into a dict. Times are Unix seconds (REAL).

-- name: insert
-- A job whose uniqueness key (`ukey`) a live job holds is not stored (fh_jobs_ukey): see `SQLiteStore._insert`.
INSERT INTO fh_jobs (id, task, queue, args, state, max_attempts, timeout, run_at, created_at, parent, owner,
                    priority, ukey, limit_key, takes, grp)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (ukey) WHERE ukey IS NOT NULL
    AND (state = 'waiting' OR state = 'scheduled' OR state = 'queued' OR state = 'retrying' OR state = 'running')
DO NOTHING;

-- name: insert_claimed
-- A new job handed straight to an in-process worker with a free slot: stored as claimed (attempt 1).
INSERT INTO fh_jobs (id, task, queue, args, state, attempts, max_attempts, timeout, run_at, created_at,
                     worker, lease_until, started_at, owner, priority, ukey, limit_key, takes, grp)
VALUES (?, ?, ?, ?, 'running', 1, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (ukey) WHERE ukey IS NOT NULL
    AND (state = 'waiting' OR state = 'scheduled' OR state = 'queued' OR state = 'retrying' OR state = 'running')
DO NOTHING;

-- name: live_key
-- The live job holding a uniqueness key (through fh_jobs_ukey).
SELECT id FROM fh_jobs
 WHERE ukey = :key AND ukey IS NOT NULL
   AND (state = 'waiting' OR state = 'scheduled' OR state = 'queued' OR state = 'retrying' OR state = 'running');

-- name: claim
-- One statement claims a batch: the due jobs of the queues in due order (run_at - priority * 60, then seq: see
-- `due`), or (:ordered) the queues' jobs one queue after the other, in the order given. attempts+1 is the new
-- fencing token. {due} is the union of one `due` query per queue, so each reads the fh_jobs_due index in order
-- (O(batch)).
UPDATE fh_jobs SET state = 'running', attempts = attempts + 1, worker = :worker,
       lease_until = :lease_until, started_at = :now
 WHERE seq IN (SELECT seq FROM ({due}) ORDER BY CASE WHEN :ordered THEN k END, rank, seq LIMIT :limit)
RETURNING id, task, queue, args, attempts, max_attempts, timeout, created_at, run_at, seq, lost, priority, takes;

-- name: any_due
-- Is a job of these queues due? Read before a claim that records no outcome, so that an empty claim takes no lock.
SELECT 1 FROM ({due}) LIMIT 1;

-- name: first_due
-- The rank of the job a claim of these queues would take first (the in-process handoff must not jump over it).
SELECT rank FROM ({due}) ORDER BY rank, seq LIMIT 1;

-- name: claim_seq
-- Claim one given job (a suspect one, which runs alone).
UPDATE fh_jobs SET state = 'running', attempts = attempts + 1, worker = :worker,
       lease_until = :lease_until, started_at = :now
 WHERE seq = :seq
RETURNING id, task, queue, args, attempts, max_attempts, timeout, created_at, run_at, seq, lost, priority, takes;

-- name: due
-- The due jobs of queue :q{i} (its position k = {i}) in due order: run_at - priority * 60.0 (the rank: a job of
-- priority p runs as if due p minutes earlier, so it cannot starve), then seq. The expression is fh_jobs_due's,
-- word for word, so the index is read in order; a due job of priority p ranks at most now - p * 60, so the read
-- stops at now minus 60 times the lowest live priority (fh_jobs_lowered; 0 when none is negative).
-- Only jobs of the tasks the worker can run (:tasks, a JSON list of names; NULL: any task): a job nobody here
-- can run stays queued for a worker that can. Jobs with a limit_key are claimed by their own step (limits, below).
SELECT * FROM (SELECT seq, run_at - priority * 60.0 AS rank, {i} AS k, run_at FROM fh_jobs
                WHERE queue = :q{i} AND (state = 'queued' OR state = 'scheduled' OR state = 'retrying')
                  AND run_at - priority * 60.0 <= :now - 60.0 * coalesce(
                      (SELECT priority FROM fh_jobs INDEXED BY fh_jobs_lowered
                        WHERE priority < 0 AND (state = 'queued' OR state = 'scheduled' OR state = 'retrying')
                        ORDER BY priority LIMIT 1), 0)
                  AND run_at <= :now AND limit_key IS NULL
                  AND (:tasks IS NULL OR task IN (SELECT value FROM json_each(:tasks)))
                ORDER BY run_at - priority * 60.0, seq LIMIT :limit)

-- name: suspect
-- The oldest due suspect job (it was running in a worker that died) of these queues and tasks. Suspect jobs come
-- before the others, and each runs alone: the claim takes one only for a worker with nothing else running
-- (:alone), and takes nothing for a busy worker while one waits, so that it drains and takes it.
-- INDEXED BY: left to itself the planner may read every queued job through fh_jobs_state instead.
SELECT seq, run_at FROM fh_jobs INDEXED BY fh_jobs_suspect
 WHERE lost > 0 AND (state = 'queued' OR state = 'scheduled' OR state = 'retrying')
   AND run_at <= :now AND limit_key IS NULL
   AND queue IN (SELECT value FROM json_each(:queues))
   AND (:tasks IS NULL OR task IN (SELECT value FROM json_each(:tasks)))
 ORDER BY run_at, seq LIMIT 1

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

-- name: look
-- Does any job wait (a chain's next step, a group's callback), and is any job suspect (it was running in a worker
-- that died)? One look at two indexes that are nearly always empty, taken once a round: after the round's outcomes
-- are written, and before its claim. A round of successes releases waiting jobs only if one waits (the lookups of
-- :ids in `release_children_of` and `release_groups_of` cost a worker about 10,000 instructions a job); a claim runs
-- `suspect` only if a job is suspect.
SELECT EXISTS (SELECT 1 FROM fh_jobs INDEXED BY fh_jobs_waiting WHERE state = 'waiting'),
       EXISTS (SELECT 1 FROM fh_jobs INDEXED BY fh_jobs_suspect
                WHERE lost > 0 AND (state = 'queued' OR state = 'scheduled' OR state = 'retrying'));

-- name: release_children_of
-- The next jobs of the chains whose previous job (one of :ids) has just succeeded.
-- INDEXED BY, +j.state: the waiting children of each of :ids through fh_jobs_waiting, and :ids through the id index,
-- not every waiting or succeeded job through fh_jobs_state.
UPDATE fh_jobs INDEXED BY fh_jobs_waiting SET state = 'queued', run_at = :now
 WHERE state = 'waiting' AND parent IN (SELECT j.id FROM json_each(:ids) AS i JOIN fh_jobs AS j ON j.id = i.value
                                         WHERE +j.state = 'succeeded');

-- name: release_groups_of
-- The callbacks of the groups (migrations 009, 012) whose member, one of :ids, has just succeeded, once every member
-- of the group succeeded. (+state, +j.state: through the id index, not every waiting or succeeded job.)
UPDATE fh_jobs SET state = 'queued', run_at = :now
 WHERE +state = 'waiting'
   AND id IN (SELECT j.grp FROM json_each(:ids) AS i JOIN fh_jobs AS j ON j.id = i.value
               WHERE j.grp IS NOT NULL AND +j.state = 'succeeded')
   AND NOT EXISTS (SELECT 1 FROM fh_jobs AS m WHERE m.grp = fh_jobs.id AND m.state <> 'succeeded');

-- name: cancel_children
UPDATE fh_jobs SET state = 'cancelled', finished_at = :now, error = :error
 WHERE parent = :id AND state = 'waiting' RETURNING id;

-- name: cancel_group_of
-- The callback of the group whose member :id ended failed or cancelled (groups: migration 009, fh_tasks/flow.py).
UPDATE fh_jobs SET state = 'cancelled', finished_at = :now, error = :error
 WHERE id = (SELECT grp FROM fh_jobs WHERE id = :id) AND state = 'waiting' RETURNING id;

-- name: inputs
-- What claimed jobs that take results (`takes`; :ids, a JSON list of their ids) get before their own arguments, one
-- row per input: for 'parent', the result of the previous job of their chain (src NULL: it is gone); for 'group',
-- the results of the group's members, in member order (their ids grow in member order: fh_tasks.flow sorts them).
-- ok: the result is JSON text (NULL for a NULL result).
SELECT * FROM (
    SELECT j.id AS job, j.takes, p.id AS src, p.state, p.result, json_valid(p.result) AS ok
      FROM json_each(:ids) AS i JOIN fh_jobs AS j ON j.id = i.value LEFT JOIN fh_jobs AS p ON p.id = j.parent
     WHERE j.takes IS NOT 'group'
    UNION ALL
    SELECT j.id, j.takes, m.id, m.state, m.result, json_valid(m.result)
      FROM json_each(:ids) AS i JOIN fh_jobs AS j ON j.id = i.value JOIN fh_jobs AS m ON m.grp = j.id
     WHERE j.takes = 'group')
 ORDER BY job, src;

-- name: heartbeat
UPDATE fh_jobs SET lease_until = :lease_until WHERE state = 'running' AND worker = :worker;

-- name: worker_seen
UPDATE fh_workers SET last_seen = :now WHERE id = :id;

-- name: register_worker
INSERT INTO fh_workers (id, host, pid, queues, tasks, concurrency, lease, started_at, last_seen)
VALUES (:id, :host, :pid, :queues, :tasks, :concurrency, :lease, :now, :now)
ON CONFLICT (id) DO UPDATE SET queues = excluded.queues, tasks = excluded.tasks, concurrency = excluded.concurrency,
                               lease = excluded.lease, last_seen = excluded.last_seen;

-- name: unregister_worker
DELETE FROM fh_workers WHERE id = :id;

-- name: workers
-- Registered workers, live ones (seen within :stale leases) first.
SELECT id, host, pid, queues, tasks, concurrency, lease, started_at, last_seen,
       last_seen >= :now - :stale * lease AS live
  FROM fh_workers ORDER BY live DESC, started_at;

-- name: forget_workers
-- Rows of workers silent for :stale leases that hold no running job any more (their jobs were taken back).
DELETE FROM fh_workers WHERE last_seen < :now - :stale * lease
   AND id NOT IN (SELECT worker FROM fh_jobs WHERE state = 'running' AND worker IS NOT NULL);

-- name: running_workers
SELECT count(DISTINCT worker) FROM fh_jobs WHERE state = 'running';

-- name: waiting_by_task
-- Jobs waiting for a worker (due or not yet), per task and queue.
SELECT task, queue, sum(state IN ('queued', 'retrying')) AS due, sum(state = 'scheduled') AS later
  FROM fh_jobs WHERE (state = 'queued' OR state = 'scheduled' OR state = 'retrying')
 GROUP BY task, queue ORDER BY task, queue;

-- name: expired
-- Is any lease expired? (the cheap look the sweep takes before anything else). A lease that is not a number
-- (NULL, or text written behind the store's back) holds nothing: it counts as expired.
SELECT 1 FROM fh_jobs WHERE state = 'running' AND (typeof(lease_until) NOT IN ('integer', 'real') OR lease_until < :now)
 LIMIT 1;

-- name: running_jobs
-- Every running job, with the process it runs in (host:pid of its registered worker, else the worker's id) and
-- whether its lease is expired.
SELECT j.seq, j.worker, coalesce(w.host || ':' || w.pid, j.worker, 'job:' || j.seq) AS process,
       typeof(j.lease_until) NOT IN ('integer', 'real') OR j.lease_until < :now AS expired
  FROM fh_jobs AS j LEFT JOIN fh_workers AS w ON w.id = j.worker WHERE j.state = 'running';

-- name: expire
-- A job of a dead worker: back to the queue, or failed once out of charged attempts.
-- :alone: it was the only job running in its worker's process, the likely cause of the crash: the attempt is charged.
-- Otherwise the attempt is excused: `excused` and `max_attempts` both grow by one, so `attempts` (the fencing
-- token) still only grows and attempts < max_attempts still decides retries. Charged attempts: attempts - excused.
-- Either way `lost` grows: the job is suspect and runs alone from now on.
-- A lost worker is not the task's fault: such a job gets at least :crash_attempts charged attempts in all.
UPDATE fh_jobs SET
       state = CASE WHEN attempts - excused - (1 - :alone) >= max(max_attempts - excused, :crash_attempts)
                    THEN 'failed' ELSE 'queued' END,
       finished_at = CASE WHEN attempts - excused - (1 - :alone) >= max(max_attempts - excused, :crash_attempts)
                          THEN :now END,
       excused = excused + 1 - :alone, max_attempts = max_attempts + 1 - :alone, lost = lost + 1,
       error = :error, lease_until = NULL, worker = NULL
 WHERE seq = :seq AND state = 'running'
RETURNING id, state, task, attempts - excused;

-- name: cancel
UPDATE fh_jobs SET state = 'cancelled', finished_at = :now
 WHERE id = :id AND state IN ('queued', 'scheduled', 'retrying', 'waiting');

-- name: cancel_running
-- Cancel a running job (`tasks.cancel(id, running=True)`): final at once; its worker's late outcome and progress are
-- refused by their fencing (state running), and the worker stops the attempt when it next checks (`cancelled_attempt`).
UPDATE fh_jobs SET state = 'cancelled', finished_at = :now, error = :error
 WHERE id = :id AND state = 'running';

-- name: cancelled_among
-- Which of a worker's running jobs (a JSON array of ids) were cancelled: one indexed lookup per id, one statement.
-- (+state: through the id index, not every cancelled job through fh_jobs_state.)
SELECT id, attempts FROM fh_jobs WHERE id IN (SELECT value FROM json_each(:ids)) AND +state = 'cancelled';

-- name: requeue
-- Run a finished (failed or cancelled) job again, with a fresh set of attempts. `attempts` is the fencing token and
-- never goes back (a late outcome of an earlier run must stay refused): the runs so far are excused instead, and
-- `max_attempts` moves on by the job's budget. `lost` stays: a job that was lost with its worker still runs alone.
-- Not while another job holding its uniqueness key is live (that one does the work).
UPDATE fh_jobs SET state = 'queued', run_at = :now, excused = attempts, max_attempts = attempts + max_attempts - excused,
       finished_at = NULL, error = NULL, result = NULL
 WHERE id = :id AND state IN ('failed', 'cancelled')
   AND (ukey IS NULL OR NOT EXISTS (SELECT 1 FROM fh_jobs AS o WHERE o.ukey = fh_jobs.ukey
                                     AND (o.state = 'waiting' OR o.state = 'scheduled' OR o.state = 'queued'
                                          OR o.state = 'retrying' OR o.state = 'running')));

-- name: progress
UPDATE fh_jobs SET progress = :progress WHERE id = :id AND state = 'running' AND attempts = :attempt;

-- name: get
SELECT * FROM fh_jobs WHERE id = :id;

-- name: summary
-- What a status page shows, cheap to read whatever a task stored: no arguments or result, the error's type and
-- message only (a malformed error as its text), texts cut at 65,536 characters. NOT json_valid goes first:
-- json_type raises on malformed JSON, and CASE stops at the first true branch.
SELECT id, task, queue, state, attempts, max_attempts, run_at, created_at, started_at, finished_at, worker, parent,
       owner, NULL AS args, NULL AS result, substr(progress, 1, 65536) AS progress,
       CASE WHEN error IS NULL THEN NULL
            WHEN NOT json_valid(error) THEN substr(error, 1, 65536)
            WHEN json_type(error) = 'object'
            THEN json_object('type', substr(json_extract(error, '$.type'), 1, 200),
                             'message', substr(json_extract(error, '$.message'), 1, 65536))
            ELSE substr(error, 1, 65536) END AS error
  FROM fh_jobs WHERE id = :id;

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
-- Of the tasks the worker can run (:tasks, as in `due`): a job nobody here runs must not wake it up in a loop.
-- The first due job (`due`, limit 1: its run_at is at or before now), else the earliest delayed job or retry
-- (fh_jobs_later, in run_at order; a run_at that is not a number is never due).
SELECT min(run_at) AS run_at FROM (
    SELECT run_at FROM ({due_one})
    UNION ALL
    SELECT * FROM (SELECT run_at FROM fh_jobs INDEXED BY fh_jobs_later
                    WHERE queue = :q{i} AND state IN ('scheduled', 'retrying') AND typeof(run_at) IN ('integer', 'real')
                      AND limit_key IS NULL AND (:tasks IS NULL OR task IN (SELECT value FROM json_each(:tasks)))
                    ORDER BY run_at LIMIT 1))

-- name: parent_state
SELECT state FROM fh_jobs WHERE id = :id;

-- name: unwait
UPDATE fh_jobs SET state = 'queued', run_at = :now WHERE id = :id AND state = 'waiting';

-- name: events_stored_trigger
-- The job-event triggers (migrations 003 and 011): created by a listener's registration, dropped by the pruning of
-- events once no listener is left (`SQLiteStore._events_on_demand`). A job stored already claimed (handed to an
-- in-process worker with the request's commit) announces both.
CREATE TRIGGER IF NOT EXISTS fh_jobs_stored AFTER INSERT ON fh_jobs BEGIN
    INSERT INTO fh_events (job, task, kind, state, attempt, progress, at)
    SELECT new.id, new.task, k.kind, CASE WHEN k.n = 0 AND new.state = 'running' THEN 'queued' ELSE new.state END,
           CASE WHEN k.n = 0 THEN 0 ELSE new.attempts END, NULL, (julianday('now') - 2440587.5) * 86400.0
      FROM (SELECT 0 AS n, 'stored' AS kind UNION ALL SELECT 1, 'started' WHERE new.state = 'running') AS k
     ORDER BY k.n;
END;

-- name: events_changed_trigger
CREATE TRIGGER IF NOT EXISTS fh_jobs_changed AFTER UPDATE OF state, progress, attempts ON fh_jobs
WHEN new.state IS NOT old.state OR new.progress IS NOT old.progress OR new.attempts IS NOT old.attempts BEGIN
    INSERT INTO fh_events (job, task, kind, state, attempt, progress, at)
    VALUES (new.id, new.task,
            CASE WHEN new.state IS old.state AND new.attempts IS old.attempts THEN 'progress'
                 WHEN new.state = 'running' THEN 'started'
                 WHEN new.state = 'queued' OR new.state = 'scheduled' OR new.state = 'waiting' THEN 'queued'
                 ELSE new.state END,
            new.state, new.attempts, new.progress, (julianday('now') - 2440587.5) * 86400.0);
END;

-- name: events_triggers
-- How many of the two job-event triggers exist (0 or 2), and whether a listener is registered.
SELECT (SELECT count(*) FROM sqlite_master WHERE type = 'trigger' AND name IN ('fh_jobs_stored', 'fh_jobs_changed')),
       EXISTS (SELECT 1 FROM fh_listeners);

-- name: drop_events_stored_trigger
DROP TRIGGER IF EXISTS fh_jobs_stored;

-- name: drop_events_changed_trigger
DROP TRIGGER IF EXISTS fh_jobs_changed;

-- name: listen_events
-- Register (or renew) an event listener: the fh_events triggers exist while one is registered.
INSERT INTO fh_listeners (id, until) VALUES (:id, :until) ON CONFLICT (id) DO UPDATE SET until = excluded.until;

-- name: last_event
SELECT coalesce(max(seq), 0) FROM fh_events;

-- name: unlisten_events
DELETE FROM fh_listeners WHERE id = :id;

-- name: expire_listeners
-- Listeners whose process died without unregistering.
DELETE FROM fh_listeners WHERE until < :now;

-- name: prune_events
-- Keep the newest :keep events, and none older than :before.
DELETE FROM fh_events WHERE seq <= (SELECT max(seq) FROM fh_events) - :keep OR at < :before;

-- ---- the jobs dashboard (fh_tasks/ui/dashboard.py) and its metrics ----------------------------------------------

-- name: paused
SELECT queue FROM fh_paused ORDER BY queue;

-- name: pause
INSERT INTO fh_paused (queue, at) VALUES (:queue, :now) ON CONFLICT (queue) DO NOTHING;

-- name: resume
DELETE FROM fh_paused WHERE queue = :queue;

-- name: dash_task_totals
-- Jobs per task, through the fh_jobs_task index alone.
SELECT task, count(*) FROM fh_jobs INDEXED BY fh_jobs_task GROUP BY task;

-- name: dash_state_totals
SELECT state, count(*) FROM fh_jobs GROUP BY state;

-- name: dash_state_tasks
-- Jobs per task in one state (the states other than succeeded: few jobs, found through fh_jobs_state).
SELECT task, count(*) FROM fh_jobs INDEXED BY fh_jobs_state WHERE state = :state GROUP BY task;

-- name: dash_queues
-- Due jobs per queue and since when the oldest has been due (the claim's own index, fh_jobs_due).
SELECT queue, count(*), min(run_at) FROM fh_jobs
 WHERE (state = 'queued' OR state = 'scheduled' OR state = 'retrying') AND run_at <= :now GROUP BY queue;

-- name: dash_succeeded_per_minute
SELECT CAST((finished_at - :since) / 60 AS INTEGER) AS minute, count(*) FROM fh_jobs
 WHERE state = 'succeeded' AND finished_at >= :since GROUP BY minute;

-- name: dash_failed_per_minute
-- Failed attempts (retried, failed for good, or lost with their worker).
SELECT CAST((ended_at - :since) / 60 AS INTEGER) AS minute, count(*) FROM fh_attempts
 WHERE ended_at >= :since GROUP BY minute;

-- name: dash_running
SELECT worker, count(*) FROM fh_jobs WHERE state = 'running' GROUP BY worker;

-- name: dash_failed_attempts
-- Failed attempts per task, of the jobs still stored and of those gone (for the run counters).
SELECT task, sum(n) FROM (SELECT task, count(*) AS n FROM fh_attempts GROUP BY task
                          UNION ALL SELECT task, failed FROM fh_gone) GROUP BY task;

-- name: dash_gone_succeeded
SELECT task, succeeded FROM fh_gone WHERE succeeded > 0;

-- name: record_attempt
-- A failed attempt, copied into the attempt history once its outcome is recorded (fenced: the job must be in
-- :state at that attempt; recorded once).
INSERT INTO fh_attempts (job, task, attempt, state, worker, started_at, ended_at, error)
SELECT id, task, attempts, state, worker, started_at, coalesce(finished_at, :now), substr(error, 1, 262144)
  FROM fh_jobs WHERE id = :id AND attempts = :attempt AND state = :state
   AND NOT EXISTS (SELECT 1 FROM fh_attempts WHERE job = :id AND attempt = :attempt);

-- name: record_lost_attempt
-- A job taken back from a dead worker (`expire`): its attempt ends in the history as `WorkerLost`.
INSERT INTO fh_attempts (job, task, attempt, state, worker, started_at, ended_at, error)
SELECT id, task, attempts, state, :worker, started_at, :now, substr(error, 1, 262144) FROM fh_jobs WHERE seq = :seq;

-- name: dash_attempts
SELECT attempt, state, worker, started_at, ended_at, error FROM fh_attempts WHERE job = :id ORDER BY seq;

-- name: dash_delete
-- Only a finished job: a queued one is cancelled first, a running one belongs to its worker.
DELETE FROM fh_jobs WHERE id = :id AND state IN ('succeeded', 'failed', 'cancelled');

-- name: dash_requeue_failed
-- `requeue` for every failed job of a task; of those sharing a uniqueness key, the latest, unless one is live.
UPDATE fh_jobs SET state = 'queued', run_at = :now, excused = attempts, max_attempts = attempts + max_attempts - excused,
       finished_at = NULL, error = NULL, result = NULL
 WHERE task = :task AND state = 'failed'
   AND (ukey IS NULL OR NOT EXISTS (SELECT 1 FROM fh_jobs AS o WHERE o.ukey = fh_jobs.ukey
                                     AND (o.state = 'waiting' OR o.state = 'scheduled' OR o.state = 'queued'
                                          OR o.state = 'retrying' OR o.state = 'running'))
                        AND seq = (SELECT max(o.seq) FROM fh_jobs AS o WHERE o.ukey = fh_jobs.ukey AND o.task = :task
                                                                         AND o.state = 'failed'));

-- name: dash_first_since
-- The first job created at or after :since, found by bisecting seq (the PK) with this probe: seq grows with time.
SELECT seq, created_at FROM fh_jobs WHERE seq >= :seq ORDER BY seq LIMIT 1;

-- name: dash_seq_range
-- Two subqueries: each min/max alone is read off the end of the table; together in one SELECT they scan it.
SELECT (SELECT min(seq) FROM fh_jobs), (SELECT max(seq) FROM fh_jobs);

-- name: cron_rows
-- Periodic tasks (fh_tasks/cron.py): their stored state, all of them (:names NULL) or those in the JSON list.
SELECT name, expr, tz, next_slot, last_slot, fired_at FROM fh_cron
 WHERE :names IS NULL OR name IN (SELECT value FROM json_each(:names)) ORDER BY name;

-- name: cron_create
-- A periodic task's first row; nothing when another scheduler made it first.
INSERT INTO fh_cron (name, expr, tz, next_slot, updated_at) VALUES (:name, :expr, :tz, :next, :now)
    ON CONFLICT (name) DO NOTHING RETURNING name;

-- name: cron_move
-- Compare-and-set: move the next slot only if the row is still what the scheduler read (else another one won).
UPDATE fh_cron SET expr = :expr, tz = :tz, next_slot = :next, updated_at = :now
 WHERE name = :name AND expr = :seen_expr AND tz = :seen_tz AND next_slot IS :seen_next RETURNING name;

-- name: cron_fired
UPDATE fh_cron SET last_slot = :slot, fired_at = :now WHERE name = :name;

-- name: cron_job_exists
SELECT 1 FROM fh_jobs WHERE id = :id;

-- ---- concurrency and rate limits (fh_tasks/limits.py, migration 008) ---------------------------------------------
-- Jobs with a limit_key are claimed by a step of their own (`SQLiteStore._claim_limited`) in the claim transaction;
-- `due` leaves them out.

-- name: limit_running
-- Running jobs per key and task (the running set is small: fh_jobs_limit_running holds only limited ones).
SELECT limit_key, task, count(*) FROM fh_jobs INDEXED BY fh_jobs_limit_running
 WHERE limit_key IS NOT NULL AND state = 'running' GROUP BY limit_key, task;

-- name: limit_closed
-- Keys whose rate window is closed: no job of theirs may start before `tat`.
SELECT key, tat FROM fh_limits WHERE tat > :now;

-- name: limited_due
-- Waiting jobs of limited tasks (:tasks, the ones this worker runs with limits) of these queues due by :until, in
-- due order, through the index of waiting limited jobs (`lost` is read from the table for the rows returned only).
-- At most :scan: a read that costs the same whatever backlog a full key has (see `_limited_candidates`).
SELECT seq, limit_key, task, lost, run_at FROM fh_jobs INDEXED BY fh_jobs_limited
 WHERE limit_key IS NOT NULL AND (state = 'queued' OR state = 'scheduled' OR state = 'retrying') AND run_at <= :until
   AND queue IN (SELECT value FROM json_each(:queues)) AND task IN (SELECT value FROM json_each(:tasks))
 ORDER BY run_at, seq LIMIT :scan;

-- name: limit_keys
-- The keys with waiting jobs, but those in :blocked, at most :keys of them: one index seek per key (a loose
-- scan of fh_jobs_limit_waiting), however many jobs each key has waiting.
WITH RECURSIVE k(key) AS (
    SELECT (SELECT min(limit_key) FROM fh_jobs INDEXED BY fh_jobs_limit_waiting
             WHERE limit_key IS NOT NULL AND (state = 'queued' OR state = 'scheduled' OR state = 'retrying'))
    UNION ALL
    SELECT (SELECT min(limit_key) FROM fh_jobs INDEXED BY fh_jobs_limit_waiting
             WHERE limit_key > k.key AND (state = 'queued' OR state = 'scheduled' OR state = 'retrying'))
      FROM k WHERE k.key IS NOT NULL LIMIT :keys)
SELECT key FROM k WHERE key IS NOT NULL AND key NOT IN (SELECT value FROM json_each(:blocked));

-- name: limited_key_due
-- `limited_due` for one key.
SELECT seq, limit_key, task, lost, run_at FROM fh_jobs INDEXED BY fh_jobs_limit_waiting
 WHERE limit_key = :key AND (state = 'queued' OR state = 'scheduled' OR state = 'retrying') AND run_at <= :until
   AND queue IN (SELECT value FROM json_each(:queues)) AND task IN (SELECT value FROM json_each(:tasks))
 ORDER BY run_at, seq LIMIT :scan;

-- name: limit_opens
-- The earliest time a closed rate window opens for a key with a job waiting for it (due by then, or by now with
-- :now_only), leaving out full keys (:blocked).
SELECT min(l.tat) FROM fh_limits AS l
 WHERE l.tat > :now AND l.key NOT IN (SELECT value FROM json_each(:blocked))
   AND EXISTS (SELECT 1 FROM fh_jobs INDEXED BY fh_jobs_limit_waiting
                WHERE limit_key = l.key AND (state = 'queued' OR state = 'scheduled' OR state = 'retrying')
                  AND run_at <= CASE WHEN :now_only THEN :now ELSE l.tat END
                  AND queue IN (SELECT value FROM json_each(:queues))
                  AND task IN (SELECT value FROM json_each(:tasks)));

-- name: claim_seqs
-- Claim the limited jobs `_claim_limited` chose, by rowid (+state: not through fh_jobs_state).
UPDATE fh_jobs SET state = 'running', attempts = attempts + 1, worker = :worker,
       lease_until = :lease_until, started_at = :now
 WHERE seq IN (SELECT value FROM json_each(:seqs))
   AND (+state = 'queued' OR +state = 'scheduled' OR +state = 'retrying')
RETURNING id, task, queue, args, attempts, max_attempts, timeout, created_at, run_at, seq, lost, priority, takes;

-- name: limit_start
-- A job of a rate-limited key started: the next may start `interval` seconds later (GCRA without burst).
INSERT INTO fh_limits (key, tat) VALUES (:key, :tat) ON CONFLICT (key) DO UPDATE SET tat = max(tat, excluded.tat);

-- name: prune_limits
-- Rate windows that opened long ago hold nothing any more.
DELETE FROM fh_limits WHERE tat < :before;
