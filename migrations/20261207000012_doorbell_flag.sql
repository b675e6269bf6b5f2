-- The doorbell reads a flag before it tries the sleeping relay's lock. A relay sets the
-- sequence outbox_doorbell to 1 while it sleeps and to 0 once it is awake, only while it
-- holds the sleeper lock; a writer that reads 0 takes no lock at all (the shared advisory
-- lock of migration 11 goes through the lock manager's shared table, and 16 writers taking
-- it cost them about 8 % of their single-row commit rate, bench/trigger-cost.sh). Before the
-- relay sleeps it waits until no transaction that could have read 0 still holds the outbox
-- (see src/wake.rs). Until a relay that knows the flag has run, it is unset and writers try
-- the lock as before, so relays from before this migration are still rung.
--
-- Writers read the flag with their own privileges, hence SELECT for everyone: it says only
-- whether a relay sleeps. The relay's role needs UPDATE on it to set it.

CREATE SEQUENCE IF NOT EXISTS outbox_doorbell MINVALUE 0 MAXVALUE 1 NO CYCLE;
GRANT SELECT ON SEQUENCE outbox_doorbell TO PUBLIC;

-- Unlogged where PostgreSQL has it (15 and later): setting the flag writes no WAL and needs
-- no commit flush; after a crash it is unset, which is safe.
DO $$
BEGIN
    IF pg_catalog.current_setting('server_version_num')::int >= 150000 THEN
        ALTER SEQUENCE outbox_doorbell SET UNLOGGED;
    END IF;
END;
$$;

CREATE OR REPLACE FUNCTION outbox_enable_notify(enabled boolean, channel text DEFAULT 'outbox_relay')
RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    DROP TRIGGER IF EXISTS outbox_notify ON outbox;
    IF enabled THEN
        EXECUTE pg_catalog.format(
            'CREATE TRIGGER outbox_notify AFTER INSERT ON outbox FOR EACH STATEMENT '
            'WHEN (pg_catalog.pg_sequence_last_value(%L::regclass) IS DISTINCT FROM 0 '
            'AND NOT pg_catalog.pg_try_advisory_xact_lock_shared(1868722808, pg_catalog.hashtext(%L))) '
            'EXECUTE FUNCTION outbox_notify(%L)',
            'outbox_doorbell', channel, channel);
    END IF;
END;
$$;
