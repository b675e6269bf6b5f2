-- What each replica last said of itself in its heartbeat, for `outbox-relay status`:
-- starting, ready, unready, stalled, blocked or draining, and why. A relay of an earlier
-- version leaves them NULL; a relay whose role may not write them relays all the same.
ALTER TABLE outbox_replica
    ADD COLUMN IF NOT EXISTS state text,
    ADD COLUMN IF NOT EXISTS state_reason text;
