-- Parked rows an operator gave up on are discarded, not deleted: they stay for audit
-- (who gave up on what, and why) and no longer hold their aggregate back.

ALTER TABLE outbox
    ADD COLUMN IF NOT EXISTS discarded_at timestamptz,
    ADD COLUMN IF NOT EXISTS discard_reason text;

DROP INDEX IF EXISTS outbox_parked_aggregate_idx;

-- Parked rows still holding their aggregate back. Empty in a healthy system.
CREATE INDEX IF NOT EXISTS outbox_parked_holding_idx
    ON outbox (aggregate_id, id)
    WHERE parked_at IS NOT NULL AND discarded_at IS NULL AND sent_at IS NULL;
