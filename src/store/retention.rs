//! Retention of sent rows: the rows sent before a cut-off are deleted oldest first, in
//! batches, by one replica at a time (a transaction-scoped advisory lock per batch), and
//! never a pending, parked or discarded row (their `sent_at` is NULL).

use std::time::Duration;

use sqlx::Row;

use super::{Store, StoreError};

/// The advisory lock key that lets one replica at a time prune the relay's own outbox
/// ("outbox" and 1); another table's key is derived from its name, so that the relays of
/// two outboxes in one database do not take turns.
const PRUNE_LOCK: i64 = 0x6f75_7462_6f78_0001;

/// The prune lock of the table named `display`.
fn prune_lock(display: &str) -> i64 {
    if display == "outbox" {
        return PRUNE_LOCK;
    }
    // FNV-1a: stable across builds and platforms.
    let hash = display.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    hash as i64
}

/// One batch of retention: how many rows it deleted, or that another replica held the lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pruned {
    Rows(u64),
    /// Another replica (or `outbox-relay prune`) is pruning right now.
    Busy,
}

/// What deleting every row sent before a cut-off came to.
#[derive(Debug)]
pub struct Sweep {
    pub deleted: u64,
    /// It stopped because another session was pruning.
    pub busy: bool,
    /// It stopped on this database error.
    pub error: Option<StoreError>,
}

impl Store {
    /// Deletes the rows sent more than `older_than` ago, `batch` at a time, until none is
    /// left, another session prunes, a statement fails, or `stop()` says so.
    pub async fn prune_all_sent(
        &self,
        older_than: Duration,
        batch: i64,
        stop: impl Fn() -> bool,
    ) -> Sweep {
        let mut sweep = Sweep {
            deleted: 0,
            busy: false,
            error: None,
        };
        loop {
            match self.prune_sent(older_than, batch).await {
                Ok(Pruned::Rows(rows)) => {
                    sweep.deleted += rows;
                    if rows < batch as u64 || stop() {
                        return sweep;
                    }
                }
                Ok(Pruned::Busy) => {
                    sweep.busy = true;
                    return sweep;
                }
                Err(err) => {
                    sweep.error = Some(err);
                    return sweep;
                }
            }
        }
    }

    /// Deletes at most `max_rows` of the rows sent more than `older_than` ago, oldest
    /// first, unless another session is pruning.
    pub async fn prune_sent(
        &self,
        older_than: Duration,
        max_rows: i64,
    ) -> Result<Pruned, StoreError> {
        self.in_session(async |conn| {
            let row = self
                .query(&self.sql()?.prune_sent)
                .bind(older_than.as_secs_f64())
                .bind(max_rows)
                .bind(prune_lock(&self.sql()?.table.display))
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
                .query_scalar(&self.sql()?.count_prunable)
                .bind(older_than.as_secs_f64())
                .fetch_one(&mut *conn)
                .await?)
        })
        .await
    }
}
