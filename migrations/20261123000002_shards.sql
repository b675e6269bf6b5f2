-- Shards and leases: several relay replicas share one outbox without reordering an
-- aggregate's rows. Every row carries a shard, a stable hash of its aggregate id computed
-- by the database at insert (services write nothing new); each replica publishes only the
-- shards it holds a lease on.
--
-- Adding a stored generated column rewrites an existing table once; on a large outbox,
-- apply this migration in a quiet period.

-- 256 shards, fixed: the shard of an aggregate never changes. hashtextextended is
-- IMMUTABLE and stable across PostgreSQL versions and platforms.
ALTER TABLE outbox
    ADD COLUMN IF NOT EXISTS shard smallint
    GENERATED ALWAYS AS ((hashtextextended(aggregate_id, 0) & 255)::smallint) STORED;

-- One row per shard. `epoch` grows by one each time the shard changes hands; a replica
-- marks rows only while the epoch it read them under is still the shard's epoch, so a
-- replica whose lease was taken over can no longer mark anything of that shard.
CREATE TABLE IF NOT EXISTS outbox_shard_lease (
    shard       smallint    PRIMARY KEY,
    owner       text,
    epoch       bigint      NOT NULL DEFAULT 0,
    expires_at  timestamptz,
    acquired_at timestamptz,
    renewed_at  timestamptz
);

INSERT INTO outbox_shard_lease (shard)
SELECT s FROM generate_series(0, 255) AS s
ON CONFLICT (shard) DO NOTHING;

-- Live replicas, by heartbeat. Each replica takes a balanced share of the shards among
-- the replicas whose heartbeat has not expired.
CREATE TABLE IF NOT EXISTS outbox_replica (
    replica_id   text        PRIMARY KEY,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL
);
