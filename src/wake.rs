//! The doorbell: a LISTEN session that wakes the relay when a writer rings, and that tells
//! writers whether to ring at all. Writers ring only while a relay sleeps: before it
//! sleeps the relay takes an advisory lock on this session, and the notify trigger rings
//! only when it cannot take the same lock shared. A writer that took it shared holds it
//! until its commit is visible, so once the relay holds the lock, every row of a writer
//! that did not ring is visible to the read the relay makes next. A lost ring (a dropped
//! connection) costs at most one poll interval: on reconnect the doorbell rings once.
//!
//! The trigger of migration 12 reads a flag first (a sequence) and tries the lock only
//! when it is not 0, so an awake relay costs the writers no advisory lock. Only the lock's
//! holder sets the flag: to 1 once it holds the lock, to 0 before it lets go. A writer that
//! read 0 before the flag turned 1 holds the outbox's `RowExclusiveLock` from before its
//! read until its commit is visible, so the relay sleeps only once no such lock is held,
//! and otherwise lets go and reads again (as when a writer holds the lock shared). The
//! holder looks the flag up each time it takes the lock, so a trigger replaced while the
//! relay runs is followed at once. When the lock is not this table's alone (another
//! table's doorbell rings the same channel) or the trigger rings another channel, the
//! flag is raised and left at 1: writers try the lock at every insert, as before the flag.
//!
//! With several replicas one sleeps on the lock; the others register as waiters (a second
//! lock, shared), read once more, and are rung by the sleeper whenever it takes or leaves
//! the lock, so rows committed without a ring are read by every replica.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::{sleep, timeout};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::model::Backoff;
use crate::store::DOORBELL_LOCK;
use crate::telemetry::{DoorbellRang, emit};

/// The lock a sleeping replica holds; the notify trigger (migration 9, adopted tables) tries
/// it shared. The second key is `hashtext(channel)`, so relays on other channels never meet.
const SLEEPER_LOCK: i32 = DOORBELL_LOCK;
/// The lock replicas hold shared while another replica sleeps.
const WAITER_LOCK: i32 = DOORBELL_LOCK + 1;

/// How long the relay waits for the doorbell session to answer before polling without
/// it, and how long a statement on that session may take before it is dropped.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// What the relay may do after asking to sleep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sleep {
    /// This replica now holds the sleeper lock: writers ring from here on. Read once more
    /// (rows committed before the lock are visible to it), then ask again.
    Armed,
    /// Already armed: wait for a ring or the poll interval.
    Asleep,
    /// A writer still committing holds the lock: read again shortly.
    Busy,
    /// Another replica sleeps, and this one has just registered to be rung by it: read
    /// once more (rows committed before the sleeper took its lock rang no one), then ask
    /// again.
    Registered,
    /// Registered, and the read after registering found nothing: wait for a ring or the
    /// poll interval.
    Waiting,
    /// No doorbell session: wait for the poll interval.
    Off,
}

enum Command {
    Sleep(oneshot::Sender<Sleep>),
    Wake,
}

/// The relay's handle on the doorbell session.
#[derive(Clone)]
pub(crate) struct Doorbell {
    commands: mpsc::UnboundedSender<Command>,
}

impl Doorbell {
    /// Asks to sleep; `Off` when the doorbell session is down or does not answer in time.
    pub(crate) async fn ask_to_sleep(&self) -> Sleep {
        let (reply, answer) = oneshot::channel();
        if self.commands.send(Command::Sleep(reply)).is_err() {
            return Sleep::Off;
        }
        // A session that took a lock for a request the relay stopped waiting for gives it
        // back (see `Session::answer`).
        match timeout(ANSWER_TIMEOUT, answer).await {
            Ok(Ok(sleep)) => sleep,
            Ok(Err(_)) => Sleep::Off,
            Err(_) => {
                warn!(
                    "the doorbell session did not answer within {ANSWER_TIMEOUT:?}; polling meanwhile"
                );
                Sleep::Off
            }
        }
    }

    /// The relay is reading: writers stop ringing for it. Does not wait.
    pub(crate) fn wake(&self) {
        let _ = self.commands.send(Command::Wake);
    }
}

