//! The doorbell: a LISTEN session that wakes the relay when a writer rings, and that tells
//! writers whether to ring at all. Writers ring only while the relay sleeps: before it
//! sleeps the relay takes an advisory lock on this session, and the notify trigger rings
//! only when it cannot take the same lock shared. A writer that took it shared holds it
//! until its commit is visible, so once the relay holds the lock, every row of a writer
//! that did not ring is visible to the poll the relay makes next. A lost ring (a dropped
//! connection) costs at most one poll interval: on reconnect the doorbell rings once.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::sleep;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::model::Backoff;
use crate::store::DOORBELL_LOCK;
use crate::telemetry::{DoorbellRang, emit};

/// The advisory lock's first key, the same in the notify trigger (migration 9 and adopted
/// tables); the second is `hashtext(channel)`, so relays on other channels do not meet.
const SLEEPER_LOCK: i32 = DOORBELL_LOCK;
/// The lock replicas hold shared while they wait for another replica, the sleeper, to
/// wake: the sleeper rings for them when it wakes, so one of them can take its place.
const WAITER_LOCK: i32 = SLEEPER_LOCK + 1;

/// What the relay may do after asking to sleep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sleep {
    /// This replica now holds the sleeper lock: writers ring from here on. Poll once more
    /// (rows committed before the lock are visible to it), then wait for a ring.
    Armed,
    /// Already armed and the poll after arming found nothing: wait for a ring or the poll
    /// interval.
    Asleep,
    /// A writer still committing holds the lock: look again shortly.
    Busy,
    /// Another replica sleeps, and rings for this one when it wakes: wait for a ring or
    /// the poll interval.
    Waiting,
    /// No doorbell session: poll at the poll interval.
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
    /// Asks to sleep; `Off` when the doorbell session is down.
    pub(crate) async fn sleep(&self) -> Sleep {
        let (reply, answer) = oneshot::channel();
        if self.commands.send(Command::Sleep(reply)).is_err() {
            return Sleep::Off;
        }
        answer.await.unwrap_or(Sleep::Off)
    }

    /// The relay is awake: writers stop ringing. Does not wait.
    pub(crate) fn wake(&self) {
        let _ = self.commands.send(Command::Wake);
    }
}

/// Where this session stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    Nothing,
    /// The sleeper lock, exclusively.
    Sleeper,
    /// The waiter lock, shared.
    Waiter,
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
        Doorbell { commands },
        listen(pool, channel, wake, received, cancel),
    )
}

