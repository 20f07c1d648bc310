-- The durable job queue: everything slow or remote (image resizing, pushes) runs
-- from here, at least once, however many workers die on the way.
--
-- A job is `queued` until a worker claims it (`running`, with a lease until
-- `locked_until`). Success deletes it; failure puts it back with a later `run_at`, or
-- makes it `dead` after `max_attempts`, keeping `last_error`. A lease that expires (its
-- worker was killed) makes the job claimable again.

CREATE TABLE jobs (
    id           uuid PRIMARY KEY,
    kind         text NOT NULL,
    payload      jsonb NOT NULL,
    state        text NOT NULL DEFAULT 'queued' CHECK (state IN ('queued', 'running', 'dead')),
    -- For jobs that must not be enqueued twice (at most one queued or running per key).
    unique_key   text,
    attempts     integer NOT NULL DEFAULT 0,
    max_attempts integer NOT NULL DEFAULT 10 CHECK (max_attempts > 0),
    run_at       timestamptz NOT NULL DEFAULT now(),
    locked_by    text,
    locked_until timestamptz,
    last_error   text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT jobs_running_has_lease CHECK (state <> 'running' OR locked_until IS NOT NULL)
);

-- What a worker scans: claimable jobs of one kind, oldest due first.
CREATE INDEX jobs_due_idx ON jobs (kind, run_at) WHERE state = 'queued';
-- Expired leases.
CREATE INDEX jobs_lease_idx ON jobs (kind, locked_until) WHERE state = 'running';
CREATE UNIQUE INDEX jobs_unique_key ON jobs (kind, unique_key)
    WHERE unique_key IS NOT NULL AND state IN ('queued', 'running');

-- Wake sleeping workers at commit (NOTIFY is transactional): one notification per
-- statement and kind, whatever the number of rows.
CREATE FUNCTION jobs_notify() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    k text;
BEGIN
    FOR k IN SELECT DISTINCT kind FROM inserted LOOP
        PERFORM pg_notify('jobs', k);
    END LOOP;
    RETURN NULL;
END;
$$;

CREATE TRIGGER jobs_notify AFTER INSERT ON jobs
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION jobs_notify();
