//! All SQL the relay runs. Reads never hold a transaction open; every mark, delete or park
//! is one set-based statement per batch that only touches rows still pending, so a
//! repeated mark is harmless and a sent row is never un-sent.

use std::time::Duration;
use tracing::{error, warn};

use chrono::{DateTime, Utc};
use futures_util::TryStreamExt;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgArguments, PgConnection, PgRow};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::query::{Query, QueryScalar};
use sqlx::{Column, ConnectOptions, Connection, FromRow, Postgres, Row, Transaction};

use crate::config::DatabaseSettings;
use crate::model::{Mode, OutboxRow, ParkPolicy};

/// The migrations in `migrations/`, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// How much one read may fetch: rows, bytes in all, and bytes of one row's payload or
/// headers (a larger one is measured in SQL and never fetched).
#[derive(Debug, Clone, Copy)]
pub struct ReadLimits {
    pub rows: u32,
    pub batch_bytes: usize,
    pub row_bytes: usize,
}

/// Where the broker stored an acknowledged row, and the lease epoch it was read under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    pub id: i64,
    pub partition: i32,
    pub offset: i64,
    pub shard: i16,
    pub epoch: i64,
}

/// A replica as `status` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReplicaStatus {
    pub replica_id: String,
    pub live: bool,
    pub started_at: DateTime<Utc>,
    pub heartbeat_age_seconds: f64,
    pub shards: i64,
    /// Age of the least recently renewed of its leases.
    pub oldest_lease_renewal_seconds: Option<f64>,
}

/// A row to park, with its bounded reason kind and the full explanation.
#[derive(Debug, Clone)]
pub struct Parking {
    pub id: i64,
    pub reason: &'static str,
    pub error: String,
}

/// A parked row, as `parked list` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ParkedRow {
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

/// Database errors, each able to say whether retrying can help. The display carries the
/// database's own message once; there is no source chain to repeat it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database unreachable or connection lost: {0}")]
    Connection(sqlx::Error),
    #[error("database refused the statement (SQLSTATE {code}): {message}")]
    Statement { code: String, message: String },
    #[error(
        "the outbox table is missing or incomplete ({0}); run `outbox-relay migrate`, or set database.schema to the schema holding it and grant the relay's role USAGE on that schema"
    )]
    Schema(String),
    #[error("database error: {0}")]
    Other(sqlx::Error),
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
    /// Bounded label for metrics; one of [`ERROR_KINDS`].
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

/// Every label [`StoreError::kind`] can return.
pub const ERROR_KINDS: &[&str] = &[
    "connection",
    "read_only",
    "statement_timeout",
    "server_shutdown",
    "schema",
    "statement",
    "other",
];

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
                    message: db.message().to_string(),
                },
                None => StoreError::Other(err),
            },
            _ => StoreError::Other(err),
        }
    }
}

/// One row of `read_pending`'s answer, by position. With `check_types` each column's type
/// is first compared with its field's; without, the value is decoded as it comes, which is
/// for the rows after the first, whose column types are the same.
fn decode_pending(r: &PgRow, check_types: bool) -> Result<OutboxRow, sqlx::Error> {
    fn get<'r, T>(r: &'r PgRow, column: usize, check_types: bool) -> Result<T, sqlx::Error>
    where
        T: sqlx::Decode<'r, Postgres> + sqlx::Type<Postgres>,
    {
        if check_types {
            r.try_get(column)
        } else {
            r.try_get_unchecked(column)
        }
    }
    // Text arrives as the database stores it: in a SQL_ASCII database it need not be
    // UTF-8. Such a value is kept (lossily, so the row still has an aggregate) and the row
    // marked undecodable, to be parked instead of failing the whole read.
    let mut undecodable = None;
    let mut text = |column: usize, name: &'static str| -> Result<Option<String>, sqlx::Error> {
        if check_types {
            // Text, or the bytes of text (the raw read).
            let ty = r.column(column).type_info();
            if !<String as sqlx::Type<Postgres>>::compatible(ty)
                && !<Vec<u8> as sqlx::Type<Postgres>>::compatible(ty)
            {
                return r.try_get::<Option<String>, _>(column);
            }
        }
        let Some(bytes) = r.try_get_unchecked::<Option<&[u8]>, _>(column)? else {
            return Ok(None);
        };
        Ok(Some(match std::str::from_utf8(bytes) {
            Ok(text) => text.to_owned(),
            Err(_) => {
                undecodable.get_or_insert(name);
                String::from_utf8_lossy(bytes).into_owned()
            }
        }))
    };
    let aggregate_type = text(1, "aggregate_type")?.unwrap_or_default();
    let aggregate_id = text(2, "aggregate_id")?.unwrap_or_default();
    let event_type = text(3, "event_type")?.unwrap_or_default();
    let payload_json = text(4, "payload")?;
    let headers_json = text(6, "headers")?;
    let topic = text(7, "topic")?;
    Ok(OutboxRow {
        id: get(r, 0, check_types)?,
        aggregate_type,
        aggregate_id,
        event_type,
        payload_json,
        payload_bytes: get(r, 5, check_types)?,
        headers_json,
        topic,
        undecodable,
        event_id: get(r, 8, check_types)?,
        created_at: get(r, 9, check_types)?,
        shard: get(r, 10, check_types)?,
        withheld_bytes: get(r, 11, check_types)?,
        aggregate_hash: get(r, 12, check_types)?,
    })
}

fn connect_options(settings: &DatabaseSettings) -> Result<PgConnectOptions, sqlx::Error> {
    let mut options: PgConnectOptions = settings.url.expose().parse()?;
    options = options
        .application_name("outbox-relay")
        .statement_cache_capacity(settings.statement_cache_capacity)
        .log_statements(tracing::log::LevelFilter::Debug)
        .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_secs(2));
    // A transaction-mode pooler refuses the `options` startup parameter: set the timeout
    // and the search_path on the role there (ALTER ROLE ... SET). Its unnamed statements
    // are planned with their parameters every time anyway.
    if !settings.transaction_pooler {
        // Batches bind arrays of ids: a generic plan guesses 10 elements and, for the
        // mark, chose a nested loop comparing every id with every other (260 ms per 1000
        // rows instead of 15 ms). Plans made with the real arrays cost well under 1 ms.
        let mut startup = vec![("plan_cache_mode", "force_custom_plan".to_string())];
        // pg_catalog is searched first when the path does not name it, so a function or
        // operator with a built-in's exact signature resolves to the built-in; functions
        // whose built-in is polymorphic (width_bucket) are also called by their qualified
        // name, which an exact-typed impostor would otherwise beat. `unnest` of several
        // arrays stays unqualified: the parser expands only that spelling, into
        // pg_catalog.unnest of each array.
        startup.push(("search_path", format!("\"{}\"", settings.schema)));
        if !settings.statement_timeout.is_zero() {
            startup.push((
                "statement_timeout",
                settings.statement_timeout.as_millis().to_string(),
            ));
        }
        options = options.options(startup);
    }
    Ok(options)
}

