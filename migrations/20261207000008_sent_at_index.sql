-- no-transaction
-- Retention of sent rows (relay.retain_sent, `outbox-relay prune`) deletes the sent rows
-- older than a cut-off, oldest first, in batches: this index finds them without scanning
-- the rows still kept. Pending and parked rows (sent_at NULL) are not in it.
--
-- Built CONCURRENTLY, so that services keep inserting while it scans the table. Should the
-- build fail half-way, PostgreSQL leaves an invalid index behind: drop it (DROP INDEX
-- CONCURRENTLY outbox_sent_at_idx) and run `outbox-relay migrate` again.
CREATE INDEX CONCURRENTLY IF NOT EXISTS outbox_sent_at_idx
    ON outbox (sent_at)
    WHERE sent_at IS NOT NULL;
