//! The doorbell: a LISTEN session that wakes the relay when a writer rings, and that tells
//! writers whether to ring at all. Writers ring only while a relay sleeps: before it
//! sleeps the relay takes an advisory lock on this session, and the notify trigger rings
//! only when it cannot take the same lock shared. A writer that took it shared holds it
//! until its commit is visible, so once the relay holds the lock, every row of a writer
//! that did not ring is visible to the read the relay makes next. A lost ring (a dropped
//! connection) costs at most one poll interval: on reconnect the doorbell rings once.
//!
//! With several replicas one sleeps on the lock; the others register as waiters (a second
//! lock, shared), read once more, and are rung by the sleeper whenever it takes or leaves
//! the lock, so rows committed without a ring are read by every replica.
//!
//! The trigger is opt-in (`migrate --notify-trigger on`): while the catalog shows none on
//! the relay's channel, the relay takes none of these locks and polls.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::{Instant, sleep, timeout};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::model::Backoff;
use crate::store::{DOORBELL_LOCK, Store};
use crate::telemetry::{DoorbellRang, emit};

/// The lock a sleeping replica holds; the notify trigger (migration 9, adopted tables) tries
/// it shared. The second key is `hashtext(channel)`, so relays on other channels never meet.
const SLEEPER_LOCK: i32 = DOORBELL_LOCK;
/// The lock replicas hold shared while another replica sleeps.
const WAITER_LOCK: i32 = DOORBELL_LOCK + 1;

/// How long the relay waits for the doorbell session to answer before polling without
/// it, and how long a statement on that session may take before it is dropped.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// How long an idle relay trusts what it last read of the trigger: one installed or removed
/// while it runs is seen within this (polling covers the meantime).
const TRIGGER_RECHECK: Duration = Duration::from_secs(10);

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
    channel: Arc<str>,
}

impl Doorbell {
    /// Whether writers ring on this doorbell's channel, read from the catalog.
    pub(crate) fn trigger_watch(&self) -> TriggerWatch {
        TriggerWatch {
            channel: self.channel.clone(),
            installed: false,
            checked: None,
        }
    }

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

/// Whether a doorbell trigger notifies the relay's channel, as the catalog said at most
/// [`TRIGGER_RECHECK`] ago. Without one no writer rings, so taking the doorbell's locks
/// before each sleep would cost two statements per poll for nothing.
pub(crate) struct TriggerWatch {
    channel: Arc<str>,
    installed: bool,
    checked: Option<Instant>,
}

impl TriggerWatch {
    /// Whether the relay should ask the doorbell to sleep rather than just poll. A catalog
    /// that cannot be read leaves the last answer standing until the next check.
    pub(crate) async fn installed(&mut self, store: &Store) -> bool {
        if self
            .checked
            .is_some_and(|checked| checked.elapsed() < TRIGGER_RECHECK)
        {
            return self.installed;
        }
        self.checked = Some(Instant::now());
        match timeout(ANSWER_TIMEOUT, store.doorbell_trigger()).await {
            Err(_) => {
                debug!("the doorbell trigger could not be read in time; going by the last reading")
            }
            Ok(Ok(trigger)) => {
                let installed = trigger.is_some_and(|t| *t.channel == *self.channel);
                if installed != self.installed {
                    if installed {
                        info!(channel = %self.channel, "doorbell trigger found: an idle relay sleeps until a writer rings");
                    } else {
                        info!(channel = %self.channel, "no doorbell trigger on this channel: the idle relay polls");
                    }
                }
                self.installed = installed;
            }
            Ok(Err(err)) => {
                debug!(error = %err, "could not read the doorbell trigger; going by the last reading")
            }
        }
        self.installed
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

/// The doorbell task and the relay's handle on it.
pub(crate) fn doorbell(
    pool: PgPool,
    channel: String,
    wake: Arc<Notify>,
    cancel: CancellationToken,
) -> (Doorbell, impl Future<Output = ()> + Send + 'static) {
    let (commands, received) = mpsc::unbounded_channel();
    (
        Doorbell {
            commands,
            channel: channel.as_str().into(),
        },
        listen(pool, channel, wake, received, cancel),
    )
}

/// Listens on `channel` until `cancel`, ringing `wake` for every notification another
/// session sends, and taking or releasing the doorbell's locks as the relay asks.
async fn listen(
    pool: PgPool,
    channel: String,
    wake: Arc<Notify>,
    mut commands: mpsc::UnboundedReceiver<Command>,
    cancel: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_secs(30));
    while !cancel.is_cancelled() {
        let connected = tokio::select! {
            _ = cancel.cancelled() => return,
            connected = timeout(ANSWER_TIMEOUT * 5, connect(&pool, &channel)) => connected,
        };
        let (mut listener, pid) = match connected {
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

    /// This session took the sleeper lock: replicas waiting for one read once more.
    async fn armed(&mut self, waiters: bool) -> Result<Sleep, sqlx::Error> {
        self.held = Held::Sleeper;
        if waiters {
            self.ring().await?;
        }
        Ok(Sleep::Armed)
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

/// A LISTEN session holding no advisory lock, and its backend's pid.
async fn connect(pool: &PgPool, channel: &str) -> Result<(PgListener, u32), sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    // A lost connection ends this session (and its locks); a new one is made by `listen`.
    listener.eager_reconnect(false);
    listener.listen(channel).await?;
    let pid: i32 = sqlx::query_scalar(
        "SELECT pg_catalog.pg_backend_pid() FROM (SELECT pg_catalog.pg_advisory_unlock_all()) AS none",
    )
    .fetch_one(&mut listener)
    .await?;
    Ok((listener, pid.unsigned_abs()))
}
