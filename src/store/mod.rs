//! All SQL the relay runs, behind one `Store`. Every statement runs through one session
//! helper ([`Store::in_session`]), which commits behind a transaction-mode pooler; the
//! statements on the outbox table are built once from its quoted names ([`statements`]),
//! the lease fence and the "parked and still holding" predicate written once there.

use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgArguments, PgConnection, PgRow};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::query::{Query, QueryScalar};
use sqlx::{ConnectOptions, Connection, FromRow, Postgres, Transaction};

use crate::config::DatabaseSettings;

mod adopt;
mod error;
mod lease;
mod proof;
mod read;
mod retention;
mod schema;
mod statements;
mod status;
mod table;
mod write;

pub use adopt::{AdoptionPlan, Step};
pub(crate) use error::ERROR_KINDS;
pub use error::StoreError;
pub use proof::{LocatedRow, PROOF_PAGE_ROWS, RangeCensus, RowKey, SentRow, ValueDigest};
pub use read::ReadLimits;
pub use retention::{Pruned, Sweep};
pub use schema::MIGRATOR;
pub use schema::TriggerChange;
pub(crate) use schema::{DOORBELL_LOCK, doorbell_finding};
pub use status::BacklogStats;
pub(crate) use status::{EXACT_PENDING_UP_TO, ParkedFilter, ReplicaStatus};
pub use table::{OutboxTable, TableSpec};
pub(crate) use write::leases_of;
pub use write::{Ack, Parking};

use statements::Statements;

/// The outbox as the relay sees it.
#[derive(Clone)]
pub struct Store {
    pool: PgPool,
    /// Behind a transaction-mode pooler (PgBouncer): every statement runs in its own
    /// explicit transaction with unnamed prepared statements, so the statement and its
    /// execution stay on one server connection and nothing outlives it.
    transaction_pooler: bool,
    /// A table `[outbox]` names, to be checked against the catalog; `None` for the
    /// relay's own `outbox`.
    spec: Option<std::sync::Arc<TableSpec>>,
    /// The statements on the outbox table: built at once for the relay's own table, after
    /// [`Store::verify_schema`] has read the catalog for another.
    statements: std::sync::Arc<std::sync::OnceLock<std::sync::Arc<Statements>>>,
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

impl Store {
    /// A store of the relay's own `outbox`.
    pub fn new(pool: PgPool) -> Self {
        Self::behind_transaction_pooler(pool, false)
    }

    /// A store for a database reached through a transaction-mode pooler.
    pub(crate) fn behind_transaction_pooler(pool: PgPool, transaction_pooler: bool) -> Self {
        let statements = std::sync::OnceLock::new();
        let _ = statements.set(std::sync::Arc::new(Statements::new(OutboxTable::own())));
        Self {
            pool,
            transaction_pooler,
            spec: None,
            statements: std::sync::Arc::new(statements),
        }
    }

    /// The store for `settings`: a lazily connecting pool, pooler-aware.
    pub fn connect(settings: &DatabaseSettings) -> Result<Self, sqlx::Error> {
        Ok(Self::behind_transaction_pooler(
            connect_lazy(settings)?,
            settings.transaction_pooler,
        ))
    }

    /// The store of the outbox `settings` name: the relay's own, or the table `[outbox]`
    /// names.
    pub fn open(settings: &crate::config::Settings) -> Result<Self, sqlx::Error> {
        Ok(
            Self::connect(&settings.database)?.on_table(TableSpec::from_settings(
                &settings.outbox,
                &settings.database.schema,
            )),
        )
    }

    /// This store on the table `spec` names (checked by [`Store::verify_schema`]), or on
    /// the relay's own `outbox` when `None`.
    pub fn on_table(mut self, spec: Option<TableSpec>) -> Self {
        if let Some(spec) = spec {
            self.spec = Some(std::sync::Arc::new(spec));
            self.statements = std::sync::Arc::default();
        }
        self
    }

    /// Whether the outbox is a table `[outbox]` names, adopted by `migrate`.
    pub fn adopts_table(&self) -> bool {
        self.spec.is_some()
    }

    /// The statements on the outbox table, once it is known.
    fn sql(&self) -> Result<&Statements, StoreError> {
        self.statements.get().map(|s| &**s).ok_or_else(|| {
            StoreError::Schema(
                "the outbox table has not been checked against the catalog yet".into(),
            )
        })
    }

    /// The outbox table as people read it (`outbox`, `app.events`).
    pub fn table_display(&self) -> String {
        match (&self.spec, self.statements.get()) {
            (_, Some(sql)) => sql.table.display.clone(),
            (Some(spec), None) => spec.display(),
            (None, None) => "outbox".into(),
        }
    }

