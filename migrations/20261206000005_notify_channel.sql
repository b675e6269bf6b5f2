-- The doorbell notifies the channel the relay listens on (`database.listen_channel`),
-- given to the trigger as its argument; `outbox_relay` when none is given.

CREATE OR REPLACE FUNCTION outbox_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_catalog.pg_notify(COALESCE(TG_ARGV[0], 'outbox_relay'), '');
    RETURN NULL;
END;
$$;

DROP FUNCTION IF EXISTS outbox_enable_notify(boolean);

-- Installs (true) or removes (false) the statement-level doorbell trigger, notifying
-- `channel`. Fires once per INSERT statement, however many rows it inserts.
CREATE OR REPLACE FUNCTION outbox_enable_notify(enabled boolean, channel text DEFAULT 'outbox_relay')
RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    DROP TRIGGER IF EXISTS outbox_notify ON outbox;
    IF enabled THEN
        EXECUTE pg_catalog.format(
            'CREATE TRIGGER outbox_notify AFTER INSERT ON outbox '
            'FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify(%L)',
            channel);
    END IF;
END;
$$;
