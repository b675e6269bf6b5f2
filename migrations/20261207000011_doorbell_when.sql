-- The doorbell trigger tries the sleeping relay's lock in its WHEN clause, which PostgreSQL
-- evaluates without calling the trigger function: while the relay is awake an insert pays
-- for one shared advisory lock, not for a PL/pgSQL call as well (about 3 % of a writer's
-- single-row commit rate at 16 connections, bench step wakeup-paired). outbox_notify()
-- keeps its own try, so a trigger created before this migration still rings only while the
-- relay sleeps; `outbox-relay migrate` replaces such a trigger with this one.

CREATE OR REPLACE FUNCTION outbox_enable_notify(enabled boolean, channel text DEFAULT 'outbox_relay')
RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    DROP TRIGGER IF EXISTS outbox_notify ON outbox;
    IF enabled THEN
        EXECUTE pg_catalog.format(
            'CREATE TRIGGER outbox_notify AFTER INSERT ON outbox FOR EACH STATEMENT '
            'WHEN (NOT pg_catalog.pg_try_advisory_xact_lock_shared(1868722808, pg_catalog.hashtext(%L))) '
            'EXECUTE FUNCTION outbox_notify(%L)',
            channel, channel);
    END IF;
END;
$$;