/// Opens and closes one connection, so that the error says why it failed.
pub async fn probe(settings: &DatabaseSettings) -> Result<(), StoreError> {
    let connection = connect_options(settings)?.connect().await?;
    connection.close().await?;
    Ok(())
}

/// The distinct (shard, epoch) leases a batch of acks was read under, sorted.
pub fn leases_of(acks: &[Ack]) -> Vec<(i16, i64)> {
    let mut pairs: Vec<(i16, i64)> = acks.iter().map(|a| (a.shard, a.epoch)).collect();
    pairs.sort_unstable();
    pairs.dedup();
    pairs
}

/// (shard, epoch) pairs as the two arrays the lease statements bind.
fn split_leases(leases: &[(i16, i64)]) -> (Vec<i16>, Vec<i64>) {
    leases.iter().copied().unzip()
}

/// Rows of `shard, epoch` as pairs.
fn lease_pairs(rows: &[PgRow]) -> Result<Vec<(i16, i64)>, StoreError> {
    rows.iter()
        .map(|r| Ok((r.try_get("shard")?, r.try_get("epoch")?)))
        .collect::<Result<_, sqlx::Error>>()
        .map_err(StoreError::from)
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

/// A pool of one connection for the doorbell's LISTEN session, which it holds for good:
/// kept apart from the relay's pool so that `max_connections` counts only the connections
/// that read, mark and renew leases.
pub fn listener_pool(settings: &DatabaseSettings) -> Result<PgPool, sqlx::Error> {
    let options = connect_options(settings)?;
    Ok(PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(settings.connect_timeout)
        .connect_lazy_with(options))
}

/// The outbox as the relay sees it.
#[derive(Clone)]
pub struct Store {
    pool: PgPool,
    /// Behind a transaction-mode pooler (PgBouncer): every statement runs in its own
    /// explicit transaction with unnamed prepared statements, so the statement and its
    /// execution stay on one server connection and nothing outlives it.
    transaction_pooler: bool,
}

/// One connection for one store call: a plain pooled connection, or an explicit
/// transaction behind a transaction-mode pooler.
enum Session {
    Plain(PoolConnection<Postgres>),
    Transaction(Transaction<'static, Postgres>),
}

impl Session {
    fn conn(&mut self) -> &mut PgConnection {
        match self {
            Session::Plain(conn) => conn,
            Session::Transaction(tx) => tx,
        }
    }

    /// Commits after success; dropping the transaction after a failure rolls it back.
    async fn finish<T>(self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        let value = result?;
        if let Session::Transaction(tx) = self {
            tx.commit().await?;
        }
        Ok(value)
    }
}

/// Pending rows are counted exactly up to this many; beyond, they are estimated. Counting
/// runs every `relay.stats_interval` on every replica: a million pending rows took 160 to
/// 480 ms per count in the benchmark, a hundred thousand a tenth of that.
pub const EXACT_PENDING_UP_TO: i64 = 100_000;

/// The mark: one UPDATE of `outbox` by id, with no join. Each row finds its partition and
/// offset by binary search (`width_bucket`) in the ids, which are sorted and distinct.
///
/// Joining the rows with `unnest` of the acks instead leaves the join order to estimates
/// that are wrong exactly when it matters: with most rows sent, `sent_at IS NULL` looks
/// rare, the planner expects one row, and it rescans the 1000 acks for every row marked
/// (400 ms per batch instead of 15).
///
/// The fence is a sorted array of the shards still held under the epochs the rows were
/// read with; each row finds its shard in it by binary search too (a plain `= ANY` of a
/// computed array searches it linearly: about 128 comparisons per row when one replica
/// holds all 256 shards).
pub const MARK_SENT: &str = "WITH fence AS ( \
     SELECT l.shard FROM outbox_shard_lease l \
     JOIN unnest($4::smallint[], $5::bigint[]) AS f(shard, epoch) \
       ON l.shard = f.shard AND l.epoch = f.epoch \
     WHERE l.owner = $6 \
     ORDER BY l.shard \
     FOR SHARE OF l) \
 UPDATE outbox o \
 SET sent_at = pg_catalog.now(), \
     kafka_partition = ($2::int[])[pg_catalog.width_bucket(o.id, $1::bigint[])], \
     kafka_offset = ($3::bigint[])[pg_catalog.width_bucket(o.id, $1::bigint[])] \
 WHERE o.id = ANY($1::bigint[]) AND o.sent_at IS NULL \
   AND o.shard = (ARRAY(SELECT shard FROM fence ORDER BY shard)) \
       [pg_catalog.width_bucket(o.shard, ARRAY(SELECT shard FROM fence ORDER BY shard))]";

/// A text column's value (as `$value`) when it is at most the read's per-row limit (`$8`),
/// NULL otherwise: its stored size decides first, so that a small value is never measured
/// and a large one never sent.
macro_rules! fetched {
    ($column:literal, $value:literal) => {
        concat!(
            "CASE WHEN pg_catalog.pg_column_size(",
            $column,
            ") <= 8192 \
                    OR pg_catalog.octet_length(",
            $column,
            ") <= $8 \
                  THEN ",
            $value,
            " END"
        )
    };
}

/// The `withheld_bytes` arm of a text column [`fetched!`] leaves out: its length.
macro_rules! withheld {
    ($column:literal) => {
        concat!(
            "WHEN pg_catalog.pg_column_size(",
            $column,
            ") > 8192 \
               AND pg_catalog.octet_length(",
            $column,
            ") > $8 \
               THEN pg_catalog.octet_length(",
            $column,
            ") "
        )
    };
}

/// The pending rows of one side of the skipped run, without the skipped ids on that side
/// (`o.id < $5` without `$4`, then `o.id > $6` without `$7`); the two sides are merged in
/// id order. Written out twice because a range is what lets the index step over the run.
macro_rules! read_pending_side {
    ($side:literal) => {
        read_pending_side!(
            concat!(
                fetched!("o.aggregate_type", "o.aggregate_type"),
                " AS aggregate_type, ",
                fetched!("o.aggregate_id", "o.aggregate_id"),
                " AS aggregate_id, ",
                fetched!("o.event_type", "o.event_type"),
                " AS event_type, "
            ),
            "o.payload::text",
            "o.headers::text",
            fetched!("o.topic", "o.topic"),
            $side
        )
    };
    (raw $side:literal) => {
        read_pending_side!(
            concat!(
                fetched!(
                    "o.aggregate_type",
                    "pg_catalog.convert_to(o.aggregate_type, 'SQL_ASCII')"
                ),
                " AS aggregate_type, ",
                fetched!(
                    "o.aggregate_id",
                    "pg_catalog.convert_to(o.aggregate_id, 'SQL_ASCII')"
                ),
                " AS aggregate_id, ",
                fetched!(
                    "o.event_type",
                    "pg_catalog.convert_to(o.event_type, 'SQL_ASCII')"
                ),
                " AS event_type, "
            ),
            "pg_catalog.convert_to(o.payload::text, 'SQL_ASCII')",
            "pg_catalog.convert_to(o.headers::text, 'SQL_ASCII')",
            fetched!("o.topic", "pg_catalog.convert_to(o.topic, 'SQL_ASCII')"),
            $side
        )
    };
    ($names:expr, $payload:literal, $headers:literal, $topic:expr, $side:literal) => {
        concat!(
            "(SELECT o.id, ",
            $names,
            "CASE WHEN pg_catalog.pg_column_size(o.payload) <= 8192 \
                       OR pg_catalog.octet_length(o.payload::text) <= $8 \
                     THEN ",
            $payload,
            " END AS payload_json, \
                CASE WHEN pg_catalog.octet_length(o.payload_bytes) <= $8 \
                     THEN o.payload_bytes END AS payload_bytes, \
                CASE WHEN pg_catalog.pg_column_size(o.headers) <= 8192 \
                       OR pg_catalog.octet_length(o.headers::text) <= $8 \
                     THEN ",
            $headers,
            " END AS headers_json, ",
            $topic,
            " AS topic, o.event_id, \
                LEAST(GREATEST(o.created_at, '1970-01-01Z'::timestamptz), \
                      '9999-12-31Z'::timestamptz) AS created_at, \
                o.shard, \
                CASE WHEN pg_catalog.octet_length(o.payload_bytes) > $8 \
                       THEN pg_catalog.octet_length(o.payload_bytes) \
                     WHEN pg_catalog.pg_column_size(o.payload) > 8192 \
                       AND pg_catalog.octet_length(o.payload::text) > $8 \
                       THEN pg_catalog.octet_length(o.payload::text) \
                     WHEN pg_catalog.pg_column_size(o.headers) > 8192 \
                       AND pg_catalog.octet_length(o.headers::text) > $8 \
                       THEN pg_catalog.octet_length(o.headers::text) \
                     ",
            withheld!("o.aggregate_id"),
            withheld!("o.aggregate_type"),
            withheld!("o.event_type"),
            withheld!("o.topic"),
            " END::bigint AS withheld_bytes, \
                pg_catalog.hashtextextended(o.aggregate_id, 0) AS aggregate_hash \
             FROM outbox o \
             WHERE o.sent_at IS NULL AND o.parked_at IS NULL AND ",
            $side,
            " AND ($3::smallint[] IS NULL OR o.shard = ANY($3)) \
               AND ($9::bigint[] IS NULL \
                    OR pg_catalog.hashtextextended(o.aggregate_id, 0) <> ALL($9)) \
               AND ($2 \
                    OR NOT EXISTS ( \
                     SELECT 1 FROM outbox h \
                     WHERE h.parked_at IS NOT NULL AND h.discarded_at IS NULL \
                       AND h.sent_at IS NULL) \
                    OR NOT EXISTS ( \
                     SELECT 1 FROM outbox p \
                     WHERE p.parked_at IS NOT NULL AND p.discarded_at IS NULL \
                       AND p.sent_at IS NULL \
                       AND pg_catalog.hashtextextended(p.aggregate_id, 0) \
                           = pg_catalog.hashtextextended(o.aggregate_id, 0) \
                       AND p.aggregate_id = o.aggregate_id AND p.id < o.id)) \
             ORDER BY o.id \
             LIMIT $1)"
        )
    };
}

/// The read: pending rows in id order, without the skipped ids. The longest run of
/// consecutive skipped ids (`$5..=$6`) is left out by two index ranges, below and above
/// it, so its rows are never fetched; the other skipped ids are filtered row by row, each
/// side by its own list (`$4` below the run, `$7` above it), so that planning estimates
/// each skipped id once. With one replica the run is usually every row in flight
/// (filtering the whole skip list fetched and dropped up to two batches of rows per read);
/// with several, a replica's rows in flight are interleaved with other shards' ids and
/// most of them are filtered as before.
const READ_PENDING: &str = concat!(
    "SELECT * FROM (",
    read_pending_side!("o.id < $5::bigint AND o.id <> ALL($4::bigint[])"),
    " UNION ALL ",
    read_pending_side!("o.id > $6::bigint AND o.id <> ALL($7::bigint[])"),
    ") AS pending ORDER BY id LIMIT $1"
);

/// [`READ_PENDING`] with every text column as the bytes the database stores, for when
/// the server cannot send a row's text as UTF-8 (SQLSTATE 22021, a SQL_ASCII database):
/// decoding then finds the row and it is parked instead of failing every read.
const READ_PENDING_RAW: &str = concat!(
    "SELECT * FROM (",
    read_pending_side!(raw "o.id < $5::bigint AND o.id <> ALL($4::bigint[])"),
    " UNION ALL ",
    read_pending_side!(raw "o.id > $6::bigint AND o.id <> ALL($7::bigint[])"),
    ") AS pending ORDER BY id LIMIT $1"
);

/// Ids a read leaves out, as the longest run of consecutive ids (`run_first..=run_last`,
/// empty when `run_first > run_last`) and the others below and above it. Every id of the
/// run is in the skip list, so leaving out the range leaves out exactly those ids.
#[derive(Debug, PartialEq, Eq)]
struct SkipList {
    below: Vec<i64>,
    run_first: i64,
    run_last: i64,
    above: Vec<i64>,
}

impl SkipList {
    fn new(skip: &[i64]) -> Self {
        let mut ids = skip.to_vec();
        ids.sort_unstable();
        ids.dedup();
        // (start index, length) of the longest run.
        let (mut best, mut start) = ((0, 0), 0);
        for i in 0..ids.len() {
            if i > 0 && ids[i - 1].checked_add(1) != Some(ids[i]) {
                start = i;
            }
            if i + 1 - start > best.1 {
                best = (start, i + 1 - start);
            }
        }
        let (first, len) = best;
        if len == 0 {
            // An empty run: `id < MIN + 1` and `id > MIN` together cover every id.
            return Self {
                below: Vec::new(),
                run_first: i64::MIN + 1,
                run_last: i64::MIN,
                above: Vec::new(),
            };
        }
        let above = ids.split_off(first + len);
        let run = ids.split_off(first);
        Self {
            below: ids,
            run_first: run[0],
            run_last: run[len - 1],
            above,
        }
    }
}

impl Store {
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            transaction_pooler: false,
        }
    }

    /// A store for a database reached through a transaction-mode pooler.
    pub fn behind_transaction_pooler(pool: PgPool, transaction_pooler: bool) -> Self {
        Self {
            pool,
            transaction_pooler,
        }
    }

    /// The store for `settings`: a lazily connecting pool, pooler-aware.
    pub fn connect(settings: &DatabaseSettings) -> Result<Self, sqlx::Error> {
        Ok(Self::behind_transaction_pooler(
            connect_lazy(settings)?,
            settings.transaction_pooler,
        ))
    }

    async fn session(&self) -> Result<Session, StoreError> {
        Ok(if self.transaction_pooler {
            Session::Transaction(self.pool.begin().await?)
        } else {
            Session::Plain(self.pool.acquire().await?)
        })
    }

    fn query<'q>(&self, sql: &'q str) -> Query<'q, Postgres, PgArguments> {
        sqlx::query(sql).persistent(!self.transaction_pooler)
    }

    fn query_scalar<'q, O>(&self, sql: &'q str) -> QueryScalar<'q, Postgres, O, PgArguments>
    where
        (O,): for<'r> FromRow<'r, PgRow>,
    {
        sqlx::query_scalar(sql).persistent(!self.transaction_pooler)
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub async fn migrate(&self) -> Result<(), sqlx::migrate::MigrateError> {
        MIGRATOR.run(&self.pool).await
    }

    /// Installs or removes the optional statement-level doorbell trigger, which notifies
    /// `channel`.
    pub async fn set_notify_trigger(&self, enabled: bool, channel: &str) -> Result<(), StoreError> {
        let mut s = self.session().await?;
        let result: Result<_, StoreError> = async {
            self.query("SELECT outbox_enable_notify($1, $2)")
                .bind(enabled)
                .bind(channel)
                .execute(s.conn())
                .await?;
            Ok(())
        }
        .await;
        s.finish(result).await
    }

    /// The next pending rows in id order, leaving out `skip` (rows already sent whose mark
    /// has not committed yet). A row whose aggregate has an earlier parked row waits behind
    /// it unless the policy is `skip`. That check costs one probe of the parked index per
    /// row, so it is skipped, by one probe per side of the skipped run, while nothing is
    /// parked.
    ///
    /// A payload or headers object larger than `limits.row_bytes` is measured in SQL and
    /// not fetched ([`OutboxRow::withheld_bytes`]); a payload stored in at most 8 KB is
    /// fetched without measuring (its text is at most a few times that). The read stops
    /// after `limits.rows` rows, or after the row that takes it to `limits.batch_bytes`.
    pub async fn read_pending(
        &self,
        limits: ReadLimits,
        policy: ParkPolicy,
        shards: Option<&[i16]>,
        skip: &[i64],
    ) -> Result<Vec<OutboxRow>, StoreError> {
        self.read_pending_except(limits, policy, shards, skip, &[])
            .await
    }

    /// [`Store::read_pending`], leaving out every row of the aggregates whose
    /// [`OutboxRow::aggregate_hash`] is `held` (those waiting for a topic: reading them
    /// again and again would fill every batch; a row of another aggregate with the same
    /// hash waits with them).
    pub async fn read_pending_except(
        &self,
        limits: ReadLimits,
        policy: ParkPolicy,
        shards: Option<&[i16]>,
        skip: &[i64],
        held: &[i64],
    ) -> Result<Vec<OutboxRow>, StoreError> {
        let skip = SkipList::new(skip);
        let held = (!held.is_empty()).then_some(held);
        match self
            .read_pending_as(READ_PENDING, limits, policy, shards, &skip, held)
            .await
        {
            Err(StoreError::Statement { code, .. }) if code == "22021" => {
                self.read_pending_as(READ_PENDING_RAW, limits, policy, shards, &skip, held)
                    .await
            }
            read => read,
        }
    }

    async fn read_pending_as(
        &self,
        sql: &'static str,
        limits: ReadLimits,
        policy: ParkPolicy,
        shards: Option<&[i16]>,
        skip: &SkipList,
        held: Option<&[i64]>,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        let limit = limits.rows;
        let mut s = self.session().await?;
        let result: Result<_, StoreError> = async {
            let mut rows = self
                .query(sql)
                .bind(i64::from(limit))
                .bind(policy == ParkPolicy::Skip)
                .bind(shards)
                .bind(&skip.below)
                .bind(skip.run_first)
                .bind(skip.run_last)
                .bind(&skip.above)
                .bind(i64::try_from(limits.row_bytes).unwrap_or(i64::MAX))
                .bind(held)
                .fetch(s.conn());
            // Each row is decoded as it arrives, while the server still sends the rest.
            // By position, in the SELECT's order: a lookup by name hashes the name per
            // column per row. Every row of one answer has the same column types, so only
            // the first row's are checked against the Rust types (the check resolved each
            // column's type again per row, a fifth of the relay's decoding work).
            let mut decoded = Vec::with_capacity(limit.min(1024) as usize);
            let mut bytes = 0;
            while let Some(row) = rows.try_next().await? {
                let row = decode_pending(&row, decoded.is_empty())?;
                bytes += row.approximate_bytes();
                decoded.push(row);
                // Dropping the answer's stream here makes the connection skip the rest.
                if bytes >= limits.batch_bytes {
                    break;
                }
            }
            Ok(decoded)
        }
        .await;
        s.finish(result).await
    }

    /// Marks acknowledged rows sent with where the broker put them, but only rows of
    /// shards `replica` still holds under the epoch they were read with (the lease rows are
    /// share-locked, so a takeover waits for this statement or fences it). Returns rows
    /// changed.
    pub async fn mark_sent(&self, replica: &str, acks: &[Ack]) -> Result<u64, StoreError> {
        if acks.is_empty() {
            return Ok(0);
        }
        let mut s = self.session().await?;
        let result: Result<_, StoreError> = async {
            let mut by_id: Vec<&Ack> = acks.iter().collect();
            by_id.sort_by_key(|a| a.id);
            by_id.dedup_by_key(|a| a.id);
            let ids: Vec<i64> = by_id.iter().map(|a| a.id).collect();
            let partitions: Vec<i32> = by_id.iter().map(|a| a.partition).collect();
            let offsets: Vec<i64> = by_id.iter().map(|a| a.offset).collect();
            let (shards, epochs) = split_leases(&leases_of(acks));
            let done = self
                .query(MARK_SENT)
                .bind(&ids)
                .bind(&partitions)
                .bind(&offsets)
                .bind(&shards)
                .bind(&epochs)
                .bind(replica)
                .execute(s.conn())
                .await?;
            Ok(done.rows_affected())
        }
        .await;
        s.finish(result).await
    }

    /// Deletes acknowledged rows (delete mode), fenced like [`Store::mark_sent`].
    pub async fn delete_sent(&self, replica: &str, acks: &[Ack]) -> Result<u64, StoreError> {
        if acks.is_empty() {
            return Ok(0);
        }
        let mut s = self.session().await?;
        let result: Result<_, StoreError> = async {
            let ids: Vec<i64> = acks.iter().map(|a| a.id).collect();
            let (shards, epochs) = split_leases(&leases_of(acks));
            let done = self
                .query(
                    "WITH fence AS ( \
                     SELECT l.shard FROM outbox_shard_lease l \
                     JOIN unnest($2::smallint[], $3::bigint[]) AS f(shard, epoch) \
                       ON l.shard = f.shard AND l.epoch = f.epoch \
                     WHERE l.owner = $4 \
                     ORDER BY l.shard \
                     FOR SHARE OF l) \
                 DELETE FROM outbox o \
                 WHERE o.id = ANY($1::bigint[]) \
                   AND o.shard = (ARRAY(SELECT shard FROM fence ORDER BY shard)) \
                       [pg_catalog.width_bucket(o.shard, ARRAY(SELECT shard FROM fence ORDER BY shard))]",
                )
                .bind(&ids)
                .bind(&shards)
                .bind(&epochs)
                .bind(replica)
                .execute(s.conn())
                .await?;
            Ok(done.rows_affected())
        }
        .await;
        s.finish(result).await
    }

    /// Parks rows that can never be published, with their reasons. Returns the ids of the
    /// rows it parked: a row already sent, parked or gone is left as it is.
    pub async fn park(&self, parked: &[Parking]) -> Result<Vec<i64>, StoreError> {
        match self.park_together(parked).await {
            Err(err) if !err.is_retriable() && !parked.is_empty() => {
                // What a row holds must never stop the relay: find the row the statement
                // failed on by parking each alone.
                warn!(error = %err, rows = parked.len(), "parking rows together failed; parking each alone");
                let mut done = Vec::with_capacity(parked.len());
                for parking in parked {
                    done.extend(self.park_alone(parking).await?);
                }
                Ok(done)
            }
            result => result,
        }
    }

    /// Parks one row; if the database refuses its error text, parks it with a note
    /// instead, and if it refuses the row itself, leaves it pending and says so.
    async fn park_alone(&self, parking: &Parking) -> Result<Vec<i64>, StoreError> {
        let err = match self.park_together(std::slice::from_ref(parking)).await {
            Err(err) if !err.is_retriable() => err,
            result => return result,
        };
        let noted = Parking {
            id: parking.id,
            reason: parking.reason,
            error: format!(
                "the database refused this row's error text ({}); see the relay's log",
                err.kind()
            ),
        };
        match self.park_together(std::slice::from_ref(&noted)).await {
            Err(again) if !again.is_retriable() => {
                error!(row_id = parking.id, reason = parking.reason, error = %again, "the database refuses to park this row; it stays pending and its aggregate is retried");
                Ok(Vec::new())
            }
            result => {
                warn!(row_id = parking.id, error = %err, "the row's error text could not be stored; parked with a note");
                result
            }
        }
    }

    async fn park_together(&self, parked: &[Parking]) -> Result<Vec<i64>, StoreError> {
        if parked.is_empty() {
            return Ok(Vec::new());
        }
        let mut s = self.session().await?;
        let result: Result<_, StoreError> = async {
            // Sorted and distinct ids, so that each row finds its reason by binary search,
            // with no join to misplan (see MARK_SENT).
            let mut by_id: Vec<&Parking> = parked.iter().collect();
            by_id.sort_by_key(|p| p.id);
            by_id.dedup_by_key(|p| p.id);
            let ids: Vec<i64> = by_id.iter().map(|p| p.id).collect();
            let reasons: Vec<&str> = by_id.iter().map(|p| p.reason).collect();
            let errors: Vec<&str> = by_id.iter().map(|p| p.error.as_str()).collect();
            let done = self
                .query(
                    "UPDATE outbox o \
                 SET parked_at = pg_catalog.now(), \
                     park_reason = ($2::text[])[pg_catalog.width_bucket(o.id, $1::bigint[])], \
                     park_error = ($3::text[])[pg_catalog.width_bucket(o.id, $1::bigint[])] \
                 WHERE o.id = ANY($1::bigint[]) \
                   AND o.sent_at IS NULL AND o.parked_at IS NULL \
                 RETURNING o.id",
                )
                .bind(&ids)
                .bind(&reasons)
                .bind(&errors)
                .fetch_all(s.conn())
                .await?;
            done.iter()
                .map(|row| row.try_get::<i64, _>(0))
                .collect::<Result<Vec<i64>, _>>()
                .map_err(StoreError::from)
        }
        .await;
        s.finish(result).await
    }

    /// Pending and parked counts and the age of the oldest pending row. Pending rows are
    /// counted up to [`EXACT_PENDING_UP_TO`] and estimated beyond it.
    pub async fn backlog_stats(&self) -> Result<BacklogStats, StoreError> {
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
        let mut s = self.session().await?;
        let result: Result<_, StoreError> = async {
            let row = self.query(
                "SELECT \
                   (SELECT pg_catalog.count(*) FROM ( \
                      SELECT 1 FROM outbox WHERE sent_at IS NULL AND parked_at IS NULL LIMIT $1 + 1) c) \
                     AS counted, \
                   (SELECT reltuples::float8 FROM pg_catalog.pg_class \
                      WHERE oid = pg_catalog.to_regclass('outbox_pending_idx')) AS indexed_rows, \
                   (SELECT id FROM outbox WHERE sent_at IS NULL AND parked_at IS NULL \
                      ORDER BY id DESC LIMIT 1) AS newest_id, \
                   o.id AS oldest_id, \
                   EXTRACT(EPOCH FROM (pg_catalog.clock_timestamp() \
                       - LEAST(GREATEST(o.created_at, '1970-01-01Z'::timestamptz), \
                               pg_catalog.clock_timestamp())))::float8 AS oldest_age, \
                   (SELECT pg_catalog.count(*) FROM outbox \
                      WHERE parked_at IS NOT NULL AND discarded_at IS NULL AND sent_at IS NULL) AS parked \
                 FROM (SELECT 1) AS one \
                 LEFT JOIN LATERAL ( \
                   SELECT id, created_at FROM outbox WHERE sent_at IS NULL AND parked_at IS NULL \
                   ORDER BY id LIMIT 1) o ON true",
            )
            .bind(exact_up_to)
            .fetch_one(s.conn())
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
                oldest_pending_age: oldest.map(|s| Duration::try_from_secs_f64(s).unwrap_or_default()),
                parked_rows: row.try_get("parked")?,
            })
        }
        .await;
        s.finish(result).await
    }

    /// Records that `replica` is alive for `ttl` and returns the live replicas, sorted.
    pub async fn heartbeat(&self, replica: &str, ttl: Duration) -> Result<Vec<String>, StoreError> {
        let mut s = self.session().await?;
        let result: Result<_, StoreError> = async {
            let live: Vec<String> = self.query_scalar(
                "WITH me AS ( \
                     INSERT INTO outbox_replica (replica_id, heartbeat_at, expires_at) \
                     VALUES ($1, pg_catalog.now(), pg_catalog.now() + pg_catalog.make_interval(secs => $2)) \
                     ON CONFLICT (replica_id) DO UPDATE \
                     SET heartbeat_at = pg_catalog.now(), expires_at = pg_catalog.now() + pg_catalog.make_interval(secs => $2) \
                     RETURNING replica_id) \
                 SELECT replica_id FROM outbox_replica WHERE expires_at > pg_catalog.now() AND replica_id <> $1 \
                 UNION SELECT replica_id FROM me \
                 ORDER BY 1",
            )
            .bind(replica)
            .bind(ttl.as_secs_f64())
            .fetch_all(s.conn())
            .await?;
            Ok(live)
        }
        .await;
        s.finish(result).await
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
        let mut s = self.session().await?;
        let result: Result<_, StoreError> = async {
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
                .fetch_all(s.conn())
                .await?;
            lease_pairs(&rows)
        }
        .await;
        s.finish(result).await
    }

    /// Takes the wanted shards that nobody holds (or whose lease expired), each under a
    /// new epoch; returns those taken.
    pub async fn acquire_leases(
        &self,
        replica: &str,
        wanted: &[i16],
        ttl: Duration,
    ) -> Result<Vec<(i16, i64)>, StoreError> {
        let mut s = self.session().await?;
        let result: Result<_, StoreError> = async {
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
                .fetch_all(s.conn())
                .await?;
            lease_pairs(&rows)
        }
        .await;
        s.finish(result).await
    }

    /// Gives shards up at once, so another replica can take them without waiting.
    pub async fn release_leases(
        &self,
        replica: &str,
        leases: &[(i16, i64)],
    ) -> Result<u64, StoreError> {
        if leases.is_empty() {
            return Ok(0);
        }
        let mut s = self.session().await?;
        let result: Result<_, StoreError> = async {
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
                .execute(s.conn())
                .await?;
            Ok(done.rows_affected())
        }
        .await;
        s.finish(result).await
    }

    /// Parked rows still waiting for an operator, oldest first.
    pub async fn list_parked(
        &self,
        aggregate_id: Option<&str>,
        limit: i64,
    ) -> Result<Vec<ParkedRow>, StoreError> {
        let mut s = self.session().await?;
        let result: Result<_, StoreError> = async {
            let rows = self
                .query(
                    "SELECT id, aggregate_type, aggregate_id, event_type, event_id, \
                            LEAST(GREATEST(created_at, '1970-01-01Z'::timestamptz), \
                                  '9999-12-31Z'::timestamptz) AS created_at, \
                            parked_at, park_reason, park_error \
                     FROM outbox \
                     WHERE parked_at IS NOT NULL AND discarded_at IS NULL AND sent_at IS NULL \
                       AND ($1::text IS NULL OR aggregate_id = $1) \
                     ORDER BY id LIMIT $2",
                )
                .bind(aggregate_id)
                .bind(limit)
                .fetch_all(s.conn())
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
        }
        .await;
        s.finish(result).await
    }

    /// Ids of parked rows (all, or one aggregate's), in id order.
    pub async fn parked_ids(&self, aggregate_id: Option<&str>) -> Result<Vec<i64>, StoreError> {
        let mut s = self.session().await?;
        let result: Result<_, StoreError> = async {
            Ok(self
                .query_scalar(
                    "SELECT id FROM outbox \
                     WHERE parked_at IS NOT NULL AND discarded_at IS NULL AND sent_at IS NULL \
                       AND ($1::text IS NULL OR aggregate_id = $1) \
                     ORDER BY id",
                )
                .bind(aggregate_id)
                .fetch_all(s.conn())
                .await?)
        }
        .await;
        s.finish(result).await
    }

    /// Puts parked rows back in the queue. They keep their ids, so they are published in
    /// their original order, ahead of the later rows of their aggregates that waited.
    pub async fn replay_parked(&self, ids: &[i64]) -> Result<u64, StoreError> {
        let mut s = self.session().await?;
        let result: Result<_, StoreError> = async {
            let done = self
                .query(
                    "UPDATE outbox SET parked_at = NULL, park_reason = NULL, park_error = NULL \
                     WHERE id = ANY($1::bigint[]) AND parked_at IS NOT NULL \
                       AND discarded_at IS NULL AND sent_at IS NULL",
                )
                .bind(ids)
                .execute(s.conn())
                .await?;
            Ok(done.rows_affected())
        }
        .await;
        s.finish(result).await
    }

    /// Gives up on parked rows: they stay in the table for audit, with the reason, and no
    /// longer hold their aggregates back.
    pub async fn discard_parked(&self, ids: &[i64], reason: &str) -> Result<u64, StoreError> {
        let mut s = self.session().await?;
        let result: Result<_, StoreError> = async {
            let done = self
                .query(
                    "UPDATE outbox SET discarded_at = pg_catalog.now(), discard_reason = $2 \
                     WHERE id = ANY($1::bigint[]) AND parked_at IS NOT NULL \
                       AND discarded_at IS NULL AND sent_at IS NULL",
                )
                .bind(ids)
                .bind(reason)
                .execute(s.conn())
                .await?;
            Ok(done.rows_affected())
        }
        .await;
        s.finish(result).await
    }

    /// Which of these (shard, epoch) leases `replica` still holds in the database.
    pub async fn still_held(
        &self,
        replica: &str,
        leases: &[(i16, i64)],
    ) -> Result<Vec<(i16, i64)>, StoreError> {
        let (shards, epochs) = split_leases(leases);
        let mut s = self.session().await?;
        let result: Result<_, StoreError> = async {
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
                .fetch_all(s.conn())
                .await?;
            lease_pairs(&rows)
        }
        .await;
        s.finish(result).await
    }

    /// Removes `replica` from the live set (clean shutdown).
    pub async fn deregister(&self, replica: &str) -> Result<(), StoreError> {
        let mut s = self.session().await?;
        let result: Result<_, StoreError> = async {
            self.query("DELETE FROM outbox_replica WHERE replica_id = $1")
                .bind(replica)
                .execute(s.conn())
                .await?;
            Ok(())
        }
        .await;
        s.finish(result).await
    }

    /// How long until the first of these shards' current leases expires.
    pub async fn next_lease_expiry(&self, shards: &[i16]) -> Result<Option<Duration>, StoreError> {
        let mut s = self.session().await?;
        let result: Result<_, StoreError> = async {
            let seconds: Option<f64> = self
                .query_scalar(
                    "SELECT EXTRACT(EPOCH FROM (pg_catalog.min(expires_at) - pg_catalog.now()))::float8 \
                 FROM outbox_shard_lease \
                 WHERE shard = ANY($1::smallint[]) AND expires_at > pg_catalog.now()",
                )
                .bind(shards)
                .fetch_one(s.conn())
                .await?;
            Ok(seconds.map(|s| Duration::try_from_secs_f64(s).unwrap_or_default()))
        }
        .await;
        s.finish(result).await
    }

    /// Replicas known to the outbox and how many shards each holds.
    pub async fn replica_status(&self) -> Result<(Vec<ReplicaStatus>, i64), StoreError> {
        let mut s = self.session().await?;
        let result: Result<_, StoreError> = async {
            let rows = self
                .query(
                    "SELECT r.replica_id, r.expires_at > pg_catalog.now() AS live, r.started_at, \
                        EXTRACT(EPOCH FROM (pg_catalog.now() - r.heartbeat_at))::float8 AS heartbeat_age, \
                        pg_catalog.count(l.shard) AS shards, \
                        EXTRACT(EPOCH FROM (pg_catalog.now() - pg_catalog.min(l.renewed_at)))::float8 AS oldest_renewal \
                 FROM outbox_replica r \
                 LEFT JOIN outbox_shard_lease l \
                   ON l.owner = r.replica_id AND l.expires_at > pg_catalog.now() \
                 GROUP BY r.replica_id, r.expires_at, r.started_at, r.heartbeat_at \
                 ORDER BY r.replica_id",
                )
                .fetch_all(s.conn())
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
                    })
                })
                .collect::<Result<Vec<_>, sqlx::Error>>()?;
            let unowned: i64 = self
                .query_scalar(
                    "SELECT pg_catalog.count(*) FROM outbox_shard_lease \
                 WHERE owner IS NULL OR expires_at IS NULL OR expires_at <= pg_catalog.now()",
                )
                .fetch_one(s.conn())
                .await?;
            Ok((replicas, unowned))
        }
        .await;
        s.finish(result).await
    }

    /// Confirms the database answers and the outbox table has the relay's columns.
    /// Who, besides the owner of the outbox's schema (and its members) and superusers, may
    /// create in that schema: `PUBLIC` alone when everyone may. Any of them could plant a
    /// table, function or operator the relay's statements would resolve to.
    pub async fn schema_creators(&self) -> Result<Vec<String>, StoreError> {
        let mut s = self.session().await?;
        let result: Result<_, StoreError> = async {
            Ok(self
                .query_scalar(
                    "WITH s AS (SELECT oid, nspowner, nspacl FROM pg_catalog.pg_namespace \
                                WHERE nspname = pg_catalog.current_schema()), \
                     public_may AS (SELECT 1 FROM s, pg_catalog.aclexplode(s.nspacl) a \
                                    WHERE a.grantee = 0::oid \
                                      AND a.privilege_type = 'CREATE'::text) \
                     SELECT 'PUBLIC'::text FROM public_may \
                     UNION ALL \
                     (SELECT r.rolname::text FROM s, pg_catalog.pg_roles r \
                      WHERE NOT EXISTS (SELECT 1 FROM public_may) \
                        AND NOT r.rolsuper AND r.rolname::text !~ '^pg_'::text \
                        AND NOT pg_catalog.pg_has_role(r.oid, s.nspowner, 'MEMBER') \
                        AND pg_catalog.has_schema_privilege(r.oid, s.oid, 'CREATE') \
                      ORDER BY 1)",
                )
                .fetch_all(s.conn())
                .await?)
        }
        .await;
        s.finish(result).await
    }

    /// The privileges `run` needs in `mode` that the connected role lacks, each written
    /// as a grant (`UPDATE (sent_at) ON outbox`). Checked at start: a relay that can
    /// publish but not mark would resend its first batch on every restart.
    pub async fn missing_grants(&self, mode: Mode) -> Result<Vec<String>, StoreError> {
        let mut needed: Vec<(&str, &str, &str)> = Vec::new();
        let mut need = |privilege, table, columns: &[&'static str]| {
            if columns.is_empty() {
                needed.push((table, "", privilege));
            }
            for column in columns {
                needed.push((table, column, privilege));
            }
        };
        need("SELECT", "outbox", &[]);
        need(
            "UPDATE",
            "outbox",
            &["parked_at", "park_reason", "park_error"],
        );
        match mode {
            Mode::Mark => need(
                "UPDATE",
                "outbox",
                &["sent_at", "kafka_partition", "kafka_offset"],
            ),
            Mode::Delete => need("DELETE", "outbox", &[]),
        }
        need("SELECT", "outbox_shard_lease", &[]);
        need(
            "UPDATE",
            "outbox_shard_lease",
            &["owner", "epoch", "expires_at", "acquired_at", "renewed_at"],
        );
        need("SELECT", "outbox_replica", &[]);
        need(
            "INSERT",
            "outbox_replica",
            &["replica_id", "heartbeat_at", "expires_at"],
        );
        need("UPDATE", "outbox_replica", &["heartbeat_at", "expires_at"]);
        need("DELETE", "outbox_replica", &[]);
        let (tables, rest): (Vec<&str>, Vec<(&str, &str)>) =
            needed.iter().map(|(t, c, p)| (*t, (*c, *p))).unzip();
        let (columns, privileges): (Vec<&str>, Vec<&str>) = rest.into_iter().unzip();
        let mut s = self.session().await?;
        let result: Result<Vec<(String, String, String)>, StoreError> = async {
            let rows = self
                .query(
                    "SELECT t, c, p FROM unnest($1::text[], $2::text[], $3::text[])                          WITH ORDINALITY AS g(t, c, p, n)                      WHERE NOT CASE WHEN c = '' THEN pg_catalog.has_table_privilege(t, p)                                     ELSE pg_catalog.has_column_privilege(t, c, p) END                      ORDER BY n",
                )
                .bind(&tables)
                .bind(&columns)
                .bind(&privileges)
                .fetch_all(s.conn())
                .await?;
            rows.iter()
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
                .collect::<Result<Vec<_>, sqlx::Error>>()
                .map_err(StoreError::from)
        }
        .await;
        let missing = s.finish(result).await?;
        // One grant per privilege and table, its columns together.
        let mut grants: Vec<(String, String, Vec<String>)> = Vec::new();
        for (table, column, privilege) in missing {
            match grants
                .iter_mut()
                .find(|(t, p, _)| *t == table && *p == privilege)
            {
                Some((_, _, cols)) if !column.is_empty() => cols.push(column),
                Some(_) => {}
                None => grants.push((
                    table,
                    privilege,
                    if column.is_empty() {
                        vec![]
                    } else {
                        vec![column]
                    },
                )),
            }
        }
        Ok(grants
            .into_iter()
            .map(|(table, privilege, cols)| {
                if cols.is_empty() {
                    format!("{privilege} ON {table}")
                } else {
                    format!("{privilege} ({}) ON {table}", cols.join(", "))
                }
            })
            .collect())
    }

    pub async fn verify_schema(&self) -> Result<String, StoreError> {
        let mut s = self.session().await?;
        let result: Result<_, StoreError> = async {
            let version: String = self
                .query_scalar("SHOW server_version")
                .fetch_one(s.conn())
                .await?;
            self.query(
                "SELECT id, aggregate_type, aggregate_id, event_type, payload, payload_bytes, \
                        headers, topic, event_id, created_at, sent_at, kafka_partition, \
                        kafka_offset, parked_at, park_reason, park_error, shard, discarded_at \
                 FROM outbox LIMIT 0",
            )
            .execute(s.conn())
            .await?;
            self.query("SELECT shard, owner, epoch, expires_at FROM outbox_shard_lease LIMIT 0")
                .execute(s.conn())
                .await?;
            Ok(version)
        }
        .await;
        s.finish(result).await
    }
}

