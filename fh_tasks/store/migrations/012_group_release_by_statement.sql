-- fh-tasks job store, schema version 12: a group's callback is released by the statement that records successes.
--
-- Migration 009 released it from a trigger on every change of any job's state: a trigger program ran for each row
-- a claim or an outcome wrote, group or not (about a twentieth of a worker's instructions per job). The one
-- statement that makes a job `succeeded` is the store's `succeed` query, and the store now runs `release_groups_of`
-- after it, in the same transaction, for the jobs it has just recorded: the callback is queued once every member of
-- its group succeeded, as before, and jobs outside groups pay one index lookup per batch instead of a trigger per row.
DROP TRIGGER IF EXISTS fh_jobs_group_done;
