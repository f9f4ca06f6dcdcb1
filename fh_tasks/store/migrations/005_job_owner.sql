-- Who may see a job: an opaque token of the session that deferred it (a random value the web binding keeps in the
-- app's session), or NULL for a job deferred outside a request. Status routes show a job only to its owner unless
-- the app gives `Tasks(access=...)`; nothing lists jobs by owner, so no index.
ALTER TABLE fh_jobs ADD COLUMN owner TEXT;
