-- The doorbell rings only while the relay sleeps. A sleeping relay holds the advisory lock
-- (1868722808, hashtext(channel)) on its LISTEN session; a writer that can take it shared
-- knows the relay is awake and will read again after this commit, and holds it until the
-- commit is visible, so a relay that takes the lock to sleep reads every such row first.
-- NOTIFY serialises commits database-wide; a writer now pays for it only while the relay
-- is idle.

CREATE OR REPLACE FUNCTION outbox_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    channel text := COALESCE(TG_ARGV[0], 'outbox_relay');
BEGIN
    IF NOT pg_catalog.pg_try_advisory_xact_lock_shared(1868722808, pg_catalog.hashtext(channel)) THEN
        PERFORM pg_catalog.pg_notify(channel, '');
    END IF;
    RETURN NULL;
END;
$$;
