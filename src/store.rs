//! All SQL the relay runs. Reads never hold a transaction open; every mark, delete or park
//! is one set-based statement per batch that only touches rows still pending, so a
//! repeated mark is harmless and a sent row is never un-sent.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, Row};

use crate::config::{DatabaseSettings, ParkPolicy};

/// The migrations in `migrations/`, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// A pending outbox row, as read for publishing.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    pub id: i64,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_type: String,
    /// `payload` (jsonb) as JSON text.
    pub payload_json: Option<String>,
    pub payload_bytes: Option<Vec<u8>>,
    /// `headers` (jsonb) as JSON text.
    pub headers_json: Option<String>,
    pub topic: Option<String>,
    pub event_id: uuid::Uuid,
    pub created_at: DateTime<Utc>,
}

/// Where the broker stored an acknowledged row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    pub id: i64,
    pub partition: i32,
    pub offset: i64,
}

/// A row to park, with its bounded reason kind and the full explanation.
#[derive(Debug, Clone)]
pub struct Parking {
    pub id: i64,
    pub reason: &'static str,
    pub error: String,
}

/// Cheap figures about the backlog, for gauges and `check`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BacklogStats {
    pub pending_rows: i64,
    pub oldest_pending_age: Option<Duration>,
    pub parked_rows: i64,
}

/// Database errors, each able to say whether retrying can help.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database unreachable or connection lost: {0}")]
    Connection(#[source] sqlx::Error),
    #[error("database refused the statement (SQLSTATE {code}): {source}")]
    Statement {
        code: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("the outbox table is missing or incomplete ({0}); run `outbox-relay migrate`")]
    Schema(String),
    #[error("database error: {0}")]
    Other(#[source] sqlx::Error),
}

impl StoreError {
    /// Whether waiting and reconnecting can fix it (lost connections, restarts, failover,
    /// timeouts, serialization failures).
    pub fn is_retriable(&self) -> bool {
        match self {
            StoreError::Connection(_) => true,
            StoreError::Statement { code, .. } => {
                // 08: connection exception, 25006: read-only (failover), 40: rollback,
                // 53: insufficient resources, 57: operator intervention (restart,
                // statement_timeout as 57014), 58: system error.
                ["08", "40", "53", "57", "58"]
                    .iter()
                    .any(|c| code.starts_with(c))
                    || code == "25006"
            }
            StoreError::Schema(_) => false,
            StoreError::Other(_) => false,
        }
    }

    /// Bounded label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::Connection(_) => "connection",
            StoreError::Statement { code, .. } if code == "25006" => "read_only",
            StoreError::Statement { code, .. } if code == "57014" => "statement_timeout",
            StoreError::Statement { code, .. } if code.starts_with("57") => "server_shutdown",
            StoreError::Statement { code, .. } if code.starts_with("42") => "schema",
            StoreError::Statement { .. } => "statement",
            StoreError::Schema(_) => "schema",
            StoreError::Other(_) => "other",
        }
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(err: sqlx::Error) -> Self {
        match &err {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::WorkerCrashed => StoreError::Connection(err),
            sqlx::Error::Database(db) => match db.code() {
                Some(code) if code == "42P01" || code == "42703" => {
                    StoreError::Schema(db.message().to_string())
                }
                Some(code) => StoreError::Statement {
                    code: code.into_owned(),
                    source: err,
                },
                None => StoreError::Other(err),
            },
            _ => StoreError::Other(err),
        }
    }
}

fn connect_options(settings: &DatabaseSettings) -> Result<PgConnectOptions, sqlx::Error> {
    let mut options: PgConnectOptions = settings.url.expose().parse()?;
    options = options
        .application_name("outbox-relay")
        .log_statements(tracing::log::LevelFilter::Debug)
        .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_secs(2));
    if !settings.statement_timeout.is_zero() {
        options = options.options([(
            "statement_timeout",
            settings.statement_timeout.as_millis().to_string(),
        )]);
    }
    Ok(options)
}

/// Opens and closes one connection, so that the error says why it failed.
pub async fn probe(settings: &DatabaseSettings) -> Result<(), StoreError> {
    let connection = connect_options(settings)?.connect().await?;
    connection.close().await?;
    Ok(())
}

/// Builds the pool. Connections are opened lazily so a relay can start while the database
/// is still coming up; the first statement says whether it is reachable.
pub fn connect_lazy(settings: &DatabaseSettings) -> Result<PgPool, sqlx::Error> {
    let options = connect_options(settings)?;
    Ok(PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(settings.connect_timeout)
        .connect_lazy_with(options))
}

/// The outbox as the relay sees it.
#[derive(Clone)]
pub struct Store {
    pool: PgPool,
}

impl Store {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub async fn migrate(&self) -> Result<(), sqlx::migrate::MigrateError> {
        MIGRATOR.run(&self.pool).await
    }