    /// The mark statement, for tests that ask the planner about it.
    pub fn mark_sent_statement(&self) -> Result<String, StoreError> {
        Ok(self.sql()?.mark_sent.clone())
    }

    /// Runs `work` on one connection of the pool and, behind a transaction-mode pooler,
    /// inside one transaction that commits only when `work` succeeds. Every statement of
    /// the store runs through here, so none can forget to commit (behind PgBouncer an
    /// unfinished transaction silently rolls a mark back).
    async fn in_session<T>(
        &self,
        work: impl AsyncFnOnce(&mut PgConnection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut session = self.session().await?;
        let result = work(session.conn()).await;
        session.finish(result).await
    }

    async fn session(&self) -> Result<Session, StoreError> {
        let session = if self.transaction_pooler {
            self.pool.begin().await.map(Session::Transaction)
        } else {
            self.pool.acquire().await.map(Session::Plain)
        };
        match session {
            Ok(session) => Ok(session),
            Err(err) => Err(self.connection_failure(err).await),
        }
    }

    /// Says why a connection could not be had: the pool only says that it timed out, so a
    /// connection is tried once more directly for the server's or the network's reason.
    async fn connection_failure(&self, err: sqlx::Error) -> StoreError {
        let options = self.pool.connect_options();
        let target = format!(
            "at {}:{}, database {}, as user {}",
            options.get_host(),
            options.get_port(),
            options.get_database().unwrap_or("(the user's name)"),
            options.get_username()
        );
        let cause = match err {
            sqlx::Error::PoolTimedOut => {
                let direct =
                    tokio::time::timeout(std::time::Duration::from_secs(5), options.connect())
                        .await;
                match direct {
                    Ok(Ok(connection)) => {
                        let _ = connection.close().await;
                        return StoreError::Connection(sqlx::Error::PoolTimedOut);
                    }
                    Ok(Err(cause)) => cause,
                    Err(_) => {
                        return StoreError::Unreachable {
                            target,
                            cause: "no answer within 5 s (a firewall, a wrong host, or a server that hangs)".into(),
                            retriable: true,
                        };
                    }
                }
            }
            other => other,
        };
        describe_connect_error(target, cause)
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

/// What a failed connection attempt means, in the words an operator acts on.
fn describe_connect_error(target: String, err: sqlx::Error) -> StoreError {
    let (cause, retriable) = match &err {
        sqlx::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => (
            "connection refused: nothing listens there (is PostgreSQL running, on that host and port?)".to_string(),
            true,
        ),
        sqlx::Error::Io(io) => (format!("{io}"), true),
        sqlx::Error::Tls(tls) => (format!("TLS failed: {tls}"), false),
        sqlx::Error::Database(db) => match db.code().as_deref() {
            Some("28P01") => (
                "authentication failed: the server wants a password for this user, and the one given is wrong or none was given (database.url, database.password_file, or else $PGPASSWORD, then ~/.pgpass)".to_string(),
                false,
            ),
            Some(code) if code.starts_with("28") => (
                format!("the server refused this user: {} (pg_hba.conf, or the role does not exist)", db.message()),
                false,
            ),
            Some("3D000") => (format!("{} (database.url names it)", db.message()), false),
            Some(code) if code.starts_with("57") || code.starts_with("53") => {
                (db.message().to_string(), true)
            }
            _ => return StoreError::from(err),
        },
        _ => return StoreError::from(err),
    };
    StoreError::Unreachable {
        target,
        cause,
        retriable,
    }
}

/// Builds the pool. Connections are opened lazily so a relay can start while the database
/// is still coming up; the first statement says whether it is reachable.
pub(crate) fn connect_lazy(settings: &DatabaseSettings) -> Result<PgPool, sqlx::Error> {
    let options = connect_options(settings)?;
    Ok(PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(settings.connect_timeout)
        .connect_lazy_with(options))
}

/// A pool of one connection for the doorbell's LISTEN session, which it holds for good:
/// kept apart from the relay's pool so that `max_connections` counts only the connections
/// that read, mark and renew leases.
pub(crate) fn listener_pool(settings: &DatabaseSettings) -> Result<PgPool, sqlx::Error> {
    let options = connect_options(settings)?;
    Ok(PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(settings.connect_timeout)
        // A released LISTEN session is closed, never reused: it may hold the doorbell's
        // advisory locks, or be half-way through a statement that timed out.
        .after_release(|_, _| Box::pin(async { Ok(false) }))
        .connect_lazy_with(options))
}
