//! Adopting a table a team already has: `outbox-relay migrate` adds what the relay needs
//! (an ordering column, a creation time, the sent and park bookkeeping, indexes, the
//! relay's own lease tables) and nothing its writers must supply. Each step says the lock
//! it takes and whether it rewrites or scans the table, so `--dry-run` can show them all.

use super::schema::{DOORBELL_LOCK, DoorbellTrigger, doorbell_when, quote_literal, unless_busy};
use super::table::{ADOPTED_CREATED_AT, ADOPTED_ID, BOOKKEEPING, Catalog, quote};
use super::{Store, StoreError, TableSpec};

/// What one step of an adoption does to the table and its writers.
#[derive(Debug, Clone)]
pub struct Step {
    /// The statements, run in one transaction unless `concurrently`.
    pub statements: Vec<String>,
    /// The lock the step takes on the outbox table, and for how long.
    pub lock: String,
    /// Whether it rewrites or scans the table, and what its writers notice.
    pub effect: String,
    /// `CREATE INDEX CONCURRENTLY` and its kind, which cannot run in a transaction.
    concurrently: bool,
    /// Run again until it changes no row (the numbering: rows updated meanwhile by
    /// someone else are numbered in the next round).
    until_done: bool,
    /// Skipped when the table stays locked through five short tries (see
    /// [`super::schema::TriggerChange::KeptOld`]): what it replaces works as it is.
    kept_if_busy: bool,
}

/// Everything `migrate` would do to adopt a table.
#[derive(Debug, Clone)]
pub struct AdoptionPlan {
    pub table: String,
    /// Rows in the table now; they are published once the relay runs.
    pub existing_rows: i64,
    /// Rows that get an ordering number (all of them, the first time).
    pub rows_to_number: i64,
    pub steps: Vec<Step>,
    /// Whether a step installs, changes or removes the doorbell trigger (else it is as
    /// asked).
    pub doorbell_changes: bool,
}

/// The first value of the ordering sequence: far above any number given to the rows
/// already there, so every new row is ordered after them.
const SEQUENCE_START: i64 = 1 << 40;

/// The relay's own tables, as migrations 2 and 10 leave them.
const LEASE_TABLES: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS outbox_shard_lease ( \
         shard smallint PRIMARY KEY, owner text, epoch bigint NOT NULL DEFAULT 0, \
         expires_at timestamptz, acquired_at timestamptz, renewed_at timestamptz)",
    "INSERT INTO outbox_shard_lease (shard) SELECT s FROM pg_catalog.generate_series(0, 255) AS s \
     ON CONFLICT (shard) DO NOTHING",
    "CREATE TABLE IF NOT EXISTS outbox_replica ( \
         replica_id text PRIMARY KEY, started_at timestamptz NOT NULL DEFAULT pg_catalog.now(), \
         heartbeat_at timestamptz NOT NULL DEFAULT pg_catalog.now(), expires_at timestamptz NOT NULL, \
         state text, state_reason text)",
];

