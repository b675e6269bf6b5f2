//! The schema the relay needs: migrations, the doorbell trigger, and the checks
//! that the outbox is in place and the relay's role may do what it must (and that no one
//! else may create in its schema).

use sqlx::Row;

use super::{Store, StoreError};
use crate::model::Mode;

/// The advisory lock a sleeping relay holds (with `hashtext(channel)` as its second key)
/// and the doorbell trigger tries shared: the trigger notifies only when it cannot take it.
pub(crate) const DOORBELL_LOCK: i32 = 1_868_722_808;

/// The doorbell trigger found on the outbox table.
pub(crate) struct DoorbellTrigger {
    pub(crate) channel: String,
    /// It notifies only while a relay sleeps (its WHEN clause or its function tries the
    /// sleeper's lock); a trigger from before migration 9 notifies at every insert.
    pub(crate) only_while_asleep: bool,
    /// Its WHEN clause tries the sleeper's lock, so no function runs while the relay is
    /// awake (migration 11); before it, every insert called the function.
    pub(crate) tries_lock_in_when: bool,
}

impl DoorbellTrigger {
    /// A trigger from before migration 11 on `channel`: it works (rings only while a relay
    /// sleeps) and only lacks the WHEN clause, so replacing it may wait for a quiet table.
    pub(crate) fn only_lacks_when(&self, channel: &str) -> bool {
        self.only_while_asleep && !self.tries_lock_in_when && self.channel == channel
    }
}

/// How many times, a second apart, a change that only replaces a working trigger tries
/// for the table's lock (its statements wait 200 ms each time) before it gives up.
const BUSY_TRIES: u32 = 5;

/// Runs `change` (whose statements set a short lock_timeout) up to [`BUSY_TRIES`] times
/// while the table stays locked, pausing a second between tries so that the writers
/// queued behind each 200 ms wait get through; `None` when it never got the lock.
pub(super) async fn unless_busy<T>(
    mut change: impl AsyncFnMut() -> Result<T, StoreError>,
) -> Result<Option<T>, StoreError> {
    for attempt in 1..=BUSY_TRIES {
        match change().await {
            Ok(done) => return Ok(Some(done)),
            // 55P03: lock_not_available, the lock_timeout ran out.
            Err(StoreError::Statement { code, .. }) if code == "55P03" => {
                if attempt < BUSY_TRIES {
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
            }
            Err(err) => return Err(err),
        }
    }
    Ok(None)
}

/// The WHEN clause of the doorbell trigger on `channel`: true only while a relay sleeps.
pub(crate) fn doorbell_when(channel: &str) -> String {
    format!(
        "WHEN (NOT pg_catalog.pg_try_advisory_xact_lock_shared({DOORBELL_LOCK}, pg_catalog.hashtext({})))",
        quote_literal(channel)
    )
}

/// `text` as an SQL string literal, read alike whatever `standard_conforming_strings` says
/// (an escape string: backslashes doubled, quotes doubled).
pub(crate) fn quote_literal(text: &str) -> String {
    format!("E'{}'", text.replace('\\', "\\\\").replace('\'', "''"))
}

/// What [`Store::set_notify_trigger`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TriggerChange {
    /// The trigger was already as asked.
    Unchanged,
    /// Installed, removed or replaced.
    Changed,
    /// A trigger from before migration 11 (ringing only while the relay sleeps, but calling
    /// its function at every insert) stays: the table stayed busy, and replacing it is not
    /// worth queueing the writers behind its lock for long.
    KeptOld,
}

