-- What each replica last said of itself in its heartbeat, for `outbox-relay status`:
-- starting, ready, unready, stalled, blocked or draining, and why. A relay of an earlier
-- version leaves them NULL; a relay whose role may not write them relays all the same.
-- The ALTER holds outbox_replica's exclusive lock for an instant, which running relays'
-- heartbeats wait for: give up after 10 s (run `migrate` again) rather than queue them
-- behind a long transaction that has read the table.
SET LOCAL lock_timeout = '10s';
ALTER TABLE outbox_replica
    ADD COLUMN IF NOT EXISTS state text,
    ADD COLUMN IF NOT EXISTS state_reason text;
