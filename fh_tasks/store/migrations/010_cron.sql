-- fh-tasks job store, schema version 10: periodic tasks (`@tasks.cron`, fh_tasks/cron.py).
--
-- One row per periodic task, shared by every scheduler on the store (each process whose workers serve the task's
-- queue runs one). `next_slot` is the first slot not handled yet: a scheduler moves it forward with a
-- compare-and-set (query `cron_move`) and stores the slot's job in the same transaction, so a slot fires once
-- however many schedulers run. Times are Unix seconds.
CREATE TABLE IF NOT EXISTS fh_cron (
    name       TEXT PRIMARY KEY,  -- the task's stored name
    expr       TEXT NOT NULL,     -- its cron expression, as declared
    tz         TEXT NOT NULL,     -- its time zone (a zoneinfo name)
    next_slot  REAL NOT NULL,     -- the first slot not fired or skipped yet
    last_slot  REAL,              -- the slot of the last job fired (NULL: none yet)
    fired_at   REAL,              -- when that job was stored
    updated_at REAL NOT NULL
);