/// The locks this session holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    Nothing,
    /// The sleeper lock, exclusively.
    Sleeper,
    /// The waiter lock, shared.
    Waiter,
}

/// Who holds the sleeper lock, as one try found it.
enum Try {
    /// This session now holds it; other replicas wait to be rung.
    Taken { waiters: bool },
    /// Writers between their insert and their commit.
    Writers,
    /// Another relay's doorbell session.
    Relay,
}

/// The doorbell task and the relay's handle on it; `table` is the outbox as SQL names it.
pub(crate) fn doorbell(
    pool: PgPool,
    channel: String,
    table: String,
    wake: Arc<Notify>,
    cancel: CancellationToken,
) -> (Doorbell, impl Future<Output = ()> + Send + 'static) {
    let (commands, received) = mpsc::unbounded_channel();
    (
        Doorbell { commands },
        listen(pool, channel, table, wake, received, cancel),
    )
}

/// The flag the doorbell trigger on the outbox reads (migration 12), as the sleeper lock's
/// holder finds it.
struct FlagNow {
    /// The sequence's OID; `None`: the trigger reads no flag (or there is no trigger).
    sequence: Option<i64>,
    /// This role may set it (UPDATE).
    settable: bool,
    /// Its value where this role may read it and it was ever set.
    value: Option<i64>,
    /// The trigger notifies this relay's channel, and no other table's doorbell does: the
    /// sleeper lock is this table's alone, so the flag may be lowered.
    lock_is_this_tables: bool,
}

/// Listens on `channel` until `cancel`, ringing `wake` for every notification another
/// session sends, and taking or releasing the doorbell's locks as the relay asks.
async fn listen(
    pool: PgPool,
    channel: String,
    table: String,
    wake: Arc<Notify>,
    mut commands: mpsc::UnboundedReceiver<Command>,
    cancel: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_secs(30));
    while !cancel.is_cancelled() {
        let connected = tokio::select! {
            _ = cancel.cancelled() => return,
            connected = timeout(ANSWER_TIMEOUT * 5, connect(&pool, &channel, &table)) => connected,
        };
        let (mut listener, pid, table) = match connected {
            Ok(Ok(connected)) => connected,
            Ok(Err(err)) => {
                let delay = backoff.next_delay();
                warn!(error = %err, retry_in = ?delay, "LISTEN connection failed; polling covers the gap");
                if !answer_off_until(&mut commands, sleep(delay), &cancel).await {
                    return;
                }
                continue;
            }
            Err(_) => {
                let delay = backoff.next_delay();
                warn!(retry_in = ?delay, "LISTEN connection timed out; polling covers the gap");
                if !answer_off_until(&mut commands, sleep(delay), &cancel).await {
                    return;
                }
                continue;
            }
        };
        debug!(%channel, "listening for the outbox doorbell");
        let mut session = Session {
            listener: &mut listener,
            channel: &channel,
            table,
            lowers_flag: None,
            held: Held::Nothing,
        };
        // Anything committed while we were not listening is found by this read.
        wake.notify_one();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                received = session.listener.try_recv() => match received {
                    // Its own rings (for waiting replicas) come back to this session too.
                    Ok(Some(notification)) if notification.process_id() == pid => {}
                    Ok(Some(_)) => {
                        backoff.reset();
                        emit(DoorbellRang);
                        wake.notify_one();
                    }
                    Ok(None) => {
                        warn!("LISTEN connection lost; reconnecting");
                        wake.notify_one();
                        break;
                    }
                    Err(err) => {
                        warn!(error = %err, "LISTEN connection failed; reconnecting");
                        wake.notify_one();
                        break;
                    }
                },
                Some(command) = commands.recv() => {
                    let handled = tokio::select! {
                        _ = cancel.cancelled() => return,
                        handled = timeout(ANSWER_TIMEOUT, session.answer(command)) => handled,
                    };
                    let failure = match handled {
                        Ok(Ok(())) => continue,
                        Ok(Err(err)) => err.to_string(),
                        Err(_) => format!("no answer within {ANSWER_TIMEOUT:?}"),
                    };
                    warn!(error = %failure, "the doorbell session failed; reconnecting");
                    wake.notify_one();
                    break;
                }
            }
        }
        // The pool closes the connection instead of keeping it (see `listener_pool`), so
        // the locks it may hold go with it.
        drop(listener);
        let delay = backoff.next_delay();
        if !answer_off_until(&mut commands, sleep(delay), &cancel).await {
            return;
        }
    }
}

