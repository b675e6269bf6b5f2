//! Retention of sent rows: the rows sent before a cut-off are deleted oldest first, in
//! batches, by one replica at a time (a transaction-scoped advisory lock per batch), and
//! never a pending, parked or discarded row (their `sent_at` is NULL).

use std::time::Duration;

use sqlx::Row;

use super::{Store, StoreError};

/// The advisory lock key that lets one replica at a time prune ("outbox" and 1).
const PRUNE_LOCK: i64 = 0x6f75_7462_6f78_0001;

/// One batch of retention: how many rows it deleted, or that another replica held the lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pruned {
    Rows(u64),
    /// Another replica (or `outbox-relay prune`) is pruning right now.
    Busy,
}

impl Store {
    /// Deletes at most `max_rows` of the rows sent more than `older_than` ago, oldest
    /// first, unless another session is pruning.
    pub async fn prune_sent(
        &self,
        older_than: Duration,
        max_rows: i64,
    ) -> Result<Pruned, StoreError> {
        self.in_session(async |conn| {
            let row = self
                .query(
                    "WITH lock AS MATERIALIZED ( \
                       SELECT pg_catalog.pg_try_advisory_xact_lock($3) AS held), \
                     doomed AS ( \
                       DELETE FROM outbox o WHERE o.id = ANY(ARRAY( \
                         SELECT id FROM outbox \
                         WHERE sent_at IS NOT NULL \
                           AND sent_at < pg_catalog.now() - pg_catalog.make_interval(secs => $1) \
                           AND (SELECT held FROM lock) \
                         ORDER BY sent_at LIMIT $2)) \
                       RETURNING 1) \
                     SELECT (SELECT held FROM lock) AS held, \
                            (SELECT pg_catalog.count(*) FROM doomed) AS deleted",
                )
                .bind(older_than.as_secs_f64())
                .bind(max_rows)
                .bind(PRUNE_LOCK)
                .fetch_one(&mut *conn)
                .await?;
            let held: bool = row.try_get("held")?;
            let deleted: i64 = row.try_get("deleted")?;
            Ok(if held {
                Pruned::Rows(deleted.max(0) as u64)
            } else {
                Pruned::Busy
            })
        })
        .await
    }

    /// How many rows were sent more than `older_than` ago: what pruning would delete.
    pub async fn count_prunable(&self, older_than: Duration) -> Result<i64, StoreError> {
        self.in_session(async |conn| {
            Ok(self
                .query_scalar(
                    "SELECT pg_catalog.count(*) FROM outbox \
                     WHERE sent_at IS NOT NULL \
                       AND sent_at < pg_catalog.now() - pg_catalog.make_interval(secs => $1)",
                )
                .bind(older_than.as_secs_f64())
                .fetch_one(&mut *conn)
                .await?)
        })
        .await
    }
}