#[cfg(test)]
mod tests {
    use super::SkipList;

    fn skip(ids: &[i64]) -> SkipList {
        SkipList::new(ids)
    }

    #[test]
    fn no_skipped_ids_leave_out_no_range() {
        let s = skip(&[]);
        assert!(s.run_first > s.run_last);
        assert!(s.below.is_empty() && s.above.is_empty());
        // The two sides `id < run_first` and `id > run_last` cover every id.
        assert_eq!(s.run_first, s.run_last + 1);
    }

    #[test]
    fn two_adjacent_batches_are_one_range() {
        let ids: Vec<i64> = (1001..=3000).rev().collect();
        assert_eq!(
            skip(&ids),
            SkipList {
                below: vec![],
                run_first: 1001,
                run_last: 3000,
                above: vec![],
            }
        );
    }

    #[test]
    fn the_longest_run_is_a_range_and_the_rest_are_listed() {
        assert_eq!(
            skip(&[40, 7, 10, 11, 12, 13, 20, 21, 12, 5]),
            SkipList {
                below: vec![5, 7],
                run_first: 10,
                run_last: 13,
                above: vec![20, 21, 40],
            }
        );
    }

    #[test]
    fn a_single_id_is_a_run_of_one() {
        assert_eq!(
            skip(&[42]),
            SkipList {
                below: vec![],
                run_first: 42,
                run_last: 42,
                above: vec![],
            }
        );
    }

    #[test]
    fn ids_at_the_ends_of_the_range_do_not_overflow() {
        assert_eq!(
            skip(&[i64::MAX, i64::MAX - 1, i64::MIN]),
            SkipList {
                below: vec![i64::MIN],
                run_first: i64::MAX - 1,
                run_last: i64::MAX,
                above: vec![],
            }
        );
    }
}