impl Store {
    /// What adopting the table `[outbox]` names would do; changes nothing.
    pub async fn adoption_plan(
        &self,
        notify_channel: Option<&str>,
    ) -> Result<AdoptionPlan, StoreError> {
        let Some(spec) = self.spec.clone() else {
            return Err(StoreError::Config {
                key: "outbox.table".into(),
                message: "names no table: the relay's own outbox is created by its migrations"
                    .into(),
            });
        };
        let catalog = self.table_columns(&spec).await?;
        // The mapped columns must exist with usable types whatever is adopted; only the
        // relay's bookkeeping may be missing.
        if let Err(err @ StoreError::Config { .. }) = spec.resolve(&catalog) {
            return Err(err);
        }
        let (existing_rows, rows_to_number) = self.adoption_counts(&spec, &catalog).await?;
        let has = |name: &str| catalog.has(name);
        let t = spec.quoted_name();
        let display = spec.display();
        let mut steps = vec![Step {
            statements: LEASE_TABLES.iter().map(|s| s.to_string()).collect(),
            lock: format!("none on {display}: new tables of the relay's own, in database.schema"),
            effect: "creates the lease and replica tables if missing".into(),
            concurrently: false,
            until_done: false,
            kept_if_busy: false,
        }];
        if self.replica_table_lacks_state().await? {
            steps.push(Step {
                statements: vec![
                    "SET LOCAL lock_timeout = '10s'".into(),
                    "ALTER TABLE outbox_replica ADD COLUMN IF NOT EXISTS state text, \
                     ADD COLUMN IF NOT EXISTS state_reason text"
                        .into(),
                ],
                lock: format!(
                    "none on {display}; ACCESS EXCLUSIVE on outbox_replica for an instant (waits 10 s at most): running relays' heartbeats wait for it"
                ),
                effect: "adds the columns in which each replica records its state for `status` (migration 10)".into(),
                concurrently: false,
                until_done: false,
                kept_if_busy: false,
            });
        }

        let mut add = Vec::new();
        let mut added = Vec::new();
        if !has(ADOPTED_ID) {
            add.push(format!("ADD COLUMN {} bigint", quote(ADOPTED_ID)));
            added.push(ADOPTED_ID.to_string());
        }
        if !has(ADOPTED_CREATED_AT) {
            add.push(format!(
                "ADD COLUMN {} timestamptz NOT NULL DEFAULT pg_catalog.now()",
                quote(ADOPTED_CREATED_AT)
            ));
            added.push(ADOPTED_CREATED_AT.to_string());
        }
        for (column, ty) in BOOKKEEPING {
            if !has(column) {
                add.push(format!("ADD COLUMN {} {ty}", quote(column)));
                added.push(column.to_string());
            }
        }
        if !add.is_empty() {
            // Fail fast rather than queue every insert behind a long transaction.
            let mut statements = vec![
                "SET LOCAL lock_timeout = '10s'".to_string(),
                format!("ALTER TABLE {t} {}", add.join(", ")),
            ];
            if !has(ADOPTED_ID) {
                let schema = quote(&spec.schema);
                let sequence = format!("{schema}.{}", quote(&spec.object_name("seq")));
                let next = format!("{schema}.{}", quote(&spec.object_name("next_seq")));
                statements.push(format!(
                    "CREATE SEQUENCE IF NOT EXISTS {sequence} START WITH {SEQUENCE_START} \
                     OWNED BY {t}.{}",
                    quote(ADOPTED_ID)
                ));
                // A column default calls nextval with the inserting role's privileges; the
                // writers hold none on a sequence they never heard of. This function runs
                // as the table's owner and does nothing but take the next number.
                statements.push(format!(
                    "CREATE OR REPLACE FUNCTION {next}() RETURNS bigint LANGUAGE sql \
                     SECURITY DEFINER SET search_path = pg_catalog \
                     AS $relay$ SELECT pg_catalog.nextval('{}') $relay$",
                    sequence.replace('\'', "''")
                ));
                statements.push(format!(
                    "ALTER TABLE {t} ALTER COLUMN {} SET DEFAULT {next}()",
                    quote(ADOPTED_ID)
                ));
            }
            steps.push(Step {
                statements,
                lock: format!(
                    "ACCESS EXCLUSIVE on {display} for a moment, in one transaction: it waits (at most 10 s, else it fails and changes nothing) for the transactions using the table, and inserts wait for it"
                ),
                effect: format!(
                    "no rewrite, no scan: adds {} (nullable, or a default stored once in the catalog); new rows get their ordering number from a sequence, through a function that runs as the table's owner, so writers need no new privilege",
                    added.join(", ")
                ),
                concurrently: false,
                until_done: false,
                kept_if_busy: false,
            });
        }
        if !catalog.numbered {
            let id = quote(ADOPTED_ID);
            steps.push(Step {
                statements: vec![format!(
                    "UPDATE {t} AS o SET {id} = numbered.base + numbered.n \
                     FROM (SELECT ctid AS row, \
                                  pg_catalog.row_number() OVER (ORDER BY pg_catalog.age(xmin) DESC, cmin::text::bigint, ctid) AS n, \
                                  (SELECT COALESCE(pg_catalog.max({id}), 0) FROM {t} WHERE {id} < {SEQUENCE_START}) AS base \
                           FROM {t} WHERE {id} IS NULL) AS numbered \
                     WHERE o.ctid = numbered.row AND o.{id} IS NULL"
                )],
                lock: format!("ROW EXCLUSIVE on {display}: inserts go on"),
                effect: format!(
                    "writes a new version of each of the {rows_to_number} rows already in the table, numbered by the age of the transaction that wrote them (oldest first), so that they are published before any new row; run again until none is left"
                ),
                concurrently: false,
                until_done: true,
                kept_if_busy: false,
            });
            let check = quote(&spec.numbered_check());
            let mut statements = Vec::new();
            if !catalog.numbering_checked {
                statements.push(format!(
                    "ALTER TABLE {t} ADD CONSTRAINT {check} CHECK ({id} IS NOT NULL) NOT VALID"
                ));
            }
            if !statements.is_empty() {
                steps.push(Step {
                    statements,
                    lock: format!("ACCESS EXCLUSIVE on {display} for a moment"),
                    effect: "no rewrite, no scan: a CHECK that every row has its ordering number, not validated yet".into(),
                    concurrently: false,
                    until_done: false,
                    kept_if_busy: false,
                });
            }
            steps.push(Step {
                statements: vec![format!("ALTER TABLE {t} VALIDATE CONSTRAINT {check}")],
                lock: format!("SHARE UPDATE EXCLUSIVE on {display}: writes go on"),
                effect: "scans the table: proves every row is numbered; the relay starts on the table only then".into(),
                concurrently: false,
                until_done: false,
                kept_if_busy: false,
            });
        }
        let aggregate_id = quote(&spec.columns.aggregate_id);
        let indexes = &catalog.indexes;
        let wanted = [
            (
                spec.index_name("seq"),
                format!(
                    "CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS {{}} ON {t} ({})",
                    quote(ADOPTED_ID)
                ),
                "finds rows by their ordering number (marks, parks, replays)",
            ),
            (
                spec.pending_index(),
                format!(
                    "CREATE INDEX CONCURRENTLY IF NOT EXISTS {{}} ON {t} ({}) \
                     WHERE sent_at IS NULL AND parked_at IS NULL",
                    quote(ADOPTED_ID)
                ),
                "the pending rows in order, for the read",
            ),
            (
                spec.index_name("holding"),
                format!(
                    "CREATE INDEX CONCURRENTLY IF NOT EXISTS {{}} ON {t} \
                     (pg_catalog.hashtextextended({aggregate_id}, 0), {}) WHERE {}",
                    quote(ADOPTED_ID),
                    super::statements::parked_holding("")
                ),
                "parked rows holding their aggregates back",
            ),
            (
                spec.index_name("sent_at"),
                format!(
                    "CREATE INDEX CONCURRENTLY IF NOT EXISTS {{}} ON {t} (sent_at) \
                     WHERE sent_at IS NOT NULL"
                ),
                "sent rows by age, for the retention of sent rows",
            ),
        ];
        for (name, create, purpose) in wanted {
            let qualified = format!("{}.{}", quote(&spec.schema), quote(&name));
            let mut statements = Vec::new();
            match indexes.iter().find(|(n, _)| *n == name) {
                Some((_, true)) => continue,
                Some((_, false)) => {
                    statements.push(format!("DROP INDEX CONCURRENTLY IF EXISTS {qualified}"))
                }
                None => {}
            }
            statements.push(create.replace("{}", &quote(&name)));
            steps.push(Step {
                statements,
                lock: format!(
                    "SHARE UPDATE EXCLUSIVE on {display} while it builds: inserts, updates and deletes go on"
                ),
                effect: format!("scans the table to build {name}: {purpose}"),
                concurrently: true,
                until_done: false,
                kept_if_busy: false,
            });
        }
        // Installed, replaced or removed (without a channel): a dry run shows it too.
        let existing = self.doorbell_trigger_on(&t).await?;
        let doorbell = notify_step(&t, &display, notify_channel, existing.as_ref());
        let doorbell_changes = doorbell.is_some();
        steps.extend(doorbell);
        Ok(AdoptionPlan {
            table: display,
            existing_rows,
            rows_to_number,
            steps,
            doorbell_changes,
        })
    }

