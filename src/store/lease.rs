//! Replicas and shard leases in the database: heartbeats, renewals, takeovers and
//! hand-overs. A lease's epoch grows with every change of owner; marks are fenced by it.

use std::time::Duration;

use sqlx::Row;
use sqlx::postgres::PgRow;

use super::write::split_leases;
use super::{Store, StoreError};

/// Rows of `shard, epoch` as pairs.
fn lease_pairs(rows: &[PgRow]) -> Result<Vec<(i16, i64)>, StoreError> {
    rows.iter()
        .map(|r| Ok((r.try_get("shard")?, r.try_get("epoch")?)))
        .collect::<Result<_, sqlx::Error>>()
        .map_err(StoreError::from)
}

impl Store {
    /// When `replica` last heartbeated, if its registration has not expired.
    pub(crate) async fn live_heartbeat(
        &self,
        replica: &str,
    ) -> Result<Option<chrono::DateTime<chrono::Utc>>, StoreError> {
        self.in_session(async |conn| {
            Ok(self
                .query_scalar(
                    "SELECT heartbeat_at FROM outbox_replica \
                     WHERE replica_id = $1 AND expires_at > pg_catalog.now()",
                )
                .bind(replica)
                .fetch_optional(&mut *conn)
                .await?)
        })
        .await
    }

    /// Records that `replica` is alive for `ttl`, and in which state and why when
    /// `state` is given (a schema before migration 10, or a role without the grant, has no
    /// place for it), and returns the live replicas, sorted. Registrations expired for an
    /// hour (relays that died without handing over) are deleted on the way, so that
    /// `status` does not list them for ever.
    pub(crate) async fn heartbeat(
        &self,
        replica: &str,
        ttl: Duration,
        state: Option<(&str, Option<&str>)>,
    ) -> Result<Vec<String>, StoreError> {
        let (columns, values, updates) = match state {
            Some(_) => (
                ", state, state_reason",
                ", $3, $4",
                ", state = $3, state_reason = $4",
            ),
            None => ("", "", ""),
        };
        let me = format!(
            "INSERT INTO outbox_replica (replica_id, heartbeat_at, expires_at{columns}) \
             VALUES ($1, pg_catalog.now(), pg_catalog.now() + pg_catalog.make_interval(secs => $2){values}) \
             ON CONFLICT (replica_id) DO UPDATE \
             SET heartbeat_at = pg_catalog.now(), expires_at = pg_catalog.now() + pg_catalog.make_interval(secs => $2){updates}"
        );
        let statement = format!(
            "WITH gone AS ( \
                 DELETE FROM outbox_replica \
                 WHERE expires_at < pg_catalog.now() - interval '1 hour' AND replica_id <> $1), \
             me AS ({me} RETURNING replica_id) \
             SELECT replica_id FROM outbox_replica WHERE expires_at > pg_catalog.now() AND replica_id <> $1 \
             UNION SELECT replica_id FROM me \
             ORDER BY 1"
        );
        self.in_session(async |conn| {
            let mut query = self
                .query_scalar(&statement)
                .bind(replica)
                .bind(ttl.as_secs_f64());
            if let Some((state, reason)) = state {
                query = query.bind(state).bind(reason);
            }
            let live: Vec<String> = query.fetch_all(&mut *conn).await?;
            Ok(live)
        })
        .await
    }

    /// Extends the leases `replica` holds under the given epochs; returns those renewed.
    pub async fn renew_leases(
        &self,
        replica: &str,
        held: &[(i16, i64)],
        ttl: Duration,
    ) -> Result<Vec<(i16, i64)>, StoreError> {
        if held.is_empty() {
            return Ok(Vec::new());
        }
        self.in_session(async |conn| {
            let (shards, epochs) = split_leases(held);
            let rows = self
                .query(
                    "WITH locked AS ( \
                         SELECT l.shard FROM outbox_shard_lease l \
                         JOIN unnest($2::smallint[], $3::bigint[]) AS h(shard, epoch) \
                           ON l.shard = h.shard AND l.epoch = h.epoch \
                         WHERE l.owner = $1 \
                         ORDER BY l.shard \
                         FOR NO KEY UPDATE OF l) \
                     UPDATE outbox_shard_lease l \
                     SET expires_at = pg_catalog.now() + pg_catalog.make_interval(secs => $4), renewed_at = pg_catalog.now() \
                     WHERE l.shard IN (SELECT shard FROM locked) \
                     RETURNING l.shard, l.epoch",
                )
                .bind(replica)
                .bind(&shards)
                .bind(&epochs)
                .bind(ttl.as_secs_f64())
                .fetch_all(&mut *conn)
                .await?;
            lease_pairs(&rows)
        })
        .await
    }

