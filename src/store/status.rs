//! What operators ask the database: the backlog, the replicas and their leases, and the
//! parked rows with their replay and discard.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::Row;

use super::{Store, StoreError};

/// A replica as `status` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct ReplicaStatus {
    pub replica_id: String,
    pub live: bool,
    pub started_at: DateTime<Utc>,
    pub heartbeat_age_seconds: f64,
    pub shards: i64,
    /// Age of the least recently renewed of its leases.
    pub oldest_lease_renewal_seconds: Option<f64>,
    /// What it said of itself in its last heartbeat (`ready`, `stalled`, `blocked`...);
    /// `None` from a relay of an earlier version or a role without the grant.
    pub state: Option<String>,
    /// Why, unless all was well.
    pub state_reason: Option<String>,
}

/// A parked row, as `parked list` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct ParkedRow {
    pub id: i64,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_type: String,
    pub event_id: uuid::Uuid,
    pub created_at: DateTime<Utc>,
    pub parked_at: DateTime<Utc>,
    pub park_reason: Option<String>,
    pub park_error: Option<String>,
}

/// Cheap figures about the backlog, for gauges and `check`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BacklogStats {
    pub pending_rows: i64,
    /// Whether `pending_rows` is an estimate (more than [`EXACT_PENDING_UP_TO`] pending).
    pub pending_rows_estimated: bool,
    pub oldest_pending_age: Option<Duration>,
    pub parked_rows: i64,
}

/// Pending rows are counted exactly up to this many; beyond, they are estimated. Counting
/// runs every `relay.stats_interval` on every replica: a million pending rows took 160 to
/// 480 ms per count in the benchmark, a hundred thousand a tenth of that.
pub(crate) const EXACT_PENDING_UP_TO: i64 = 100_000;

/// Which parked rows an operator means: each field narrows (`None` lets every row through).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ParkedFilter<'a> {
    pub aggregate_id: Option<&'a str>,
    /// `park_reason`, e.g. `invalid_topic`.
    pub reason: Option<&'a str>,
    /// Parked at or after.
    pub since: Option<chrono::DateTime<chrono::Utc>>,
    /// Parked before.
    pub until: Option<chrono::DateTime<chrono::Utc>>,
}

impl Store {
    /// Pending and parked counts and the age of the oldest pending row. Pending rows are
    /// counted up to [`EXACT_PENDING_UP_TO`] and estimated beyond it.
    pub(crate) async fn backlog_stats(&self) -> Result<BacklogStats, StoreError> {
        self.backlog_stats_counting_up_to(EXACT_PENDING_UP_TO).await
    }

    /// [`Store::backlog_stats`], counting pending rows exactly up to `exact_up_to`. Beyond
    /// it, the backlog is estimated as the smaller of two upper-leaning figures: the span of
    /// pending ids (the relay retires rows in id order, so nearly every id between the
    /// oldest and the newest pending row is pending; one row held behind a parked one
    /// stretches it) and the pending index's size at its last vacuum or analyze (stale
    /// while the backlog grows). Never below the rows counted.
    pub async fn backlog_stats_counting_up_to(
        &self,
        exact_up_to: i64,
    ) -> Result<BacklogStats, StoreError> {
        self.in_session(async |conn| {
            let statements = self.sql()?;
            let row = self
                .query(&statements.backlog)
                .bind(exact_up_to)
                .bind(&statements.table.pending_index)
                .fetch_one(&mut *conn)
                .await?;
            let counted: i64 = row.try_get("counted")?;
            let oldest_id: Option<i64> = row.try_get("oldest_id")?;
            let newest_id: Option<i64> = row.try_get("newest_id")?;
            let oldest: Option<f64> = row.try_get("oldest_age")?;
            let indexed_rows: Option<f64> = row.try_get("indexed_rows")?;
            let estimated = counted > exact_up_to;
            let pending_rows = match (estimated, oldest_id, newest_id) {
                (true, Some(oldest), Some(newest)) => {
                    let span = newest - oldest + 1;
                    // reltuples is -1 until the first vacuum or analyze.
                    let indexed = indexed_rows.filter(|n| *n > 0.0).map(|n| n as i64);
                    indexed.map_or(span, |n| n.min(span)).max(counted)
                }
                _ => counted,
            };
            Ok(BacklogStats {
                pending_rows,
                pending_rows_estimated: estimated,
                oldest_pending_age: oldest
                    .map(|s| Duration::try_from_secs_f64(s).unwrap_or_default()),
                parked_rows: row.try_get("parked")?,
            })
        })
        .await
    }

