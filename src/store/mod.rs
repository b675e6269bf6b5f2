//! All SQL the relay runs, behind one `Store`. Every statement runs through one session
//! helper ([`Store::in_session`]), which commits behind a transaction-mode pooler; the
//! lease fence and the "parked and still holding" predicate are written once
//! ([`sql`]), the latter shared with a migration's partial index by a test.

use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgArguments, PgConnection, PgRow};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::query::{Query, QueryScalar};
use sqlx::{ConnectOptions, Connection, FromRow, Postgres, Transaction};

use crate::config::DatabaseSettings;

#[macro_use]
mod sql;
mod error;
mod lease;
mod read;
mod retention;
mod schema;
mod status;
mod write;

pub(crate) use error::ERROR_KINDS;
pub use error::StoreError;
pub use read::ReadLimits;
pub use retention::Pruned;
pub use schema::MIGRATOR;
pub use status::BacklogStats;
pub(crate) use status::{EXACT_PENDING_UP_TO, ReplicaStatus};
pub(crate) use write::leases_of;
pub use write::{Ack, MARK_SENT, Parking};

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

impl Store {
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            transaction_pooler: false,
        }
    }

    /// A store for a database reached through a transaction-mode pooler.
    pub(crate) fn behind_transaction_pooler(pool: PgPool, transaction_pooler: bool) -> Self {
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
        .connect_lazy_with(options))
}