/// Answers `Off` to every request to sleep until `until` completes; false on `cancel`.
async fn answer_off_until(
    commands: &mut mpsc::UnboundedReceiver<Command>,
    until: impl Future<Output = ()>,
    cancel: &CancellationToken,
) -> bool {
    tokio::pin!(until);
    loop {
        tokio::select! {
            _ = &mut until => return true,
            _ = cancel.cancelled() => return false,
            Some(command) = commands.recv() => {
                if let Command::Sleep(reply) = command {
                    let _ = reply.send(Sleep::Off);
                }
            }
        }
    }
}

struct Session<'a> {
    listener: &'a mut PgListener,
    channel: &'a str,
    /// The outbox's OID, as `bigint`.
    table: i64,
    /// The flag this session raised and lowers before it lets go of the sleeper lock.
    lowers_flag: Option<i64>,
    held: Held,
}

impl Session<'_> {
    async fn answer(&mut self, command: Command) -> Result<(), sqlx::Error> {
        match command {
            Command::Sleep(reply) => {
                let answer = self.ask_to_sleep().await?;
                if reply.send(answer).is_err() {
                    // The relay stopped waiting and polls; it will never wake this session.
                    self.wake().await?;
                }
                Ok(())
            }
            Command::Wake => self.wake().await,
        }
    }

    async fn ask_to_sleep(&mut self) -> Result<Sleep, sqlx::Error> {
        let registered = match self.held {
            Held::Sleeper => return Ok(Sleep::Asleep),
            Held::Waiter => false,
            Held::Nothing => {
                if let Try::Taken { waiters } = self.try_sleeper().await? {
                    return self.armed(waiters).await;
                }
                // Register, then try once more: a sleeper that left between the two tries
                // left the lock free; one that takes it later rings this waiter.
                if self
                    .call("pg_try_advisory_lock_shared", WAITER_LOCK)
                    .await?
                {
                    self.held = Held::Waiter;
                }
                true
            }
        };
        match self.try_sleeper().await? {
            Try::Taken { waiters } => {
                if self.held == Held::Waiter {
                    self.call("pg_advisory_unlock_shared", WAITER_LOCK).await?;
                    self.held = Held::Nothing;
                }
                self.armed(waiters).await
            }
            Try::Writers => Ok(Sleep::Busy),
            Try::Relay if registered => Ok(Sleep::Registered),
            Try::Relay => Ok(Sleep::Waiting),
        }
    }

    /// This session took the sleeper lock: it raises the flag and, unless a writer that
    /// may have read it lowered is still in flight (then it lets go: `Busy`), sleeps;
    /// replicas waiting for one read once more.
    async fn armed(&mut self, mut waiters: bool) -> Result<Sleep, sqlx::Error> {
        self.held = Held::Sleeper;
        let flag = self.flag_now().await?;
        match flag.sequence {
            // Writers try the lock at every insert: holding it is enough.
            None => {}
            Some(sequence) if flag.settable => {
                self.set_flag(sequence, 1).await?;
                if flag.lock_is_this_tables {
                    self.lowers_flag = Some(sequence);
                }
                if self.writers_in_flight().await? {
                    self.wake().await?;
                    return Ok(Sleep::Busy);
                }
                // A replica that registered after this session took the lock read before
                // those writers committed: it is rung too.
                waiters = waiters || self.waiters_registered().await?;
            }
            // Writers read the flag at 0 and do not ring: this session cannot sleep on it.
            Some(_) if flag.value == Some(0) => {
                self.wake().await?;
                return Ok(Sleep::Off);
            }
            Some(_) => {}
        }
        if waiters {
            self.ring().await?;
        }
        Ok(Sleep::Armed)
    }

    /// The flag the trigger reads now, looked up while this session holds the lock (any
    /// relay that set it held the lock too).
    async fn flag_now(&mut self) -> Result<FlagNow, sqlx::Error> {
        // The flag is the sequence the trigger's WHEN clause depends on.
        #[derive(sqlx::FromRow)]
        struct Found {
            args: Vec<u8>,
            sequence: Option<i64>,
            settable: bool,
            value: Option<i64>,
            alone: bool,
        }
        let found: Option<Found> = sqlx::query_as(
            "SELECT m.tgargs AS args, f.oid::bigint AS sequence, \
                    f.oid IS NOT NULL \
                      AND pg_catalog.has_sequence_privilege(f.oid, 'UPDATE') AS settable, \
                    CASE WHEN pg_catalog.has_sequence_privilege(f.oid, 'SELECT') \
                         THEN pg_catalog.pg_sequence_last_value(f.oid::pg_catalog.regclass) \
                    END AS value, \
                    (SELECT pg_catalog.count(*) FROM pg_catalog.pg_trigger o \
                     WHERE NOT o.tgisinternal AND o.tgargs = m.tgargs \
                       AND o.tgname IN ('outbox_notify', 'outbox_relay_notify')) = 1 AS alone \
             FROM pg_catalog.pg_trigger m \
             LEFT JOIN LATERAL ( \
               SELECT d.refobjid AS oid FROM pg_catalog.pg_depend d \
               JOIN pg_catalog.pg_class s ON s.oid = d.refobjid AND s.relkind = 'S' \
               WHERE d.classid = 'pg_catalog.pg_trigger'::pg_catalog.regclass \
                 AND d.objid = m.oid \
                 AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass \
               LIMIT 1) AS f ON true \
             WHERE m.tgrelid = $1::bigint::oid AND NOT m.tgisinternal \
               AND m.tgname IN ('outbox_notify', 'outbox_relay_notify')",
        )
        .bind(self.table)
        .fetch_optional(&mut *self.listener)
        .await?;
        let Some(Found {
            args,
            sequence,
            settable,
            value,
            alone,
        }) = found
        else {
            return Ok(FlagNow {
                sequence: None,
                settable: false,
                value: None,
                lock_is_this_tables: false,
            });
        };
        let rings_this_channel = args.split(|b| *b == 0).next() == Some(self.channel.as_bytes());
        Ok(FlagNow {
            sequence,
            settable,
            value,
            lock_is_this_tables: alone && rings_this_channel,
        })
    }

    /// Another session holds the outbox's `RowExclusiveLock`: a writer that may have read
    /// the flag at 0 (or a mark, a delete) has not finished.
    async fn writers_in_flight(&mut self) -> Result<bool, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT EXISTS (SELECT FROM pg_catalog.pg_locks l \
               WHERE l.locktype = 'relation' AND l.relation = $1::bigint::oid \
                 AND l.database = (SELECT d.oid FROM pg_catalog.pg_database d \
                                   WHERE d.datname = pg_catalog.current_database()) \
                 AND l.mode = 'RowExclusiveLock' \
                 AND l.pid IS DISTINCT FROM pg_catalog.pg_backend_pid())",
        )
        .bind(self.table)
        .fetch_one(&mut *self.listener)
        .await
    }

    /// Some replica holds the waiter lock (shared): it waits to be rung.
    async fn waiters_registered(&mut self) -> Result<bool, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT NOT pg_catalog.pg_try_advisory_xact_lock($1, pg_catalog.hashtext($2))",
        )
        .bind(WAITER_LOCK)
        .bind(self.channel)
        .fetch_one(&mut *self.listener)
        .await
    }

    /// Sets the flag the trigger reads; only while this session holds the sleeper lock.
    async fn set_flag(&mut self, sequence: i64, value: i64) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT pg_catalog.setval($1::bigint::oid::pg_catalog.regclass, $2)")
            .bind(sequence)
            .bind(value)
            .execute(&mut *self.listener)
            .await?;
        Ok(())
    }

    /// One try at the sleeper lock; CASE evaluates its branches in order.
    async fn try_sleeper(&mut self) -> Result<Try, sqlx::Error> {
        let found: String = sqlx::query_scalar(
            "SELECT CASE \
               WHEN pg_catalog.pg_try_advisory_lock($1, pg_catalog.hashtext($3)) THEN \
                 CASE WHEN pg_catalog.pg_try_advisory_xact_lock($2, pg_catalog.hashtext($3)) \
                      THEN 'taken' ELSE 'taken, waiters' END \
               WHEN pg_catalog.pg_try_advisory_lock_shared($1, pg_catalog.hashtext($3)) THEN \
                 CASE WHEN pg_catalog.pg_advisory_unlock_shared($1, pg_catalog.hashtext($3)) \
                      THEN 'writers' ELSE 'writers' END \
               ELSE 'relay' END",
        )
        .bind(SLEEPER_LOCK)
        .bind(WAITER_LOCK)
        .bind(self.channel)
        .fetch_one(&mut *self.listener)
        .await?;
        Ok(match found.as_str() {
            "taken" => Try::Taken { waiters: false },
            "taken, waiters" => Try::Taken { waiters: true },
            "writers" => Try::Writers,
            _ => Try::Relay,
        })
    }

    async fn wake(&mut self) -> Result<(), sqlx::Error> {
        match self.held {
            Held::Nothing => {}
            Held::Waiter => {
                self.call("pg_advisory_unlock_shared", WAITER_LOCK).await?;
            }
            Held::Sleeper => {
                if let Some(sequence) = self.lowers_flag.take() {
                    self.set_flag(sequence, 0).await?;
                }
                let waiters: bool = sqlx::query_scalar(
                    "SELECT CASE WHEN pg_catalog.pg_advisory_unlock($1, pg_catalog.hashtext($3)) \
                                 THEN NOT pg_catalog.pg_try_advisory_xact_lock($2, pg_catalog.hashtext($3)) \
                                 ELSE NOT pg_catalog.pg_try_advisory_xact_lock($2, pg_catalog.hashtext($3)) END",
                )
                .bind(SLEEPER_LOCK)
                .bind(WAITER_LOCK)
                .bind(self.channel)
                .fetch_one(&mut *self.listener)
                .await?;
                if waiters {
                    self.ring().await?;
                }
            }
        }
        self.held = Held::Nothing;
        Ok(())
    }

    /// Rings every replica listening on the channel (this session ignores its own).
    async fn ring(&mut self) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT pg_catalog.pg_notify($1, '')")
            .bind(self.channel)
            .execute(&mut *self.listener)
            .await?;
        Ok(())
    }

    /// Calls one of PostgreSQL's advisory lock functions (`pg_try_advisory_lock_shared`,
    /// `pg_advisory_unlock_shared`) on `key` and the channel.
    async fn call(&mut self, function: &str, key: i32) -> Result<bool, sqlx::Error> {
        sqlx::query_scalar(&format!(
            "SELECT pg_catalog.{function}($1, pg_catalog.hashtext($2))"
        ))
        .bind(key)
        .bind(self.channel)
        .fetch_one(&mut *self.listener)
        .await
    }
}

/// A LISTEN session holding no advisory lock, its backend's pid, and the OID of `table`.
async fn connect(
    pool: &PgPool,
    channel: &str,
    table: &str,
) -> Result<(PgListener, u32, i64), sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    // A lost connection ends this session (and its locks); a new one is made by `listen`.
    listener.eager_reconnect(false);
    listener.listen(channel).await?;
    let (pid, table): (i32, Option<i64>) = sqlx::query_as(
        "SELECT pg_catalog.pg_backend_pid(), pg_catalog.to_regclass($1)::oid::bigint \
         FROM (SELECT pg_catalog.pg_advisory_unlock_all()) AS none",
    )
    .bind(table)
    .fetch_one(&mut listener)
    .await?;
    let table = table
        .ok_or_else(|| sqlx::Error::Protocol(format!("the outbox table {table:?} is gone")))?;
    Ok((listener, pid.unsigned_abs(), table))
}