/// The longest poll interval `check` lets pass without a doorbell trigger: a row after a
/// quiet spell waits up to one interval.
const SLOW_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// What the doorbell trigger found on `table` (`None`: none) means for a relay listening on
/// `listen_channel`: `Ok` when writers wake it while it sleeps or when, without a trigger,
/// it polls often; else what to fix. `check` prints it and `run` logs it at start.
pub(crate) fn doorbell_finding(
    trigger: Option<&DoorbellTrigger>,
    listen_channel: &str,
    poll_interval: std::time::Duration,
    table: &str,
) -> Result<String, String> {
    match trigger {
        None if poll_interval <= SLOW_POLL => Ok(format!(
            "no doorbell trigger on {table} (the default): an idle relay polls every {poll_interval:?}"
        )),
        None => Err(format!(
            "no doorbell trigger on {table} and relay.poll_interval = {poll_interval:?}: a row that comes after a quiet spell waits up to that long; lower relay.poll_interval (10ms by default) or run `outbox-relay migrate --notify-trigger on`"
        )),
        Some(trigger) if trigger.channel != listen_channel => Err(format!(
            "the doorbell trigger notifies channel {} but the relay listens on database.listen_channel = {listen_channel}: run `outbox-relay migrate --notify-trigger on` with this configuration",
            trigger.channel
        )),
        Some(trigger) if !trigger.only_while_asleep => Err(
            "the doorbell trigger notifies at every insert, which serialises the writers' commits: run `outbox-relay migrate --notify-trigger on` to install the one that notifies only while the relay sleeps, or `off` to poll instead".into(),
        ),
        Some(trigger) if !trigger.tries_lock_in_when => Err(
            "the doorbell trigger calls its function at every insert, which costs the writers about 3 % of their commit rate while the relay is awake: run `outbox-relay migrate --notify-trigger on` to install the one that tries the relay's lock first, or `off` to poll instead".into(),
        ),
        Some(trigger) if poll_interval <= SLOW_POLL => Ok(format!(
            "doorbell trigger notifies channel {} while the relay sleeps; with it relay.poll_interval ({poll_interval:?}) is only the safety net, and raising it (e.g. 500ms) lets an idle relay read seldom",
            trigger.channel
        )),
        Some(trigger) => Ok(format!(
            "doorbell trigger notifies channel {} while the relay sleeps",
            trigger.channel
        )),
    }
}

/// The migrations in `migrations/`, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The migration defining the doorbell's trigger function, `outbox_notify()`, as it is now
/// (a unit test keeps it there).
fn doorbell_migration() -> Option<&'static sqlx::migrate::Migration> {
    MIGRATOR
        .iter()
        .rfind(|m| m.sql.contains("FUNCTION outbox_notify()"))
}

impl Store {
    /// Applies the migrations on one connection without a statement timeout (an index
    /// built concurrently on a big table takes as long as it takes; cut short, it would be
    /// left invalid), then fails naming any of the outbox's indexes left invalid by an
    /// earlier interrupted build, which `IF NOT EXISTS` would otherwise pass over.
    pub async fn migrate(&self) -> Result<(), sqlx::migrate::MigrateError> {
        let mut conn = self.pool.acquire().await?;
        sqlx::query("SET statement_timeout = 0")
            .execute(&mut *conn)
            .await?;
        MIGRATOR.run(&mut *conn).await?;
        let invalid: Vec<String> = sqlx::query_scalar(
            "SELECT i.relname::text FROM pg_catalog.pg_index x \
             JOIN pg_catalog.pg_class i ON i.oid = x.indexrelid \
             WHERE x.indrelid = pg_catalog.to_regclass('outbox') AND NOT x.indisvalid",
        )
        .fetch_all(&mut *conn)
        .await?;
        if let Some(index) = invalid.first() {
            return Err(sqlx::migrate::MigrateError::Execute(sqlx::Error::Protocol(
                format!(
                    "the index {index} on outbox is invalid (an earlier build was interrupted): DROP INDEX CONCURRENTLY {index}; then run `outbox-relay migrate` again"
                ),
            )));
        }
        Ok(())
    }

