-- no-transaction
-- The old index of parked rows by aggregate id (see migration 6), dropped without
-- blocking the services' inserts.
DROP INDEX CONCURRENTLY IF EXISTS outbox_parked_holding_idx;
