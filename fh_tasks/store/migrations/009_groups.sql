-- fh-tasks job store, schema version 9: groups of jobs with a callback (fh_tasks.flow, docs/workflows.md).
--
-- The members of a group carry `grp` = the id of the group's callback job (`takes` = 'group', stored `waiting`).
-- The callback is released (queued) in the same transaction that records the success of the last member to succeed;
-- a member that ends failed or cancelled cancels it (and the rest of its chain: `SQLiteStore._cancel_chain`).
--
-- The members of one group, found from the callback: what the release below and the claim of the callback read
-- (the `inputs` query). Partial: jobs outside groups (grp NULL) are not in it, so they cost it nothing.
CREATE INDEX IF NOT EXISTS fh_jobs_grp ON fh_jobs (grp, state) WHERE grp IS NOT NULL;
-- Release a group's callback once every member succeeded. A trigger, so that it happens in the statement that records
-- the member's success whoever records it, and costs other jobs one test of NEW.grp. The UPDATE it makes fires the
-- event triggers (003) like any other: subscribers see the callback `queued`.
CREATE TRIGGER IF NOT EXISTS fh_jobs_group_done AFTER UPDATE OF state ON fh_jobs
WHEN new.grp IS NOT NULL AND new.state = 'succeeded' AND old.state IS NOT 'succeeded' BEGIN
    UPDATE fh_jobs SET state = 'queued', run_at = coalesce(new.finished_at, (julianday('now') - 2440587.5) * 86400.0)
     WHERE id = new.grp AND state = 'waiting'
       AND NOT EXISTS (SELECT 1 FROM fh_jobs WHERE grp = new.grp AND state <> 'succeeded');
END;
