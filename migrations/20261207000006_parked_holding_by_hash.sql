-- no-transaction
-- The index of parked rows holding their aggregate back keyed the aggregate id itself: a
-- parked row with an aggregate id over about 2.7 KB exceeded the btree's maximum entry
-- size (SQLSTATE 54000) and the park failed. A row's content must never make a park fail,
-- so this index keys a fixed-size hash of the id; the read compares the hash (by this
-- index) and then the id itself. Migration 7 drops the old index.
--
-- Built CONCURRENTLY, so that services keep inserting while it scans the table; that
-- cannot run in a transaction (the first line), nor beside another statement. Should the
-- build fail half-way, PostgreSQL leaves an invalid index behind: drop it (DROP INDEX
-- CONCURRENTLY outbox_parked_holding_hash_idx) and run `outbox-relay migrate` again.
CREATE INDEX CONCURRENTLY IF NOT EXISTS outbox_parked_holding_hash_idx
    ON outbox (pg_catalog.hashtextextended(aggregate_id, 0), id)
    WHERE parked_at IS NOT NULL AND discarded_at IS NULL AND sent_at IS NULL;
