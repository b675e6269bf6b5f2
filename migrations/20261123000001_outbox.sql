-- The outbox table: its first seven columns are the public contract a service writes;
-- every other column belongs to the relay and has a default, so an INSERT that names
-- only the contract columns is complete.
--
-- Plain SQL: teams with their own migration tool can apply this file as it is.

CREATE TABLE IF NOT EXISTS outbox (
    -- Contract: what a service writes, in the same transaction as its business change.
    aggregate_type  text        NOT NULL,
    aggregate_id    text        NOT NULL,
    event_type      text        NOT NULL,
    payload         jsonb,
    payload_bytes   bytea,
    headers         jsonb,
    topic           text,
    event_id        uuid        NOT NULL DEFAULT gen_random_uuid(),

    -- The relay's own bookkeeping.
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    created_at      timestamptz NOT NULL DEFAULT now(),
    sent_at         timestamptz,
    kafka_partition integer,
    kafka_offset    bigint,
    parked_at       timestamptz,
    park_reason     text,
    park_error      text,

    CONSTRAINT outbox_one_payload CHECK (payload IS NULL OR payload_bytes IS NULL)
) WITH (fillfactor = 90);

-- Pending rows in id order. Partial, so its size follows the backlog, never the number
-- of rows already sent: reading the next batch costs the same with 10 M sent rows as with
-- none.
CREATE INDEX IF NOT EXISTS outbox_pending_idx
    ON outbox (id)
    WHERE sent_at IS NULL AND parked_at IS NULL;

-- Parked rows by aggregate: later rows of a parked aggregate wait behind it. Empty in a
-- healthy system, so the check costs one probe of an empty index.
CREATE INDEX IF NOT EXISTS outbox_parked_aggregate_idx
    ON outbox (aggregate_id, id)
    WHERE parked_at IS NOT NULL AND sent_at IS NULL;

-- The doorbell: a payload-less NOTIFY the relay LISTENs for. Only the function is
-- created here; the trigger is optional (see outbox_enable_notify below) because NOTIFY
-- takes a database-wide lock at commit.
CREATE OR REPLACE FUNCTION outbox_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('outbox_relay', '');
    RETURN NULL;
END;
$$;

-- Installs (true) or removes (false) the statement-level doorbell trigger.
-- Fires once per INSERT statement, however many rows it inserts.
CREATE OR REPLACE FUNCTION outbox_enable_notify(enabled boolean) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    DROP TRIGGER IF EXISTS outbox_notify ON outbox;
    IF enabled THEN
        CREATE TRIGGER outbox_notify
            AFTER INSERT ON outbox
            FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();
    END IF;
END;
$$;
