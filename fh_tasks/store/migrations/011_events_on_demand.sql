-- fh-tasks job store, schema version 11: the job-event triggers exist only while somebody listens.
--
-- Migration 003 made them permanent, each testing `EXISTS (SELECT 1 FROM fh_listeners)` for every row a statement
-- wrote: a store nobody watched still paid a trigger program per insert and per change of state (a few µs each,
-- twice per job on a worker's path). Now a listener's registration creates them when they are missing, and the
-- workers' pruning of events (once a minute) drops them when no listener is left, in the same transaction as the
-- change to fh_listeners (`SQLiteStore._events_on_demand`, queries `events_stored_trigger` and
-- `events_changed_trigger`). Every connection sees the new schema at its next statement (SQLite prepares its
-- statements again), so a change committed after a listener registered is announced whoever makes it, as before.
-- Listeners coming and going change the schema at most about twice a minute. Dropped here; a listener's next
-- registration or renewal (every 10 seconds) creates them again, without the test.
DROP TRIGGER IF EXISTS fh_jobs_stored;
DROP TRIGGER IF EXISTS fh_jobs_changed;