    /// Runs an adoption plan, step by step, on one connection without a statement
    /// timeout (a big table's index builds take as long as they take); `progress` hears of
    /// each step before it runs. Returns whether a step was skipped because the table
    /// stayed locked (only the replacement of a doorbell from before migration 11 may be).
    pub async fn adopt(
        &self,
        plan: &AdoptionPlan,
        mut progress: impl FnMut(usize, &Step),
    ) -> Result<bool, StoreError> {
        let mut conn = self.pool().acquire().await?;
        sqlx::query("SET statement_timeout = 0")
            .persistent(false)
            .execute(&mut *conn)
            .await?;
        let mut kept = false;
        for (i, step) in plan.steps.iter().enumerate() {
            progress(i, step);
            if step.kept_if_busy {
                kept |= unless_busy(async || run_step(&mut conn, step).await)
                    .await?
                    .is_none();
                continue;
            }
            while run_step(&mut conn, step).await? > 0 && step.until_done {}
        }
        Ok(kept)
    }

    /// Whether `outbox_replica` exists without the state columns of migration 10 (an
    /// adoption made by an earlier version). Asked first: `ADD COLUMN IF NOT EXISTS` would
    /// take the table's exclusive lock at every `migrate` even with nothing to add.
    async fn replica_table_lacks_state(&self) -> Result<bool, StoreError> {
        let exists: bool = self
            .in_session(async |conn| {
                Ok(self
                    .query_scalar("SELECT pg_catalog.to_regclass('outbox_replica') IS NOT NULL")
                    .fetch_one(&mut *conn)
                    .await?)
            })
            .await?;
        Ok(exists && !self.replica_table_has_state().await?)
    }

