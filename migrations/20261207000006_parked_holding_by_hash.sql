-- The index of parked rows holding their aggregate back keyed the aggregate id itself: a
-- parked row with an aggregate id over about 2.7 KB exceeded the btree's maximum entry
-- size (SQLSTATE 54000) and the park failed. A row's content must never make a park fail,
-- so the index keys a fixed-size hash of the id; the read compares the hash (by this
-- index) and then the id itself.

DROP INDEX IF EXISTS outbox_parked_holding_idx;

CREATE INDEX IF NOT EXISTS outbox_parked_holding_hash_idx
    ON outbox (pg_catalog.hashtextextended(aggregate_id, 0), id)
    WHERE parked_at IS NOT NULL AND discarded_at IS NULL AND sent_at IS NULL;