/// Listens on `channel` until `cancel`, ringing `wake` for every notification and taking
/// or releasing the sleeper lock as the relay asks.
async fn listen(
    pool: PgPool,
    channel: String,
    wake: Arc<Notify>,
    mut commands: mpsc::UnboundedReceiver<Command>,
    cancel: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_secs(30));
    while !cancel.is_cancelled() {
        let mut listener = match connect(&pool, &channel).await {
            Ok(listener) => listener,
            Err(err) => {
                let delay = backoff.next_delay();
                warn!(error = %err, retry_in = ?delay, "LISTEN connection failed; polling covers the gap");
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
        // Anything committed while we were not listening is found by this poll.
        wake.notify_one();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                received = session.listener.try_recv() => match received {
                    Ok(Some(_)) => {
                        backoff.reset();
                        emit(DoorbellRang);
                        wake.notify_one();
                    }
                    Ok(None) => {
                        // The session was lost, and its locks with it; the next try_recv
                        // reconnects and listens again.
                        warn!("LISTEN connection lost; reconnecting");
                        session.held = Held::Nothing;
                        wake.notify_one();
                    }
                    Err(err) => {
                        warn!(error = %err, "LISTEN connection failed; reconnecting");
                        wake.notify_one();
                        break;
                    }
                },
                Some(command) = commands.recv() => {
                    let done = match command {
                        Command::Sleep(reply) => session.sleep().await.map(|sleep| {
                            let _ = reply.send(sleep);
                        }),
                        Command::Wake => session.wake().await,
                    };
                    if let Err(err) = done {
                        warn!(error = %err, "the doorbell session failed; reconnecting");
                        wake.notify_one();
                        break;
                    }
                }
            }
        }
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
    async fn sleep(&mut self) -> Result<Sleep, sqlx::Error> {
        match self.held {
            Held::Sleeper => Ok(Sleep::Asleep),
            Held::Waiter => self.take_sleeper().await,
            Held::Nothing => {
                if self.try_lock("pg_try_advisory_lock", SLEEPER_LOCK).await? {
                    self.held = Held::Sleeper;
                    return Ok(Sleep::Armed);
                }
                // Wait as a waiter, then try once more: a sleeper that woke between the
                // two tries left the lock free; one that wakes later sees this waiter.
                if self
                    .try_lock("pg_try_advisory_lock_shared", WAITER_LOCK)
                    .await?
                {
                    self.held = Held::Waiter;
                }
                self.take_sleeper().await
            }
        }
    }

    async fn take_sleeper(&mut self) -> Result<Sleep, sqlx::Error> {
        // pg_locks shows every database's locks, and the two keys as classid, objid
        // (unsigned) and objsubid 2.
        let (took, other_sleeper): (bool, bool) = sqlx::query_as(
            "SELECT pg_catalog.pg_try_advisory_lock($1, pg_catalog.hashtext($2)), \
                    EXISTS (SELECT FROM pg_catalog.pg_locks \
                            WHERE locktype = 'advisory' AND objsubid = 2 AND granted \
                              AND database = (SELECT oid FROM pg_catalog.pg_database \
                                              WHERE datname = pg_catalog.current_database()) \
                              AND mode = 'ExclusiveLock' AND pid <> pg_catalog.pg_backend_pid() \
                              AND classid = $1::int8::oid \
                              AND objid = (pg_catalog.hashtext($2)::int8 & 4294967295)::oid)",
        )
        .bind(SLEEPER_LOCK)
        .bind(self.channel)
        .fetch_one(&mut *self.listener)
        .await?;
        if !took {
            return Ok(if other_sleeper {
                Sleep::Waiting
            } else {
                Sleep::Busy
            });
        }
        if self.held == Held::Waiter {
            self.unlock("pg_advisory_unlock_shared", WAITER_LOCK)
                .await?;
        }
        self.held = Held::Sleeper;
        Ok(Sleep::Armed)
    }

    async fn wake(&mut self) -> Result<(), sqlx::Error> {
        match self.held {
            Held::Nothing => return Ok(()),
            Held::Waiter => {
                self.unlock("pg_advisory_unlock_shared", WAITER_LOCK)
                    .await?
            }
            Held::Sleeper => {
                self.unlock("pg_advisory_unlock", SLEEPER_LOCK).await?;
                // Replicas waiting for this one to wake hold the waiter lock shared.
                sqlx::query(
                    "SELECT pg_catalog.pg_notify($1, '') \
                     WHERE NOT pg_catalog.pg_try_advisory_xact_lock($2, pg_catalog.hashtext($1))",
                )
                .bind(self.channel)
                .bind(WAITER_LOCK)
                .execute(&mut *self.listener)
                .await?;
            }
        }
        self.held = Held::Nothing;
        Ok(())
    }

    async fn try_lock(&mut self, function: &str, key: i32) -> Result<bool, sqlx::Error> {
        sqlx::query_scalar(&format!(
            "SELECT pg_catalog.{function}($1, pg_catalog.hashtext($2))"
        ))
        .bind(key)
        .bind(self.channel)
        .fetch_one(&mut *self.listener)
        .await
    }

    async fn unlock(&mut self, function: &str, key: i32) -> Result<(), sqlx::Error> {
        let released: bool = self.try_lock(function, key).await?;
        if !released {
            warn!(
                key,
                "the doorbell's advisory lock was not held by this session"
            );
        }
        Ok(())
    }
}

async fn connect(pool: &PgPool, channel: &str) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(channel).await?;
    Ok(listener)
}