    /// The migrations `migrate` would apply: (version, description, SQL).
    pub(crate) async fn pending_migrations(
        &self,
    ) -> Result<Vec<(i64, String, String)>, StoreError> {
        let applied: Vec<i64> = self
            .in_session(async |conn| {
                let exists: bool = self
                    .query_scalar("SELECT pg_catalog.to_regclass('_sqlx_migrations') IS NOT NULL")
                    .fetch_one(&mut *conn)
                    .await?;
                if !exists {
                    return Ok(Vec::new());
                }
                Ok(self
                    .query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
                    .fetch_all(&mut *conn)
                    .await?)
            })
            .await?;
        Ok(MIGRATOR
            .iter()
            .filter(|m| !m.migration_type.is_down_migration() && !applied.contains(&m.version))
            .map(|m| (m.version, m.description.to_string(), m.sql.to_string()))
            .collect())
    }

    /// The server's `max_prepared_transactions`: above 0, writers may use two-phase
    /// commit, and PostgreSQL refuses to prepare a transaction that ran NOTIFY.
    pub(crate) async fn max_prepared_transactions(&self) -> Result<i64, StoreError> {
        self.in_session(async |conn| {
            Ok(self
                .query_scalar::<String>(
                    "SELECT pg_catalog.current_setting('max_prepared_transactions')",
                )
                .fetch_one(&mut *conn)
                .await?
                .parse()
                .unwrap_or(0))
        })
        .await
    }

    /// Installs or removes the statement-level doorbell trigger, which notifies `channel`.
    /// A trigger already as asked is left alone: replacing it would lock the outbox. Waits
    /// at most 10 s for the table's lock rather than queue every insert behind a long
    /// transaction; only 200 ms, five times over, to replace a trigger from before
    /// migration 11, which works as it is (see [`TriggerChange::KeptOld`]).
    pub(crate) async fn set_notify_trigger(
        &self,
        enabled: bool,
        channel: &str,
    ) -> Result<TriggerChange, StoreError> {
        let existing = self.doorbell_trigger().await?;
        let (replace_function, replace_trigger) = match &existing {
            Some(trigger) if enabled => (
                !trigger.only_while_asleep,
                trigger.channel != channel || !trigger.tries_lock_in_when,
            ),
            Some(_) => (false, true),
            None => (enabled, enabled),
        };
        if !replace_function && !replace_trigger {
            return Ok(TriggerChange::Unchanged);
        }
        if !(enabled
            && existing
                .as_ref()
                .is_some_and(|t| t.only_lacks_when(channel)))
        {
            return self
                .replace_notify_trigger(enabled, channel, replace_function, "10s")
                .await
                .map(|()| TriggerChange::Changed);
        }
        let replaced = unless_busy(async || {
            self.replace_notify_trigger(enabled, channel, false, "200ms")
                .await
        })
        .await?;
        Ok(replaced.map_or(TriggerChange::KeptOld, |()| TriggerChange::Changed))
    }