    /// Replicas known to the outbox, what each last said of itself and how many shards it
    /// holds. The state columns are read through the row's JSON, so that `status` works
    /// on a schema from before migration 10.
    pub(crate) async fn replica_status(&self) -> Result<(Vec<ReplicaStatus>, i64), StoreError> {
        self.in_session(async |conn| {
            let rows = self
                .query(
                    "SELECT r.replica_id, r.expires_at > pg_catalog.now() AS live, r.started_at, \
                        EXTRACT(EPOCH FROM (pg_catalog.now() - r.heartbeat_at))::float8 AS heartbeat_age, \
                        pg_catalog.count(l.shard) AS shards, \
                        EXTRACT(EPOCH FROM (pg_catalog.now() - pg_catalog.min(l.renewed_at)))::float8 AS oldest_renewal, \
                        pg_catalog.max(pg_catalog.to_jsonb(r) OPERATOR(pg_catalog.->>) 'state') AS state, \
                        pg_catalog.max(pg_catalog.to_jsonb(r) OPERATOR(pg_catalog.->>) 'state_reason') AS state_reason \
                 FROM outbox_replica r \
                 LEFT JOIN outbox_shard_lease l \
                   ON l.owner = r.replica_id AND l.expires_at > pg_catalog.now() \
                 GROUP BY r.replica_id, r.expires_at, r.started_at, r.heartbeat_at \
                 ORDER BY r.replica_id",
                )
                .fetch_all(&mut *conn)
                .await?;
            let replicas = rows
                .iter()
                .map(|r| {
                    Ok(ReplicaStatus {
                        replica_id: r.try_get("replica_id")?,
                        live: r.try_get("live")?,
                        started_at: r.try_get("started_at")?,
                        heartbeat_age_seconds: r.try_get("heartbeat_age")?,
                        shards: r.try_get("shards")?,
                        oldest_lease_renewal_seconds: r.try_get("oldest_renewal")?,
                        state: r.try_get("state")?,
                        state_reason: r.try_get("state_reason")?,
                    })
                })
                .collect::<Result<Vec<_>, sqlx::Error>>()?;
            let unowned: i64 = self
                .query_scalar(
                    "SELECT pg_catalog.count(*) FROM outbox_shard_lease \
                 WHERE owner IS NULL OR expires_at IS NULL OR expires_at <= pg_catalog.now()",
                )
                .fetch_one(&mut *conn)
                .await?;
            Ok((replicas, unowned))
        })
        .await
    }

    /// Parked rows still waiting for an operator that `filter` lets through, oldest first.
    pub(crate) async fn list_parked(
        &self,
        filter: &ParkedFilter<'_>,
        limit: i64,
    ) -> Result<Vec<ParkedRow>, StoreError> {
        self.in_session(async |conn| {
            let rows = self
                .query(&self.sql()?.list_parked)
                .bind(filter.aggregate_id)
                .bind(limit)
                .bind(filter.reason)
                .bind(filter.since)
                .bind(filter.until)
                .fetch_all(&mut *conn)
                .await?;
            rows.iter()
                .map(|r| {
                    Ok(ParkedRow {
                        id: r.try_get("id")?,
                        aggregate_type: r.try_get("aggregate_type")?,
                        aggregate_id: r.try_get("aggregate_id")?,
                        event_type: r.try_get("event_type")?,
                        event_id: r.try_get("event_id")?,
                        created_at: r.try_get("created_at")?,
                        parked_at: r.try_get("parked_at")?,
                        park_reason: r.try_get("park_reason")?,
                        park_error: r.try_get("park_error")?,
                    })
                })
                .collect::<Result<Vec<_>, sqlx::Error>>()
                .map_err(StoreError::from)
        })
        .await
    }

    /// Ids of the parked rows `filter` lets through, in id order.
    pub(crate) async fn parked_ids(
        &self,
        filter: &ParkedFilter<'_>,
    ) -> Result<Vec<i64>, StoreError> {
        self.in_session(async |conn| {
            Ok(self
                .query_scalar(&self.sql()?.parked_ids)
                .bind(filter.aggregate_id)
                .bind(filter.reason)
                .bind(filter.since)
                .bind(filter.until)
                .fetch_all(&mut *conn)
                .await?)
        })
        .await
    }

    /// Which of `ids` are parked and still holding their aggregates, in id order.
    pub(crate) async fn parked_among(&self, ids: &[i64]) -> Result<Vec<i64>, StoreError> {
        self.in_session(async |conn| {
            Ok(self
                .query_scalar(&self.sql()?.parked_among)
                .bind(ids)
                .fetch_all(&mut *conn)
                .await?)
        })
        .await
    }

    /// Puts parked rows back in the queue. They keep their ids, so they are published in
    /// their original order, ahead of the later rows of their aggregates that waited.
    pub(crate) async fn replay_parked(&self, ids: &[i64]) -> Result<u64, StoreError> {
        self.in_session(async |conn| {
            let done = self
                .query(&self.sql()?.replay_parked)
                .bind(ids)
                .execute(&mut *conn)
                .await?;
            Ok(done.rows_affected())
        })
        .await
    }

    /// Gives up on parked rows: they stay in the table for audit, with the reason, and no
    /// longer hold their aggregates back.
    pub(crate) async fn discard_parked(
        &self,
        ids: &[i64],
        reason: &str,
    ) -> Result<u64, StoreError> {
        self.in_session(async |conn| {
            let done = self
                .query(&self.sql()?.discard_parked)
                .bind(ids)
                .bind(reason)
                .execute(&mut *conn)
                .await?;
            Ok(done.rows_affected())
        })
        .await
    }
}