    /// Takes the wanted shards that nobody holds (or whose lease expired), each under a
    /// new epoch; returns those taken.
    pub async fn acquire_leases(
        &self,
        replica: &str,
        wanted: &[i16],
        ttl: Duration,
    ) -> Result<Vec<(i16, i64)>, StoreError> {
        self.in_session(async |conn| {
            let rows = self
                .query(
                    "WITH free AS ( \
                         SELECT shard FROM outbox_shard_lease \
                         WHERE shard = ANY($2::smallint[]) \
                           AND (owner IS NULL OR expires_at IS NULL OR expires_at <= pg_catalog.now()) \
                         ORDER BY shard \
                         FOR NO KEY UPDATE SKIP LOCKED) \
                     UPDATE outbox_shard_lease l \
                     SET owner = $1, epoch = l.epoch + 1, \
                         expires_at = pg_catalog.now() + pg_catalog.make_interval(secs => $3), \
                         acquired_at = pg_catalog.now(), renewed_at = pg_catalog.now() \
                     WHERE l.shard IN (SELECT shard FROM free) \
                     RETURNING l.shard, l.epoch",
                )
                .bind(replica)
                .bind(wanted)
                .bind(ttl.as_secs_f64())
                .fetch_all(&mut *conn)
                .await?;
            lease_pairs(&rows)
        })
        .await
    }

    /// Gives shards up at once, so another replica can take them without waiting.
    pub(crate) async fn release_leases(
        &self,
        replica: &str,
        leases: &[(i16, i64)],
    ) -> Result<u64, StoreError> {
        if leases.is_empty() {
            return Ok(0);
        }
        self.in_session(async |conn| {
            let (shards, epochs) = split_leases(leases);
            let done = self
                .query(
                    "UPDATE outbox_shard_lease l SET owner = NULL, expires_at = NULL \
                 FROM unnest($2::smallint[], $3::bigint[]) AS h(shard, epoch) \
                 WHERE l.shard = h.shard AND l.epoch = h.epoch AND l.owner = $1",
                )
                .bind(replica)
                .bind(&shards)
                .bind(&epochs)
                .execute(&mut *conn)
                .await?;
            Ok(done.rows_affected())
        })
        .await
    }

    /// Which of these (shard, epoch) leases `replica` still holds in the database.
    pub(crate) async fn still_held(
        &self,
        replica: &str,
        leases: &[(i16, i64)],
    ) -> Result<Vec<(i16, i64)>, StoreError> {
        let (shards, epochs) = split_leases(leases);
        self.in_session(async |conn| {
            let rows = self
                .query(
                    "SELECT l.shard, l.epoch FROM outbox_shard_lease l \
                     JOIN unnest($2::smallint[], $3::bigint[]) AS h(shard, epoch) \
                       ON l.shard = h.shard AND l.epoch = h.epoch \
                     WHERE l.owner = $1",
                )
                .bind(replica)
                .bind(&shards)
                .bind(&epochs)
                .fetch_all(&mut *conn)
                .await?;
            lease_pairs(&rows)
        })
        .await
    }

    /// Removes `replica` from the live set (clean shutdown).
    pub(crate) async fn deregister(&self, replica: &str) -> Result<(), StoreError> {
        self.in_session(async |conn| {
            self.query("DELETE FROM outbox_replica WHERE replica_id = $1")
                .bind(replica)
                .execute(&mut *conn)
                .await?;
            Ok(())
        })
        .await
    }

    /// How long until the first of these shards' current leases expires.
    pub(crate) async fn next_lease_expiry(
        &self,
        shards: &[i16],
    ) -> Result<Option<Duration>, StoreError> {
        self.in_session(async |conn| {
            let seconds: Option<f64> = self
                .query_scalar(
                    "SELECT EXTRACT(EPOCH FROM (pg_catalog.min(expires_at) - pg_catalog.now()))::float8 \
                 FROM outbox_shard_lease \
                 WHERE shard = ANY($1::smallint[]) AND expires_at > pg_catalog.now()",
                )
                .bind(shards)
                .fetch_one(&mut *conn)
                .await?;
            Ok(seconds.map(|s| Duration::try_from_secs_f64(s).unwrap_or_default()))
        })
        .await
    }
}