    /// One try at [`Store::set_notify_trigger`]'s change, waiting at most `lock_timeout`
    /// for the table's lock.
    async fn replace_notify_trigger(
        &self,
        enabled: bool,
        channel: &str,
        replace_function: bool,
        lock_timeout: &str,
    ) -> Result<(), StoreError> {
        let set_timeout = format!("SET LOCAL lock_timeout = '{lock_timeout}'");
        self.in_session(async |conn| {
            let mut tx = sqlx::Connection::begin(&mut *conn).await?;
            if replace_function && let Some(migration) = doorbell_migration() {
                // Migration 9's function, should another have taken its place since.
                sqlx::raw_sql(migration.sql.as_ref())
                    .execute(&mut *tx)
                    .await?;
            }
            sqlx::raw_sql(&set_timeout).execute(&mut *tx).await?;
            self.query("SELECT outbox_enable_notify($1, $2)")
                .bind(enabled)
                .bind(channel)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    /// The doorbell trigger on the outbox table, if any: the channel it notifies, and
    /// whether it notifies only while a relay sleeps (a trigger function installed before
    /// migration 9, or before an adopted table's last `migrate`, notifies at every insert).
    pub(crate) async fn doorbell_trigger(&self) -> Result<Option<DoorbellTrigger>, StoreError> {
        let table = self.sql()?.table.name.clone();
        self.doorbell_trigger_on(&table).await
    }

    /// [`Store::doorbell_trigger`] on `table`, a quoted name.
    pub(crate) async fn doorbell_trigger_on(
        &self,
        table: &str,
    ) -> Result<Option<DoorbellTrigger>, StoreError> {
        self.in_session(async |conn| {
            let found: Option<(Vec<u8>, String, String)> = self
                .query(
                    "SELECT t.tgargs, p.prosrc, \
                            CASE WHEN t.tgqual IS NULL THEN '' \
                                 ELSE pg_catalog.pg_get_triggerdef(t.oid) END \
                     FROM pg_catalog.pg_trigger t \
                     JOIN pg_catalog.pg_proc p ON p.oid = t.tgfoid \
                     WHERE t.tgrelid = pg_catalog.to_regclass($1) AND NOT t.tgisinternal \
                       AND t.tgname IN ('outbox_notify', 'outbox_relay_notify')",
                )
                .bind(table)
                .fetch_optional(&mut *conn)
                .await?
                .map(|row| (row.get(0), row.get(1), row.get(2)));
            Ok(found.map(|(args, source, with_when)| {
                let tries_lock_in_when = with_when
                    .contains(&format!("pg_try_advisory_xact_lock_shared({DOORBELL_LOCK}"));
                DoorbellTrigger {
                    // Arguments are stored NUL-terminated; none means the function's default.
                    channel: args
                        .split(|b| *b == 0)
                        .next()
                        .filter(|first| !first.is_empty())
                        .map_or_else(
                            || "outbox_relay".to_string(),
                            |first| String::from_utf8_lossy(first).into_owned(),
                        ),
                    only_while_asleep: tries_lock_in_when
                        || source.contains("pg_try_advisory_xact_lock_shared"),
                    tries_lock_in_when,
                }
            }))
        })
        .await
    }

    /// Confirms the database answers and the outbox table has the relay's columns.
    /// Who, besides the owner of the outbox's schema (and its members) and superusers, may
    /// create in that schema: `PUBLIC` alone when everyone may. Any of them could plant a
    /// table, function or operator the relay's statements would resolve to.
    pub async fn schema_creators(&self) -> Result<Vec<String>, StoreError> {
        self.in_session(async |conn| {
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
                .fetch_all(&mut *conn)
                .await?)
        })
        .await
    }

    /// Whether each heartbeat may record the replica's state for `status`; if not, what
    /// to do about it. Optional: a relay upgraded before `migrate` ran, or whose role was
    /// made for an earlier version, relays all the same.
    pub(crate) async fn replica_state_unrecordable(&self) -> Result<Option<String>, StoreError> {
        if !self.replica_table_has_state().await? {
            return Ok(Some("outbox_replica has no state columns yet: `outbox-relay status` cannot show this replica's state until `outbox-relay migrate` runs; relaying goes on".into()));
        }
        self.in_session(async |conn| {
            let granted: bool = self
                .query_scalar(
                    "SELECT pg_catalog.has_column_privilege('outbox_replica', 'state', 'INSERT') \
                        AND pg_catalog.has_column_privilege('outbox_replica', 'state_reason', 'INSERT') \
                        AND pg_catalog.has_column_privilege('outbox_replica', 'state', 'UPDATE') \
                        AND pg_catalog.has_column_privilege('outbox_replica', 'state_reason', 'UPDATE')",
                )
                .fetch_one(&mut *conn)
                .await?;
            Ok((!granted).then(|| "the role may not record its state for `outbox-relay status`: GRANT INSERT (state, state_reason), UPDATE (state, state_reason) ON outbox_replica (deploy/sql/least-privilege.sql does); relaying goes on".to_string()))
        })
        .await
    }

    /// Whether `outbox_replica` has both state columns of migration 10 (false too when the
    /// table does not exist).
    pub(super) async fn replica_table_has_state(&self) -> Result<bool, StoreError> {
        self.in_session(async |conn| {
            let columns: i64 = self
                .query_scalar(
                    "SELECT pg_catalog.count(*) FROM pg_catalog.pg_attribute \
                     WHERE attrelid = pg_catalog.to_regclass('outbox_replica') \
                       AND attname IN ('state', 'state_reason') AND NOT attisdropped",
                )
                .fetch_one(&mut *conn)
                .await?;
            Ok(columns == 2)
        })
        .await
    }

    /// The privileges `run` needs in `mode` that the connected role lacks, each written
    /// as a grant (`UPDATE (sent_at) ON outbox`). Checked at start: a relay that can
    /// publish but not mark would resend its first batch on every restart.
    pub(crate) async fn missing_grants(
        &self,
        mode: Mode,
        prunes_sent: bool,
    ) -> Result<Vec<String>, StoreError> {
        let outbox_name = self.sql()?.table.name.clone();
        let outbox = outbox_name.as_str();
        let mut needed: Vec<(&str, &str, &str)> = Vec::new();
        let mut need = |privilege, table, columns: &[&'static str]| {
            if columns.is_empty() {
                needed.push((table, "", privilege));
            }
            for column in columns {
                needed.push((table, column, privilege));
            }
        };
        need("SELECT", outbox, &[]);
        need(
            "UPDATE",
            outbox,
            &["parked_at", "park_reason", "park_error"],
        );
        match mode {
            Mode::Mark => {
                need(
                    "UPDATE",
                    outbox,
                    &["sent_at", "kafka_partition", "kafka_offset"],
                );
                if prunes_sent {
                    need("DELETE", outbox, &[]);
                }
            }
            Mode::Delete => need("DELETE", outbox, &[]),
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
        let missing: Vec<(String, String, String)> = self
            .in_session(async |conn| {
            let rows = self
                .query(
                    "SELECT t, c, p FROM unnest($1::text[], $2::text[], $3::text[])                          WITH ORDINALITY AS g(t, c, p, n)                      WHERE NOT CASE WHEN c = '' THEN pg_catalog.has_table_privilege(t, p)                                     ELSE pg_catalog.has_column_privilege(t, c, p) END                      ORDER BY n",
                )
                .bind(&tables)
                .bind(&columns)
                .bind(&privileges)
                .fetch_all(&mut *conn)
                .await?;
            rows.iter()
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
                .collect::<Result<Vec<_>, sqlx::Error>>()
                .map_err(StoreError::from)
        })
            .await?;
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

    /// Checks that the outbox table and the relay's own tables are in place (and, for a
    /// table `[outbox]` names, reads its columns from the catalog and builds the
    /// statements on it). Returns the server's version.
    pub(crate) async fn verify_schema(&self) -> Result<String, StoreError> {
        self.resolve_table().await?;
        self.in_session(async |conn| {
            let version: String = self
                .query_scalar("SHOW server_version")
                .fetch_one(&mut *conn)
                .await?;
            if self.spec.is_none() {
                self.query(
                    "SELECT id, aggregate_type, aggregate_id, event_type, payload, payload_bytes, \
                        headers, topic, event_id, created_at, sent_at, kafka_partition, \
                        kafka_offset, parked_at, park_reason, park_error, shard, discarded_at \
                 FROM outbox LIMIT 0",
                )
                .execute(&mut *conn)
                .await?;
            }
            self.query("SELECT shard, owner, epoch, expires_at FROM outbox_shard_lease LIMIT 0")
                .execute(&mut *conn)
                .await?;
            Ok(version)
        })
        .await
    }

    /// For a table `[outbox]` names: reads its columns from the catalog and builds the
    /// statements on it (the relay's own needs nothing). Needs no privilege on the table.
    pub async fn resolve_table(&self) -> Result<(), StoreError> {
        if let Some(spec) = &self.spec {
            if self.statements.get().is_none() {
                let columns = self.table_columns(spec).await?;
                let table = spec.resolve(&columns)?;
                let _ = self
                    .statements
                    .set(std::sync::Arc::new(super::Statements::new(table)));
            }
        }
        Ok(())
    }

    /// What the catalog says about the table `spec` names (no columns if it does not exist).
    pub(crate) async fn table_columns(
        &self,
        spec: &super::TableSpec,
    ) -> Result<super::table::Catalog, StoreError> {
        self.in_session(async |conn| {
            let rows = self
                .query(
                    "SELECT a.attname::text, pg_catalog.format_type(a.atttypid, NULL), a.attnotnull \
                     FROM pg_catalog.pg_attribute a \
                     JOIN pg_catalog.pg_class c ON c.oid = a.attrelid \
                     JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                     WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p') \
                       AND a.attnum > 0 AND NOT a.attisdropped \
                     ORDER BY a.attnum",
                )
                .bind(&spec.schema)
                .bind(&spec.table)
                .fetch_all(&mut *conn)
                .await?;
            let columns = rows
                .iter()
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
                .collect::<Result<Vec<_>, sqlx::Error>>()?;
            let facts = self
                .query(
                    "SELECT c.relkind::text AS kind, \
                       EXISTS (SELECT 1 FROM pg_catalog.pg_constraint k \
                               WHERE k.conrelid = c.oid AND k.conname = $3) AS checked, \
                       EXISTS (SELECT 1 FROM pg_catalog.pg_constraint k \
                               WHERE k.conrelid = c.oid AND k.conname = $3 AND k.convalidated) AS numbered, \
                       ARRAY(SELECT i.relname::text FROM pg_catalog.pg_index x \
                             JOIN pg_catalog.pg_class i ON i.oid = x.indexrelid \
                             WHERE x.indrelid = c.oid ORDER BY 1) AS indexes, \
                       ARRAY(SELECT x.indisvalid FROM pg_catalog.pg_index x \
                             JOIN pg_catalog.pg_class i ON i.oid = x.indexrelid \
                             WHERE x.indrelid = c.oid ORDER BY i.relname) AS valid \
                     FROM pg_catalog.pg_class c \
                     JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                     WHERE n.nspname = $1 AND c.relname = $2",
                )
                .bind(&spec.schema)
                .bind(&spec.table)
                .bind(spec.numbered_check())
                .fetch_optional(&mut *conn)
                .await?;
            let mut catalog = super::table::Catalog {
                columns,
                ..Default::default()
            };
            if let Some(facts) = facts {
                catalog.kind = facts.try_get("kind")?;
                catalog.numbering_checked = facts.try_get("checked")?;
                catalog.numbered = facts.try_get("numbered")?;
                let names: Vec<String> = facts.try_get("indexes")?;
                let valid: Vec<bool> = facts.try_get("valid")?;
                catalog.indexes = names.into_iter().zip(valid).collect();
            }
            Ok(catalog)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_doorbell_trigger_tries_the_lock_in_its_when_clause() {
        let enable = MIGRATOR
            .iter()
            .rfind(|m| m.sql.contains("FUNCTION outbox_enable_notify("))
            .expect("a migration defines outbox_enable_notify()");
        let lock = format!("pg_try_advisory_xact_lock_shared({DOORBELL_LOCK}, ");
        assert!(
            enable
                .sql
                .contains(&format!("'WHEN (NOT pg_catalog.{lock}")),
            "{}",
            enable.sql
        );
        assert!(doorbell_when("it's").contains(&lock));
        assert!(doorbell_when("it's").ends_with("hashtext(E'it''s')))"));
    }

    #[test]
    fn literals_are_quoted_alike_whatever_standard_conforming_strings_says() {
        assert_eq!(quote_literal("outbox_relay"), "E'outbox_relay'");
        assert_eq!(quote_literal(r"x\')) --"), r"E'x\\'')) --'");
    }

    #[test]
    fn the_doorbell_trigger_tries_the_lock_the_relay_sleeps_on() {
        let trigger = doorbell_migration().expect("a migration defines outbox_notify()");
        assert!(
            trigger.sql.contains(&format!(
                "pg_try_advisory_xact_lock_shared({DOORBELL_LOCK}, pg_catalog.hashtext(channel))"
            )),
            "{}",
            trigger.sql
        );
    }
}