    /// How many rows the table has, and how many lack an ordering number.
    async fn adoption_counts(
        &self,
        spec: &TableSpec,
        catalog: &Catalog,
    ) -> Result<(i64, i64), StoreError> {
        let t = spec.quoted_name();
        let numbered = catalog.has(ADOPTED_ID);
        self.in_session(async |conn| {
            let existing: i64 = sqlx::query_scalar(&format!("SELECT pg_catalog.count(*) FROM {t}"))
                .persistent(false)
                .fetch_one(&mut *conn)
                .await?;
            let unnumbered: i64 = if numbered {
                sqlx::query_scalar(&format!(
                    "SELECT pg_catalog.count(*) FROM {t} WHERE {} IS NULL",
                    quote(ADOPTED_ID)
                ))
                .persistent(false)
                .fetch_one(&mut *conn)
                .await?
            } else {
                existing
            };
            Ok((existing, unnumbered))
        })
        .await
    }
}

/// Runs one step's statements, in one transaction unless it builds indexes concurrently.
/// Returns the rows they changed.
async fn run_step(conn: &mut sqlx::PgConnection, step: &Step) -> Result<u64, StoreError> {
    let mut changed = 0;
    if step.concurrently {
        for statement in &step.statements {
            changed += sqlx::query(statement)
                .persistent(false)
                .execute(&mut *conn)
                .await?
                .rows_affected();
        }
    } else {
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        for statement in &step.statements {
            changed += sqlx::query(statement)
                .persistent(false)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        }
        tx.commit().await?;
    }
    Ok(changed)
}

/// The doorbell on an adopted table: a statement-level trigger notifying `channel` while
/// the relay sleeps (as migration 11's `outbox_notify`: the lock tried in its WHEN clause,
/// and again in its function), or none. `None` when `existing` is already what is asked
/// for. Dropping or creating a trigger waits at most 10 s for the table's lock rather than
/// queue every insert behind a long transaction.
fn notify_step(
    table: &str,
    display: &str,
    channel: Option<&str>,
    existing: Option<&DoorbellTrigger>,
) -> Option<Step> {
    let function = format!(
        "CREATE OR REPLACE FUNCTION outbox_relay_notify() RETURNS trigger \
         LANGUAGE plpgsql AS $$ BEGIN \
         IF NOT pg_catalog.pg_try_advisory_xact_lock_shared({DOORBELL_LOCK}, pg_catalog.hashtext(TG_ARGV[0])) THEN \
         PERFORM pg_catalog.pg_notify(TG_ARGV[0], ''); END IF; \
         RETURN NULL; END $$"
    );
    let lock_briefly = "SET LOCAL lock_timeout = '10s'".to_string();
    let drop = format!("DROP TRIGGER IF EXISTS outbox_relay_notify ON {table}");
    // The name the relay's own table gives its doorbell, found on an adopted table too.
    let drop_own_name = format!("DROP TRIGGER IF EXISTS outbox_notify ON {table}");
    let table_lock =
        format!("ACCESS EXCLUSIVE on {display} for a moment (at most 10 s waiting for it)");
    match (channel, existing) {
        (None, None) => None,
        (None, Some(_)) => Some(Step {
            statements: vec![lock_briefly, drop, drop_own_name],
            lock: table_lock,
            until_done: false,
            kept_if_busy: false,
            effect: "removes the doorbell trigger".into(),
            concurrently: false,
        }),
        (Some(channel), Some(trigger))
            if trigger.channel == channel && trigger.tries_lock_in_when =>
        {
            None
        }
        (Some(channel), existing) => {
            // A doorbell from before migration 11 on this channel works as it is: replace
            // it only if the table's lock comes within 200 ms, rather than queue writers.
            let only_upgrade = existing.is_some_and(|trigger| trigger.only_lacks_when(channel));
            Some(Step {
                statements: vec![
                    if only_upgrade {
                        "SET LOCAL lock_timeout = '200ms'".to_string()
                    } else {
                        lock_briefly
                    },
                    function,
                    drop,
                    drop_own_name,
                    format!(
                        "CREATE TRIGGER outbox_relay_notify AFTER INSERT ON {table} \
                     FOR EACH STATEMENT {} EXECUTE FUNCTION outbox_relay_notify({})",
                        doorbell_when(channel),
                        quote_literal(channel)
                    ),
                ],
                lock: if only_upgrade {
                    format!(
                        "ACCESS EXCLUSIVE on {display} for a moment (at most 200 ms waiting for it, five tries a second apart; the old doorbell stays if the table stays busy)"
                    )
                } else {
                    table_lock
                },
                until_done: false,
                kept_if_busy: only_upgrade,
                effect: format!(
                    "the doorbell: an inserting statement notifies {channel} while the relay sleeps (NOTIFY takes a database-wide lock at commit)"
                ),
                concurrently: false,
            })
        }
    }
}