    /// Installs or removes the optional statement-level doorbell trigger.
    pub async fn set_notify_trigger(&self, enabled: bool) -> Result<(), StoreError> {
        sqlx::query("SELECT outbox_enable_notify($1)")
            .bind(enabled)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The next pending rows in id order. A row whose aggregate has an earlier parked row
    /// waits behind it unless the policy is `skip`.
    pub async fn read_pending(
        &self,
        limit: u32,
        policy: ParkPolicy,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT o.id, o.aggregate_type, o.aggregate_id, o.event_type, \
                    o.payload::text AS payload_json, o.payload_bytes, \
                    o.headers::text AS headers_json, o.topic, o.event_id, o.created_at \
             FROM outbox o \
             WHERE o.sent_at IS NULL AND o.parked_at IS NULL \
               AND ($2 OR NOT EXISTS ( \
                     SELECT 1 FROM outbox p \
                     WHERE p.parked_at IS NOT NULL AND p.sent_at IS NULL \
                       AND p.aggregate_id = o.aggregate_id AND p.id < o.id)) \
             ORDER BY o.id \
             LIMIT $1",
        )
        .bind(i64::from(limit))
        .bind(policy == ParkPolicy::Skip)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(OutboxRow {
                    id: r.try_get("id")?,
                    aggregate_type: r.try_get("aggregate_type")?,
                    aggregate_id: r.try_get("aggregate_id")?,
                    event_type: r.try_get("event_type")?,
                    payload_json: r.try_get("payload_json")?,
                    payload_bytes: r.try_get("payload_bytes")?,
                    headers_json: r.try_get("headers_json")?,
                    topic: r.try_get("topic")?,
                    event_id: r.try_get("event_id")?,
                    created_at: r.try_get("created_at")?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    /// Marks acknowledged rows sent with where the broker put them. Returns rows changed.
    pub async fn mark_sent(&self, acks: &[Ack]) -> Result<u64, StoreError> {
        if acks.is_empty() {
            return Ok(0);
        }
        let ids: Vec<i64> = acks.iter().map(|a| a.id).collect();
        let partitions: Vec<i32> = acks.iter().map(|a| a.partition).collect();
        let offsets: Vec<i64> = acks.iter().map(|a| a.offset).collect();
        let done = sqlx::query(
            "UPDATE outbox o \
             SET sent_at = now(), kafka_partition = a.partition, kafka_offset = a.kafka_offset \
             FROM unnest($1::bigint[], $2::int[], $3::bigint[]) AS a(id, partition, kafka_offset) \
             WHERE o.id = a.id AND o.sent_at IS NULL",
        )
        .bind(&ids)
        .bind(&partitions)
        .bind(&offsets)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// Deletes acknowledged rows (delete mode). Returns rows deleted.
    pub async fn delete_sent(&self, acks: &[Ack]) -> Result<u64, StoreError> {
        if acks.is_empty() {
            return Ok(0);
        }
        let ids: Vec<i64> = acks.iter().map(|a| a.id).collect();
        let done = sqlx::query("DELETE FROM outbox WHERE id = ANY($1::bigint[])")
            .bind(&ids)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    /// Parks rows that can never be published, with their reasons.
    pub async fn park(&self, parked: &[Parking]) -> Result<u64, StoreError> {
        if parked.is_empty() {
            return Ok(0);
        }
        let ids: Vec<i64> = parked.iter().map(|p| p.id).collect();
        let reasons: Vec<&str> = parked.iter().map(|p| p.reason).collect();
        let errors: Vec<&str> = parked.iter().map(|p| p.error.as_str()).collect();
        let done = sqlx::query(
            "UPDATE outbox o \
             SET parked_at = now(), park_reason = p.reason, park_error = p.error \
             FROM unnest($1::bigint[], $2::text[], $3::text[]) AS p(id, reason, error) \
             WHERE o.id = p.id AND o.sent_at IS NULL AND o.parked_at IS NULL",
        )
        .bind(&ids)
        .bind(&reasons)
        .bind(&errors)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// Pending and parked counts and the age of the oldest pending row.
    pub async fn backlog_stats(&self) -> Result<BacklogStats, StoreError> {
        let row = sqlx::query(
            "SELECT \
               (SELECT count(*) FROM outbox WHERE sent_at IS NULL AND parked_at IS NULL) AS pending, \
               (SELECT EXTRACT(EPOCH FROM (clock_timestamp() - created_at))::float8 \
                  FROM outbox WHERE sent_at IS NULL AND parked_at IS NULL \
                  ORDER BY id LIMIT 1) AS oldest_age, \
               (SELECT count(*) FROM outbox WHERE parked_at IS NOT NULL AND sent_at IS NULL) AS parked",
        )
        .fetch_one(&self.pool)
        .await?;
        let oldest: Option<f64> = row.try_get("oldest_age")?;
        Ok(BacklogStats {
            pending_rows: row.try_get("pending")?,
            oldest_pending_age: oldest.map(|s| Duration::from_secs_f64(s.max(0.0))),
            parked_rows: row.try_get("parked")?,
        })
    }

    /// Confirms the database answers and the outbox table has the relay's columns.
    pub async fn verify_schema(&self) -> Result<String, StoreError> {
        let version: String = sqlx::query_scalar("SHOW server_version")
            .fetch_one(&self.pool)
            .await?;
        sqlx::query(
            "SELECT id, aggregate_type, aggregate_id, event_type, payload, payload_bytes, \
                    headers, topic, event_id, created_at, sent_at, kafka_partition, \
                    kafka_offset, parked_at, park_reason, park_error \
             FROM outbox LIMIT 0",
        )
        .execute(&self.pool)
        .await?;
        Ok(version)
    }
}
